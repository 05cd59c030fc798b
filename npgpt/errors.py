"""User-facing errors.

Every mistake a user can make (bad device string, bad file, bad config value) raises an
`NpgptError` with a one-line message saying what was wrong and what to do. The CLI turns these
into a clean `Error: ...` line and a non-zero exit, never a traceback.
"""


class NpgptError(Exception):
    """A problem with the user's input or environment, explained in one line."""
