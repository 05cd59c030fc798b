"""Fused neural-network ops: linear, layer_norm, gelu, causal self-attention, cross_entropy,
embedding and dropout.

Each is one Function whose backward is written by hand (as llm.c does in C) instead of being
composed from the primitives, which would store every intermediate and walk many small nodes.
Beside each fused op sits `*_reference`, the same maths composed from primitive ops; the tests
check the two against each other and against finite differences.

The reference switch is one dispatch point: each public fused op (`linear`, `layer_norm`, `gelu`,
`causal_self_attention`, `cross_entropy`, `embedding`) reads the context variable `REFERENCE_OPS`
and, when it is set, calls its `*_reference` twin instead. `with reference_ops():` sets it for the
block, in this thread only (DeZero's caller-chooses, not a rewrite of names in other modules); a
model built with `GPT(cfg, ops="reference")` sets it around its own forward.

Shapes: B batch, T time, C channels (n_embd), nh heads, hs head size (C // nh), V vocabulary.

Path: LayerNorm, GELU, attention and cross-entropy each decide once, in forward, whether the fused
GPU kernels of `cuda_kernels` serve them (`self.kernel = _ck.use_kernels(...)`), and backward follows
that record (`if self.kernel:`), so the two passes never take different paths.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np

from npgpt import precision as _precision
from npgpt.backend import asnumpy, get_xp
from npgpt.errors import NpgptError
from npgpt.ops import cuda_kernels as _ck
from npgpt.ops import softmax as _softmax
from npgpt.ops import where as _where
from npgpt.ops.parallel import for_row_blocks
from npgpt.ops.reduce import softmax_array
from npgpt.tensor import Function, Tensor

GELU_K = math.sqrt(2.0 / math.pi)   # a Python float: multiplying float32 by it stays float32

# ---- the reference switch ----------------------------------------------------------------------
REFERENCE_OPS = contextvars.ContextVar("npgpt_reference_ops", default=False)
OPS = ("fused", "reference")         # the values of GPT(cfg, ops=...)


@contextlib.contextmanager
def reference_ops(on=True):
    """Within the block, the public fused ops of this module call their `*_reference` twins (in
    this thread's context only; see the module doc). `reference_ops(False)` turns them back on."""
    token = REFERENCE_OPS.set(bool(on))
    try:
        yield
    finally:
        REFERENCE_OPS.reset(token)


def check_ops(ops) -> str:
    """A model's `ops` setting, checked: 'fused' or 'reference'."""
    if ops not in OPS:
        raise NpgptError(f"ops must be one of {', '.join(OPS)}, got {ops!r}")
    return ops



# ---- linear ------------------------------------------------------------------------------------
class Linear(Function):
    """y = x @ w + b.  x: (..., Cin), w: (Cin, Cout) (GPT-2's Conv1D layout), b: (Cout,)."""
    def forward(self, x, w, b=None):
        if x.shape[-1] != w.shape[0]:
            raise ValueError(f"linear: input shape {x.shape} does not match weight shape {w.shape}")
        x2 = x.reshape(-1, x.shape[-1])                       # (N, Cin), a view
        y = _precision.matmul(x2, w)                          # (N, Cout), one BLAS call
        if b is not None:
            y += b
        self.save(x2, w)
        self.has_bias, self.in_shape = b is not None, x.shape
        return y.reshape(x.shape[:-1] + (w.shape[1],))

    def backward(self, dout):
        x2, w = self.saved
        d2 = dout.reshape(-1, dout.shape[-1])                 # (N, Cout)
        # forward: y = x @ w + b  =>  dx = dy @ w^T, dw = x^T @ dy, db = sum_rows dy
        dx = _precision.matmul(d2, w.T).reshape(self.in_shape)
        # a frozen weight (LoRA's base) needs no dw: skip the matmul that costs as much as dx
        dw = _precision.matmul(x2.T, d2) if self.inputs[1].requires_grad else None
        if self.has_bias:
            # sum over rows as a vector-matrix product: BLAS does it several times faster
            ones = get_xp(d2).ones(d2.shape[0], dtype=d2.dtype)
            return dx, dw, ones @ d2
        return dx, dw


def linear(x, w, b=None):
    if REFERENCE_OPS.get():
        return linear_reference(x, w, b)
    return Linear.apply(x, w, b) if b is not None else Linear.apply(x, w)


def linear_reference(x, w, b=None):
    y = x @ w
    return y + b if b is not None else y


# ---- layer norm --------------------------------------------------------------------------------
class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis.  x: (..., C), w, b: (C,).

    Row sums are products with a ones vector and sums of products are einsums: BLAS and einsum
    reduce a short row several times faster than `mean(axis=-1)`, and need no temporary for
    `xc * xc`. Large inputs run as row kernels over blocks of rows (`for_row_blocks`: cache-sized
    blocks spread over the CPU cores); the weight and bias gradients are summed per block, then
    over blocks.
    """
    def forward(self, x, w, b):
        xp = get_xp(x)
        C = x.shape[-1]
        x2 = x.reshape(-1, C)                                 # (N, C)
        self.kernel = _ck.use_kernels(x, w, b)
        if self.kernel:                                       # GPU: one fused kernel
            y, mean, rstd = _ck.layernorm_forward(x, w, b, self.eps)
            self.save(x2, w, mean.reshape(-1, 1), rstd.reshape(-1, 1))
            return y
        y = xp.empty(x2.shape, dtype=x.dtype)
        mean = xp.empty((x2.shape[0], 1), dtype=x.dtype)      # (N, 1)
        rstd = xp.empty((x2.shape[0], 1), dtype=x.dtype)      # (N, 1)
        inv_c = xp.full(C, 1.0 / C, dtype=x.dtype)            # row means as one matrix-vector product

        def rows(r):
            mean[r, 0] = x2[r] @ inv_c
            xc = x2[r] - mean[r]
            var = xp.einsum("ij,ij->i", xc, xc) / C           # (n,), no xc * xc temporary
            rstd[r, 0] = 1.0 / xp.sqrt(var + self.eps)
            xc *= rstd[r]                                     # xc is now xhat
            xc *= w
            xp.add(xc, b, out=y[r])

        for_row_blocks(x2.shape[0], C, rows, xp)
        self.save(x2, w, mean, rstd)                          # as llm.c: keep stats, not xhat
        return y.reshape(x.shape)

    def backward(self, dout):
        x2, w, mean, rstd = self.saved
        if self.kernel:                                       # GPU: dx kernel + column-sum kernel
            dx, dw, db = _ck.layernorm_backward(dout.reshape(x2.shape), x2, w, mean, rstd)
            return dx.reshape(dout.shape), dw, db
        xp = get_xp(dout)
        N, C = x2.shape
        d2 = dout.reshape(x2.shape)                           # (N, C)
        dx = xp.empty(x2.shape, dtype=dout.dtype)
        inv_c = xp.full(C, 1.0 / C, dtype=dout.dtype)

        def rows(r):
            xhat = x2[r] - mean[r]
            xhat *= rstd[r]
            ones = xp.ones(xhat.shape[0], dtype=dout.dtype)   # column sums as vector-matrix products
            # forward: y = xhat * w + b  =>  dw = sum dy * xhat, db = sum dy, dxhat = dy * w
            dw = xp.einsum("ij,ij->j", d2[r], xhat)
            db = ones @ d2[r]
            dxhat = d2[r] * w
            # forward: xhat = (x - mean) * rstd  =>
            #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
            proj = xp.einsum("ij,ij->i", dxhat, xhat)[:, None] / C
            xp.subtract(dxhat, (dxhat @ inv_c)[:, None], out=dx[r])
            xhat *= proj
            dx[r] -= xhat
            dx[r] *= rstd[r]
            return dw, db

        parts = for_row_blocks(N, C, rows, xp)
        dw, db = parts[0]
        for pw, pb in parts[1:]:
            dw += pw
            db += pb
        return dx.reshape(dout.shape), dw, db


def layer_norm(x, w, b, eps=1e-5):
    if REFERENCE_OPS.get():
        return layer_norm_reference(x, w, b, eps)
    return LayerNorm.apply(x, w, b, eps=eps)


def layer_norm_reference(x, w, b, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / (var + eps).sqrt() * w + b


# ---- GELU --------------------------------------------------------------------------------------
class GELU(Function):
    """GPT-2's tanh approximation: y = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi).

    Row kernels over blocks of rows (see `for_row_blocks`), every pass in place in the block.
    By default backward recomputes tanh from x instead of keeping it (as PyTorch and the GPU kernel
    do): one tanh pass more per block, and one activation of the MLP's width (4C) less to keep,
    100 MB per layer at shakespeare-char size (B 64, T 256), 600 MB of the step's peak.
    `keep_tanh = True` keeps it (the reference the tests compare with).
    """
    keep_tanh = False

    @staticmethod
    def _tanh_into(xp, xr, tr):
        xp.multiply(xr, xr, out=tr)
        tr *= 0.044715 * GELU_K
        tr += GELU_K
        tr *= xr
        xp.tanh(tr, out=tr)                                   # t = tanh(k (x + 0.044715 x^3))
        return tr

    def forward(self, x):
        xp = get_xp(x)
        x2 = x.reshape(-1, x.shape[-1])
        self.kernel = _ck.use_kernels(x)
        if self.kernel:                                       # GPU: one elementwise kernel
            self.save(x2, None)                               # backward recomputes tanh
            return _ck.gelu_forward(x)
        t = xp.empty(x2.shape, dtype=x.dtype) if self.keep_tanh else None
        y = xp.empty(x2.shape, dtype=x.dtype)

        def rows(r):
            xr, yr = x2[r], y[r]
            tr = self._tanh_into(xp, xr, t[r] if t is not None else xp.empty(xr.shape, dtype=xr.dtype))
            xp.add(tr, 1.0, out=yr)
            yr *= xr
            yr *= 0.5

        for_row_blocks(x2.shape[0], x2.shape[1], rows, xp)
        self.save(x2, t)                                      # t None: backward recomputes it
        return y.reshape(x.shape)

    def backward(self, dout):
        x2, t = self.saved
        if self.kernel:                                       # GPU: recomputes tanh in the kernel
            return _ck.gelu_backward(dout.reshape(x2.shape), x2).reshape(dout.shape)
        xp = get_xp(dout)
        d2 = dout.reshape(x2.shape)
        dx = xp.empty(x2.shape, dtype=dout.dtype)

        def rows(r):
            xr, du = x2[r], dx[r]
            tr = t[r] if t is not None else self._tanh_into(xp, xr, xp.empty(xr.shape, dtype=xr.dtype))
            # forward: y = 0.5 x (1 + t), t = tanh(u), u = k (x + 0.044715 x^3)
            #   =>  dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 * 0.044715 x^2)
            xp.multiply(xr, xr, out=du)
            du *= 3 * 0.044715 * GELU_K
            du += GELU_K
            sech2 = tr * tr
            xp.subtract(1.0, sech2, out=sech2)
            du *= sech2
            du *= xr
            du += tr
            du += 1.0
            du *= 0.5
            du *= d2[r]

        for_row_blocks(x2.shape[0], x2.shape[1], rows, xp)
        return dx.reshape(dout.shape)


def gelu(x):
    if REFERENCE_OPS.get():
        return gelu_reference(x)
    return GELU.apply(x)


def gelu_reference(x):
    return 0.5 * x * (1.0 + (GELU_K * (x + 0.044715 * x ** 3)).tanh())


# ---- ReLU^2 and logit soft-capping (recipe switches: mlp_act=relu2, logit_softcap) ---------------
class ReLU2(Function):
    """ReLU squared, y = max(x, 0)^2 (So et al. 2021, "Primer"; the modded-nanogpt MLP).  x: (...) -> (...)

    Forward keeps r = max(x, 0), the one array backward reads."""
    def forward(self, x):
        xp = get_xp(x)
        r = xp.maximum(x, 0)
        self.save(r)
        return r * r

    def backward(self, dout):
        (r,) = self.saved
        # forward: y = r^2, r = max(x, 0)  =>  dx = 2 r dout  (r is 0 where x <= 0)
        return (2.0 * r) * dout


def relu2(x):
    if REFERENCE_OPS.get():
        return relu2_reference(x)
    return ReLU2.apply(x)


def relu2_reference(x):
    r = x.relu()
    return r * r


class SoftCap(Function):
    """Soft-capping, y = cap tanh(x / cap) (Gemma 2's final logits; modded-nanogpt's head): smooth,
    ~x for |x| << cap, never beyond +-cap.  x: (...) -> (...); option cap > 0.

    Forward keeps t = tanh(x / cap), the one array backward reads."""
    def forward(self, x):
        xp = get_xp(x)
        t = xp.tanh(x * (1.0 / self.cap))
        self.save(t)
        return t * self.cap

    def backward(self, dout):
        (t,) = self.saved
        # forward: y = c tanh(x / c)  =>  dx = dout (1 - t^2)
        return dout * (1.0 - t * t)


def softcap(x, cap):
    if not cap > 0:
        raise ValueError(f"softcap: cap must be positive, got {cap}")
    if REFERENCE_OPS.get():
        return softcap_reference(x, cap)
    return SoftCap.apply(x, cap=float(cap))


def softcap_reference(x, cap):
    return (x * (1.0 / cap)).tanh() * cap


# ---- causal self-attention ---------------------------------------------------------------------
_masks = {}   # (dtype, array module) -> the one (N, N) causal mask kept for it


def causal_bias(Tq, Tk, dtype, xp=np):
    """(Tq, Tk) additive mask: 0 where query i may see key j (j <= i + Tk - Tq), -inf elsewhere.

    The queries are the last Tq of Tk positions (Tq < Tk when a KV cache supplies earlier keys), so
    the mask is rows Tk - Tq .. Tk of one square (N, N) causal mask, cut as a view. One square mask
    is kept per (dtype, array module), grown to the next power of two when a longer sequence asks
    (so at most 4 N^2 bytes for float32, however many prompt lengths a chat session sees).
    """
    key = (np.dtype(dtype).str, xp.__name__)
    full = _masks.get(key)
    if full is None or full.shape[0] < Tk:
        n = max(64, 1 << (int(Tk) - 1).bit_length())
        full = xp.asarray(np.triu(np.full((n, n), -np.inf, dtype=dtype), k=1))
        _masks[key] = full
    return full[Tk - Tq:Tk, :Tk]


def causal_bias_reference(Tq, Tk, dtype):
    """The same mask built directly (for the tests)."""
    allowed = np.tril(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq)
    return np.where(allowed, 0.0, -np.inf).astype(dtype)


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
    return softmax_array(att, out=att)


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
    Sequences are independent, so both passes run as kernels over blocks of the batch
    (`for_row_blocks`): each block's (b, nh, T, T) scores stay in cache from the QK^T matmul through
    the softmax to the .V matmul. The blocks run one after another: BLAS spreads each matmul
    over the cores, and two threads calling BLAS at once measured slower.
    """
    def forward(self, qkv):
        xp = get_xp(qkv)
        B, T, C3 = qkv.shape
        nh = self.n_head
        if C3 % (3 * nh):
            raise ValueError(f"attention: qkv width {C3} is not 3 * n_head ({nh}) * head size")
        hs = C3 // (3 * nh)
        q, k, v = split_heads(qkv, nh)                        # (B, nh, T, hs) each
        keep = None
        if self.dropout > 0:   # drawn here, in order, so a seeded run is the same however it is split
            keep = dropout_mask((B, nh, T, T), self.dropout, self.rng, xp, qkv.dtype)
        y = xp.empty((B, T, nh, hs), dtype=qkv.dtype)
        y_heads = y.transpose(0, 2, 1, 3)                     # (B, nh, T, hs) view of y
        bias = causal_bias(T, T, qkv.dtype, xp)
        self.kernel = fused = _ck.use_kernels(qkv)
        # Recompute: keep only each score row's log-sum-exp (B, nh, T, 1) and rebuild the
        # probabilities in backward from q and k (as flash attention does), instead of keeping the
        # (B, nh, T, T) probabilities: at shakespeare-char size that is 100 MB less per layer,
        # 600 MB of the step's peak, for one more (b, nh, T, T) matmul per block in backward.
        self.recompute = recompute = self.recompute_scores and keep is None and not fused
        att = None if recompute else xp.empty((B, nh, T, T), dtype=qkv.dtype)
        lse = xp.empty((B, nh, T, 1), dtype=qkv.dtype) if recompute else None
        mm = _precision.matmul

        def rows(r):                                          # sequences r
            a = att[r] if att is not None else xp.empty((r.stop - r.start, nh, T, T), dtype=qkv.dtype)
            if fused:                                         # GPU: scale, mask, softmax in one kernel
                mm(q[r], k[r].swapaxes(-1, -2), out=a)
                _ck.causal_softmax_forward(a, 1.0 / math.sqrt(hs), out=a)
            else:
                # Scale q (T/hs times smaller than the scores) instead of the (b, nh, T, T) scores.
                mm(q[r] * (1.0 / math.sqrt(hs)), k[r].swapaxes(-1, -2), out=a)
                a += bias
                _, m, log_sum = softmax_array(a, out=a, return_stats=True)
                if recompute:
                    xp.add(m, log_sum, out=lse[r])            # logsumexp of each score row
            mm(a * keep[r] if keep is not None else a, v[r], out=y_heads[r])

        for_row_blocks(B, nh * T * T, rows, xp, threaded=False)
        self.save(qkv, lse if recompute else att, keep)
        return y.reshape(B, T, C3 // 3)

    recompute_scores = True    # False keeps the probabilities (the reference the tests compare with)

    def backward(self, dout):
        qkv, att, keep = self.saved                           # att: the lse (B, nh, T, 1) if recompute
        xp = get_xp(dout)
        B, T, C3 = qkv.shape
        nh, hs = self.n_head, C3 // (3 * self.n_head)
        q, k, v = split_heads(qkv, nh)
        dy = dout.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs) view
        dqkv = xp.empty((B, T, 3, nh, hs), dtype=qkv.dtype)
        dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        scale = 1.0 / math.sqrt(hs)
        fused = self.kernel
        mm = _precision.matmul

        bias = causal_bias(T, T, qkv.dtype, xp) if self.recompute else None

        def rows(r):                                          # sequences r
            if self.recompute:
                # forward: att = exp(s - logsumexp(s)), s = (q / sqrt(hs)) k^T + mask
                a = mm(q[r] * scale, k[r].swapaxes(-1, -2))   # (b, nh, T, T)
                a += bias
                a -= att[r]
                xp.exp(a, out=a)                              # masked entries: exp(-inf) = 0
            else:
                a = att[r]
            a_d = a * keep[r] if keep is not None else a
            # forward: y = att_d @ v  =>  dv = att_d^T @ dy, datt_d = dy @ v^T
            mm(a_d.swapaxes(-1, -2), dy[r], out=dv[r])
            d = mm(dy[r], v[r].swapaxes(-1, -2))              # (b, nh, T, T)
            if keep is not None:
                d *= keep[r]                                  # forward: att_d = att * keep
            if fused:                                         # GPU: the three lines below in one kernel
                _ck.causal_softmax_backward(a, d, scale, out=d)
            else:
                # forward: att = softmax(s)  =>  ds = att * (datt - sum_j datt_j att_j)
                d -= (d * a).sum(axis=-1, keepdims=True)
                d *= a                                        # masked entries have att = 0
                d *= scale                                    # forward: s = (q / sqrt(hs)) k^T
            mm(d, k[r], out=dq[r])
            mm(d.swapaxes(-1, -2), q[r], out=dk[r])

        for_row_blocks(B, nh * T * T, rows, xp, threaded=False)
        return dqkv.reshape(B, T, C3)


def causal_self_attention(qkv, n_head, dropout=0.0, rng=None):
    if REFERENCE_OPS.get():
        if dropout:
            raise NpgptError("reference ops: the reference attention has no dropout; call model.eval() "
                             "or use a config with dropout=0")
        return causal_self_attention_reference(qkv, n_head)
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
        self.kernel = _ck.use_kernels(z)
        if self.kernel:                                       # GPU: loss and gradient in one kernel
            loss, _, dz = _ck.cross_entropy_forward_backward(z, t, self.ignore_index)
            self.save(dz, None, None, None)                   # dz = (softmax - onehot) / n_valid
            return loss
        valid = t != self.ignore_index
        safe_t = xp.where(valid, t, 0)
        probs, m, log_sum = softmax_array(z, axis=1, return_stats=True)   # (N, V), kept for backward
        picked = xp.take_along_axis(z, safe_t[:, None], axis=1) - m       # (N, 1) shifted target logit
        nll = (log_sum - picked)[:, 0]                        # (N,) = logsumexp - logit[target]
        n = xp.maximum(valid.sum(), 1).astype(logits.dtype)   # 1 when all are ignored: loss 0, not NaN
        self.save(probs, safe_t, valid, n)
        return (nll * valid).sum() / n

    def backward(self, dout):
        probs, t, valid, n = self.saved
        if self.kernel:                                       # the forward kernel saved the gradient
            return (probs * dout).reshape(self.logits_shape)
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
    if REFERENCE_OPS.get():
        return cross_entropy_reference(logits, targets, ignore_index)
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index)


