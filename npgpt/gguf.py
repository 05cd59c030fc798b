"""GGUF, llama.cpp's one-file model format: a validated reader, the block dequantisers, and a writer.

A GGUF file is, in order (all little-endian):

    magic "GGUF" | version u32 (2 or 3) | tensor count u64 | metadata count u64
    metadata:  key (string) | value type u32 | value          (a string is a u64 length + UTF-8 bytes;
                                                               an array is item type u32 + count u64 + items)
    tensors:   name (string) | n_dims u32 | dims u64 x n_dims | ggml type u32 | offset u64
    padding up to `general.alignment` (default 32), then the data section: each tensor at its offset,
    each offset a multiple of the alignment.

`dims` are ggml's `ne`, fastest-varying first: a Linear weight of PyTorch shape (out, in) has ne =
(in, out), so the NumPy shape of a tensor is `dims` reversed. Quantised types cut each row (ne[0]
values) into blocks of 32 or 256 values, each a few bytes of scales followed by packed integers.

`GGUFFile(path)` checks everything the file claims before it allocates anything for it: the magic and
version; that the counts could fit in the file at all (each entry has a minimum size); every string
length and array count against the bytes left; UTF-8; n_dims, dims and ggml type of each tensor; that
rows divide into whole blocks; that each tensor's bytes lie inside the data section, at an aligned
offset, and overlap no other tensor; unique names and keys. Tensor bytes are read lazily through a
memory map, so opening a 4 GB file costs its header only. `dequantize(name)` returns float32 and
refuses NaN or infinite weights.

Dequantisation follows llama.cpp's reference C code (ggml-quants.c, `dequantize_row_*`) operation for
operation in float32, vectorised over blocks: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
Q5_K, Q6_K. Any other ggml type is named in a clear error. Tests compare against the `gguf`
package's own dequantisers (llama.cpp's Python port) and against hand-built blocks.

`write_gguf(path, metadata, tensors)` writes a file (atomically), with F32, F16, Q8_0, Q4_0 and Q4_1
encoders (`quantize`), so npgpt can hand models to llama.cpp, ollama and transformers.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npgpt.errors import NpgptError
from npgpt.fileio import atomic_path

MAGIC = b"GGUF"
VERSIONS = (2, 3)                      # v1 (2023) used 32-bit counts and is not read
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16
MAX_DIMS = 4                           # GGML_MAX_DIMS
MAX_NAME = 256                         # llama.cpp allows 64; a little slack, still bounded
MAX_STRING = 16 << 20                  # one metadata string (chat templates run to tens of KB)
MAX_ELEMENTS = 1 << 40                 # one tensor

# ---- the ggml types: id -> (name, values per block, bytes per block) ---------------------------------
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}

# ---- metadata value types --------------------------------------------------------------------------
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
            11: "<i8", 12: "<f8"}
T_BOOL, T_STRING, T_ARRAY = 7, 8, 9
T_UINT32, T_INT32, T_FLOAT32, T_UINT64 = 4, 5, 6, 10


def _err(path, msg):
    return NpgptError(f"{path}: {msg}; the GGUF file is corrupt or not a GGUF model")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry: name, NumPy shape (ggml dims reversed), ggml type name, bytes and offset."""
    name: str
    shape: tuple
    type: str
    offset: int                        # absolute, in the file
    nbytes: int

    @property
    def dims(self):
        """ggml's ne, fastest-varying first."""
        return tuple(reversed(self.shape))


