"""Fused neural-network ops: linear, layer_norm, gelu, causal self-attention, cross_entropy,
embedding and dropout.

Each is one Function whose backward is written by hand (as llm.c does in C) instead of being
composed from the primitives, which would store every intermediate and walk many small nodes.
Beside each fused op sits `*_reference`, the same maths composed from primitive ops; the tests
check the two against each other and against finite differences.

Shapes: B batch, T time, C channels (n_embd), nh heads, hs head size (C // nh), V vocabulary.
"""

from __future__ import annotations

import math

import numpy as np

from npgpt.backend import get_xp
from npgpt.ops import softmax as _softmax
from npgpt.ops import where as _where
from npgpt.tensor import Function, Tensor

GELU_K = math.sqrt(2.0 / math.pi)   # a Python float: multiplying float32 by it stays float32


# ---- linear ------------------------------------------------------------------------------------
class Linear(Function):
    """y = x @ w + b.  x: (..., Cin), w: (Cin, Cout) (GPT-2's Conv1D layout), b: (Cout,)."""
    def forward(self, x, w, b=None):
        if x.shape[-1] != w.shape[0]:
            raise ValueError(f"linear: input shape {x.shape} does not match weight shape {w.shape}")
        x2 = x.reshape(-1, x.shape[-1])                       # (N, Cin), a view
        y = x2 @ w                                            # (N, Cout), one BLAS call
        if b is not None:
            y += b
        self.save(x2, w)
        self.has_bias, self.in_shape = b is not None, x.shape
        return y.reshape(x.shape[:-1] + (w.shape[1],))

    def backward(self, dout):
        x2, w = self.saved
        d2 = dout.reshape(-1, dout.shape[-1])                 # (N, Cout)
        # forward: y = x @ w + b  =>  dx = dy @ w^T, dw = x^T @ dy, db = sum_rows dy
        dx = (d2 @ w.T).reshape(self.in_shape)
        dw = x2.T @ d2                                        # BLAS reads the transposes in place
        if self.has_bias:
            return dx, dw, d2.sum(axis=0)
        return dx, dw


def linear(x, w, b=None):
    return Linear.apply(x, w, b) if b is not None else Linear.apply(x, w)


def linear_reference(x, w, b=None):
    y = x @ w
    return y + b if b is not None else y


# ---- layer norm --------------------------------------------------------------------------------
class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis.  x: (..., C), w, b: (C,)."""
    def forward(self, x, w, b):
        xp = get_xp(x)
        mean = x.mean(axis=-1, keepdims=True)                 # (..., 1)
        xc = x - mean
        var = (xc * xc).mean(axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt(var + self.eps)                  # (..., 1)
        xhat = xc
        xhat *= rstd                                          # in place: xc is not needed again
        self.save(x, w, mean, rstd)                           # as llm.c: keep stats, not xhat
        y = xhat * w
        y += b
        return y

    def backward(self, dout):
        x, w, mean, rstd = self.saved
        xhat = (x - mean) * rstd
        lead = tuple(range(x.ndim - 1))
        # forward: y = xhat * w + b  =>  dw = sum dy * xhat, db = sum dy, dxhat = dy * w
        dw = (dout * xhat).sum(axis=lead)
        db = dout.sum(axis=lead)
        dxhat = dout * w
        # forward: xhat = (x - mean) * rstd  =>
        #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        proj = (dxhat * xhat).mean(axis=-1, keepdims=True)
        dx = dxhat - dxhat.mean(axis=-1, keepdims=True)
        dx -= xhat * proj
        dx *= rstd
        return dx, dw, db


def layer_norm(x, w, b, eps=1e-5):
    return LayerNorm.apply(x, w, b, eps=eps)


def layer_norm_reference(x, w, b, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / (var + eps).sqrt() * w + b


# ---- GELU --------------------------------------------------------------------------------------
class GELU(Function):
    """GPT-2's tanh approximation: y = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi)."""
    def forward(self, x):
        xp = get_xp(x)
        t = x * x
        t *= 0.044715
        t += 1.0
        t *= x
        t *= GELU_K
        xp.tanh(t, out=t)                                     # t = tanh(k (x + 0.044715 x^3))
        self.save(x, t)
        y = t + 1.0
        y *= x
        y *= 0.5
        return y

    def backward(self, dout):
        x, t = self.saved
        # forward: y = 0.5 x (1 + t), t = tanh(u), u = k (x + 0.044715 x^3)
        #   =>  dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 * 0.044715 x^2)
        du = x * x
        du *= 3 * 0.044715
        du += 1.0
        du *= GELU_K
        sech2 = 1.0 - t * t
        du *= sech2
        du *= x
        du += 1.0
        du += t
        du *= 0.5
        du *= dout
        return du


def gelu(x):
    return GELU.apply(x)


def gelu_reference(x):
    return 0.5 * x * (1.0 + (GELU_K * (x + 0.044715 * x ** 3)).tanh())


# ---- causal self-attention ---------------------------------------------------------------------
_mask_cache = {}


