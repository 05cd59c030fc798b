"""Fused CUDA kernels for the GPU path, each beside the NumPy function that is its contract.

On the GPU every NumPy-style line of an op is one kernel launch and one pass over memory; a
LayerNorm written as `mean`, `xc * xc`, `sum`, ... is a dozen passes. The kernels here do each op in
one or two passes, as llm.c's CUDA files do. Each comes as three things:

    *_reference(...)   NumPy, any float dtype: the exact contract (tests run it in float64)
    *_SRC / spec       the CUDA C source (RawKernel) or loop body (ElementwiseKernel)
    wrapper(...)       takes CuPy arrays, allocates the outputs, launches, returns

The wrappers compile their kernel on first use (CuPy caches the binary on disk), through the cupy
module that `npgpt.backend.cupy_module()` hands out: nothing here imports cupy. Importing this
module costs nothing on a machine without CuPy.

Row kernels use one thread block per row (a LayerNorm row, a softmax row, a vocabulary row of
logits), strided loops over the row (any length), and shared-memory block reductions
(`block_sum`, `block_max` below). Raw kernels take float32; the elementwise kernels (GELU, AdamW)
take any float type T and compute in float32.

Debug mode (`set_debug(True)` or NPGPT_KERNEL_DEBUG=1) fills every output with NaN before the
launch, so an element a kernel forgot to write shows up as NaN instead of as stale memory. An output
that shares memory with an input (a kernel run in place) is left as it is: it holds that input.
`launches` counts launches per kernel (the device check reads it to see whether the model used
the kernels).

Shapes: N rows, C channels, V vocabulary, R softmax rows, Tq queries, Tk keys.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np

from npgpt.backend import cupy_module, is_gpu_array

GELU_K = math.sqrt(2.0 / math.pi)

_debug = os.environ.get("NPGPT_KERNEL_DEBUG", "0") not in ("", "0")
_enabled = os.environ.get("NPGPT_FUSED_KERNELS", "1") not in ("", "0")
launches: Counter = Counter()      # kernel name -> launches since import


def set_debug(flag: bool) -> bool:
    """Turn NaN-filled outputs on or off; returns the previous setting."""
    global _debug
    prev, _debug = _debug, bool(flag)
    return prev


def use_kernels(*arrays) -> bool:
    """True when the fused kernels should serve these arrays: enabled, all CuPy float32."""
    return _enabled and all(is_gpu_array(a) and a.dtype == np.float32 for a in arrays)


# ---- CUDA building blocks ----------------------------------------------------------------------
# Block reductions for blocks of whole warps (blockDim a multiple of 32, at most 1024): each warp
# reduces with shuffles, warp 0 reduces the 32 partials, everyone reads the result. `buf` is 33
# floats of shared memory; the first barrier keeps a previous call's readers ahead of the writes.
PREAMBLE = r"""
#define NPGPT_NEG_INF __int_as_float(0xff800000)
#define NPGPT_NAN __int_as_float(0x7fffffff)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ float block_sum(float v, float* buf) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < nwarps ? buf[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) buf[32] = s;
    }
    __syncthreads();
    return buf[32];
}

