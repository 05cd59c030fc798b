"""Weight-only quantisation: int8 or packed int4 weights with float32 scales, and the module that runs them.

Scheme (symmetric, no zero point). A weight w of shape (in, out), GPT-2's Conv1D layout, is cut into
groups of `group_size` consecutive input rows (one group of all rows when `group_size` is None, i.e.
per output channel). Each (group, output column) gets its own scale

    scale = max |w[group, j]| / qmax          qmax = 127 for 8 bits, 7 for 4 bits
    q     = round(w / scale)  in [-qmax, qmax]
    w'    = q * scale                         (the dequantised weight)

so the rounding error of every entry is at most scale / 2 = max|w[group, j]| / (2 qmax): 0.4% of the
channel's largest weight at 8 bits, 7% at 4 bits. Smaller groups track local ranges more closely and
cost one float32 scale per group.

Storage (model.safetensors of a quantised folder): for a linear layer `transformer.h.0.attn.c_attn`

    transformer.h.0.attn.c_attn.qweight   int8 (in, out), or uint8 (ceil(in/2), out) at 4 bits
    transformer.h.0.attn.c_attn.scales    float32 (n_groups, out)
    transformer.h.0.attn.c_attn.bias      float32 (out,), unchanged

At 4 bits two values share a byte: row 2i in the low nibble, row 2i+1 in the high nibble, each stored
as q + 8 (0..15). The token embedding, when quantised too (`embedding=True`), is stored as the LM head
reads it, transposed to (n_embd, vocab), so each token's vector is one output channel with its own scale:
`transformer.wte.qweight` / `transformer.wte.scales`. Everything else (position embedding, LayerNorms,
biases) stays float32. config.json records the scheme under
`"npgpt": {"quantization": {"bits": 8, "group_size": null, "embedding": false}}`.

`load_model(folder)` is the one loader of model folders: it reads config.json and loads a quantised
folder here, a float one with `GPT.from_pretrained`.

At run time a `QuantizedLinear` keeps the integers and scales and dequantises its weight for each call,
so only one layer's float weight exists at a time. The quantised embedding is dequantised once at load
(the model reads `wte.weight` directly in several places), so it shrinks the file but not the memory.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from npgpt.backend import asnumpy, get_xp, to_device
from npgpt.checkpoint import atomic_write_json, save_tensors
from npgpt.errors import NpgptError
from npgpt.llama import from_pretrained
from npgpt.model import GPT, GPTConfig, check_config_matches, read_hf_config, records_quantization, weights_header
from npgpt.nn import Module
from npgpt.ops.nn import linear
from npgpt.safeio import Bool, Int, check, check_finite_tensors, load_safetensors
from npgpt.tensor import Tensor, is_grad_enabled

BITS = (8, 4)
QMAX = {8: 127, 4: 7}
QUANT_FILE = "model.safetensors"


def check_scheme(bits, group_size):
    """Validate the user's quantisation options (one-line NpgptErrors)."""
    if bits not in BITS:
        raise NpgptError(f"--bits must be 8 or 4, got {bits}")
    if group_size is not None and group_size <= 0:
        raise NpgptError(f"--group-size must be positive, got {group_size}")


