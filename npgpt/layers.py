"""The linear layers beyond nn.Linear, and where a model keeps its linear layers.

    QuantizedLinear   y = x @ dequantize(qweight, scales) + b: int8 or packed int4 weights with float32
                      scales, dequantised block by block for each call (npgpt.quant writes the folders)
    QuantizedEmbedding  an int8 token table that is also the tied LM head (GGUF models kept quantised)
    LoRALinear        a frozen base (Linear or QuantizedLinear) plus a trainable low-rank update
                      s * dropout(x) A B (npgpt.lora applies, merges and saves adapters)
    MultiLoRALinear   one base and several adapters at inference: each row of a batch gets its own
                      adapter's update (`adapter_rows` says which), the base matmul stays shared
    linear_layers     every linear layer of a model with its name, owner and attribute, so quantising
                      or adapting a model is a loop that swaps layers, whatever the model family

The quantisation maths sit here too (quantize, dequantize, pack_int4, encode_weight, ...), since the
layer decodes its own weight. Scheme (symmetric, no zero point): a weight w of shape (in, out) is cut
into groups of `group_size` consecutive input rows (one group of all rows when `group_size` is None,
i.e. per output channel); each (group, output column) gets its own scale

    scale = max |w[group, j]| / qmax          qmax = 127 for 8 bits, 7 for 4 bits
    q     = round(w / scale)  in [-qmax, qmax]
    w'    = q * scale                         (the dequantised weight)

At 4 bits two values share a byte: row 2i in the low nibble, row 2i+1 in the high nibble, each stored
as q + 8 (0..15).
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager

import numpy as np

from npgpt import precision
from npgpt.backend import asnumpy, get_xp, to_device
from npgpt.errors import NpgptError
from npgpt.nn import Linear, Module, Parameter
from npgpt.ops.nn import dropout, linear
from npgpt.tensor import Function, Tensor, is_grad_enabled

BITS = (8, 4)
QMAX = {8: 127, 4: 7}


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

    def forward(self, idx):
        """idx (B, T) ints (array or Tensor) -> (B, T, C) Tensor; no gradient reaches the table."""
        return Tensor(self.lookup(idx.data if isinstance(idx, Tensor) else idx))

    def lookup(self, idx):
        """idx (...) int -> (..., C) float32 rows."""
        h = self.head
        if get_xp(h.qweight) is not get_xp(idx):              # follow the ids to their device, once
            h.to_device_of(Tensor(idx))
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


# ---- LoRA ---------------------------------------------------------------------------------------
class QuantBaseLinear(Function):
    """y = x @ dequant(q) + b for a frozen QuantizedLinear: the gradient flows to x only.

    x: (..., Cin) -> (..., Cout). Saves no float weight: backward dequantises the layer again, so
    training memory keeps the int8/int4 base plus one layer's float weight at a time.
    """
    def forward(self, x):
        w = self.layer.dequantized()                                   # (Cin, Cout), freed after
        x2 = x.reshape(-1, x.shape[-1])
        y = precision.matmul(x2, w)
        if self.layer.bias is not None:
            y += self.layer.bias.data
        self.in_shape = x.shape
        return y.reshape(x.shape[:-1] + (w.shape[1],))

    def backward(self, dout):
        # forward: y = x @ w + b  =>  dx = dy @ w^T  (w frozen: no dw, no db)
        w = self.layer.dequantized()
        d2 = dout.reshape(-1, dout.shape[-1])
        return precision.matmul(d2, w.T).reshape(self.in_shape)


ADAPTERS_ON = contextvars.ContextVar("npgpt_lora_adapters_on", default=True)


@contextmanager
def adapters_disabled():
    """Within the block every LoRALinear computes its frozen base alone: a LoRA model is then its own
    base model, the reference that DPO and RL compare against, without a second copy in memory. A
    context setting: other threads (a server's engine, a replica) keep their adapters."""
    token = ADAPTERS_ON.set(False)
    try:
        yield
    finally:
        ADAPTERS_ON.reset(token)


class LoRALinear(Module):
    """A frozen base linear layer (Linear or QuantizedLinear) plus a trainable low-rank update.

    The base's own parameters keep their names (`...c_attn.weight`, `...c_attn.bias`), so the
    model still saves and loads as GPT-2; the adapters are `...c_attn.lora_A` (in, r) and
    `...c_attn.lora_B` (r, out).
    """

    def __init__(self, base, r, scaling, dropout_p=0.0, rng=None):
        rng = rng or np.random.default_rng()
        self.base = base
        self.r, self.scaling, self.dropout = int(r), float(scaling), float(dropout_p)
        n_in, n_out = (base.n_in, base.n_out) if isinstance(base, QuantizedLinear) else base.weight.shape
        self.n_in, self.n_out = n_in, n_out
        like = base.scales if isinstance(base, QuantizedLinear) else base.weight.data
        xp = get_xp(like)
        bound = 1.0 / math.sqrt(n_in)                                 # kaiming_uniform(a=sqrt(5)), as PEFT
        a = rng.uniform(-bound, bound, size=(n_in, self.r)).astype(np.float32)
        dtype = np.float32 if isinstance(base, QuantizedLinear) else base.weight.dtype
        self.lora_A = Parameter(xp.asarray(a, dtype=dtype))                      # (in, r)
        self.lora_B = Parameter(xp.zeros((self.r, n_out), dtype=dtype))          # (r, out)
        self.rng = rng
        for p in self.base_parameters():
            p.requires_grad = False

    def _children(self):
        # the base's parameters appear under this module's name, then the adapters
        if isinstance(self.base, Module):
            yield from self.base._children()
        yield "lora_A", self.lora_A
        yield "lora_B", self.lora_B

    def base_parameters(self):
        return [v for _, v in self.base._children() if isinstance(v, Parameter)]

    def forward(self, x):                                             # (..., in) -> (..., out)
        if isinstance(self.base, QuantizedLinear):
            self._follow(x)
            y = QuantBaseLinear.apply(x, layer=self.base)
        else:
            y = self.base(x)
        if not ADAPTERS_ON.get():                                     # adapters_disabled(): the base model
            return y
        h = dropout(x, self.dropout, self.rng, self.training) if self.dropout else x
        return y + linear(linear(h, self.lora_A), self.lora_B) * self.scaling

    def _follow(self, x):
        """Move the quantised base to the input's device (as QuantizedLinear.forward does)."""
        if get_xp(self.base.qweight) is not get_xp(x.data):
            self.base.to_device_of(x)

    def delta(self):
        """The (in, out) weight update s A B, as a plain array."""
        return (self.lora_A.data @ self.lora_B.data) * self.scaling

    def merged(self):
        """A plain Linear holding W + s A B (a quantised base is dequantised first)."""
        if isinstance(self.base, QuantizedLinear):
            w = self.base.dequantized()
            b = None if self.base.bias is None else self.base.bias.data
        else:
            w, b = self.base.weight.data, None if self.base.bias is None else self.base.bias.data
        return float_linear((w + self.delta()).astype(w.dtype), b)


def float_linear(w, b):
    """A plain Linear holding weight w (in, out) and bias b (or None), without a random init."""
    out = Linear.__new__(Linear)
    out.weight = Parameter(w)
    out.bias = None if b is None else Parameter(b.copy())
    return out


# ---- several adapters over one base, chosen per row ---------------------------------------------
# Which adapter each row of the batch being computed uses: an int array (B,), -1 for the base alone.
# A context variable (set with `adapter_rows`), so a server's decoding thread choosing rows never
# reaches another thread's forward; None (the default) runs every row on the base.
ADAPTER_ROWS = contextvars.ContextVar("npgpt_adapter_rows", default=None)


@contextmanager
def adapter_rows(rows):
    """Run the block's forwards with row i of every batch on adapter rows[i] (-1: the base alone)."""
    token = ADAPTER_ROWS.set(None if rows is None else np.asarray(rows, dtype=np.int64))
    try:
        yield
    finally:
        ADAPTER_ROWS.reset(token)


class MultiLoRALinear(Module):
    """A frozen base linear layer and K LoRA adapters, for inference: row b of the input gets

        y[b] = x[b] W + bias + s_k x[b] A_k B_k      k = adapter_rows()[b]  (k = -1: the base alone)

    The base matmul runs once over all rows; each adapter's two thin matmuls run on the rows that
    chose it (a gather by adapter, as S-LoRA / Punica batch mixed adapters). Adapters may differ in
    rank and may leave this layer out (None). The adapters are plain arrays, not Parameters: the
    model's parameters and checkpoint keys stay the base's, and nothing here trains.
    """

    def __init__(self, base, adapters):
        self.base = base
        n_in, n_out = (base.n_in, base.n_out) if isinstance(base, (QuantizedLinear, LoRALinear)) \
            else base.weight.shape
        self.n_in, self.n_out = n_in, n_out
        self.adapters = list(adapters)           # [(A (in, r), B (r, out), scaling) or None] per adapter

    def _children(self):
        if isinstance(self.base, Module):        # the base's parameters keep this layer's name
            yield from self.base._children()

    def forward(self, x):                                             # (B, ..., in) -> (B, ..., out)
        if is_grad_enabled():
            raise NpgptError("MultiLoRALinear is for inference (under no_grad); train one adapter with LoRALinear")
        y = self.base(x)
        rows = ADAPTER_ROWS.get()
        if rows is None or not (rows >= 0).any():
            return y
        if len(rows) != x.shape[0]:
            raise NpgptError(f"adapter_rows names {len(rows)} rows but the batch has {x.shape[0]}")
        xp = get_xp(x.data)
        out = y.data.copy()
        for k in np.unique(rows[rows >= 0]):
            ad = self.adapters[k]
            if ad is None:                       # this adapter leaves the layer alone
                continue
            a, b, s = ad
            idx = xp.asarray(np.nonzero(rows == k)[0])
            out[idx] += ((x.data[idx] @ a) @ b * s).astype(out.dtype, copy=False)
        return Tensor(out)


# ---- where a model keeps its linear layers ------------------------------------------------------
LINEAR_TYPES = (Linear, QuantizedLinear, LoRALinear, MultiLoRALinear)


def linear_layers(model):
    """[(module name, owner module, attribute, layer)] for every linear layer of `model` (a Linear,
    QuantizedLinear or LoRALinear), in module order: for GPT-2 the four of each block, attn.c_attn,
    attn.c_proj, mlp.c_fc, mlp.c_proj. A LoRALinear's base is part of it, not a layer of its own."""
    out = []
    for name, owner in model.named_modules():
        if isinstance(owner, QuantizedEmbedding):
            continue                          # its QuantizedLinear is the tied head, not a layer of the blocks
        for attr, layer in vars(owner).items():
            if isinstance(layer, LINEAR_TYPES):
                out.append((f"{name}.{attr}" if name else attr, owner, attr, layer))
    return out
