"""Reading untrusted files: one safe reader per file kind, small schemas, paths, locks, tensors.

Every file npgpt reads from disk may come from a stranger (a downloaded model folder, a shared data
folder), so nothing in one is trusted before it is checked. This module is the one place that does
the checking; loaders above it (model, tokenizer, checkpoint, data, SFT) call it and add what only
they know (a config must match the tensors present, an id must be below the vocabulary size).

JSON (`read_json`, `parse_json`)
    Size limit before reading, nesting-depth limit before parsing (Python's parser recurses), at most
    `MAX_INT_DIGITS` digits in an integer, no NaN/Infinity constants and no float that overflows to
    infinity (`1e999`), no duplicate keys. Any violation is an `NpgptError` naming the file.

Schemas (`Int`, `Float`, `Str`, `Bool`, `Obj`, `List`, `check`)
    `check(obj, {"step": Int(lo=0), "lr": Float(lo=0)}, where)` returns the checked values; an error
    names the file and the field (`state.json: field 'step' must be ...`). A bool is never an int.

Paths (`inside`)
    `inside(folder, name)` is `folder/name` when it resolves (symlinks followed) inside `folder`.

Run folder locks (`run_lock`)
    An OS advisory lock (`flock`) on `FOLDER/.npgpt.lock`, held by train/finetune/prepare for their
    whole life; a second writer fails at once with the holder's PID. The lock goes with the process,
    so a crash or kill -9 never leaves a stale lock behind.

safetensors (`read_safetensors_header`, `load_safetensors`)
    The 8-byte header length and the JSON header are read and checked against the file size (dtypes,
    shapes, offsets inside the data area and not overlapping, bytes = elements x itemsize) before a
    single array is allocated, so a header cannot make npgpt allocate more than the file holds.
    Tensors are then read with NumPy; BF16 and F16 are upcast to float32 (bfloat16 is the top half of
    a float32, so the upcast is a 16-bit shift).

Numbers (`finite`, `check_finite_tensors`)
    NaN and infinity are refused in options and in loaded weights.

TOML (`read_toml`)
    `tomllib` under the same size limit, then the same depth/finite checks as JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from npgpt.errors import NpgptError
from npgpt.fileio import atomic_path, write_error

MAX_JSON_BYTES = 64 << 20          # GPT-2's vocab.json is 1 MB; tokenizer.json files run to ~20 MB
MAX_DEPTH = 64                     # no npgpt or Hugging Face file nests deeper than a handful
MAX_INT_DIGITS = 40                # 128-bit PCG64 state words have 39 digits
MAX_HEADER_BYTES = 100 << 20       # the safetensors library's own limit
LOCK_FILE = ".npgpt.lock"


# ----------------------------------------------------------------------------------------- JSON

def _short(value, n=60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


def read_limited(path, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file (or pipe) at `path`, refusing anything over `max_bytes`."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NpgptError(f"{what} {path} does not exist; check the path") from None
    except OSError as e:
        raise NpgptError(f"cannot read {what} {path} ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise NpgptError(f"{what} {path} is a folder; give the path of a file")
    if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
        raise NpgptError(f"{what} {path} is {st.st_size:,} bytes, more than the {max_bytes:,} allowed; "
                         f"it is not a file npgpt wrote")
    try:
        with open(path, "rb") as f:
            # in chunks: f.read(max_bytes + 1) would reserve the whole limit up front
            chunks, n = [], 0
            while n <= max_bytes:
                chunk = f.read(min(1 << 20, max_bytes + 1 - n))
                if not chunk:
                    break
                chunks.append(chunk)
                n += len(chunk)
            data = b"".join(chunks)
    except OSError as e:
        raise NpgptError(f"cannot read {what} {path} ({e.strerror or e}); check its permissions") from None
    if len(data) > max_bytes:
        raise NpgptError(f"{what} {path} is more than the {max_bytes:,} bytes allowed; it is not a file npgpt wrote")
    return data


def _json_depth(text: str) -> int:
    """Deepest nesting of [ and { outside strings (a linear scan; strings are skipped by regex)."""
    depth = deepest = 0
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', text):
        c = m.group()
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _parse_int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer with {len(s.lstrip('-'))} digits (at most {MAX_INT_DIGITS} allowed)")
    return int(s)


def _parse_float(s: str) -> float:
    x = float(s)
    if not math.isfinite(x):
        raise ValueError(f"the number {s[:40]} is out of range")
    return x


def _parse_constant(s: str):
    raise ValueError(f"{s} is not a number JSON allows")


def _infinity_only(s: str):
    if s == "NaN":
        raise ValueError("NaN is not a number npgpt reads")
    return float(s)


def _no_duplicates(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"the key {_short(k)} appears twice")
            seen.add(k)
    return obj


def parse_json(data: bytes | str, where: str, max_depth: int = MAX_DEPTH, allow_infinity: bool = False):
    """Parse JSON text under the limits above; NpgptError naming `where` on any problem.

    `allow_infinity` accepts the constants Infinity/-Infinity (Python's json.dumps writes them for
    float('inf'), e.g. a best loss not measured yet); NaN is refused always."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise NpgptError(f"{where} is not UTF-8 text (byte {e.start}); it is damaged or not JSON") from None
    if _json_depth(text) > max_depth:
        raise NpgptError(f"{where} is damaged: it nests deeper than {max_depth} levels")
    try:
        obj = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_infinity_only if allow_infinity else _parse_constant,
                          object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise NpgptError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         f"the file is damaged") from None
    except (ValueError, RecursionError, OverflowError) as e:
        raise NpgptError(f"{where} is damaged: {str(e)[:100] or type(e).__name__}") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
        raise NpgptError(f"{where} is damaged: a string holds a lone surrogate (a \\udXXX escape), which is not text")
    return obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(obj) -> bool:
    """Whether a string (or key) anywhere in a parsed document holds an unpaired surrogate."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


def read_json(path, what: str = "file", max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH,
              allow_infinity: bool = False):
    """The parsed JSON of the file at `path` (see the module docstring for the limits)."""
    return parse_json(read_limited(path, what, max_bytes), str(path), max_depth, allow_infinity)


def read_jsonl(path, what: str = "file", max_bytes: int = MAX_JSON_BYTES):
    """[(where, record)] of a JSON Lines file: one value per non-blank line, each under the JSON
    limits above; `where` ("PATH line N") names the line for the caller's own checks."""
    path = Path(path)
    try:
        lines = read_limited(path, what, max_bytes).decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise NpgptError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    return [(f"{path} line {n}", parse_json(line, f"{path} line {n}"))
            for n, line in enumerate(lines, 1) if line.strip()]


def read_json_object(path, what: str = "file", **limits) -> dict:
    """`read_json`, which must give an object (`{...}`)."""
    obj = read_json(path, what, **limits)
    if not isinstance(obj, dict):
        raise NpgptError(f"{path} must hold a JSON object {{...}}, not {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------------------- TOML

def _check_tree(obj, where, depth=0):
    if depth > MAX_DEPTH:
        raise NpgptError(f"{where} nests deeper than {MAX_DEPTH} levels")
    if isinstance(obj, float) and not math.isfinite(obj):
        raise NpgptError(f"{where} holds {obj}; numbers must be finite")
    if isinstance(obj, int) and not isinstance(obj, bool) and len(str(abs(obj))) > MAX_INT_DIGITS:
        raise NpgptError(f"{where} holds an integer with more than {MAX_INT_DIGITS} digits")
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    for v in children:
        _check_tree(v, where, depth + 1)


def read_toml(path, what: str = "config file", max_bytes: int = 1 << 20) -> dict:
    """A TOML file as a dict, under a size limit, with finite numbers only."""
    try:
        import tomllib                   # here, not at the top: Python 3.10 has none
    except ImportError:                  # pragma: no cover - Python 3.10
        raise NpgptError("TOML config files need Python 3.11+; use a JSON file instead") from None

    data = read_limited(path, what, max_bytes)
    try:
        obj = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise NpgptError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise NpgptError(f"{what} {path} is not valid TOML ({e})") from None
    except (ValueError, RecursionError) as e:
        raise NpgptError(f"{what} {path} is not usable TOML ({str(e)[:100] or type(e).__name__})") from None
    _check_tree(obj, f"{what} {path}")
    return obj


# ------------------------------------------------------------------------------------ schemas

class _Missing:
    def __repr__(self):
        return "<required>"


REQUIRED = _Missing()


class Spec:
    """One field's type and range; subclasses say what a valid value is."""
    kind = "value"

    def __init__(self, default=REQUIRED):
        self.default = default

    def convert(self, value):          # -> the checked value, or raise ValueError(reason)
        return value


class Int(Spec):
    """An integer (never a bool, never a float) in [lo, hi]."""

    def __init__(self, lo=None, hi=None, default=REQUIRED, none_ok=False):
        super().__init__(default)
        self.lo, self.hi, self.none_ok = lo, hi, none_ok

    def convert(self, value):
        if value is None and self.none_ok:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"must be an integer, got {_short(value)}")
        value = int(value)
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise ValueError(f"must be {_range(self.lo, self.hi)}, got {value}")
        return value


class Float(Spec):
    """A finite number (ints accepted, bools refused) in [lo, hi] (or lo < x when lo_open)."""

    def __init__(self, lo=None, hi=None, default=REQUIRED, lo_open=False, hi_open=False, allow_inf=False):
        super().__init__(default)
        self.lo, self.hi, self.lo_open, self.hi_open, self.allow_inf = lo, hi, lo_open, hi_open, allow_inf

    def convert(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"must be a number, got {_short(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise ValueError("is too large") from None
        if math.isnan(value) or (math.isinf(value) and not self.allow_inf):
            raise ValueError(f"must be a finite number, got {value}")
        lo_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if lo_bad or hi_bad:
            raise ValueError(f"must be {_range(self.lo, self.hi, self.lo_open, self.hi_open)}, got {value}")
        return value


class Str(Spec):
    """A string, optionally one of `choices`, at most `max_len` characters."""

    def __init__(self, choices=None, default=REQUIRED, max_len=None):
        super().__init__(default)
        self.choices, self.max_len = choices, max_len

    def convert(self, value):
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_short(value)}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(repr, self.choices))}, got {_short(value)}")
        if self.max_len is not None and len(value) > self.max_len:
            raise ValueError(f"must be at most {self.max_len} characters")
        return value