# ---- the maths ---------------------------------------------------------------------------------
def quantize(w, bits=8, group_size=None):
    """Quantise a weight.  w: (in, out) float -> q (in, out) int8 in [-qmax, qmax], scales (n_groups, out) f32."""
    check_scheme(bits, group_size)
    w = np.asarray(asnumpy(w), dtype=np.float32)
    n_in, n_out = w.shape
    g = n_in if group_size is None else group_size
    if n_in % g:
        raise NpgptError(f"--group-size {g} does not divide a weight's {n_in} input rows; "
                         f"choose a divisor of {n_in} (or no --group-size for per-channel scales)")
    groups = w.reshape(n_in // g, g, n_out)                         # (n_groups, G, out)
    scales = np.abs(groups).max(axis=1) / QMAX[bits]                # (n_groups, out)
    # An all-zero channel (e.g. fully pruned) keeps scale 1, not 0, so the division stays finite.
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.rint(groups / scales[:, None, :])
    q = np.clip(q, -QMAX[bits], QMAX[bits]).astype(np.int8)
    return q.reshape(n_in, n_out), scales


def dequantize(q, scales):
    """q: (in, out) ints, scales: (n_groups, out) -> (in, out) float32 (NumPy or CuPy, as q)."""
    n_in, n_out = q.shape
    n_groups = scales.shape[0]
    w = q.reshape(n_groups, n_in // n_groups, n_out).astype(np.float32)
    w *= scales[:, None, :]
    return w.reshape(n_in, n_out)


def pack_int4(q):
    """(in, out) int8 in [-7, 7] -> (ceil(in/2), out) uint8: row 2i low nibble, row 2i+1 high nibble."""
    q = np.asarray(q)
    if q.shape[0] % 2:                                              # odd row count: pad one zero row
        q = np.concatenate([q, np.zeros((1, q.shape[1]), dtype=q.dtype)])
    u = (q.astype(np.int16) + 8).astype(np.uint8)                   # 1..15, never negative
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed, n_rows):
    """Inverse of pack_int4: (ceil(n_rows/2), out) uint8 -> (n_rows, out) int8 (NumPy or CuPy)."""
    xp = get_xp(packed)
    lo = (packed & 0x0F).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    q = xp.empty((2 * packed.shape[0], packed.shape[1]), dtype=np.int8)
    q[0::2], q[1::2] = lo, hi
    return q[:n_rows]


def encode_weight(w, bits=8, group_size=None):
    """(stored integer array, scales) for one (in, out) weight: int8, or packed uint8 at 4 bits."""
    q, scales = quantize(w, bits, group_size)
    return (pack_int4(q) if bits == 4 else q), scales


def decode_weight(stored, scales, n_rows, bits):
    """The float32 (n_rows, out) weight back from what encode_weight stored."""
    q = unpack_int4(stored, n_rows) if bits == 4 else stored
    return dequantize(q, scales)


# Columns per dequantised block: a (768, 256) float32 block is 768 KB, so it is written and then read
# by the matmul while it is still in cache. Decoding one token through GPT-2's (768, 3072) c_fc
# (batch 1) measured 0.33 ms this way against 0.55 ms converting the whole weight first (float32
# weights: 0.06 ms from cache); for the (768, 50257) head shape, 22.6 ms against 53.7 ms, where the
# float32 GEMV reading 154 MB from memory took 24.0 ms (one thread, this 2-core EPYC).
QUANT_BLOCK_COLS = 256


def quantized_matmul(x2, stored, scales, n_in, bits, mins=None):
    """x2 (N, in) float32 @ dequantize(stored) (in, out) -> (N, out) float32, NumPy only.

    With `mins` (n_groups, out), the 4-bit-with-minimum scheme: w = nibble * scale + min.

    The weight is dequantised `QUANT_BLOCK_COLS` columns at a time into one reused buffer, straight
    before the matmul that reads it, so no full float copy of the weight is ever built.
    QuantizedLinear.forward's dequantise-then-multiply is the reference it is tested against.
    """
    N, n_out = x2.shape[0], stored.shape[1]
    n_groups = scales.shape[0]
    y = np.empty((N, n_out), dtype=np.float32)
    cols = QUANT_BLOCK_COLS
    flat = np.empty(n_in * cols, dtype=np.float32)
    if bits == 4:
        nib = np.empty((stored.shape[0], cols), dtype=np.uint8)
    shift = np.float32(0 if mins is not None else 8)                  # with a minimum, nibbles are 0..15
    per_group = n_groups > 1 or mins is not None
    for j in range(0, n_out, cols):
        k = min(cols, n_out - j)
        w = flat[:n_in * k].reshape(n_in, k)                          # (in, k), contiguous
        if bits == 4:                                                 # rows 2i low nibble, 2i+1 high
            blk, nb = stored[:, j:j + k], nib[:, :k]
            np.bitwise_and(blk, 0x0F, out=nb)
            np.subtract(nb[:(n_in + 1) // 2], shift, out=w[0::2])    # in float32
            np.right_shift(blk, 4, out=nb)
            np.subtract(nb[:n_in // 2], shift, out=w[1::2])
        else:
            np.copyto(w, stored[:, j:j + k], casting="unsafe")         # int8 -> float32
        if per_group:
            g = w.reshape(n_groups, n_in // n_groups, k)
            g *= scales[:, None, j:j + k]
            if mins is not None:
                g += mins[:, None, j:j + k]
        np.matmul(x2, w, out=y[:, j:j + k])
    if not per_group:
        y *= scales[0]                                                # x @ (q s) = (x @ q) s
    return y


# ---- the module --------------------------------------------------------------------------------
class QuantizedLinear(Module):
    """y = x @ dequantize(qweight, scales) + bias: a drop-in for npgpt.nn.Linear in inference.

    Holds the stored integers and scales (plain arrays, not Parameters: nothing here trains) and
    builds a float copy of the weight afresh in each forward (with per-channel scales, just the
    integers as floats; the scales then multiply the output), so the model's memory is the integers
    plus one layer's float weight: less memory, paid for with that conversion on every call. No gradient flows into the weight; one still flows to the input.
    """

    def __init__(self, stored, scales, n_in, bits, bias=None, mins=None):
        self.qweight, self.scales, self.mins = stored, scales, mins
        self.n_in, self.n_out, self.bits = n_in, scales.shape[1], bits
        self.bias = None if bias is None else Tensor(bias)
        if mins is not None and (bits != 4 or mins.shape != scales.shape):
            raise NpgptError(f"a minimum per group goes with 4-bit weights and one scale per group "
                             f"(got {bits} bits, mins {mins.shape}, scales {scales.shape})")

    @classmethod
    def from_linear(cls, lin, bits=8, group_size=None):
        stored, scales = encode_weight(lin.weight.data, bits, group_size)
        bias = None if lin.bias is None else asnumpy(lin.bias.data).astype(np.float32)
        return cls(stored, scales, lin.weight.shape[0], bits, bias)

    def dequantized(self):
        """The (in, out) float32 weight this layer computes with."""
        if self.mins is None:
            return decode_weight(self.qweight, self.scales, self.n_in, self.bits)
        # 4 bits with a minimum (llama.cpp's Q4_1): w = nibble * scale + min, nibble 0..15
        n_groups = self.scales.shape[0]
        q = (unpack_int4(self.qweight, self.n_in) + np.int8(8)).astype(np.float32)
        w = q.reshape(n_groups, self.n_in // n_groups, self.n_out)
        w *= self.scales[:, None, :]
        w += self.mins[:, None, :]
        return w.reshape(self.n_in, self.n_out)

    def arrays(self):
        """{name: array} of what this layer stores (moved together between devices)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.mins is not None:
            out["mins"] = self.mins
        return out

    def nbytes(self):
        return sum(a.nbytes for a in self.arrays().values()) + (0 if self.bias is None else self.bias.data.nbytes)

    def forward(self, x):
        xp = get_xp(x.data)
        if get_xp(self.qweight) is not xp:        # follow the input to its device, once
            self.to_device_of(x)
        if xp is np and x.dtype == np.float32 and not (x.requires_grad and is_grad_enabled()):
            # inference on the CPU: dequantise in cache-sized blocks straight into the matmul
            x2 = x.data.reshape(-1, self.n_in)
            y = quantized_matmul(x2, self.qweight, self.scales, self.n_in, self.bits, self.mins)
            if self.bias is not None:
                y += self.bias.data
            return Tensor(y.reshape(x.shape[:-1] + (self.n_out,)))
        return self.forward_reference(x)

    def to_device_of(self, x):
        """Move the stored arrays (and bias) to x's device."""
        dev = x.device
        for name, a in self.arrays().items():
            setattr(self, name, to_device(a, dev))
        if self.bias is not None:
            self.bias = Tensor(to_device(self.bias.data, dev))

    def forward_reference(self, x):
        """Dequantise the whole weight, then multiply (and the path that carries a gradient)."""
        if self.scales.shape[0] == 1 and self.mins is None:
            # one scale per output column: x @ (q * s) = (x @ q) * s, so scale the (small) output
            # instead of the whole weight, one pass over the weight fewer per call
            q = unpack_int4(self.qweight, self.n_in) if self.bits == 4 else self.qweight
            y = linear(x, Tensor(q.astype(np.float32))) * Tensor(self.scales[0])
            return y + self.bias if self.bias is not None else y
        w = Tensor(self.dequantized())
        return linear(x, w, self.bias) if self.bias is not None else linear(x, w)


class QuantizedEmbedding(Module):
    """A token embedding kept as int8 (one float32 scale per group of values along n_embd), also used
    as the tied LM head: a drop-in for a model's (V, C) embedding when its weights stay quantised.

    `head` is the QuantizedLinear (in=C, out=V) of the LM head, logits = x @ head: each token's vector
    is one of its output columns, so a lookup gathers columns and scales them; nothing the size of
    the float table is ever built (at batch 1, 576 values per token instead of the 113 MB table of
    SmolLM2).
    """

    def __init__(self, head: QuantizedLinear):
        if head.bits != 8 or head.mins is not None:
            raise NpgptError("a quantised embedding is stored at 8 bits")
        self.head = head

    @property
    def shape(self):
        return (self.head.n_out, self.head.n_in)              # (V, C), as the float table's

    def lookup(self, idx):
        """idx (...) int -> (..., C) float32 rows."""
        h = self.head
        xp = get_xp(h.qweight)
        ids = xp.asarray(idx).reshape(-1)
        n_groups = h.scales.shape[0]
        q = h.qweight[:, ids].astype(np.float32)                   # (C, N)
        q = q.reshape(n_groups, h.n_in // n_groups, -1) * h.scales[:, None, ids]
        return q.reshape(h.n_in, -1).T.reshape(tuple(idx.shape) + (h.n_in,))

    def logits(self, x):
        """x (..., C) Tensor -> (..., V) Tensor (gradient to x only)."""
        return self.head(x)

    def dequantized(self):
        """The (V, C) float32 table."""
        return self.head.dequantized().T


# ---- which weights -----------------------------------------------------------------------------
LINEAR_PATHS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def linear_layers(model):
    """[(module name, owner module, attribute, layer)] for every linear layer of the blocks, in order."""
    out = []
    for i, block in enumerate(model.transformer.h):
        for path in LINEAR_PATHS:
            owner_name, attr = path.split(".")
            owner = getattr(block, owner_name)
            out.append((f"transformer.h.{i}.{path}", owner, attr, getattr(owner, attr)))
    return out


# ---- folders -----------------------------------------------------------------------------------
def _check_plain(model):
    """Quantised folders are GPT-2's layout (or Llama's): a GPT with recipe switches is refused."""
    switches = getattr(model.config, "switches", dict)()
    if {k: v for k, v in switches.items() if k != "zero_init_proj"}:
        raise NpgptError(f"quantising a model with recipe switches ({', '.join(switches)}) is not supported; "
                         f"keep it in float (npgpt folders of such models load with npgpt)")


def quantize_model(model, bits=8, group_size=None, embedding=False):
    """Replace every linear layer of `model` with a QuantizedLinear, in place; returns the model.

    With embedding=True the token embedding is rounded to the same grid (quantised, then dequantised
    back into its Parameter), so the model computes exactly what a reloaded quantised folder does.
    """
    check_scheme(bits, group_size)
    _check_plain(model)
    for _, owner, attr, lin in linear_layers(model):
        if not isinstance(lin, QuantizedLinear):
            setattr(owner, attr, QuantizedLinear.from_linear(lin, bits, group_size))
    if embedding:
        wte = model.transformer.wte.weight
        stored, scales = encode_weight(asnumpy(wte.data).T, bits, group_size)
        w = decode_weight(stored, scales, wte.shape[1], bits).T
        wte.data[...] = get_xp(wte.data).asarray(w)
    model.quantization = {"bits": bits, "group_size": group_size, "embedding": bool(embedding)}
    return model


def quantized_tensors(model, bits=8, group_size=None, embedding=False):
    """{key: array} for model.safetensors of a quantised folder (see the module docstring)."""
    check_scheme(bits, group_size)
    _check_plain(model)
    tensors = {}
    quantized = {}
    for name, _, _, lin in linear_layers(model):
        q = lin if isinstance(lin, QuantizedLinear) else QuantizedLinear.from_linear(lin, bits, group_size)
        if q.bits != bits:
            raise NpgptError(f"{name} is already quantised to {q.bits} bits; quantise the original model instead")
        quantized[f"{name}.weight"] = q
        tensors[f"{name}.qweight"] = np.ascontiguousarray(asnumpy(q.qweight))
        tensors[f"{name}.scales"] = np.ascontiguousarray(asnumpy(q.scales))
        if q.bias is not None:
            tensors[f"{name}.bias"] = np.ascontiguousarray(asnumpy(q.bias.data))
    for name, p in model.named_parameters():
        if name == "transformer.wte.weight" and embedding:
            stored, scales = encode_weight(asnumpy(p.data).T, bits, group_size)
            tensors["transformer.wte.qweight"] = np.ascontiguousarray(stored)
            tensors["transformer.wte.scales"] = scales
        elif name not in quantized and name not in tensors:
            tensors[name] = np.ascontiguousarray(asnumpy(p.data))
    return tensors


def save_quantized(model, path, bits=8, group_size=None, embedding=False):
    """Write a quantised model folder: config.json (with the scheme) + model.safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = quantized_tensors(model, bits, group_size, embedding)
    hf = model.config.to_hf()
    hf.setdefault("npgpt", {})["quantization"] = {"bits": bits, "group_size": group_size,
                                                 "embedding": bool(embedding)}
    save_tensors(path / QUANT_FILE, tensors, metadata={"format": "npgpt-quant"})
    atomic_write_json(path / "config.json", hf)


def read_scheme(hf, where="config.json"):
    """The validated {"bits", "group_size", "embedding"} of a config.json dict, or None."""
    if not records_quantization(hf):
        return None
    scheme = hf["npgpt"]["quantization"]
    scheme = check(scheme, {"bits": Int(), "group_size": Int(default=None, none_ok=True),
                            "embedding": Bool(default=False)}, where, prefix="npgpt.quantization.")
    check_scheme(scheme["bits"], scheme["group_size"])
    return scheme


def quantized_shapes(config, scheme):
    """({tensor name: shape}, {quantised tensor name: safetensors dtype}) that a quantised folder of
    `config` holds under `scheme`: what load_quantized checks the file's header against."""
    bits, g = scheme["bits"], scheme["group_size"]
    shapes, dtypes = config.param_shapes(), {}

    def swap(name, n_in, n_out):
        if g is not None and n_in % g:
            raise NpgptError(f"config.json: npgpt.quantization.group_size {g} does not divide {name}'s {n_in} rows")
        shapes[f"{name}.qweight"] = ((n_in + 1) // 2, n_out) if bits == 4 else (n_in, n_out)
        shapes[f"{name}.scales"] = (1 if g is None else n_in // g, n_out)
        dtypes[f"{name}.qweight"], dtypes[f"{name}.scales"] = ("U8" if bits == 4 else "I8"), "F32"

    for key, shape in list(shapes.items()):
        if key.endswith(".weight") and key.rsplit(".", 2)[-2] in ("c_attn", "c_proj", "c_fc"):
            del shapes[key]
            swap(key[:-len(".weight")], *shape)
    if scheme["embedding"]:
        V, C = shapes.pop("transformer.wte.weight")
        swap("transformer.wte", C, V)
    return shapes, dtypes


def load_quantized(path, hf=None, device="cpu", **overrides):
    """A GPT from a quantised folder (written by save_quantized), in eval mode, linear layers quantised.

    `hf` is the parsed config.json when the caller (load_model) has read it already;
    `overrides` replace config fields as from_pretrained's do (e.g. dropout).
    """
    path = Path(path)
    if hf is None:
        hf = read_hf_config(path)
    scheme = read_scheme(hf, str(path / "config.json"))
    if scheme is None:
        raise NpgptError(f"{path / 'config.json'} records no npgpt.quantization; load it with GPT.from_pretrained")
    f = path / QUANT_FILE
    config = GPTConfig.from_hf(hf, str(path / "config.json"))
    bits = scheme["bits"]
    header = weights_header(path)
    # every shape and dtype checked against config.json before anything is allocated
    check_config_matches(config, header.shapes(), path / "config.json", f,
                         lambda: quantized_shapes(config, scheme)[0])
    for key, dtype in quantized_shapes(config, scheme)[1].items():
        if header.tensors[key].dtype != dtype:
            raise NpgptError(f"{f}: tensor {key} is {header.tensors[key].dtype}, expected {dtype}; the folder "
                             f"does not match its config.json")
    raw = load_safetensors(f, header)
    check_finite_tensors(raw, f)
    model = GPT(replace(config, **overrides), device="cpu")
    for name, owner, attr, lin in linear_layers(model):
        bias = raw.pop(f"{name}.bias") if lin.bias is not None else None
        setattr(owner, attr, QuantizedLinear(raw.pop(f"{name}.qweight"), raw.pop(f"{name}.scales"),
                                             lin.weight.shape[0], bits, bias))
    if scheme["embedding"]:
        stored, scales = raw.pop("transformer.wte.qweight"), raw.pop("transformer.wte.scales")
        raw["transformer.wte.weight"] = decode_weight(stored, scales, config.n_embd, bits).T
    model.load_state_dict({k: v.astype(np.float32, copy=False) for k, v in raw.items()})
    model.quantization = scheme
    model.eval()
    return model.to(device) if str(device) != "cpu" else model



# ---- the one loader ------------------------------------------------------------------------------
def load_model(path, device="cpu", **overrides):
    """A model from any model folder: quantised (save_quantized) or float (npgpt or Hugging Face GPT-2).

    The one place that decides how a folder loads, so npgpt.model never needs to know about
    quantisation. In eval mode, as GPT.from_pretrained; `overrides` replace config fields (e.g. dropout).
    """
    path = Path(path)
    if not path.is_dir():
        raise NpgptError(f"model folder {path} does not exist")
    hf = read_hf_config(path)
    if read_scheme(hf, str(path / "config.json")) is not None:
        return load_quantized(path, hf, device=device, **overrides)
    return from_pretrained(path, device=device, **overrides)
