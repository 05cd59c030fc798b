"""Fused ops of the Llama family: RMSNorm, rotary position embeddings, SwiGLU and grouped-query
causal attention.

A Llama block differs from a GPT-2 block in four places, one op each:

    RMSNorm       y = x / rms(x) * w                   (no mean subtracted, no shift)
    RoPE          q, k turned by a position-dependent angle per channel pair (no position table)
    SwiGLU        down(silu(gate(x)) * up(x))           (a gated MLP, three matrices)
    GQA           groups of query heads share one key/value head (num_key_value_heads)

Each is one Function with forward directly above a hand-written backward, and a composed
`*_reference` from primitive ops below it; tests/test_llama_ops.py checks the two against each
other and every gradient against finite differences (float64). The reference switch is the GPT
ops' (npgpt.ops.nn): each public op (`rms_norm`, `rope`, `swiglu`, `gqa_attention`) reads
`REFERENCE_OPS` and calls its `*_reference` twin when it is set, so `with reference_ops():` and
`Llama(cfg, ops="reference")` run a Llama on primitives only. The conventions are Hugging
Face's (`modeling_llama.py`), so weights from a Llama or Qwen2 folder run unchanged: RoPE turns
the pair (x_i, x_{i + hs/2}) ("rotate_half"), and query head h reads key/value head h // (nh / nkv).

Shapes: B batch, T time, C channels, nh query heads, nkv key/value heads, hs head size, H MLP width.
"""

from __future__ import annotations

import math

import numpy as np

from npgpt.backend import get_xp
from npgpt.ops import concatenate as _concatenate
from npgpt.ops import softmax as _softmax
from npgpt.ops import where as _where
from npgpt.errors import NpgptError
from npgpt.ops.nn import REFERENCE_OPS, causal_bias, dropout_mask
from npgpt.ops.parallel import for_row_blocks
from npgpt.ops.reduce import softmax_array
from npgpt.tensor import Function


# ---- RMSNorm -----------------------------------------------------------------------------------
class RMSNorm(Function):
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis.  x: (..., C), w: (C,) -> (..., C).

    Root-mean-square normalisation (Zhang & Sennrich 2019): LayerNorm without the mean and the
    shift. Forward keeps x and the per-row rstd (N, 1), not the normalised tensor (as llm.c's
    LayerNorm keeps its statistics). Both passes run as row kernels over cache-sized blocks spread
    over the cores (`for_row_blocks`, as LayerNorm does); the weight gradient is one sum over all
    rows, so its bits do not depend on the blocks."""
    def forward(self, x, w):
        xp = get_xp(x)
        C = x.shape[-1]
        x2 = x.reshape(-1, C)                                 # (N, C)
        y = xp.empty(x2.shape, dtype=x.dtype)
        rstd = xp.empty((x2.shape[0], 1), dtype=x.dtype)      # (N, 1)

        def rows(r):
            ms = xp.einsum("ij,ij->i", x2[r], x2[r])[:, None] / C   # mean of squares, no x*x temporary
            rstd[r] = 1.0 / xp.sqrt(ms + self.eps)
            xp.multiply(x2[r], rstd[r], out=y[r])
            y[r] *= w

        for_row_blocks(x2.shape[0], C, rows, xp)
        self.save(x2, w, rstd)
        return y.reshape(x.shape)

    def backward(self, dout):
        x2, w, rstd = self.saved
        xp = get_xp(dout)
        N, C = x2.shape
        d2 = dout.reshape(x2.shape)                           # (N, C)
        xhat = xp.empty(x2.shape, dtype=x2.dtype)
        dx = xp.empty(x2.shape, dtype=dout.dtype)
        for_row_blocks(N, C, lambda r: xp.multiply(x2[r], rstd[r], out=xhat[r]), xp)
        # forward: y = xhat * w  =>  dw = sum_rows dy * xhat (one sum over every row), dxhat = dy * w
        dw = xp.einsum("ij,ij->j", d2, xhat)

        def rows(r):
            # forward: xhat = x * rstd, rstd = (mean(x^2) + eps)^(-1/2)  =>
            #   dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
            dxhat = d2[r] * w
            proj = xp.einsum("ij,ij->i", dxhat, xhat[r])[:, None] / C
            xh = xhat[r]
            xh *= proj
            dxhat -= xh
            xp.multiply(dxhat, rstd[r], out=dx[r])

        for_row_blocks(N, C, rows, xp)
        return dx.reshape(dout.shape), dw


def rms_norm(x, w, eps=1e-6):
    if REFERENCE_OPS.get():
        return rms_norm_reference(x, w, eps)
    return RMSNorm.apply(x, w, eps=eps)


def rms_norm_reference(x, w, eps=1e-6):
    return x / ((x * x).mean(axis=-1, keepdims=True) + eps).sqrt() * w


# ---- rotary position embeddings ----------------------------------------------------------------
def rope_inv_freq(head_dim, theta=10000.0, scaling=None):
    """The rotation speed of each channel pair: (hs/2,) float64, theta^(-2i/hs), adjusted by
    `scaling` (a validated rope_scaling dict, or None):

      {"rope_type": "linear", "factor": f}      positions divided by f (all speeds / f)
      {"rope_type": "llama3", "factor": f, "low_freq_factor": lo, "high_freq_factor": hi,
       "original_max_position_embeddings": n}   Llama 3.1's: slow channels (wavelength > n / lo)
                                                / f, fast ones (< n / hi) kept, the band between
                                                blended smoothly
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        n = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > n / lo, inv / f, inv)
        smooth = (n / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= n / hi) & (wavelen <= n / lo)
        return np.where(medium, blended, scaled)
    return inv


