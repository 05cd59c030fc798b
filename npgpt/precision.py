"""Matmul precision (`--precision fp32|tf32|fp16`) and the fp16 casts.

Three settings, all with float32 master weights in the optimizer's flat buffer:

    fp32   plain float32 GEMMs (cuBLAS CUBLAS_COMPUTE_32F, CUBLAS_DEFAULT_MATH): the reference
    tf32   float32 in and out, products on the tensor cores with 10-bit mantissas
           (CUBLAS_COMPUTE_32F_FAST_TF32 with CUBLAS_TF32_TENSOR_OP_MATH): ~1e-3 relative error
    fp16   operands cast to float16, products on the tensor cores, sums in float32
           (CUBLAS_COMPUTE_32F); the result comes back as float32 unless both inputs were half

`Precision(name).matmul(a, b)` calls cuBLAS directly (`gemmEx`, `gemmStridedBatchedEx`) so the
compute type and math mode are explicit instead of inherited from environment variables. On NumPy
arrays it is `np.matmul` (fp16: operands rounded to float16 first, sums in float32, so the CPU
shows the same rounding), which keeps every caller CPU-testable.

cuBLAS is column-major. A row-major (r, c) matrix with row stride ld is, to cuBLAS, the (c, r)
matrix X^T with leading dimension ld; so C = A @ B is computed as C^T = B^T A^T: the call gets B
first, then A, and m = N, n = M. A transposed view (a row-major matrix read column-wise, such as
`w.T`) is passed with op T and ld = its stride between columns, so no copy is made.

fp16 gradients underflow: the trainer scales the loss (npgpt.training.scaler.DynamicLossScaler).
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import numpy as np

from npgpt.backend import cupy_module, get_xp, is_gpu_array
from npgpt.errors import NpgptError

PRECISIONS = ("fp32", "tf32", "fp16")

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h), used when the cupy bindings lack a name.
_FALLBACK = {"CUBLAS_OP_N": 0, "CUBLAS_OP_T": 1, "CUBLAS_DEFAULT_MATH": 0, "CUBLAS_TF32_TENSOR_OP_MATH": 3,
             "CUBLAS_COMPUTE_32F": 68, "CUBLAS_COMPUTE_32F_FAST_TF32": 77, "CUBLAS_GEMM_DEFAULT": -1,
             "CUBLAS_POINTER_MODE_HOST": 0, "CUDA_R_32F": 0, "CUDA_R_16F": 2}

matmul_calls = 0      # calls of Precision.matmul (the device check reads it to see the model uses it)
# NPGPT_DIRECT_CUBLAS=0: fp32 on the GPU goes through cupy.matmul instead (a fallback, should the direct
# cuBLAS call misbehave on some CuPy / CUDA version); tf32 and fp16 always call cuBLAS directly.
DIRECT_CUBLAS = os.environ.get("NPGPT_DIRECT_CUBLAS", "1") not in ("", "0")


class Precision:
    """A matmul precision: 'fp32', 'tf32' or 'fp16' (see the module doc)."""

    def __init__(self, name: str = "fp32"):
        name = str(name).strip().lower()
        if name not in PRECISIONS:
            raise NpgptError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
        self.name = name

    def __repr__(self):
        return f"Precision({self.name!r})"

    def __eq__(self, other):
        return isinstance(other, Precision) and other.name == self.name

    def __hash__(self):
        return hash(self.name)

    @property
    def needs_loss_scaling(self) -> bool:
        return self.name == "fp16"

    # ---- matmul --------------------------------------------------------------------------------
    def matmul(self, a, b, out=None):
        """a (..., M, K) @ b (..., K, N) -> (..., M, N). Leading dims equal, or one side 2-D.

        out: a C-contiguous array of the result's shape and dtype to write into.
        """
        global matmul_calls
        matmul_calls += 1
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul needs 2-D or batched operands, got {a.shape} @ {b.shape}")
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not fit (K {a.shape[-1]} != {b.shape[-2]})")
        if is_gpu_array(a) or is_gpu_array(b):
            if self.name == "fp32" and not DIRECT_CUBLAS:
                xp = get_xp(a, b)
                return xp.matmul(a, b, out=out) if out is not None else xp.matmul(a, b)
            return self._cublas(a, b, out)
        xp = get_xp(a, b)
        if self.name == "fp16":
            half = a.dtype == np.float16 and b.dtype == np.float16
            a32 = a.astype(np.float16).astype(np.float32)      # the operands' rounding, sums in float32
            b32 = b.astype(np.float16).astype(np.float32)
            y = xp.matmul(a32, b32)
            y = y.astype(np.float16) if half else y
            if out is not None:
                out[...] = y
                return out
            return y
        return xp.matmul(a, b, out=out) if out is not None else xp.matmul(a, b)

    def _cublas(self, a, b, out):
        cp = cupy_module()
        if not (is_gpu_array(a) and is_gpu_array(b)):
            raise ValueError("matmul: both operands must be on the GPU")
        if out is not None and is_gpu_array(out) and not out.flags.c_contiguous:
            # cuBLAS writes C-contiguous results; a strided out (e.g. heads written into (B, T, nh, hs))
            # gets a copy, as cupy.matmul does
            y = self._cublas(a, b, None)
            if y.shape != out.shape or y.dtype != out.dtype:
                raise ValueError(f"matmul: out must be a {y.dtype} CuPy array of shape {y.shape}")
            out[...] = y
            return out
        cublas = cp.cuda.cublas
        runtime = cp.cuda.runtime

        def const(name, module=cublas):
            return getattr(module, name, _FALLBACK[name])

        if self.name == "fp16":
            half_out = a.dtype == np.float16 and b.dtype == np.float16
            a, b = to_half(a), to_half(b)
            in_type = const("CUDA_R_16F", runtime)
            out_dtype = np.float16 if half_out else np.float32
            compute, math_mode = const("CUBLAS_COMPUTE_32F"), const("CUBLAS_DEFAULT_MATH")
        else:
            if a.dtype != np.float32 or b.dtype != np.float32:
                raise ValueError(f"{self.name} matmul takes float32 operands, got {a.dtype} and {b.dtype}")
            in_type, out_dtype = const("CUDA_R_32F", runtime), np.float32
            if self.name == "tf32":
                compute, math_mode = const("CUBLAS_COMPUTE_32F_FAST_TF32"), const("CUBLAS_TF32_TENSOR_OP_MATH")
            else:
                compute, math_mode = const("CUBLAS_COMPUTE_32F"), const("CUBLAS_DEFAULT_MATH")
        out_type = const("CUDA_R_16F", runtime) if out_dtype == np.float16 else const("CUDA_R_32F", runtime)

        plan = gemm_plan(a.shape, a.strides, a.itemsize, b.shape, b.strides, b.itemsize)
        if plan.copy_a:
            a = cp.ascontiguousarray(a)
        if plan.copy_b:
            b = cp.ascontiguousarray(b)
        if plan.copy_a or plan.copy_b:
            plan = gemm_plan(a.shape, a.strides, a.itemsize, b.shape, b.strides, b.itemsize)
        shape = plan.out_shape
        if out is not None and (not is_gpu_array(out) or tuple(out.shape) != shape or out.dtype != out_dtype):
            raise ValueError(f"matmul: out must be a {np.dtype(out_dtype)} CuPy array of shape {shape}")
        if out is None:
            out = cp.empty(shape, dtype=out_dtype)
        M, N, K = plan.m, plan.n, plan.k
        if M == 0 or N == 0 or plan.batch == 0:
            return out
        if K == 0:
            out.fill(0)
            return out

        alpha = np.ones(1, dtype=np.float32)     # host scalars: compute type 32F takes float alpha/beta
        beta = np.zeros(1, dtype=np.float32)
        handle = cp.cuda.device.get_cublas_handle()
        cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
        prev_mode = cublas.getMathMode(handle)
        prev_ptr = cublas.getPointerMode(handle)
        op = {False: const("CUBLAS_OP_N"), True: const("CUBLAS_OP_T")}
        try:
            cublas.setMathMode(handle, math_mode)
            if prev_ptr != const("CUBLAS_POINTER_MODE_HOST"):
                cublas.setPointerMode(handle, const("CUBLAS_POINTER_MODE_HOST"))
            algo = const("CUBLAS_GEMM_DEFAULT")
            # C^T (N x M, ld N) = op(B^T) (N x K) @ op(A^T) (K x M)
            if plan.batch == 1:
                cublas.gemmEx(handle, op[plan.trans_b], op[plan.trans_a], N, M, K,
                              alpha.ctypes.data, b.data.ptr, in_type, plan.ld_b,
                              a.data.ptr, in_type, plan.ld_a,
                              beta.ctypes.data, out.data.ptr, out_type, N, compute, algo)
            else:
                cublas.gemmStridedBatchedEx(handle, op[plan.trans_b], op[plan.trans_a], N, M, K,
                                            alpha.ctypes.data, b.data.ptr, in_type, plan.ld_b, plan.stride_b,
                                            a.data.ptr, in_type, plan.ld_a, plan.stride_a,
                                            beta.ctypes.data, out.data.ptr, out_type, N, M * N,
                                            plan.batch, compute, algo)
        finally:
            cublas.setMathMode(handle, prev_mode)       # the handle is CuPy's own: leave it as found
            if prev_ptr != const("CUBLAS_POINTER_MODE_HOST"):
                cublas.setPointerMode(handle, prev_ptr)
        return out


class GemmPlan:
    """How one matmul maps onto a cuBLAS call (all counts in elements)."""

    __slots__ = ("m", "n", "k", "batch", "out_shape", "trans_a", "ld_a", "stride_a", "trans_b", "ld_b",
                 "stride_b", "copy_a", "copy_b")

    def __repr__(self):
        return "GemmPlan(" + ", ".join(f"{s}={getattr(self, s)!r}" for s in self.__slots__) + ")"


def _matrix_layout(shape, strides, item):
    """(trans, ld) for the last two dims: row-major rows -> (False, row stride); a transposed view
    (column-major) -> (True, column stride); None when cuBLAS cannot read it as it is."""
    rows, cols = shape[-2], shape[-1]
    s_r, s_c = strides[-2], strides[-1]
    if s_r < 0 or s_c < 0 or s_r % item or s_c % item:
        return None
    s_r, s_c = s_r // item, s_c // item
    if (s_c == 1 or cols == 1) and s_r >= max(cols, 1):
        return False, s_r
    if (s_r == 1 or rows == 1) and s_c >= max(rows, 1):
        return True, s_c
    if rows <= 1 and cols <= 1:
        return False, 1
    return None


def _batch_stride(shape, strides, item):
    """One element stride that walks all leading (batch) dims in order, or None."""
    lead = [(n, s) for n, s in zip(shape[:-2], strides[:-2]) if n != 1]
    if not lead:
        return 0
    if any(s < 0 or s % item for _, s in lead):
        return None
    for (n_out, s_out), (n_in, s_in) in zip(lead[:-1], lead[1:]):
        if s_out != s_in * n_in:
            return None
    return lead[-1][1] // item


def gemm_plan(a_shape, a_strides, a_item, b_shape, b_strides, b_item) -> GemmPlan:
    """Plan a @ b for cuBLAS from shapes and byte strides (pure Python: tested on the CPU).

    Batched operands must have equal leading dims, or one side is 2-D (its stride 0 repeats it).
    copy_a / copy_b say an operand must be made contiguous first (call again after copying).
    """
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    M, K = a_shape[-2], a_shape[-1]
    N = b_shape[-1]
    a_lead, b_lead = a_shape[:-2], b_shape[:-2]
    if a_lead and b_lead and a_lead != b_lead:
        raise ValueError(f"matmul: batch dims {a_lead} and {b_lead} must match (or one side 2-D)")
    lead = a_lead or b_lead
    p = GemmPlan()
    p.m, p.n, p.k = M, N, K
    p.batch = int(np.prod(lead)) if lead else 1
    p.out_shape = lead + (M, N)
    p.copy_a = p.copy_b = False
    la, lb = _matrix_layout(a_shape, a_strides, a_item), _matrix_layout(b_shape, b_strides, b_item)
    sa = _batch_stride(a_shape, a_strides, a_item) if a_lead else 0
    sb = _batch_stride(b_shape, b_strides, b_item) if b_lead else 0
    p.copy_a, p.copy_b = la is None or sa is None, lb is None or sb is None
    p.trans_a, p.ld_a = la if la else (False, K)
    p.trans_b, p.ld_b = lb if lb else (False, N)
    p.stride_a, p.stride_b = sa or 0, sb or 0
    # cuBLAS wants ld >= the stored matrix's rows in its column-major view, and at least 1
    p.ld_a, p.ld_b = max(p.ld_a, (M if p.trans_a else K), 1), max(p.ld_b, (K if p.trans_b else N), 1)
    if (p.batch > 1 and not b_lead and not p.copy_a and not p.copy_b and not p.trans_a
            and p.stride_a == M * p.ld_a):
        # (..., M, K) rows one after another @ a 2-D b: one (batch * M, K) GEMM (Linear's case)
        p.m, p.batch, p.stride_a = p.batch * M, 1, 0
    return p


# ---- the active precision ----------------------------------------------------------------------
# A context variable, not a module global: `with use_precision("tf32"):` in one thread leaves every
# other thread (a server's engine, another test) on its own precision; the replicas' threads run in
# a copy of their starter's context and so use the trainer's.
ACTIVE = contextvars.ContextVar("npgpt_precision", default=Precision("fp32"))


def current() -> Precision:
    """The precision matmuls in the model use in this context (set by `with use_precision(...)`)."""
    return ACTIVE.get()


@contextlib.contextmanager
def use_precision(name):
    """Within the block, matmuls of this thread's context run in `name` (yields the Precision)."""
    p = name if isinstance(name, Precision) else Precision(name)
    token = ACTIVE.set(p)
    try:
        yield p
    finally:
        ACTIVE.reset(token)


def matmul(a, b, out=None):
    """a @ b in the active precision (see Precision.matmul)."""
    return ACTIVE.get().matmul(a, b, out=out)


# ---- casts for fp16 ----------------------------------------------------------------------------
def to_half(x):
    """x as float16 (no copy when it already is). Values beyond +-65504 become inf (on purpose:
    the loss scaler sees them and backs off), so NumPy's overflow warning is silenced."""
    if x.dtype == np.float16:
        return x
    with np.errstate(over="ignore"):
        return x.astype(np.float16)


def to_float(x):
    """x as float32 (no copy when it already is): back to master precision."""
    return x if x.dtype == np.float32 else x.astype(np.float32)