__device__ float block_max(float v, float* buf) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < nwarps ? buf[lane] : NPGPT_NEG_INF;
        s = warp_max(s);
        if (lane == 0) buf[32] = s;
    }
    __syncthreads();
    return buf[32];
}
"""

# ---- layer norm --------------------------------------------------------------------------------
LAYERNORM_FORWARD_SRC = r"""
// One block per row: two-pass mean and variance (no E[x^2] - E[x]^2 cancellation).
extern "C" __global__ void npgpt_layernorm_forward(
        const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
        float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
        const int N, const int C, const float eps, const int has_bias) {
    __shared__ float buf[33];
    const int row = blockIdx.x;
    if (row >= N) return;                        // whole block leaves together
    const float* xr = x + (long long)row * C;
    float* yr = y + (long long)row * C;
    float s = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) s += xr[j];
    const float m = block_sum(s, buf) / C;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) { const float d = xr[j] - m; ss += d * d; }
    const float r = 1.0f / sqrtf(block_sum(ss, buf) / C + eps);
    for (int j = threadIdx.x; j < C; j += blockDim.x)
        yr[j] = (xr[j] - m) * r * w[j] + (has_bias ? b[j] : 0.0f);
    if (threadIdx.x == 0) { mean[row] = m; rstd[row] = r; }
}
"""

LAYERNORM_BACKWARD_DX_SRC = r"""
// forward: y = xhat * w + b, xhat = (x - mean) * rstd
//   =>  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dy * w
extern "C" __global__ void npgpt_layernorm_backward_dx(
        const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ w,
        const float* __restrict__ mean, const float* __restrict__ rstd, float* __restrict__ dx,
        const int N, const int C) {
    __shared__ float buf[33];
    const int row = blockIdx.x;
    if (row >= N) return;
    const long long off = (long long)row * C;
    const float m = mean[row], r = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        const float dxhat = dy[off + j] * w[j];
        s1 += dxhat;
        s2 += dxhat * (x[off + j] - m) * r;
    }
    const float mean_d = block_sum(s1, buf) / C;
    const float mean_dx = block_sum(s2, buf) / C;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        const float xhat = (x[off + j] - m) * r;
        dx[off + j] = r * (dy[off + j] * w[j] - mean_d - xhat * mean_dx);
    }
}
"""

LN_ROWS = 8          # threads per column in the parameter-gradient kernel (blockDim.y)
LN_CHUNK = 256       # rows summed by one block; the partial sums are added up by cupy.sum

LAYERNORM_BACKWARD_PARAMS_SRC = r"""
// dw[c] = sum_n dy[n,c] * xhat[n,c], db[c] = sum_n dy[n,c], as partial sums per chunk of rows:
// block (32, 8) covers 32 adjacent columns (coalesced reads) and one chunk of rows; its partials
// go to dw_part[chunk, c] and db_part[chunk, c] (summed over chunks afterwards: deterministic).
extern "C" __global__ void npgpt_layernorm_backward_params(
        const float* __restrict__ dy, const float* __restrict__ x,
        const float* __restrict__ mean, const float* __restrict__ rstd,
        float* __restrict__ dw_part, float* __restrict__ db_part,
        const int N, const int C, const int rows_per_chunk) {
    __shared__ float sw[8][33];
    __shared__ float sb[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min(N, r0 + rows_per_chunk);
    float aw = 0.0f, ab = 0.0f;
    if (c < C) {
        for (int r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            const long long k = (long long)r * C + c;
            const float g = dy[k];
            aw += g * (x[k] - mean[r]) * rstd[r];
            ab += g;
        }
    }
    sw[threadIdx.y][threadIdx.x] = aw;
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        for (int t = 1; t < blockDim.y; t++) { aw += sw[t][threadIdx.x]; ab += sb[t][threadIdx.x]; }
        dw_part[(long long)blockIdx.y * C + c] = aw;
        db_part[(long long)blockIdx.y * C + c] = ab;
    }
}
"""


def layernorm_forward_reference(x, w, b, eps=1e-5):
    """x (..., C), w (C,), b (C,) or None -> y (..., C), mean (...), rstd (...)."""
    mean = x.mean(axis=-1)
    xc = x - mean[..., None]
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1) + eps)
    y = xc * rstd[..., None] * w
    return (y + b if b is not None else y), mean, rstd


def layernorm_backward_reference(dy, x, w, mean, rstd):
    """dy, x (..., C); w (C,); mean, rstd (...) from the forward -> dx (..., C), dw (C,), db (C,)."""
    C = x.shape[-1]
    xhat = (x - mean.reshape(x.shape[:-1] + (1,))) * rstd.reshape(x.shape[:-1] + (1,))
    dxhat = dy * w
    dx = (dxhat - dxhat.mean(axis=-1, keepdims=True)
          - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) * rstd.reshape(x.shape[:-1] + (1,))
    d2, xh2 = dy.reshape(-1, C), xhat.reshape(-1, C)
    return dx, (d2 * xh2).sum(axis=0), d2.sum(axis=0)


def layernorm_forward(x, w, b, eps=1e-5):
    """The fused LayerNorm forward on the GPU (contract: layernorm_forward_reference)."""
    cp = cupy_module()
    C = x.shape[-1]
    x2 = _rows(cp, x, "layernorm_forward: x")
    w = _vec(cp, w, C, "layernorm_forward: w")
    b = _vec(cp, b, C, "layernorm_forward: b") if b is not None else None
    N = x2.shape[0]
    y = _empty(cp, x2.shape)
    mean, rstd = _empty(cp, (N,)), _empty(cp, (N,))
    if N:
        _launch(cp, "layernorm_forward", (N,), (_threads(C),),
                (x2, w, b if b is not None else w, y, mean, rstd, np.int32(N), np.int32(C),
                 np.float32(eps), np.int32(b is not None)))
    lead = x.shape[:-1]
    return y.reshape(x.shape), mean.reshape(lead), rstd.reshape(lead)


def layernorm_backward(dy, x, w, mean, rstd):
    """The fused LayerNorm backward on the GPU -> dx, dw, db (contract: layernorm_backward_reference)."""
    cp = cupy_module()
    C = x.shape[-1]
    x2 = _rows(cp, x, "layernorm_backward: x")
    d2 = _rows(cp, dy, "layernorm_backward: dy")
    N = x2.shape[0]
    if d2.shape != x2.shape:
        raise ValueError(f"layernorm_backward: dy {dy.shape} and x {x.shape} differ")
    w = _vec(cp, w, C, "layernorm_backward: w")
    mean, rstd = _vec(cp, mean, N, "layernorm_backward: mean"), _vec(cp, rstd, N, "layernorm_backward: rstd")
    dx = _empty(cp, x2.shape)
    rows_per_chunk = max(LN_CHUNK, -(-N // 65535))            # gridDim.y is at most 65535
    chunks = max(1, -(-N // rows_per_chunk))
    dw_part, db_part = _empty(cp, (chunks, C)), _empty(cp, (chunks, C))
    if N:
        _launch(cp, "layernorm_backward_dx", (N,), (_threads(C),),
                (d2, x2, w, mean, rstd, dx, np.int32(N), np.int32(C)))
        _launch(cp, "layernorm_backward_params", (-(-C // 32), chunks), (32, LN_ROWS),
                (d2, x2, mean, rstd, dw_part, db_part, np.int32(N), np.int32(C), np.int32(rows_per_chunk)))
        return dx.reshape(x.shape), dw_part.sum(axis=0), db_part.sum(axis=0)
    return dx.reshape(x.shape), cp.zeros(C, cp.float32), cp.zeros(C, cp.float32)


# ---- GELU --------------------------------------------------------------------------------------
# ElementwiseKernel specs: (in_params, out_params, body). T is the arrays' float type; the maths
# runs in float32. k = sqrt(2/pi).
_GELU_DEFS = r"""
const float k = 0.7978845608028654f;
"""
GELU_FORWARD = ("T x", "T y", _GELU_DEFS + r"""
const float xf = (float)x;
const float t = tanhf(k * (xf + 0.044715f * xf * xf * xf));
y = (T)(0.5f * xf * (1.0f + t));
""")
# forward: y = 0.5 x (1 + t), t = tanh(u), u = k (x + 0.044715 x^3)
#   =>  dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 * 0.044715 x^2)
_GELU_GRAD = r"""
const float t = tanhf(k * (xf + 0.044715f * xf * xf * xf));
const float g = 0.5f * (1.0f + t) + 0.5f * xf * (1.0f - t * t) * k * (1.0f + 0.134145f * xf * xf);
"""
GELU_BACKWARD = ("T dout, T x", "T dx", _GELU_DEFS + "const float xf = (float)x;\n" + _GELU_GRAD + r"""
dx = (T)((float)dout * g);
""")


def gelu_forward_reference(x):
    """GPT-2's tanh GELU: 0.5 x (1 + tanh(k (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + np.tanh(GELU_K * (x + 0.044715 * x ** 3)))