def rope_tables(positions, inv_freq, dtype=np.float32):
    """cos and sin of every (position, channel pair) angle: positions (...) int (NumPy or CuPy)
    and inv_freq (hs/2,) -> two arrays (..., hs/2) of `dtype`, on the positions' device. The
    angles are formed in float64, so a position in the tens of thousands keeps its precision."""
    xp = get_xp(positions)
    angles = xp.asarray(positions, dtype=np.float64)[..., None] * xp.asarray(inv_freq)
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def _per_head(t):
    """cos/sin (T, h) or (B, T, h) -> a view that broadcasts over (B, T, n, h)."""
    return t[:, None, :] if t.ndim == 2 else t[:, :, None, :]


class Rope(Function):
    """Rotary position embedding (Su et al. 2021) in Hugging Face's half-split layout.

    x: (B, T, n, hs); cos, sin (options, from rope_tables): (T, hs/2), or (B, T, hs/2) when each
    row has its own positions -> (B, T, n, hs). For i < hs/2 the pair (x_i, x_{i+hs/2}) turns by
    the angle whose cos and sin are given. A rotation's inverse is its transpose, so backward turns
    the gradient back by the same angle; nothing is saved. Both passes run over blocks of
    sequences spread over the cores (`for_row_blocks`)."""
    def forward(self, x):
        xp = get_xp(x)
        y = xp.empty_like(x)

        def rows(r):                                          # sequences r
            x1, x2, c, s = self._halves(x, r)
            h = x1.shape[-1]
            xp.multiply(x1, c, out=y[r, ..., :h])
            y[r, ..., :h] -= x2 * s                           # y1 = x1 cos - x2 sin
            xp.multiply(x2, c, out=y[r, ..., h:])
            y[r, ..., h:] += x1 * s                           # y2 = x2 cos + x1 sin

        for_row_blocks(x.shape[0], x.size // max(x.shape[0], 1), rows, xp)
        return y

    def backward(self, dout):
        xp = get_xp(dout)
        dx = xp.empty_like(dout)

        def rows(r):
            d1, d2, c, s = self._halves(dout, r)
            h = d1.shape[-1]
            # forward: [y1; y2] = [[cos, -sin], [sin, cos]] [x1; x2]  =>  dx = the transpose times dy
            xp.multiply(d1, c, out=dx[r, ..., :h])
            dx[r, ..., :h] += d2 * s                          # dx1 = dy1 cos + dy2 sin
            xp.multiply(d2, c, out=dx[r, ..., h:])
            dx[r, ..., h:] -= d1 * s                          # dx2 = dy2 cos - dy1 sin

        for_row_blocks(dout.shape[0], dout.size // max(dout.shape[0], 1), rows, xp)
        return dx

    def _halves(self, a, r):
        """The two halves of a's sequences r, and the cos / sin tables that turn them."""
        h = a.shape[-1] // 2
        c, s = (t if t.ndim == 2 else t[r] for t in (self.cos, self.sin))
        return a[r, ..., :h], a[r, ..., h:], _per_head(c), _per_head(s)


def rope(x, cos, sin):
    if x.shape[-1] % 2:
        raise ValueError(f"rope: head size {x.shape[-1]} must be even")
    if cos.shape != sin.shape or cos.shape[-1] != x.shape[-1] // 2 or cos.shape[-2] != x.shape[1]:
        raise ValueError(f"rope: tables {cos.shape} do not fit x {x.shape} (want (T, hs/2) or (B, T, hs/2))")
    if REFERENCE_OPS.get():
        return rope_reference(x, cos, sin)
    return Rope.apply(x, cos=cos, sin=sin)


def rope_reference(x, cos, sin):
    """The same rotation composed from slices, products and a concatenation (HF's rotate_half)."""
    h = x.shape[-1] // 2
    c, s = _per_head(cos), _per_head(sin)
    x1, x2 = x[..., :h], x[..., h:]
    return _concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


# ---- SwiGLU ------------------------------------------------------------------------------------
def _sigmoid(xp, g):
    return 0.5 * (xp.tanh(0.5 * g) + 1.0)                     # no exp overflow for large |g|


class SwiGLU(Function):
    """y = silu(g) * u = g * sigmoid(g) * u (Shazeer 2020).  g, u: (..., H) -> (..., H).

    g and u are the gate_proj and up_proj outputs; backward recomputes sigmoid(g) from g instead
    of keeping it (one (N, H) activation less per layer)."""
    def forward(self, g, u):
        xp = get_xp(g)
        H = g.shape[-1]
        g2, u2 = g.reshape(-1, H), u.reshape(-1, H)           # (N, H)
        y = xp.empty(g2.shape, dtype=g.dtype)

        def rows(r):
            yr = y[r]
            yr[...] = _sigmoid(xp, g2[r])
            yr *= g2[r]
            yr *= u2[r]

        for_row_blocks(g2.shape[0], H, rows, xp)
        self.save(g, u)
        return y.reshape(g.shape)

    def backward(self, dout):
        g, u = self.saved
        xp = get_xp(dout)
        H = g.shape[-1]
        g2, u2, d2 = g.reshape(-1, H), u.reshape(-1, H), dout.reshape(-1, H)
        dg, du = xp.empty(g2.shape, dtype=dout.dtype), xp.empty(g2.shape, dtype=dout.dtype)

        def rows(r):
            gr, s = g2[r], _sigmoid(xp, g2[r])
            xp.multiply(gr, s, out=du[r])                     # silu(g)
            du[r] *= d2[r]                                    # forward: y = silu(g) u  =>  du = dy silu(g)
            # d silu/dg = s + g s (1 - s) = s (1 + g (1 - s))
            d = dg[r]
            xp.subtract(1.0, s, out=d)
            d *= gr
            d += 1.0
            d *= s
            d *= u2[r]
            d *= d2[r]

        for_row_blocks(g2.shape[0], H, rows, xp)
        return dg.reshape(g.shape), du.reshape(g.shape)


def swiglu(g, u):
    if g.shape != u.shape:
        raise ValueError(f"swiglu: gate {g.shape} and up {u.shape} differ")
    if REFERENCE_OPS.get():
        return swiglu_reference(g, u)
    return SwiGLU.apply(g, u)


def swiglu_reference(g, u):
    return g * g.sigmoid() * u


# ---- grouped-query causal attention ------------------------------------------------------------
def _group_queries(q, nkv, scale):
    """q (B, T, nh, hs) -> scaled queries (B, nkv, g T, hs): the g heads that share a key/value
    head stacked one after another along the rows, so one matmul against that head's keys serves
    the whole group and K/V are never repeated."""
    xp = get_xp(q)
    B, T, nh, hs = q.shape
    g = nh // nkv
    out = xp.empty((B, nkv, g, T, hs), dtype=q.dtype)
    out[...] = q.reshape(B, T, nkv, g, hs).transpose(0, 2, 3, 1, 4)
    out *= scale
    return out.reshape(B, nkv, g * T, hs)


def ungroup_heads(y, T):
    """(B, nkv, g T, hs) -> (B, T, nkv g, hs), the inverse of _group_queries' layout."""
    B, nkv, gT, hs = y.shape
    return y.reshape(B, nkv, gT // T, T, hs).transpose(0, 3, 1, 2, 4).reshape(B, T, -1, hs)


def gqa_probs(q, k, key_mask=None):
    """Softmax of the scaled, causally masked scores of grouped queries (plain arrays, for cached
    inference).  q: (B, nh, Tq, hs), k: (B, nkv, Tk, hs) (the queries are the last Tq of Tk
    positions) -> (B, nh, Tq, Tk). key_mask (B, Tk) bool marks real (non-padding) keys."""
    xp = get_xp(q)
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    qg = q.reshape(B, nkv, (nh // nkv) * Tq, hs)              # a view: heads of a group are adjacent
    att = (qg * (1.0 / math.sqrt(hs))) @ k.swapaxes(-1, -2)   # (B, nkv, g Tq, Tk)
    att5 = att.reshape(B, nkv, nh // nkv, Tq, Tk)
    att5 += causal_bias(Tq, Tk, att.dtype, xp)
    if key_mask is not None:
        # finite, not -inf: a padding query that sees only padding keys stays finite (not NaN)
        att5[...] = xp.where(key_mask[:, None, None, None, :], att5, att.dtype.type(-1e30))
    return softmax_array(att, out=att).reshape(B, nh, Tq, Tk)


class GroupedQueryAttention(Function):
    """Causal attention in which each group of nh / nkv query heads shares one key/value head
    (Ainslie et al. 2023; nkv = nh is multi-head attention, nkv = 1 multi-query).

    q: (B, T, nh, hs), k, v: (B, T, nkv, hs) -> (B, T, nh * hs). Options: dropout (probability on
    the attention weights), rng. Query head h reads key/value head h // (nh / nkv). The g = nh / nkv
    queries of a group are stacked along the rows, (B, nkv, g T, hs), so each score matmul and each
    gradient matmul runs against the nkv heads as they are: the gradient of a shared key or value
    head sums over its group inside the matmul, and no repeated K/V is ever formed. Sequences are
    independent, so both passes run over cache-sized blocks of the batch (`for_row_blocks`, one
    block after another, as GPT-2's attention does): a block's (b, nkv, g T, T) scores stay in cache
    from the QK^T matmul through the mask and the softmax to the .V matmul, and each score matrix is
    the same matmul it would be in one whole-batch call, so the blocks change no number."""
    def forward(self, q, k, v):
        xp = get_xp(q)
        B, T, nh, hs = q.shape
        nkv = k.shape[2]
        if k.shape != (B, T, nkv, hs) or v.shape != k.shape or nh % nkv:
            raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit grouped-query "
                             f"attention (nh a multiple of nkv, same B, T, hs)")
        g = nh // nkv
        qg = _group_queries(q, nkv, 1.0 / math.sqrt(hs))      # (B, nkv, g T, hs), scaled
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)   # (B, nkv, T, hs) views
        att = xp.empty((B, nkv, g * T, T), dtype=q.dtype)
        y = xp.empty((B, nkv, g * T, hs), dtype=q.dtype)
        keep = None
        if self.dropout > 0:   # drawn here, whole and in order, so a seeded run is the same however it is split
            keep = dropout_mask(att.shape, self.dropout, self.rng, xp, att.dtype)
        bias = causal_bias(T, T, att.dtype, xp)

        def rows(r):                                          # sequences r: their scores stay in cache
            a = att[r]                                        # (b, nkv, g T, T)
            xp.matmul(qg[r], kh[r].swapaxes(-1, -2), out=a)
            a.reshape(a.shape[0], nkv, g, T, T)[...] += bias
            softmax_array(a, out=a)
            xp.matmul(a * keep[r] if keep is not None else a, vh[r], out=y[r])

        for_row_blocks(B, nh * T * T, rows, xp, threaded=False)   # BLAS spreads each matmul over the cores
        self.save(qg, kh, vh, att, keep)
        return ungroup_heads(y, T).reshape(B, T, nh * hs)

    def backward(self, dout):
        qg, kh, vh, att, keep = self.saved
        xp = get_xp(dout)
        B, nkv, gT, hs = qg.shape
        T = kh.shape[2]
        # dout (B, T, nh hs) -> the grouped layout (B, nkv, g T, hs) of y
        dy = xp.empty((B, nkv, gT // T, T, hs), dtype=dout.dtype)
        dy[...] = dout.reshape(B, T, nkv, gT // T, hs).transpose(0, 2, 3, 1, 4)
        dy = dy.reshape(B, nkv, gT, hs)
        dq = xp.empty(qg.shape, dtype=dout.dtype)             # (B, nkv, g T, hs)
        dk = xp.empty(kh.shape, dtype=dout.dtype)             # (B, nkv, T, hs)
        dv = xp.empty(vh.shape, dtype=dout.dtype)

        def rows(r):                                          # sequences r
            a = att[r]
            a_d = a * keep[r] if keep is not None else a
            # forward: y = att_d @ v  =>  dv = att_d^T @ dy (summing the group's rows), datt_d = dy @ v^T
            xp.matmul(a_d.swapaxes(-1, -2), dy[r], out=dv[r])
            d = dy[r] @ vh[r].swapaxes(-1, -2)                # (b, nkv, g T, T)
            if keep is not None:
                d *= keep[r]                                  # forward: att_d = att * keep
            # forward: att = softmax(s)  =>  ds = att * (datt - sum_j datt_j att_j)
            d -= (d * a).sum(axis=-1, keepdims=True)
            d *= a                                            # masked entries have att = 0
            # forward: s = qg k^T with qg = q / sqrt(hs)  =>  dqg = ds @ k, dk = ds^T @ qg
            xp.matmul(d, kh[r], out=dq[r])
            dq[r] *= 1.0 / math.sqrt(hs)
            xp.matmul(d.swapaxes(-1, -2), qg[r], out=dk[r])

        for_row_blocks(B, gT * T, rows, xp, threaded=False)
        return (xp.ascontiguousarray(ungroup_heads(dq, T)), xp.ascontiguousarray(dk.transpose(0, 2, 1, 3)),
                xp.ascontiguousarray(dv.transpose(0, 2, 1, 3)))


def gqa_attention(q, k, v, dropout=0.0, rng=None):
    if REFERENCE_OPS.get():
        if dropout:
            raise NpgptError("reference ops: the reference attention has no dropout; call model.eval() "
                             "or use a config with dropout=0")
        return gqa_attention_reference(q, k, v)
    return GroupedQueryAttention.apply(q, k, v, dropout=dropout, rng=rng)


def gqa_attention_reference(q, k, v):
    """The same attention from primitive ops, the plain way: K/V repeated to every query head."""
    B, T, nh, hs = q.shape
    g = nh // k.shape[2]
    rep = np.arange(nh) // g                                  # query head h reads kv head h // g
    qh = q.permute(0, 2, 1, 3)                                # (B, nh, T, hs)
    kh = k[:, :, rep].permute(0, 2, 1, 3)                     # (B, nh, T, hs), repeated
    vh = v[:, :, rep].permute(0, 2, 1, 3)
    scores = (qh @ kh.permute(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))   # (B, nh, T, T)
    allowed = np.tril(np.ones((T, T), dtype=bool))
    scores = _where(allowed, scores, -1e30)
    y = _softmax(scores, axis=-1) @ vh                        # (B, nh, T, hs)
    return y.permute(0, 2, 1, 3).reshape(B, T, nh * hs)


__all__ = ["RMSNorm", "Rope", "SwiGLU", "GroupedQueryAttention", "rms_norm", "rms_norm_reference",
           "rope", "rope_reference", "rope_inv_freq", "rope_tables", "swiglu", "swiglu_reference",
           "gqa_attention", "gqa_attention_reference", "gqa_probs"]