def causal_bias(Tq, Tk, dtype, xp=np):
    """(Tq, Tk) additive mask: 0 where query i may see key j (j <= i + Tk - Tq), -inf elsewhere.

    Built once per shape and kept: the queries are the last Tq of Tk positions (Tq < Tk when a
    KV cache supplies earlier keys).
    """
    key = (Tq, Tk, np.dtype(dtype).str, xp.__name__)
    bias = _mask_cache.get(key)
    if bias is None:
        allowed = np.tril(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq)
        bias = xp.asarray(np.where(allowed, 0.0, -np.inf).astype(dtype))
        _mask_cache[key] = bias
    return bias


def attention_probs(q, k, key_mask=None):
    """Softmax of the scaled, causally masked scores.  q: (B, nh, Tq, hs), k: (B, nh, Tk, hs)
    -> (B, nh, Tq, Tk). key_mask (B, Tk) bool marks real (non-padding) keys."""
    xp = get_xp(q)
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    att = q @ k.swapaxes(-1, -2)                              # (B, nh, Tq, Tk)
    att *= 1.0 / math.sqrt(hs)
    att += causal_bias(Tq, Tk, att.dtype, xp)
    if key_mask is not None:
        # finite, not -inf: a padding query that sees only padding keys stays finite (not NaN)
        att = xp.where(key_mask[:, None, None, :], att, att.dtype.type(-1e30))
    att -= att.max(axis=-1, keepdims=True)                    # stable softmax, in place
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    return att


