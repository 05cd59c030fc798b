"""What the example programs (lessons, apps, benchmark scripts) share with the CLI: the same one-line errors.

A program checks each value where argparse reads it, with the types below (a bad value is argparse's
one `error:` line after the usage, exit status 2, as click's usage errors), and runs its main through
`run`, which ends it on an NpgptError, an OSError or a failed claim (`ClaimFailed`, what a lesson's
`check` raises) with one `Error: ...` line and exit status 1, no traceback, as `npgpt` does:

    p.add_argument("--steps", type=positive_int)
    p.add_argument("--text", type=text_file)
    p.add_argument("--out", type=out_dir)
    ...
    if __name__ == "__main__":
        run(main)

Nothing here allocates or trains: a bad argument ends the program before any work starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from npgpt.errors import NpgptError
from npgpt.fileio import make_dir


class ClaimFailed(AssertionError):
    """A lesson's or app's claim did not hold (its `check`): a test failure to pytest, one line to `run`."""


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, ranks, a LoRA rank, iterations)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def existing_path(text: str) -> str:
    """A file or folder that exists (a checkpoint, a model folder, a GGUF file)."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist; check the path")
    return text


def existing_file(text: str) -> str:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist; check the path")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text


def text_file(text: str) -> str:
    """A readable UTF-8 text file that is not empty (whether it is long enough, the program says)."""
    existing_file(text)
    try:
        with open(text, encoding="utf-8") as f:
            if not f.read(1):
                raise argparse.ArgumentTypeError(f"{text} is empty; give a text to train on")
    except UnicodeDecodeError:
        raise argparse.ArgumentTypeError(f"{text} is not UTF-8 text") from None
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text} ({e.strerror or e})") from None
    return text


def out_dir(text: str) -> str:
    """A folder for outputs, created now: a file in the way or a place that cannot be written is
    refused before any work starts."""
    try:
        folder = make_dir(text)
    except NpgptError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} is not writable; choose a writable place")
    return text


def need_tokens(n_tokens: int, block: int, what: str = "the text") -> None:
    """NpgptError unless a token sequence can give training windows of `block` tokens (a window needs
    block + 1 tokens, and a random start needs one more)."""
    if n_tokens < block + 2:
        raise NpgptError(f"{what} is {n_tokens:,} token{'' if n_tokens == 1 else 's'} long, too short for training windows of {block} tokens "
                         f"(at least {block + 2} are needed); give a longer --text")


def run(main, argv=None) -> None:
    """Call `main(argv)` (or `main()`) as a program: an NpgptError or OSError ends it with one
    `Error:` line on stderr and exit status 1; its own return value is the exit status (None: 0)."""
    try:
        code = main(argv) if argv is not None else main()
    except NpgptError as e:
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except ClaimFailed as e:
        print(f"Error: the claim \"{e}\" did not hold on this run (a --text unlike the default, or fewer "
              f"--steps, can break it)", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"Error: {where}{e.strerror or e}; check the path, free space and permissions", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) and not isinstance(code, bool) else 0)