def gelu_backward_reference(dout, x):
    t = np.tanh(GELU_K * (x + 0.044715 * x ** 3))
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3 * 0.044715 * x * x))


def gelu_forward(x):
    cp = cupy_module()
    _check_float(cp, x, "gelu_forward: x")
    return _elementwise(cp, "gelu_forward", x, out_shape=x.shape, out_dtype=x.dtype)


def gelu_backward(dout, x):
    cp = cupy_module()
    _check_float(cp, x, "gelu_backward: x")
    return _elementwise(cp, "gelu_backward", dout, x, out_shape=x.shape, out_dtype=x.dtype)


# ---- scaled, causally masked softmax -----------------------------------------------------------
# Rows are the (..., Tq) query positions of scores x (..., Tq, Tk); query q (row index mod Tq)
# sees keys j <= q + offset. offset = Tk - Tq (the default) puts the queries at the end of the
# keys, as with a KV cache; offset 0 with Tq == Tk is plain causal attention. A row that sees no
# key comes out all zeros. Masked entries of p are written as exact zeros.
SOFTMAX_FORWARD_SRC = r"""
extern "C" __global__ void npgpt_causal_softmax_forward(
        const float* x, float* p, const int R, const int Tq, const int Tk, const int offset,
        const float scale) {
    // x and p may be the same buffer: each thread reads and writes only its own j in the last pass
    __shared__ float buf[33];
    const int row = blockIdx.x;
    if (row >= R) return;
    const int q = row % Tq;
    const int L = min(Tk, max(0, q + offset + 1));      // keys 0..L-1 are visible
    const float* xr = x + (long long)row * Tk;
    float* pr = p + (long long)row * Tk;
    float mx = NPGPT_NEG_INF;
    for (int j = threadIdx.x; j < L; j += blockDim.x) mx = fmaxf(mx, xr[j] * scale);
    mx = block_max(mx, buf);
    float s = 0.0f;
    for (int j = threadIdx.x; j < L; j += blockDim.x) s += expf(xr[j] * scale - mx);
    s = block_sum(s, buf);
    const float inv = L > 0 ? 1.0f / s : 0.0f;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        pr[j] = j < L ? expf(xr[j] * scale - mx) * inv : 0.0f;
}
"""