def cross_entropy_reference(logits, targets, ignore_index=-1):
    V = logits.shape[-1]
    t = asnumpy(targets.data if isinstance(targets, Tensor) else targets).reshape(-1)
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

    # Up to this many one-hot entries (V x N), the backward is one matmul instead of a scatter.
    ONE_HOT_MAX = 1 << 22

    def backward(self, dout):
        xp = get_xp(dout)
        C = dout.shape[-1]
        ids, d2 = self.ids.reshape(-1), dout.reshape(-1, C)
        # forward: out[n] = w[ids[n]]  =>  dw[v] = sum of dout[n] over n with ids[n] = v
        if self.V * ids.size <= self.ONE_HOT_MAX:
            # Small vocabularies: onehot (V, N) @ dout (N, C) on BLAS; many times faster than
            # add.at's per-element scatter, and repeated ids add up all the same.
            one_hot = (ids[None, :] == xp.arange(self.V)[:, None]).astype(dout.dtype)
            return one_hot @ d2
        dw = xp.zeros((self.V, C), dtype=dout.dtype)
        xp.add.at(dw, ids, d2)                                # repeated ids add up
        return dw


def embedding(weight, ids):
    if REFERENCE_OPS.get():
        return embedding_reference(weight, ids)
    return Embedding.apply(weight, ids=ids.data if isinstance(ids, Tensor) else ids)


def embedding_reference(weight, ids):
    return weight[ids.data if isinstance(ids, Tensor) else ids]


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