class _Cursor:
    """Reads the header left to right; every read is checked against the bytes left in the file."""

    def __init__(self, buf, size, path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def left(self):
        return self.size - self.pos

    def need(self, n, what):
        if n > self.left():
            raise _err(self.path, f"{what} needs {n} bytes at offset {self.pos} but the file has "
                                  f"{self.left()} left")

    def unpack(self, fmt, what):
        n = struct.calcsize(fmt)
        self.need(n, what)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out[0]

    def string(self, what, limit=MAX_STRING):
        n = self.unpack("<Q", f"{what} length")
        if n > limit:
            raise _err(self.path, f"{what} claims {n} bytes (limit {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _err(self.path, f"{what} is not UTF-8") from None

    def value(self, vtype, what, depth=0):
        if vtype in _SCALARS:
            dt = np.dtype(_SCALARS[vtype])
            self.need(dt.itemsize, what)
            v = np.frombuffer(self.buf, dtype=dt, count=1, offset=self.pos)[0].item()
            self.pos += dt.itemsize
            if vtype == T_BOOL:
                if v > 1:
                    raise _err(self.path, f"{what} is a bool stored as {v}")
                return bool(v)
            return v
        if vtype == T_STRING:
            return self.string(what)
        if vtype == T_ARRAY:
            if depth:
                raise _err(self.path, f"{what} is an array of arrays (not read)")
            itype = self.unpack("<I", f"{what} item type")
            count = self.unpack("<Q", f"{what} item count")
            if itype in _SCALARS:
                dt = np.dtype(_SCALARS[itype])
                self.need(count * dt.itemsize, f"{what} ({count} items)")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos += count * dt.itemsize
                if itype == T_BOOL:
                    if arr.size and arr.max() > 1:
                        raise _err(self.path, f"{what} holds a bool stored as {int(arr.max())}")
                    arr = arr.astype(bool)
                return arr
            if itype == T_STRING:
                self.need(count * 8, f"{what} ({count} strings)")     # each string is >= its length word
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if itype == T_ARRAY:
                raise _err(self.path, f"{what} is an array of arrays (not read)")
            raise _err(self.path, f"{what} has unknown item type {itype}")
        raise _err(self.path, f"{what} has unknown value type {vtype}")


class GGUFFile:
    """A validated, memory-mapped GGUF file: `.metadata` {key: value}, `.tensors` {name: GGUFTensor}.

    Metadata values are Python ints, floats, bools and strings; arrays of numbers are NumPy arrays,
    arrays of strings are lists. Raises NpgptError (one line, naming the file) for anything malformed.
    """

    def __init__(self, path):
        self.path = path = Path(path)
        if not path.is_file():
            raise NpgptError(f"GGUF file {path} does not exist")
        size = path.stat().st_size
        if size < 24:
            raise _err(path, f"only {size} bytes, less than a GGUF header")
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        cur = _Cursor(self._mm, size, path)
        if cur.unpack("4s", "magic") != MAGIC:
            raise NpgptError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        self.version = cur.unpack("<I", "version")
        if self.version not in VERSIONS:
            raise NpgptError(f"{path}: GGUF version {self.version} is not supported (versions 2 and 3 are); "
                             f"convert it with a current llama.cpp")
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        # the smallest entries: a key/value is 8 (key length) + 1 + 4 (type) + 1 bytes, a tensor entry
        # 8 + 1 (name) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset)
        if n_kv * 14 > cur.left():
            raise _err(path, f"claims {n_kv} metadata entries, more than its {size} bytes can hold")
        if n_tensors * 33 > cur.left():
            raise _err(path, f"claims {n_tensors} tensors, more than its {size} bytes can hold")

        self.metadata = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}", limit=MAX_NAME * 4)
            if key in self.metadata:
                raise _err(path, f"metadata key {key!r} appears twice")
            vtype = cur.unpack("<I", f"type of {key}")
            self.metadata[key] = cur.value(vtype, f"metadata {key}")

        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or not 0 < align <= MAX_ALIGNMENT \
                or align & (align - 1):
            raise _err(path, f"general.alignment {align!r} is not a power of two up to {MAX_ALIGNMENT}")
        self.alignment = align

        entries = []
        for i in range(n_tensors):
            name = cur.string(f"tensor #{i} name", limit=MAX_NAME)
            n_dims = cur.unpack("<I", f"tensor {name} n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise _err(path, f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = tuple(cur.unpack("<Q", f"tensor {name} dims") for _ in range(n_dims))
            type_id = cur.unpack("<I", f"tensor {name} type")
            offset = cur.unpack("<Q", f"tensor {name} offset")
            entries.append((name, dims, type_id, offset))

        data_start = -(-cur.pos // align) * align
        if data_start > size:
            raise _err(path, f"the data section would start at {data_start}, past the end ({size} bytes)")
        self.data_start = data_start
        self.tensors = {}
        spans = []
        for name, dims, type_id, offset in entries:
            if name in self.tensors:
                raise _err(path, f"tensor {name} appears twice")
            if type_id not in GGML_TYPES:
                raise _err(path, f"tensor {name} has unknown ggml type {type_id}")
            tname, block, bsize = GGML_TYPES[type_id]
            if min(dims) < 1:
                raise _err(path, f"tensor {name} has a zero dimension {dims}")
            n = math.prod(dims)
            if n > MAX_ELEMENTS:
                raise _err(path, f"tensor {name} claims {n} values")
            if dims[0] % block:
                raise _err(path, f"tensor {name}: rows of {dims[0]} values do not divide into {tname} blocks "
                                 f"of {block}")
            nbytes = n // block * bsize
            if offset % align:
                raise _err(path, f"tensor {name} starts at offset {offset}, not a multiple of the alignment {align}")
            if offset + nbytes > size - data_start:
                raise _err(path, f"tensor {name} ({nbytes} bytes at data offset {offset}) runs past the end "
                                 f"of the file")
            self.tensors[name] = GGUFTensor(name, tuple(reversed(dims)), tname, data_start + offset, nbytes)
            spans.append((offset, offset + nbytes, name))
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise _err(path, f"tensors {an} and {bn} overlap")

    # ---- metadata ------------------------------------------------------------------------------
    def get(self, key, default=None, kind=None):
        """Metadata `key` (or `default` when absent), checked to be of `kind` (int, float, str, bool, list)."""
        if key not in self.metadata:
            return default
        v = self.metadata[key]
        ok = {int: lambda x: isinstance(x, int) and not isinstance(x, bool),
              float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x),
              str: lambda x: isinstance(x, str), bool: lambda x: isinstance(x, bool),
              list: lambda x: isinstance(x, (list, np.ndarray)), None: lambda x: True}[kind]
        if not ok(v):
            raise NpgptError(f"{self.path}: metadata {key} is {type(v).__name__} {_short(v)}, expected "
                             f"{kind.__name__}")
        return v

    def require(self, key, kind=None):
        if key not in self.metadata:
            raise NpgptError(f"{self.path}: metadata {key} is missing")
        return self.get(key, kind=kind)

    @property
    def architecture(self):
        return self.require("general.architecture", str)

    # ---- tensors -------------------------------------------------------------------------------
    def tensor(self, name):
        t = self.tensors.get(name)
        if t is None:
            raise NpgptError(f"{self.path}: tensor {name} is missing")
        return t

    def raw(self, name):
        """The tensor's bytes as a read-only uint8 view of the memory map (nothing copied)."""
        t = self.tensor(name)
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def blocks(self, name):
        """A quantised tensor's blocks: uint8 (rows, blocks per row, bytes per block), a view."""
        t = self.tensor(name)
        _, block, bsize = GGML_TYPES[TYPE_IDS[t.type]]
        rows = math.prod(t.shape[:-1])
        return self.raw(name).reshape(rows, t.shape[-1] // block, bsize)

    def dequantize(self, name):
        """The tensor as float32 in its NumPy shape; NpgptError for an unsupported type or NaN/inf."""
        t = self.tensor(name)
        out = dequantize(self.raw(name), t.type, t.shape, where=f"{self.path}: tensor {name}")
        if not np.isfinite(out).all():
            raise NpgptError(f"{self.path}: tensor {name} holds NaN or infinite values; refusing a broken model")
        return out


def _short(v):
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ---- dequantisation (llama.cpp's dequantize_row_* in float32) ------------------------------------
def _f16(b):
    """(..., 2) uint8 -> (..., 1) float32, reading each pair as a little-endian float16."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _low_high(qs):
    """(n, 16) packed nibbles -> (n, 32) uint8: the low nibbles are values 0..15, the high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh4):
    """(n, 4) bytes of Q5's qh (one u32, little-endian) -> (n, 32) fifth bits, value j from bit j."""
    bits = qh4.view("<u4")                                           # (n, 1)
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q8_0(b):        # d (f16) | qs int8[32]:  y = qs * d
    d = _f16(b[:, 0:2])
    return b[:, 2:34].view(np.int8).astype(np.float32) * d


def _q4_0(b):        # d | qs[16]:  y_j = (nib_j - 8) * d
    d = _f16(b[:, 0:2])
    return (_low_high(b[:, 2:18]).astype(np.int8) - np.int8(8)).astype(np.float32) * d


def _q4_1(b):        # d | m | qs[16]:  y_j = nib_j * d + m
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return _low_high(b[:, 4:20]).astype(np.float32) * d + m


def _q5_0(b):        # d | qh u32 | qs[16]:  y_j = ((nib_j | bit_j << 4) - 16) * d
    d = _f16(b[:, 0:2])
    q = _low_high(b[:, 6:22]) | (_high_bits(b[:, 2:6]) << 4)
    return (q.astype(np.int8) - np.int8(16)).astype(np.float32) * d


def _q5_1(b):        # d | m | qh u32 | qs[16]:  y_j = (nib_j | bit_j << 4) * d + m
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _low_high(b[:, 8:24]) | (_high_bits(b[:, 4:8]) << 4)
    return q.astype(np.float32) * d + m


def _k_scales(s):
    """Q4_K / Q5_K's 12 scale bytes -> (n, 8) 6-bit scales and (n, 8) 6-bit mins (get_scale_min_k4)."""
    s = s.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _q4_k(b):        # d | dmin | scales[12] | qs[128]; 8 sub-blocks of 32: y = d*sc*q - dmin*m
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 32)                                 # 4 chunks of 64 values
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)        # sub-block 2i low, 2i+1 high
    d1 = (d * sc.astype(np.float32))[:, :, None]
    m1 = (dmin * mn.astype(np.float32))[:, :, None]
    return (d1 * q.astype(np.float32) - m1).reshape(n, 256)


def _q5_k(b):        # d | dmin | scales[12] | qh[32] | qs[128]
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]                                                    # (n, 32): bit i of byte l -> sub-block i
    qs = b[:, 48:176].reshape(n, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1      # (n, 8, 32)
    q = low | (high << 4)
    d1 = (d * sc.astype(np.float32))[:, :, None]
    m1 = (dmin * mn.astype(np.float32))[:, :, None]
    return (d1 * q.astype(np.float32) - m1).reshape(n, 256)


def _q6_k(b):        # ql[128] | qh[64] | scales int8[16] | d; two halves of 128, 16 scales of 16 values
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)                               # (half, ql[l] / ql[l+32], l)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)                             # (half, -, l)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)                 # (n, 16)
    d = _f16(b[:, 208:210])
    # within a half: values l, l+32, l+64, l+96 take ql[l]&F, ql[l+32]&F, ql[l]>>4, ql[l+32]>>4 and
    # qh[l]'s bit pairs 0-1, 2-3, 4-5, 6-7 as their top two bits
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)                  # (n, 2, 4, 32)
    high = (qh >> (np.arange(4, dtype=np.uint8) * 2)[None, None, :, None]) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)               # (n, 2, 4, 32)
    scale = (d * sc).reshape(n, 16, 1)                                  # 16 values per scale
    return (scale * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)