SOFTMAX_BACKWARD_SRC = r"""
// forward: p = softmax(scale * x) over visible keys  =>  dx = scale * p * (dp - sum_j dp_j p_j)
extern "C" __global__ void npgpt_causal_softmax_backward(
        const float* p, const float* dp, float* dx, const int R, const int Tq, const int Tk,
        const int offset, const float scale) {
    // dp and dx may be the same buffer (same-thread read-then-write per element)
    __shared__ float buf[33];
    const int row = blockIdx.x;
    if (row >= R) return;
    const int q = row % Tq;
    const int L = min(Tk, max(0, q + offset + 1));
    const long long off = (long long)row * Tk;
    float s = 0.0f;
    for (int j = threadIdx.x; j < L; j += blockDim.x) s += p[off + j] * dp[off + j];
    s = block_sum(s, buf);
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        dx[off + j] = j < L ? scale * p[off + j] * (dp[off + j] - s) : 0.0f;
}
"""


def _visible(Tq, Tk, offset):
    offset = Tk - Tq if offset is None else int(offset)
    return np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + offset       # (Tq, Tk)


def causal_softmax_forward_reference(x, scale, offset=None):
    """x (..., Tq, Tk) raw scores -> p (..., Tq, Tk) = softmax(scale * x) over visible keys."""
    vis = _visible(x.shape[-2], x.shape[-1], offset)
    s = np.where(vis, x * scale, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(mx), mx, 0.0))
    tot = e.sum(axis=-1, keepdims=True)
    return e / np.where(tot > 0, tot, 1.0)


def causal_softmax_backward_reference(p, dp, scale, offset=None):
    """p, dp (..., Tq, Tk) -> dx (..., Tq, Tk), the gradient with respect to the raw scores."""
    vis = _visible(p.shape[-2], p.shape[-1], offset)
    dpv = np.where(vis, dp, 0.0)
    return np.where(vis, scale * p * (dpv - (p * dpv).sum(axis=-1, keepdims=True)), 0.0)


def causal_softmax_forward(x, scale, offset=None, out=None):
    """The fused softmax on the GPU; out may be x itself (in place)."""
    cp = cupy_module()
    x3, Tq, Tk, offset = _softmax_rows(cp, x, offset, "causal_softmax_forward: x")
    p = _out_like(cp, out, x, "causal_softmax_forward: out", inputs=(x,))
    R = x3.shape[0]
    if R and Tk:
        _launch(cp, "causal_softmax_forward", (R,), (_threads(Tk),),
                (x3, p, np.int32(R), np.int32(Tq), np.int32(Tk), np.int32(offset), np.float32(scale)))
    return p