class Bool(Spec):
    def convert(self, value):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {_short(value)}")
        return value


class Obj(Spec):
    """A JSON object; with `fields`, checked recursively (unknown keys kept as they are)."""

    def __init__(self, fields=None, default=REQUIRED):
        super().__init__(default)
        self.fields = fields

    def convert(self, value):
        if value is None and self.default is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"must be an object {{...}}, got {_short(value)}")
        return value


class List(Spec):
    """A JSON array, optionally of `item`s, of at most `max_len` entries."""

    def __init__(self, item: Spec | None = None, default=REQUIRED, max_len=None):
        super().__init__(default)
        self.item, self.max_len = item, max_len

    def convert(self, value):
        if not isinstance(value, list):
            raise ValueError(f"must be a list [...], got {_short(value)}")
        if self.max_len is not None and len(value) > self.max_len:
            raise ValueError(f"must have at most {self.max_len} entries, got {len(value)}")
        if self.item is None:
            return value
        out = []
        for i, v in enumerate(value):
            try:
                out.append(self.item.convert(v))
            except ValueError as e:
                raise ValueError(f"entry {i} {e}") from None
        return out


def _range(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"


def check(obj, fields: dict[str, Spec], where: str, prefix: str = "") -> dict:
    """`{name: checked value}` for each field of `fields` in the object `obj` (defaults filled in).

    Raises NpgptError("WHERE: field 'NAME' must be ...") on the first field that is missing or wrong.
    Keys of `obj` not in `fields` are ignored (files carry extra keys, e.g. Hugging Face's).
    """
    if not isinstance(obj, dict):
        name = f" field {prefix[:-1]!r}" if prefix else ""
        raise NpgptError(f"{where}:{name} must be a JSON object {{...}}, not {type(obj).__name__}")
    out = {}
    for name, spec in fields.items():
        if name not in obj:
            if spec.default is REQUIRED:
                raise NpgptError(f"{where}: field {prefix + name!r} is missing")
            out[name] = spec.default
            continue
        try:
            value = spec.convert(obj[name])
        except ValueError as e:
            raise NpgptError(f"{where}: field {prefix + name!r} {e}") from None
        if isinstance(spec, Obj) and spec.fields is not None and value is not None:
            value = check(value, spec.fields, where, prefix=f"{prefix}{name}.")
        out[name] = value
    return out


def check_value(value, spec: Spec, what: str):
    """One value against a spec: `check_value(t, Float(lo=0), "--temperature")` (NpgptError on failure)."""
    try:
        return spec.convert(value)
    except ValueError as e:
        raise NpgptError(f"{what} {e}") from None


def finite(value, what: str) -> float:
    """`value` as a float, or NpgptError when it is NaN or infinite (`what` names the option)."""
    return check_value(value, Float(), what)


# --------------------------------------------------------------------------------------- paths

def inside(folder, name, what: str = "file") -> Path:
    """`folder / name`, provided it resolves (symlinks followed) inside `folder`; NpgptError otherwise."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise NpgptError(f"{folder}: {what} name {_short(name)} is not a file name")
    rel = Path(name)
    if rel.is_absolute() or rel.drive:
        raise NpgptError(f"{folder}: {what} {name!r} is an absolute path; files must stay inside the folder")
    try:
        root = folder.resolve()
        target = (folder / rel).resolve()
    except (OSError, RuntimeError) as e:     # RuntimeError: a symlink loop (before Python 3.13)
        raise NpgptError(f"{folder}: {what} {name!r} cannot be resolved ({e})") from None
    if target != root and root not in target.parents:
        raise NpgptError(f"{folder}: {what} {name!r} points outside the folder; it is refused")
    return folder / rel


# ----------------------------------------------------------------------------- run folder lock

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


# -------------------------------------------------------------------------------- safetensors

# dtype name -> NumPy dtype of the stored bytes (little-endian); BF16 is read as raw uint16.
SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_DIMS = 8


class TensorInfo:
    """One header entry: dtype name, shape, byte range within the data area."""
    __slots__ = ("dtype", "shape", "start", "end")

    def __init__(self, dtype, shape, start, end):
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end

    def __repr__(self):
        return f"TensorInfo({self.dtype}, {self.shape}, [{self.start}, {self.end}))"


class SafetensorsHeader:
    """A checked safetensors header: `tensors` {name: TensorInfo}, `metadata` {str: str}, data offset."""

    def __init__(self, path, tensors, metadata, data_start):
        self.path, self.tensors, self.metadata, self.data_start = path, tensors, metadata, data_start

    def shapes(self) -> dict[str, tuple]:
        return {name: t.shape for name, t in self.tensors.items()}


def read_safetensors_header(path, max_header: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Read and check a safetensors file's header against its size; allocates no tensor."""
    path = Path(path)
    bad = f"{path} is truncated or corrupt"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise NpgptError(f"{bad} ({size} bytes, too short for a safetensors header); it cannot be loaded")
            n = int.from_bytes(prefix, "little")
            if n > max_header or n > size - 8:
                raise NpgptError(f"{bad} (header length {n} exceeds the file's {size} bytes or the "
                                 f"{max_header:,}-byte limit); it cannot be loaded")
            raw = f.read(n)
    except FileNotFoundError:
        raise NpgptError(f"{path} does not exist; check the path") from None
    except IsADirectoryError:
        raise NpgptError(f"{path} is a folder, not a safetensors file") from None
    except OSError as e:
        raise NpgptError(f"cannot read {path} ({e.strerror or e})") from None
    header = parse_json(raw.rstrip(b" "), f"{path} (safetensors header)", max_depth=4)
    if not isinstance(header, dict):
        raise NpgptError(f"{bad} (the header is not a JSON object); it cannot be loaded")
    data_len = size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise NpgptError(f"{bad} (__metadata__ must map strings to strings); it cannot be loaded")
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(name, entry, data_len, f"{bad} (tensor {_short(name, 50)}")
    spans = sorted((t.start, t.end, name) for name, t in tensors.items() if t.end > t.start)
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise NpgptError(f"{bad} (tensors {_short(a, 40)} and {_short(b, 40)} overlap); it cannot be loaded")
    return SafetensorsHeader(path, tensors, metadata, 8 + n)


def _check_entry(name, entry, data_len, bad) -> TensorInfo:
    if not isinstance(entry, dict):
        raise NpgptError(f"{bad}: entry is not an object); it cannot be loaded")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise NpgptError(f"{bad}: dtype {_short(dtype)} is not one npgpt reads); it cannot be loaded")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise NpgptError(f"{bad}: shape {_short(shape)} is not a list of sizes); it cannot be loaded")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len):
        raise NpgptError(f"{bad}: data_offsets {_short(offsets)} fall outside the file's {data_len} data "
                         f"bytes); it cannot be loaded")
    count = math.prod(shape)
    if count * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize != offsets[1] - offsets[0]:
        raise NpgptError(f"{bad}: shape {shape} of {dtype} does not match its {offsets[1] - offsets[0]} "
                         f"bytes); it cannot be loaded")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: bfloat16 is the high half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def load_safetensors(path, header: SafetensorsHeader | None = None, upcast: bool = True,
                     names=None) -> dict[str, np.ndarray]:
    """`{name: array}` from a safetensors file, its header checked first (see `read_safetensors_header`).

    With `upcast`, F16 and BF16 tensors come back as float32 (F64 stays F64). `names` limits the read
    to some tensors. Arrays are fresh, writable and C-contiguous.
    """
    header = header or read_safetensors_header(path)
    out = {}
    try:
        with open(header.path, "rb") as f:
            for name, t in header.tensors.items():
                if names is not None and name not in names:
                    continue
                f.seek(header.data_start + t.start)
                buf = f.read(t.end - t.start)
                if len(buf) != t.end - t.start:
                    raise NpgptError(f"{header.path} is truncated (tensor {_short(name, 50)} ends past the file's "
                                     f"end); it cannot be loaded")
                arr = np.frombuffer(buf, dtype=SAFETENSORS_DTYPES[t.dtype]).reshape(t.shape)
                if t.dtype == "BF16":
                    arr = bf16_to_f32(arr) if upcast else arr.copy()
                elif t.dtype == "F16" and upcast:
                    arr = arr.astype(np.float32)
                else:
                    arr = arr.astype(arr.dtype.newbyteorder("="), copy=True)
                out[name] = arr
    except OSError as e:
        raise NpgptError(f"cannot read {header.path} ({e.strerror or e})") from None
    return out


def check_finite_tensors(tensors: dict, where) -> None:
    """NpgptError naming the first floating tensor in `tensors` that holds NaN or infinity."""
    for name, arr in tensors.items():
        a = np.asarray(arr)
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            bad = "NaN" if np.isnan(a).any() else "infinity"
            raise NpgptError(f"{where}: tensor {name} holds {bad}; the weights are damaged (a diverged run "
                             f"or a corrupt file) and are not loaded")


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write `{name: host array}` as a safetensors file, atomically (npgpt.fileio), with the writer's own
    errors (a full disk, a file-size limit: not OSErrors) turned into one line; the old file stays."""
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise write_error(path, OSError(reason)) from None