_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k,
            "Q5_K": _q5_k, "Q6_K": _q6_k}
SUPPORTED_TYPES = ("F32", "F16", "BF16") + tuple(_DEQUANT)
CHUNK_BLOCKS = 1 << 16                 # blocks dequantised at a time: bounds the temporaries


def dequantize(raw, type_name, shape, where="tensor"):
    """raw: the tensor's bytes (uint8), ggml type name, NumPy shape -> float32 array of `shape`."""
    n = math.prod(shape)
    if type_name == "F32":
        return np.frombuffer(raw, dtype="<f4", count=n).reshape(shape).astype(np.float32)
    if type_name == "F16":
        return np.frombuffer(raw, dtype="<f2", count=n).reshape(shape).astype(np.float32)
    if type_name == "BF16":            # the top half of a float32
        u = np.frombuffer(raw, dtype="<u2", count=n).astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    fn = _DEQUANT.get(type_name)
    if fn is None:
        raise NpgptError(f"{where} is stored as {type_name}, which npgpt does not read (supported: "
                         f"{', '.join(SUPPORTED_TYPES)}); requantise the model, e.g. with llama-quantize to Q8_0")
    _, block, bsize = GGML_TYPES[TYPE_IDS[type_name]]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, bsize)
    out = np.empty((blocks.shape[0], block), np.float32)
    for i in range(0, blocks.shape[0], CHUNK_BLOCKS):
        out[i:i + CHUNK_BLOCKS] = fn(blocks[i:i + CHUNK_BLOCKS])
    return out.reshape(shape)