def split_heads(qkv, n_head):
    """(B, T, 3C) -> three views (B, nh, T, hs), no copies (BLAS reads the strides as they are)."""
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    parts = qkv.reshape(B, T, 3, n_head, hs)
    return tuple(parts[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


class CausalSelfAttention(Function):
    """The attention core: split qkv into heads, scaled QK^T, causal mask, softmax, dropout, .V,
    merge heads.   qkv: (B, T, 3C) (q, k, v side by side, as GPT-2's c_attn emits) -> (B, T, C).

    Options: n_head; dropout (probability); rng (np.random.Generator, for the dropout mask).
    The maths is on (B, nh, T, hs); the heads are strided views of qkv, and gradients are written
    straight into a (B, T, 3, nh, hs) buffer, so there are no transposed copies in either pass.
    """
    def forward(self, qkv):
        xp = get_xp(qkv)
        B, T, C3 = qkv.shape
        nh = self.n_head
        if C3 % (3 * nh):
            raise ValueError(f"attention: qkv width {C3} is not 3 * n_head ({nh}) * head size")
        q, k, v = split_heads(qkv, nh)                        # (B, nh, T, hs) each
        att = attention_probs(q, k)                           # (B, nh, T, T)
        keep = None
        if self.dropout > 0:
            keep = dropout_mask(att.shape, self.dropout, self.rng, xp, att.dtype)
            att_d = att * keep
        else:
            att_d = att
        y = xp.empty((B, T, nh, C3 // (3 * nh)), dtype=qkv.dtype)
        xp.matmul(att_d, v, out=y.transpose(0, 2, 1, 3))       # writes (B, nh, T, hs) into (B, T, nh, hs)
        self.save(qkv, att, keep)
        return y.reshape(B, T, C3 // 3)

    def backward(self, dout):
        qkv, att, keep = self.saved
        xp = get_xp(dout)
        B, T, C3 = qkv.shape
        nh, hs = self.n_head, C3 // (3 * self.n_head)
        q, k, v = split_heads(qkv, nh)
        dy = dout.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs) view
        att_d = att * keep if keep is not None else att
        dqkv = xp.empty((B, T, 3, nh, hs), dtype=qkv.dtype)
        dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        # forward: y = att_d @ v  =>  dv = att_d^T @ dy, datt_d = dy @ v^T
        xp.matmul(att_d.swapaxes(-1, -2), dy, out=dv)
        datt = dy @ v.swapaxes(-1, -2)                        # (B, nh, T, T)
        if keep is not None:
            datt *= keep                                      # forward: att_d = att * keep
        # forward: att = softmax(s)  =>  ds = att * (datt - sum_j datt_j att_j)
        datt -= (datt * att).sum(axis=-1, keepdims=True)
        datt *= att                                           # masked entries have att = 0
        datt *= 1.0 / math.sqrt(hs)                           # forward: s = q k^T / sqrt(hs)
        xp.matmul(datt, k, out=dq)
        xp.matmul(datt.swapaxes(-1, -2), q, out=dk)
        return dqkv.reshape(B, T, C3)


def causal_self_attention(qkv, n_head, dropout=0.0, rng=None):
    return CausalSelfAttention.apply(qkv, n_head=n_head, dropout=dropout, rng=rng)


def causal_self_attention_reference(qkv, n_head):
    """The same attention built from primitive ops (no dropout)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    heads = qkv.reshape(B, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)   # (3, B, nh, T, hs)
    q, k, v = heads[0], heads[1], heads[2]
    scores = (q @ k.permute(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))       # (B, nh, T, T)
    allowed = np.tril(np.ones((T, T), dtype=bool))
    scores = _where(allowed, scores, -1e30)
    y = _softmax(scores, axis=-1) @ v                                  # (B, nh, T, hs)
    return y.permute(0, 2, 1, 3).reshape(B, T, C)


# ---- cross-entropy -----------------------------------------------------------------------------
class CrossEntropy(Function):
    """Mean negative log-likelihood of integer `targets` under softmax(logits).

    logits: (..., V) float; targets (option): (...) int, where `ignore_index` marks positions that
    count for nothing. All positions ignored -> loss 0 and zero gradients (not NaN).
    """
    def forward(self, logits):
        xp = get_xp(logits)
        V = logits.shape[-1]
        z = logits.reshape(-1, V)                             # (N, V)
        t = self.targets.reshape(-1)                          # (N,)
        if t.shape[0] != z.shape[0]:
            raise ValueError(f"cross_entropy: logits {logits.shape} and targets {self.targets.shape} do not match")
        valid = t != self.ignore_index
        safe_t = xp.where(valid, t, 0)
        probs = z - z.max(axis=1, keepdims=True)              # (N, V) shifted logits
        picked = xp.take_along_axis(probs, safe_t[:, None], axis=1)[:, 0]
        xp.exp(probs, out=probs)
        total = probs.sum(axis=1)                             # (N,)
        nll = xp.log(total) - picked                          # (N,) = logsumexp - logit[target]
        probs /= total[:, None]                               # softmax, kept for backward
        n = xp.maximum(valid.sum(), 1).astype(logits.dtype)   # 1 when all are ignored: loss 0, not NaN
        self.save(probs, safe_t, valid, n)
        return (nll * valid).sum() / n

    def backward(self, dout):
        probs, t, valid, n = self.saved
        xp = get_xp(probs)
        # forward: loss = mean_valid (logsumexp(z) - z[target])  =>  dz = (softmax(z) - onehot) / n
        scale = dout / n
        dz = probs * (scale * valid)[:, None]
        rows = xp.arange(dz.shape[0])
        dz[rows, t] -= scale * valid
        return dz.reshape(self.logits_shape)

    @classmethod
    def apply(cls, logits, targets, ignore_index=-1):
        xp = get_xp(logits.data)
        return super().apply(logits, targets=xp.asarray(targets), ignore_index=ignore_index,
                             logits_shape=logits.shape)


def cross_entropy(logits, targets, ignore_index=-1):
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index)


def cross_entropy_reference(logits, targets, ignore_index=-1):
    V = logits.shape[-1]
    t = np.asarray(targets).reshape(-1)
    valid = t != ignore_index
    logp = logits.reshape(-1, V).log_softmax(axis=-1)
    picked = logp[np.arange(len(t)), np.where(valid, t, 0)]
    w = valid.astype(logits.dtype) / max(int(valid.sum()), 1)
    return -(picked * w).sum()


# ---- embedding ---------------------------------------------------------------------------------
class Embedding(Function):
    """Rows of `weight` picked by integer ids.  weight: (V, C), ids (option): (...) -> (..., C)."""
    def forward(self, weight):
        self.V = weight.shape[0]
        return weight[self.ids]

    def backward(self, dout):
        xp = get_xp(dout)
        C = dout.shape[-1]
        dw = xp.zeros((self.V, C), dtype=dout.dtype)
        # forward: out[n] = w[ids[n]]  =>  dw[v] = sum of dout[n] over n with ids[n] = v
        xp.add.at(dw, self.ids.reshape(-1), dout.reshape(-1, C))   # repeated ids add up
        return dw


def embedding(weight, ids):
    return Embedding.apply(weight, ids=ids.data if isinstance(ids, Tensor) else ids)


def embedding_reference(weight, ids):
    return weight[ids]


# ---- dropout -----------------------------------------------------------------------------------
def dropout_mask(shape, p, rng, xp, dtype):
    """Inverted-dropout mask: 0 with probability p, 1/(1-p) otherwise, drawn from `rng`."""
    if rng is None:
        rng = np.random.default_rng()
    if xp is np:
        keep = rng.random(shape, dtype=np.float32) >= p
    else:  # draw on the device, seeded from the host generator so runs stay reproducible
        keep = xp.random.default_rng(int(rng.integers(2**63))).random(shape, dtype=np.float32) >= p
    return keep.astype(dtype) * (1.0 / (1.0 - p))


class Dropout(Function):
    """Inverted dropout: zero each element with probability p, scale survivors by 1/(1-p)."""
    def forward(self, x):
        keep = dropout_mask(x.shape, self.p, self.rng, get_xp(x), x.dtype)
        self.save(keep)
        return x * keep

    def backward(self, dout):
        (keep,) = self.saved
        return dout * keep


def dropout(x, p, rng=None, training=True):
    if not training or p == 0:
        return x
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    return Dropout.apply(x, p=p, rng=rng)
