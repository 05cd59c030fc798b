"""Reading and writing safetensors files without trusting them.

The 8-byte header length and the JSON header are read and checked against the file size (dtypes,
shapes, offsets inside the data area and not overlapping, bytes = elements x itemsize) before a
single array is allocated, so a header cannot make npgpt allocate more than the file holds.
Tensors are then read with NumPy; BF16 and F16 are upcast to float32 (bfloat16 is the top half of
a float32, so the upcast is a 16-bit shift). `check_finite_tensors` refuses NaN and infinity in
loaded weights; `write_safetensors` writes atomically (npgpt.fileio).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from npgpt.errors import NpgptError
from npgpt.fileio import atomic_path, write_error
from npgpt.safeio.schema import parse_json, short

MAX_HEADER_BYTES = 100 << 20       # the safetensors library's own limit

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
        tensors[name] = _check_entry(name, entry, data_len, f"{bad} (tensor {short(name, 50)}")
    spans = sorted((t.start, t.end, name) for name, t in tensors.items() if t.end > t.start)
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise NpgptError(f"{bad} (tensors {short(a, 40)} and {short(b, 40)} overlap); it cannot be loaded")
    return SafetensorsHeader(path, tensors, metadata, 8 + n)


def _check_entry(name, entry, data_len, bad) -> TensorInfo:
    if not isinstance(entry, dict):
        raise NpgptError(f"{bad}: entry is not an object); it cannot be loaded")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise NpgptError(f"{bad}: dtype {short(dtype)} is not one npgpt reads); it cannot be loaded")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise NpgptError(f"{bad}: shape {short(shape)} is not a list of sizes); it cannot be loaded")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len):
        raise NpgptError(f"{bad}: data_offsets {short(offsets)} fall outside the file's {data_len} data "
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
                    raise NpgptError(f"{header.path} is truncated (tensor {short(name, 50)} ends past the file's "
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