# ---- quantisation (llama.cpp's quantize_row_*_ref), for writing -------------------------------------
def _roundf(x):
    """C's roundf: halves away from zero (NumPy's rint rounds them to even)."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def quantize(w, type_name):
    """float32 w (..., K) -> the ggml bytes (uint8, flat) of `type_name`: F32, F16, Q8_0, Q4_0 or Q4_1."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if type_name == "F32":
        return w.astype("<f4").view(np.uint8).ravel()
    if type_name == "F16":
        return w.astype("<f2").view(np.uint8).ravel()
    if type_name not in ("Q8_0", "Q4_0", "Q4_1"):
        raise NpgptError(f"cannot write ggml type {type_name}: choose f32, f16 or q8_0")
    if w.shape[-1] % 32:
        raise NpgptError(f"{type_name} needs rows whose length divides by 32; a row here has {w.shape[-1]} "
                         f"values (use --type f16 or f32)")
    x = w.reshape(-1, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if type_name == "Q8_0":
            d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0))
            q = _roundf(x * inv).astype(np.int8)
            return np.concatenate([d.astype("<f2").view(np.uint8), q.view(np.uint8)], axis=1).ravel()
        if type_name == "Q4_0":
            # the value of largest magnitude, with its sign, maps to -8
            mx = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
            d = mx / np.float32(-8)
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0))
            q = np.minimum(np.float32(15), np.trunc(x * inv + np.float32(8.5))).astype(np.uint8)
        else:
            lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
            d = (hi - lo) / np.float32(15)
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0))
            q = np.minimum(np.float32(15), np.trunc((x - lo) * inv + np.float32(0.5))).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    head = [d.astype("<f2").view(np.uint8)]
    if type_name == "Q4_1":
        head.append(lo.astype("<f2").view(np.uint8))
    return np.concatenate(head + [packed], axis=1).ravel()


