"""Atomic file writes: the one writer every floor above uses (model, tokenizer, data, checkpoint).

Every file npgpt writes goes through a temporary file in the same folder, is flushed and fsynced,
moved over the final name with `os.replace`, and then the folder itself is fsynced, so a crash or a
full disk leaves either the old file or the whole new one, never a part, and the rename survives a
power cut. `write_files_atomically` does the same for a set of files that belong together (a
tokenizer's files): all of them are in place, or none is replaced.

Before writing, the target is looked at (`_resolve_target`): a new name or a regular file is replaced
atomically and keeps the permissions it had (a new file gets the ones the umask allows, as `open`
would give it); a character device or a FIFO (`/dev/stdout`, `/dev/null`, a pipe) is written
through, never renamed over; a symbolic link is followed when it leads to a regular file in the
same folder; anything else (a folder, a socket, a block device, a link out of the folder) is
refused with one line, so npgpt never turns a device or a link into a plain file.

This module sits just above `backend` (it needs only `errors`), so `model.save_pretrained` can use
it as well as `checkpoint`, `data` and `tokenizer`.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from npgpt.errors import NpgptError


def fsync_dir(folder) -> None:
    """Make a rename or new file inside `folder` durable (no-op where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_error(path, e: OSError) -> NpgptError:
    return NpgptError(f"cannot write {path} ({e.strerror or e}); check free space and permissions")


def _remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (reading it means setting it, so briefly and under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def make_dir(path) -> Path:
    """Create folder `path` (and its parents) for output, or NpgptError in one line: a file in the way,
    a read-only or missing place, no permission."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NpgptError(f"{path} (or a folder above it) is a file, not a folder; give a folder path") from None
    except NotADirectoryError:
        raise NpgptError(f"{path}: a part of the path above it is a file, not a folder; give a folder path") from None
    except OSError as e:
        raise NpgptError(f"cannot create folder {path} ({e.strerror or e}); choose a writable place") from None
    return path


def _resolve_target(path: Path) -> tuple[str, Path]:
    """("file", where to replace atomically) or ("stream", what to write through); refuse the rest."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "file", path
    except OSError as e:
        raise write_error(path, e) from None
    if stat.S_ISREG(st.st_mode):
        return "file", path
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return "stream", path
    if stat.S_ISLNK(st.st_mode):
        try:
            rst = os.stat(path)                  # follows /proc's magic links too (/dev/stdout -> pipe:[N])
        except (OSError, RuntimeError):
            raise NpgptError(f"{path} is a broken or looping symbolic link; remove it or write elsewhere") from None
        if stat.S_ISCHR(rst.st_mode) or stat.S_ISFIFO(rst.st_mode):
            return "stream", path                # /dev/stdout, /dev/fd/N, a link to a pipe
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise NpgptError(f"{path} is a broken or looping symbolic link; remove it or write elsewhere") from None
        if stat.S_ISREG(rst.st_mode) and real.parent == path.parent.resolve():
            return "file", real                  # replace the file the link names; the link stays
        raise NpgptError(f"{path} is a symbolic link to {real}, outside its folder; npgpt does not write "
                         "through it: remove the link or give the real path")
    kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file, character device or FIFO"
    raise NpgptError(f"{path} is {kind}; npgpt will not replace it: give a file path")


def _temp_next_to(path: Path) -> Path:
    make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600: give the result the mode the file had, or the umask's.
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = 0o666 & ~current_umask()
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path` for the caller to write; on success fsync it, move it
    onto `path` and fsync the folder. On any error the temporary file is removed. A character device
    or FIFO target is written through instead (see the module docstring)."""
    kind, path = _resolve_target(Path(path))
    if kind == "stream":
        try:
            yield path                           # the caller opens and writes the device itself
        except OSError as e:
            raise write_error(path, e) from None
        return
    try:
        tmp = _temp_next_to(path)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise write_error(path, e) from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(path.parent)


def open_log(path, append: bool = True, encoding: str = "utf-8"):
    """Open a log that grows line by line (metrics.jsonl, a request log, a progress file) by the same
    rules as the atomic writers: a new name or a regular file (through a link to one in the same
    folder) is opened to append (or truncated, `append=False`); a character device or FIFO
    (`/dev/stdout`) is written through; a folder, a socket or a link out of the folder is refused."""
    kind, target = _resolve_target(Path(path))
    mode = "a" if append or kind == "stream" else "w"
    try:
        return open(target, mode, encoding=encoding)       # noqa: SIM115 (the caller closes it)
    except OSError as e:                                   # a missing folder too: a log names an existing place
        raise write_error(path, e) from None


def check_replaceable(path) -> Path:
    """For writers that move a finished file into place themselves (`os.replace` of a file made
    aside): NpgptError unless `path` is absent or a regular file (not a link, a device, a FIFO), so
    a rename never turns a device or a link into a plain file."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise write_error(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) \
            else "a device, FIFO or socket"
        raise NpgptError(f"{path} is {what}, not a regular file; npgpt will not replace it: remove it or "
                         f"write elsewhere")
    return path


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text (newlines written as given)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj):
    # NumPy scalars and arrays turn up in metrics and configs; JSON knows their Python equivalents.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path, obj) -> None:
    """Write `obj` as indented JSON, atomically. Infinity/NaN are allowed (Python's json reads them)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_files_atomically(folder, files: dict[str, str]) -> None:
    """Write `{file name: text}` into `folder` (created if needed): all files, or none of them."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NpgptError(f"{folder} is a file, not a folder; give a folder path to save into")
    written: list[tuple[Path, Path]] = []
    try:
        for name, text in files.items():
            kind, final = _resolve_target(folder / name)
            if kind == "stream":
                raise NpgptError(f"{final} is a device or FIFO, not a file; these files are written "
                                 "together: give a folder without it")
            tmp = _temp_next_to(final)
            written.append((tmp, final))
            tmp.write_bytes(text.encode("utf-8"))
            _fsync_file(tmp)
        for tmp, final in written:
            os.replace(tmp, final)
    except OSError as e:
        for tmp, _ in written:
            _remove_quietly(tmp)
        raise NpgptError(f"cannot write to {folder} ({e.strerror or e}); check free space and permissions") from None
    except BaseException:
        for tmp, _ in written:
            _remove_quietly(tmp)
        raise
    fsync_dir(folder)