def causal_softmax_backward(p, dp, scale, offset=None, out=None):
    """The fused softmax backward on the GPU; out may be dp itself (in place)."""
    cp = cupy_module()
    p3, Tq, Tk, offset = _softmax_rows(cp, p, offset, "causal_softmax_backward: p")
    dp3, _, _, _ = _softmax_rows(cp, dp, offset, "causal_softmax_backward: dp")
    if dp.shape != p.shape:
        raise ValueError(f"causal_softmax_backward: p {p.shape} and dp {dp.shape} differ")
    dx = _out_like(cp, out, p, "causal_softmax_backward: out", inputs=(p, dp))
    R = p3.shape[0]
    if R and Tk:
        _launch(cp, "causal_softmax_backward", (R,), (_threads(Tk),),
                (p3, dp3, dx, np.int32(R), np.int32(Tq), np.int32(Tk), np.int32(offset), np.float32(scale)))
    return dx


# ---- cross-entropy -----------------------------------------------------------------------------
CROSS_ENTROPY_SRC = r"""
// One block per row of logits: loss_n = logsumexp(z_n) - z_n[t_n] and
// dlogits_n = (softmax(z_n) - onehot(t_n)) / n_valid; ignored rows: loss 0, dlogits 0.
// A target outside [0, V) (and not ignore_index) makes the row's loss and dlogits NaN.
// dlogits may be the logits buffer itself: z[t] is read before the first barrier, and in the
// last pass each thread reads and then overwrites only its own elements.
extern "C" __global__ void npgpt_cross_entropy(
        const float* logits, const long long* __restrict__ targets, float* dlogits,
        float* __restrict__ losses, const float* __restrict__ n_valid,
        const int N, const int V, const long long ignore_index) {
    __shared__ float buf[33];
    const int row = blockIdx.x;
    if (row >= N) return;
    const long long t = targets[row];
    const float* zr = logits + (long long)row * V;
    float* dr = dlogits + (long long)row * V;
    if (t == ignore_index) {
        for (int j = threadIdx.x; j < V; j += blockDim.x) dr[j] = 0.0f;
        if (threadIdx.x == 0) losses[row] = 0.0f;
        return;
    }
    const bool bad = t < 0 || t >= V;
    const float zt = bad ? NPGPT_NAN : zr[t];
    float mx = NPGPT_NEG_INF;
    for (int j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, zr[j]);
    mx = block_max(mx, buf);
    float s = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += expf(zr[j] - mx);
    const float lse = mx + logf(block_sum(s, buf));
    const float inv_n = 1.0f / n_valid[0];
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        const float pj = expf(zr[j] - lse);
        dr[j] = bad ? NPGPT_NAN : (pj - (j == t ? 1.0f : 0.0f)) * inv_n;
    }
    if (threadIdx.x == 0) losses[row] = lse - zt;
}
"""


def cross_entropy_reference(logits, targets, ignore_index=-1):
    """logits (N, V), targets (N,) int -> loss (mean over valid rows; 0 if none), losses (N,)
    (0 on ignored rows), dlogits (N, V) = (softmax - onehot) / n_valid (0 on ignored rows)."""
    z = np.asarray(logits)
    t = np.asarray(targets).reshape(-1)
    valid = t != ignore_index
    n = max(int(valid.sum()), 1)
    mx = z.max(axis=-1, keepdims=True)
    lse = (mx + np.log(np.exp(z - mx).sum(axis=-1, keepdims=True)))[:, 0]
    safe_t = np.where(valid, t, 0)
    rows = np.arange(z.shape[0])
    losses = np.where(valid, lse - z[rows, safe_t], 0.0).astype(z.dtype)
    d = np.exp(z - lse[:, None])
    d[rows, safe_t] -= 1.0
    d *= (valid / n)[:, None]
    return losses.sum() / n, losses, d


