"""npgpt.gguf: the validated reader, the block dequantisers against llama.cpp's own Python port (the
`gguf` package) and hand-built blocks, the encoders, the writer, and the header checks."""

import struct

import numpy as np
import pytest

from npgpt.errors import NpgptError
from npgpt.gguf import GGML_TYPES, TYPE_IDS, GGUFFile, dequantize, quantize, write_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package (extra npgpt[gguf]) is the oracle here")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

QUANTISED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# where each block keeps its float16 scale(s): random bytes there could spell NaN
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(rng, name, n):
    _, block, bsize = GGML_TYPES[TYPE_IDS[name]]
    raw = rng.integers(0, 256, size=(n, bsize), dtype=np.uint8)
    for p in F16_FIELDS[name]:
        raw[:, p:p + 2] = rng.normal(size=(n, 1)).astype("<f2").view(np.uint8)
    return raw, block


@pytest.mark.parametrize("name", QUANTISED)
def test_dequantize_matches_llama_cpp_python_port_bit_for_bit(rng, name):
    raw, block = random_blocks(rng, name, 37)
    ours = dequantize(raw.ravel(), name, (37 * block,))
    ref = quants.dequantize(raw, Q[name]).ravel()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types(rng, name):
    w = rng.normal(size=(3, 8)).astype(np.float32)
    raw = {"F32": w.astype("<f4"), "F16": w.astype("<f2"),
           "BF16": (w.view(np.uint32) >> 16).astype("<u2")}[name].view(np.uint8).ravel()
    ours = dequantize(raw, name, (3, 8))
    ref = quants.dequantize(raw.reshape(3, -1), Q[name])
    np.testing.assert_array_equal(ours, ref.reshape(3, 8))


def test_hand_built_blocks():
    d = np.float16(0.5).tobytes()
    # Q8_0: y = q * d
    q8 = d + np.arange(-16, 16, dtype=np.int8).tobytes()
    np.testing.assert_array_equal(dequantize(np.frombuffer(q8, np.uint8), "Q8_0", (32,)),
                                  np.arange(-16, 16) * 0.5)
    # Q4_0: byte j holds value j (low nibble) and value j + 16 (high nibble); y = (nibble - 8) * d
    qs = bytes((j & 15) | ((15 - j) << 4) for j in range(16))
    want = np.array([j - 8 for j in range(16)] + [15 - j - 8 for j in range(16)]) * 0.5
    np.testing.assert_array_equal(dequantize(np.frombuffer(d + qs, np.uint8), "Q4_0", (32,)), want)
    # Q4_1: y = nibble * d + m
    m = np.float16(-1.0).tobytes()
    want = np.array([j for j in range(16)] + [15 - j for j in range(16)]) * 0.5 - 1.0
    np.testing.assert_array_equal(dequantize(np.frombuffer(d + m + qs, np.uint8), "Q4_1", (32,)), want)
    # Q5_0: the fifth bit of value j is bit j of qh; y = (q - 16) * d
    qh = struct.pack("<I", 0xFFFF0000)                       # values 16..31 get +16
    want = np.array([j - 16 for j in range(16)] + [15 - j for j in range(16)]) * 0.5
    np.testing.assert_array_equal(dequantize(np.frombuffer(d + qh + qs, np.uint8), "Q5_0", (32,)), want)
    # Q6_K: one scale of 2 for everything, all 6-bit values 33 -> y = d * 2 * (33 - 32)
    ql = bytes([0x11] * 128)                                 # low nibbles 1
    qhk = bytes([0b10101010] * 64)                           # top bits 10 -> +32
    blk = ql + qhk + bytes([2] * 16) + np.float16(0.25).tobytes()
    np.testing.assert_array_equal(dequantize(np.frombuffer(blk, np.uint8), "Q6_K", (256,)),
                                  np.full(256, 0.5, np.float32))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "F16", "F32"])
def test_quantize_matches_llama_cpp_reference(rng, name):
    w = rng.normal(size=(16, 64)).astype(np.float32)
    w[3] = 0                                                  # an all-zero block
    ours = quantize(w, name)
    ref = quants.quantize(w, Q[name]).view(np.uint8).ravel()
    np.testing.assert_array_equal(ours, ref)
    back = dequantize(ours, name, w.shape)
    tol = {"Q8_0": 0.02, "Q4_0": 0.35, "Q4_1": 0.25, "F16": 2e-3, "F32": 0}[name]
    assert np.abs(back - w).max() <= tol


def test_unsupported_type_is_named():
    raw = np.zeros(84, np.uint8)
    with pytest.raises(NpgptError, match="Q2_K, which npgpt does not read"):
        dequantize(raw, "Q2_K", (256,))


# ---- files -------------------------------------------------------------------------------------------
def small_file(tmp_path, rng, name="m.gguf", extra_meta=None):
    w = rng.normal(size=(4, 64)).astype(np.float32)
    meta = {"general.architecture": "test", "test.count": 7, "test.neg": -3, "test.ratio": 0.5,
            "test.flag": True, "test.words": ["a", "bé", ""], "test.ids": np.array([1, -2, 3], np.int32),
            **(extra_meta or {})}
    tensors = [("w.q8", w.shape, "Q8_0", quantize(w, "Q8_0")), ("w.f32", (64,), "F32", quantize(w[0], "F32")),
               ("w.f16", (2, 4, 64), "F16", quantize(np.stack([w, w])[:, :, :], "F16"))]
    path = tmp_path / name
    write_gguf(path, meta, tensors)
    return path, w


