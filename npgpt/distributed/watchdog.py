"""The watchdog of a launched job: a collective that waits too long, or a launcher that has gone, ends
this process, so a dead or hung peer never leaves the other ranks blocked forever.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

from npgpt.errors import NpgptError

DEFAULT_TIMEOUT_S = 300.0     # a collective waiting longer than this ends the job (NPGPT_DIST_TIMEOUT)


class Watchdog:
    """Ends this process when one collective has waited longer than `timeout_s`, or when its
    launcher has gone (the parent process changed): a peer that was killed, crashed or hangs must
    not leave the other ranks blocked forever. The launcher then sees this rank vanish and ends the
    rest. timeout_s: None reads $NPGPT_DIST_TIMEOUT (default 300 s); 0 disables the timeout.
    """

    def __init__(self, timeout_s=None, poll_s=1.0):
        if timeout_s is None:
            try:
                timeout_s = float(os.environ.get("NPGPT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
            except ValueError:
                raise NpgptError("NPGPT_DIST_TIMEOUT must be a number of seconds") from None
        self.timeout_s, self.poll_s = float(timeout_s), poll_s
        self.parent = os.getppid()
        self._since, self._what = None, ""
        self._thread = None

    @contextmanager
    def waiting(self, what):
        """Mark the enclosed block as a collective wait (cheap: two assignments)."""
        if self._thread is None:
            self._start()
        self._since, self._what = time.monotonic(), what
        try:
            yield
        finally:
            self._since = None

    def _start(self):
        self._thread = threading.Thread(target=self._run, name="npgpt-dist-watchdog", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            time.sleep(self.poll_s)
            since = self._since
            if os.getppid() != self.parent:
                self._end("the launcher has gone")
            if since is not None and self.timeout_s > 0 and time.monotonic() - since > self.timeout_s:
                self._end(f"waited more than {self.timeout_s:.0f} s in a collective ({self._what}): another rank "
                          f"has stopped or hangs (NPGPT_DIST_TIMEOUT sets the limit)")

    def _end(self, why):
        try:
            print(f"Error: {why}; ending the job", file=sys.stderr, flush=True)
        finally:
            os._exit(1)