def cross_entropy_forward_backward(logits, targets, ignore_index=-1, out=None):
    """The fused cross-entropy on the GPU -> (loss 0-d array, losses (N,), dlogits (N, V)).

    Forward and backward in one pass, as llm.c: the gradient is written during the forward.
    out=logits overwrites the logits with their gradient (saves N*V floats: 3.3 GB at GPT-2's
    B=16, T=1024); only do that when nothing else reads the logits. Nothing here syncs the host.
    """
    cp = cupy_module()
    z = _rows(cp, logits, "cross_entropy: logits")
    N, V = z.shape
    t = cp.ascontiguousarray(cp.asarray(targets).reshape(-1).astype(cp.int64, copy=False))
    if t.shape[0] != N:
        raise ValueError(f"cross_entropy: logits {logits.shape} and targets {targets.shape} do not match")
    if out is not None:
        out = _out_like(cp, out, logits, "cross_entropy: out", inputs=(logits,))
    d = out.reshape(N, V) if out is not None else _empty(cp, (N, V))
    losses = _empty(cp, (N,))
    n_valid = cp.maximum((t != ignore_index).sum(), 1).astype(cp.float32).reshape(1)
    if N:
        _launch(cp, "cross_entropy", (N,), (_threads(V),),
                (z, t, d, losses, n_valid, np.int32(N), np.int32(V), np.int64(ignore_index)))
    return losses.sum() / n_valid[0], losses, d.reshape(logits.shape)


# ---- AdamW -------------------------------------------------------------------------------------
# One pass over the flat buffers of npgpt.optim.AdamW: p, m, v updated in place. gscale (a device
# scalar) multiplies the gradient first: the clipping coefficient and/or 1/loss-scale, with no
# host sync. The arithmetic follows npgpt.optim.adamw_update line by line (PyTorch's AdamW
# arrangement), and the tests hold the kernel to that function.
ADAMW = ("T g, raw float32 gscale, float32 decay, float32 b1, float32 omb1, float32 b2, float32 omb2, "
         "float32 eps, float32 step_size, float32 inv_sqrt_bias2, int64 n_decay",
         "T p, T m, T v", r"""
const float gf = (float)g * gscale[0];
float pf = (float)p;
if (i < n_decay) pf = pf * decay;                 // decoupled weight decay, before the Adam step
const float mf = (float)m * b1 + gf * omb1;
const float vf = (float)v * b2 + gf * gf * omb2;
m = (T)mf;
v = (T)vf;
p = (T)(pf - step_size * (mf / (sqrtf(vf) * inv_sqrt_bias2 + eps)));
""")


def adamw_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, n_decay, grad_scale=None):
    """The fused AdamW update on the GPU, in place on p, m, v (1-D contiguous, one dtype).
    grad_scale: None, a float, or a device array holding one float32 (no host sync)."""
    cp = cupy_module()
    for name, a in (("p", p), ("g", g), ("m", m), ("v", v)):
        if not is_gpu_array(a) or a.ndim != 1 or not a.flags.c_contiguous or a.size != p.size:
            raise ValueError(f"adamw_step: {name} must be a contiguous 1-D CuPy array of {p.size} values")
    if grad_scale is None or not is_gpu_array(grad_scale):
        grad_scale = cp.full(1, 1.0 if grad_scale is None else float(grad_scale), dtype=cp.float32)
    gs = grad_scale.reshape(1).astype(cp.float32, copy=False)
    bias1, bias2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    kern = _elementwise_kernel(cp, "adamw")
    launches["adamw"] += 1
    kern(g, gs, 1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, lr / bias1,
         1.0 / math.sqrt(bias2), int(n_decay), p, m, v)
    return p, m, v


# ---- global gradient norm ----------------------------------------------------------------------
# Parameter names long and unique: CuPy's CUB path rewrites the map/post expressions by name, and a
# one-letter name (x, y) could match inside other identifiers.
GRAD_NORM = ("T npgpt_grad", "float32 npgpt_norm", "(float)npgpt_grad * (float)npgpt_grad", "a + b",
             "npgpt_norm = sqrtf(a)", "0")


def grad_norm_reference(g):
    return float(np.sqrt(np.sum(np.asarray(g, dtype=np.float64) ** 2)))


def grad_norm(g):
    """sqrt(sum g^2) over all of g as a 0-d float32 device array (no host sync)."""
    cp = cupy_module()
    if not is_gpu_array(g):
        raise TypeError("grad_norm: expected a CuPy array")
    kern = _cache.get((cp, "grad_norm"))
    if kern is None:
        in_p, out_p, map_e, red_e, post_e, ident = GRAD_NORM
        kern = _cache[(cp, "grad_norm")] = cp.ReductionKernel(in_p, out_p, map_e, red_e, post_e, ident,
                                                         "npgpt_grad_norm", reduce_type="float32")
    launches["grad_norm"] += 1
    return kern(g)