def test_write_then_read_back(tmp_path, rng):
    path, w = small_file(tmp_path, rng)
    g = GGUFFile(path)
    assert g.metadata["test.count"] == 7 and g.metadata["test.neg"] == -3 and g.metadata["test.flag"] is True
    assert g.metadata["test.ratio"] == 0.5 and g.metadata["test.words"] == ["a", "bé", ""]
    assert g.metadata["test.ids"].tolist() == [1, -2, 3]
    assert g.tensors["w.q8"].shape == (4, 64) and g.tensors["w.q8"].type == "Q8_0"
    assert g.tensors["w.f16"].shape == (2, 4, 64)
    np.testing.assert_array_equal(g.dequantize("w.f32"), w[0])
    assert np.abs(g.dequantize("w.q8") - w).max() < 0.02
    assert g.data_start % 32 == 0 and all(t.offset % 32 == 0 for t in g.tensors.values())


def test_gguf_package_reads_our_file(tmp_path, rng):
    path, w = small_file(tmp_path, rng)
    r = gguf.GGUFReader(path)
    assert r.fields["test.words"].contents() == ["a", "bé", ""]
    t = {t.name: t for t in r.tensors}
    np.testing.assert_array_equal(quants.dequantize(t["w.q8"].data, t["w.q8"].tensor_type).reshape(4, 64),
                                  GGUFFile(path).dequantize("w.q8"))


def test_nan_weights_refused(tmp_path):
    w = np.ones((2, 32), np.float32)
    w[1, 3] = np.nan
    write_gguf(tmp_path / "nan.gguf", {"general.architecture": "x"}, [("w", w.shape, "F32", quantize(w, "F32"))])
    with pytest.raises(NpgptError, match="NaN or infinite"):
        GGUFFile(tmp_path / "nan.gguf").dequantize("w")


def _header(n_tensors, n_kv, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _s(text):
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


@pytest.mark.parametrize("data, match", [
    (b"", "less than a GGUF header"),
    (b"GGML" + bytes(40), "not a GGUF file"),
    (_header(0, 0, version=1) + bytes(16), "version 1 is not supported"),
    (_header(0, 2**40) + bytes(16), "metadata entries, more than"),
    (_header(2**40, 0) + bytes(16), "tensors, more than"),
    (_header(0, 1) + struct.pack("<Q", 2**62) + bytes(16), "claims"),
    (_header(0, 1) + _s("k") + struct.pack("<IIQ", 9, 4, 2**50) + bytes(8), "needs"),
    (_header(0, 1) + _s("k") + struct.pack("<IIQ", 9, 8, 2**40) + bytes(8), "needs"),
    (_header(0, 1) + _s("k") + struct.pack("<IIQ", 9, 9, 1) + bytes(16), "array of arrays"),
    (_header(0, 1) + _s("k") + struct.pack("<I", 99) + bytes(16), "unknown value type 99"),
    (_header(0, 1) + _s("k") + struct.pack("<IQ", 8, 2) + b"\xff\xfe" + bytes(8), "not UTF-8"),
    (_header(0, 1) + _s("general.alignment") + struct.pack("<II", 4, 24) + bytes(8), "power of two"),
    (_header(1, 0) + _s("t") + struct.pack("<I", 5) + bytes(60), "dimensions"),
    (_header(1, 0) + _s("t") + struct.pack("<IQIQ", 1, 32, 77, 0) + bytes(60), "unknown ggml type 77"),
    (_header(1, 0) + _s("t") + struct.pack("<IQIQ", 1, 0, 0, 0) + bytes(60), "zero dimension"),
    (_header(1, 0) + _s("t") + struct.pack("<IQIQ", 1, 33, 8, 0) + bytes(60), "do not divide"),
    (_header(1, 0) + _s("t") + struct.pack("<IQIQ", 1, 32, 0, 8) + bytes(300), "not a multiple"),
    (_header(1, 0) + _s("t") + struct.pack("<IQIQ", 1, 2**20, 0, 0) + bytes(60), "runs past the end"),
    (_header(2, 0) + _s("t") + struct.pack("<IQIQ", 1, 8, 0, 0) + _s("u") + struct.pack("<IQIQ", 1, 8, 0, 0)
     + bytes(60), "overlap"),
    (_header(2, 0) + _s("t") + struct.pack("<IQIQ", 1, 8, 0, 0) + _s("t") + struct.pack("<IQIQ", 1, 8, 0, 32)
     + bytes(90), "appears twice"),
])
def test_malformed_headers_fail_with_one_clear_line(tmp_path, data, match):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(NpgptError, match=match):
        GGUFFile(p)


def test_truncated_files_fail_cleanly(tmp_path, rng):
    path, _ = small_file(tmp_path, rng)
    raw = path.read_bytes()
    bad = tmp_path / "cut.gguf"
    for n in range(0, len(raw) - 1, 37):
        bad.write_bytes(raw[:n])
        with pytest.raises(NpgptError):
            GGUFFile(bad)
