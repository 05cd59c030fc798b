"""Reading untrusted JSON and TOML: size, depth and number limits, small schemas, paths inside a folder.

JSON (`read_json`, `read_jsonl`, `parse_json`)
    Size limit before reading, nesting-depth limit before parsing (Python's parser recurses), at most
    `MAX_INT_DIGITS` digits in an integer, no NaN/Infinity constants and no float that overflows to
    infinity (`1e999`), no duplicate keys. Any violation is an `NpgptError` naming the file.

Schemas (`Int`, `Float`, `Str`, `Bool`, `Obj`, `List`, `check`)
    `check(obj, {"step": Int(lo=0), "lr": Float(lo=0)}, where)` returns the checked values; an error
    names the file and the field (`state.json: field 'step' must be ...`). A bool is never an int.

Numbers (`finite`)
    NaN and infinity are refused in options.

Paths (`inside`)
    `inside(folder, name)` is `folder/name` when it resolves (symlinks followed) inside `folder`.

TOML (`read_toml`)
    `tomllib` under the same size limit, then the same depth/finite checks as JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

import numpy as np

from npgpt.errors import NpgptError

MAX_JSON_BYTES = 64 << 20          # GPT-2's vocab.json is 1 MB; tokenizer.json files run to ~20 MB
MAX_DEPTH = 64                     # no npgpt or Hugging Face file nests deeper than a handful
MAX_INT_DIGITS = 40                # 128-bit PCG64 state words have 39 digits


# ----------------------------------------------------------------------------------------- JSON

def short(value, n=60) -> str:
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
                raise ValueError(f"the key {short(k)} appears twice")
            seen.add(k)
    return obj


def parse_json(data: bytes | str, where: str, max_depth: int = MAX_DEPTH, allow_infinity: bool = False,
               sent: bool = False):
    """Parse JSON text under the limits above; NpgptError naming `where` on any problem.

    `allow_infinity` accepts the constants Infinity/-Infinity (Python's json.dumps writes them for
    float('inf'), e.g. a best loss not measured yet); NaN is refused always. `sent`: the text came
    from a client (an HTTP body), so errors ask for valid JSON instead of calling a file damaged."""
    def bad(problem):
        return NpgptError(f"{where} is not valid JSON: {problem}; send valid JSON" if sent
                          else f"{where} is damaged: {problem}")
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise (bad(f"it is not UTF-8 text (byte {e.start})") if sent else
               NpgptError(f"{where} is not UTF-8 text (byte {e.start}); it is damaged or not JSON")) from None
    if _json_depth(text) > max_depth:
        raise bad(f"it nests deeper than {max_depth} levels")
    try:
        obj = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_infinity_only if allow_infinity else _parse_constant,
                          object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise (bad(f"{e.msg} at line {e.lineno} column {e.colno}") if sent else
               NpgptError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                          f"the file is damaged")) from None
    except (ValueError, RecursionError, OverflowError) as e:
        raise bad(str(e)[:100] or type(e).__name__) from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
        raise bad("a string holds a lone surrogate (a \\udXXX escape), which is not text")
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
            raise ValueError(f"must be an integer, got {short(value)}")
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
            raise ValueError(f"must be a number, got {short(value)}")
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
            raise ValueError(f"must be a string, got {short(value)}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(repr, self.choices))}, got {short(value)}")
        if self.max_len is not None and len(value) > self.max_len:
            raise ValueError(f"must be at most {self.max_len} characters")
        return value


class Bool(Spec):
    def convert(self, value):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {short(value)}")
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
            raise ValueError(f"must be an object {{...}}, got {short(value)}")
        return value


class List(Spec):
    """A JSON array, optionally of `item`s, of at most `max_len` entries."""

    def __init__(self, item: Spec | None = None, default=REQUIRED, max_len=None):
        super().__init__(default)
        self.item, self.max_len = item, max_len

    def convert(self, value):
        if not isinstance(value, list):
            raise ValueError(f"must be a list [...], got {short(value)}")
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
        raise NpgptError(f"{folder}: {what} name {short(name)} is not a file name")
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