# ---- compiling and launching -------------------------------------------------------------------
RAW_SOURCES = {
    "layernorm_forward": LAYERNORM_FORWARD_SRC,
    "layernorm_backward_dx": LAYERNORM_BACKWARD_DX_SRC,
    "layernorm_backward_params": LAYERNORM_BACKWARD_PARAMS_SRC,
    "causal_softmax_forward": SOFTMAX_FORWARD_SRC,
    "causal_softmax_backward": SOFTMAX_BACKWARD_SRC,
    "cross_entropy": CROSS_ENTROPY_SRC,
}
ELEMENTWISE_SPECS = {
    "gelu_forward": GELU_FORWARD,
    "gelu_backward": GELU_BACKWARD,
    "adamw": ADAMW,
}
_cache: dict = {}


def raw_source(name):
    """The full CUDA source CuPy compiles for raw kernel `name` (the preamble + the kernel)."""
    return PREAMBLE + RAW_SOURCES[name]


def _launch(cp, name, grid, block, args):
    kern = _cache.get((cp, name))     # per cupy module: the test suite also serves an emulated one
    if kern is None:
        kern = _cache[(cp, name)] = cp.RawKernel(raw_source(name), "npgpt_" + name)
    launches[name] += 1
    kern(grid, block, args)


def _elementwise_kernel(cp, name):
    kern = _cache.get((cp, name))
    if kern is None:
        in_p, out_p, body = ELEMENTWISE_SPECS[name]
        kern = _cache[(cp, name)] = cp.ElementwiseKernel(in_p, out_p, body, "npgpt_" + name)
    return kern


def _elementwise(cp, name, *inputs, out_shape, out_dtype):
    out = _empty(cp, out_shape, out_dtype)
    launches[name] += 1
    _elementwise_kernel(cp, name)(*inputs, out)
    return out


def _threads(n):
    """Threads per row block: whole warps, about 4 elements each, 32 to 1024."""
    return int(min(1024, max(32, 32 * -(-int(n) // 128))))


def _empty(cp, shape, dtype=np.float32):
    if _debug:
        return cp.full(shape, np.nan, dtype=dtype)
    return cp.empty(shape, dtype=dtype)


def _check_float(cp, a, what):
    if not is_gpu_array(a):
        raise TypeError(f"{what}: expected a CuPy array, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{what}: expected a float array, got {a.dtype}")


def _rows(cp, a, what):
    """a (..., C) float32 CuPy array -> a C-contiguous (N, C) view (a copy only if it must)."""
    if not is_gpu_array(a):
        raise TypeError(f"{what}: expected a CuPy array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{what}: the fused kernels take float32, got {a.dtype}")
    if a.ndim < 1:
        raise ValueError(f"{what}: expected at least one dimension")
    return cp.ascontiguousarray(a.reshape(-1, a.shape[-1]))


def _vec(cp, a, n, what, dtype=np.float32):
    if not is_gpu_array(a):
        raise TypeError(f"{what}: expected a CuPy array, got {type(a).__name__}")
    if a.size != n or a.dtype != dtype:
        raise ValueError(f"{what}: expected {n} values of {np.dtype(dtype)}, got shape {a.shape} {a.dtype}")
    return cp.ascontiguousarray(a.reshape(n))


def _softmax_rows(cp, x, offset, what):
    if x.ndim < 2:
        raise ValueError(f"{what}: expected (..., Tq, Tk), got shape {x.shape}")
    Tq, Tk = x.shape[-2], x.shape[-1]
    x3 = _rows(cp, x, what)
    return x3, max(Tq, 1), Tk, (Tk - Tq if offset is None else int(offset))


def may_poison(out, inputs, may_share_memory) -> bool:
    """Debug mode may NaN-fill `out` only when it shares no memory with any input: a kernel run
    in place (`out=dp`, `out=logits`, or a view of either) must still read its inputs."""
    return not any(a is not None and may_share_memory(out, a) for a in inputs)


def _out_like(cp, out, like, what, inputs=()):
    """The output array: a new one shaped like `like`, or the caller's `out` after checking it.
    `inputs` are the arrays the kernel reads (so an aliasing `out` is never NaN-filled)."""
    if out is None:
        return _empty(cp, like.shape)
    if not is_gpu_array(out) or out.shape != like.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"{what}: must be a C-contiguous float32 CuPy array of shape {like.shape}")
    if _debug and may_poison(out, inputs, cp.may_share_memory):
        out.fill(np.nan)
    return out
