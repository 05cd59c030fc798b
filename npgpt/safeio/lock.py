"""Run folder locks: an OS advisory lock (`flock`) on `FOLDER/.npgpt.lock`, held by train/finetune/prepare
for their whole life; a second writer fails at once with the holder's PID. The lock goes with the
process, so a crash or kill -9 never leaves a stale lock behind.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from npgpt.errors import NpgptError

LOCK_FILE = ".npgpt.lock"

@contextmanager
def run_lock(folder, command: str = "npgpt"):
    """Hold an exclusive OS lock on `folder` (created if needed) for the life of the block.

    A second holder, in this or another process, fails at once with an NpgptError naming the first
    holder's PID. The lock file is removed on release (checked by inode on taking it, so a file
    removed meanwhile is never trusted). Where `fcntl` does not exist (Windows) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:                    # pragma: no cover - Windows
        yield None
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NpgptError(f"{folder} is a file; give a folder")
    path = folder / LOCK_FILE
    for _ in range(20):
        fd = _open_lock_file(folder, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise NpgptError(f"{folder} is in use by {holder}; wait for it to finish or choose another folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)                        # the holder removed the file as we opened it: take a fresh one
    else:                                   # pragma: no cover - needs a lock race twenty times over
        raise NpgptError(f"cannot take the lock {path}; try again")
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} npgpt {command}\n".encode(), 0)
        except OSError:
            pass                            # the lock holds even if its note cannot be written
        yield path
    finally:
        try:
            os.unlink(path)                 # still locked: nobody can take this inode meanwhile
        except OSError:
            pass
        os.close(fd)                        # closing releases the lock


def _open_lock_file(folder: Path, path: Path) -> int:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise NpgptError(f"{folder} is not writable ({e.strerror or e}); choose another folder") from None


def _lock_holder(fd: int) -> str:
    try:
        note = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        note = []
    who = f"PID {note[0]}" if note and note[0].isdigit() else "another process"
    return who + (f" ({' '.join(note[1:])})" if len(note) > 1 else "")