# ---- writing --------------------------------------------------------------------------------------
def _pack_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(key, value):
    """(type id, bytes) for a metadata value: bool, int (u32 when it fits, else i64/u64), float (f32),
    str, or a list / 1-D array of one of these."""
    if isinstance(value, bool):
        return T_BOOL, struct.pack("<?", value)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if 0 <= value < 1 << 32:
            return T_UINT32, struct.pack("<I", value)
        if -(1 << 31) <= value < 0:
            return T_INT32, struct.pack("<i", value)
        return (T_UINT64, struct.pack("<Q", value)) if value > 0 else (11, struct.pack("<q", value))
    if isinstance(value, (float, np.floating)):
        return T_FLOAT32, struct.pack("<f", float(value))
    if isinstance(value, str):
        return T_STRING, _pack_string(value)
    if isinstance(value, np.ndarray):
        codes = {np.dtype(np.int32): (T_INT32, "<i4"), np.dtype(np.float32): (T_FLOAT32, "<f4"),
                 np.dtype(np.uint32): (T_UINT32, "<u4"), np.dtype(np.int64): (11, "<i8"),
                 np.dtype(bool): (T_BOOL, "<u1")}
        if value.ndim != 1 or value.dtype not in codes:
            raise NpgptError(f"GGUF metadata {key}: cannot write a {value.dtype} array of shape {value.shape}")
        t, dt = codes[value.dtype]
        return T_ARRAY, struct.pack("<IQ", t, value.size) + value.astype(dt).tobytes()
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return T_ARRAY, struct.pack("<IQ", T_STRING, len(value)) + b"".join(_pack_string(v) for v in value)
        return _pack_value(key, np.asarray(value))
    raise NpgptError(f"GGUF metadata {key}: cannot write a value of type {type(value).__name__}")


def write_gguf(path, metadata, tensors, alignment=DEFAULT_ALIGNMENT):
    """Write a GGUF v3 file atomically.

    metadata: {key: value} in order (general.architecture first, as llama.cpp writes it);
    tensors: [(name, NumPy shape, ggml type name, bytes as uint8)] in order, e.g. from `quantize`.
    """
    path = Path(path)
    head = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        t, payload = _pack_value(key, value)
        head += [_pack_string(key), struct.pack("<I", t), payload]
    offset, offsets = 0, []
    for name, shape, type_name, data in tensors:
        _, block, bsize = GGML_TYPES[TYPE_IDS[type_name]]
        dims = tuple(reversed(shape))
        if data.nbytes != math.prod(dims) // block * bsize or dims[0] % block:
            raise NpgptError(f"GGUF tensor {name}: {data.nbytes} bytes do not match {type_name} of shape {shape}")
        head += [_pack_string(name), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims),
                 struct.pack("<IQ", TYPE_IDS[type_name], offset)]
        offsets.append(offset)
        offset = -(-(offset + data.nbytes) // alignment) * alignment
    header = b"".join(head)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(b"\0" * (-len(header) % alignment))
        start = f.tell()
        for (name, _, _, data), off in zip(tensors, offsets):
            f.write(b"\0" * (start + off - f.tell()))
            f.write(np.ascontiguousarray(data, dtype=np.uint8).tobytes())
        f.write(b"\0" * (-(f.tell() - start) % alignment))
        f.flush()
        os.fsync(f.fileno())
