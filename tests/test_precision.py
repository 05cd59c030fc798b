"""npgpt.precision: matmul precisions, the cuBLAS call plan, casts and the dynamic loss scaler.

The cuBLAS plan is checked on the CPU with a NumPy model of cuBLAS's column-major GEMM that reads
the operands' raw memory the way cuBLAS would; the real cuBLAS calls run only on a GPU.
"""

import math

import numpy as np
import pytest

from npgpt import precision as P
from npgpt.training.scaler import DynamicLossScaler
from npgpt.backend import gpu_available
from npgpt.errors import NpgptError
from npgpt.optim import AdamW

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")


def rnd(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


# ---- Precision on NumPy --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fp32", "tf32"])
@pytest.mark.parametrize("shapes", [((5, 7), (7, 3)), ((2, 5, 7), (2, 7, 3)), ((2, 5, 7), (7, 3))])
def test_numpy_matmul_is_np_matmul(name, shapes):
    a, b = rnd(0, *shapes[0]).astype(np.float32), rnd(1, *shapes[1]).astype(np.float32)
    np.testing.assert_array_equal(P.Precision(name).matmul(a, b), np.matmul(a, b))
    out = np.empty(np.matmul(a, b).shape, np.float32)
    assert P.Precision(name).matmul(a, b, out=out) is out
    np.testing.assert_array_equal(out, np.matmul(a, b))


def test_numpy_fp16_rounds_operands_and_sums_in_float32():
    a, b = rnd(2, 6, 40).astype(np.float32), rnd(3, 40, 5).astype(np.float32)
    y = P.Precision("fp16").matmul(a, b)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, a.astype(np.float16).astype(np.float32) @ b.astype(np.float16).astype(np.float32))
    assert np.abs(y - a @ b).max() / np.abs(a @ b).max() < 5e-3
    assert P.Precision("fp16").matmul(a.astype(np.float16), b.astype(np.float16)).dtype == np.float16


def test_unknown_precision_and_bad_shapes():
    with pytest.raises(NpgptError, match="fp32, tf32, fp16"):
        P.Precision("bf16")
    with pytest.raises(ValueError):
        P.Precision("fp32").matmul(np.ones((2, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError):
        P.Precision("fp32").matmul(np.ones(3), np.ones((3, 2)))


def test_active_precision_context():
    assert P.current().name == "fp32"
    with P.use_precision("tf32") as p:
        assert p.name == "tf32" and P.current() is p
        a, b = np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)
        np.testing.assert_array_equal(P.matmul(a, b), a @ b)
    assert P.current().name == "fp32"
    assert P.Precision("FP16").needs_loss_scaling and not P.Precision("tf32").needs_loss_scaling


def test_casts():
    x = np.array([1.0, 70000.0, -3.5], np.float32)
    h = P.to_half(x)
    assert h.dtype == np.float16 and np.isinf(h[1]) and P.to_half(h) is h
    assert P.to_float(h).dtype == np.float32 and P.to_float(x) is x


# ---- the cuBLAS plan, checked against a model of column-major GEMM --------------------------------
def _raw(a):
    """The flat element memory an array view reads from, starting at its first element."""
    item = a.itemsize
    span = 1 + sum((n - 1) * s // item for n, s in zip(a.shape, a.strides) if n > 0)
    return np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(item,))


def _colmajor(buf, off, rows, cols, ld):
    """The rows x cols column-major matrix at buf[off] with leading dimension ld."""
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return buf[off + i + j * ld]


def cublas_gemm_model(a, b, plan):
    """What P._cublas asks cuBLAS for: C^T = op(B^T) op(A^T), column-major, C row-major (ld N)."""
    M, N, K = plan.m, plan.n, plan.k
    ra, rb = _raw(a), _raw(b)
    out = np.empty(plan.out_shape, dtype=np.float64).reshape(-1)
    for i in range(plan.batch):
        # first operand: B, op'd to (N x K); stored (K x N) when transposed, else (N x K)
        Bm = (_colmajor(rb, i * plan.stride_b, K, N, plan.ld_b).T if plan.trans_b
              else _colmajor(rb, i * plan.stride_b, N, K, plan.ld_b))
        Am = (_colmajor(ra, i * plan.stride_a, M, K, plan.ld_a).T if plan.trans_a
              else _colmajor(ra, i * plan.stride_a, K, M, plan.ld_a))
        Ct = Bm @ Am                                                  # (N x M) column-major
        out[i * M * N:(i + 1) * M * N] = Ct.T.reshape(-1)            # = C (M x N) row-major
    return out.reshape(plan.out_shape)


def _layouts():
    r = np.random.default_rng(5)
    a = r.standard_normal((4, 6))
    b = r.standard_normal((6, 5))
    big = r.standard_normal((3, 4, 9))
    qkv = r.standard_normal((2, 5, 3, 2, 4))           # (B, T, 3, nh, hs) as attention's views
    q, k = qkv[:, :, 0].transpose(0, 2, 1, 3), qkv[:, :, 1].transpose(0, 2, 1, 3)
    yield "plain", a, b
    yield "a transposed view", np.ascontiguousarray(a.T).T, b
    yield "b transposed view (tied LM head)", a, np.ascontiguousarray(b.T).T
    yield "both transposed", np.ascontiguousarray(a.T).T, np.ascontiguousarray(b.T).T
    yield "row-padded a", big[0, :, :6], b                          # ld 9 > K 6
    yield "batched", r.standard_normal((3, 4, 6)), r.standard_normal((3, 6, 5))
    yield "batched @ 2-D (Linear)", r.standard_normal((3, 4, 6)), b
    yield "2-D @ batched", a, r.standard_normal((3, 6, 5))
    yield "batched, transposed b", r.standard_normal((3, 4, 6)), r.standard_normal((3, 5, 6)).swapaxes(-1, -2)
    yield "4-D batch", r.standard_normal((2, 3, 4, 6)), r.standard_normal((2, 3, 6, 5))
    yield "attention q @ k^T (strided heads)", q, k.swapaxes(-1, -2)
    yield "vector rows", r.standard_normal((1, 6)), r.standard_normal((6, 1))
    yield "column slice", big[:, :, ::2], r.standard_normal((3, 5, 2))


@pytest.mark.parametrize("case", list(_layouts()), ids=lambda c: c[0])
def test_gemm_plan_reproduces_matmul(case):
    _, a, b = case
    plan = P.gemm_plan(a.shape, a.strides, a.itemsize, b.shape, b.strides, b.itemsize)
    if plan.copy_a:
        a = np.ascontiguousarray(a)
    if plan.copy_b:
        b = np.ascontiguousarray(b)
    plan = P.gemm_plan(a.shape, a.strides, a.itemsize, b.shape, b.strides, b.itemsize)
    assert not plan.copy_a and not plan.copy_b
    ref = np.matmul(a, b)
    assert plan.out_shape == ref.shape
    np.testing.assert_allclose(cublas_gemm_model(a, b, plan), ref, rtol=1e-12, atol=1e-12)


def test_gemm_plan_avoids_copies_for_views():
    w = np.zeros((8, 24))
    p = P.gemm_plan((16, 8), (64, 8), 8, w.T.shape, w.T.strides, 8)
    assert p.trans_b and p.ld_b == 24 and not p.copy_b
    x = np.zeros((4, 16, 8))
    p = P.gemm_plan(x.shape, x.strides, 8, w.shape, w.strides, 8)
    assert (p.m, p.batch) == (64, 1)                           # batched @ 2-D became one GEMM
    s = np.zeros((3, 5, 6))[:, :, ::2]                          # every other column: must copy
    assert P.gemm_plan(s.shape, s.strides, 8, (3, 3, 2), (48, 16, 8), 8).copy_a
    with pytest.raises(ValueError, match="batch dims"):
        P.gemm_plan((2, 3, 4), (96, 32, 8), 8, (3, 4, 5), (160, 40, 8), 8)


# ---- the dynamic loss scaler ---------------------------------------------------------------------
class _P:
    def __init__(self, a):
        self.data, self.grad = a, None


def _opt():
    r = np.random.default_rng(7)
    return AdamW([("w", _P(r.standard_normal((3, 4)).astype(np.float32))),
                  ("b", _P(np.zeros(4, np.float32)))], lr=1e-2)


def test_scaler_scales_loss_and_unscales_grads():
    s = DynamicLossScaler(init_scale=1024.0)
    assert s.scale_loss(np.float32(2.0)) == 2048.0
    g = np.full(3, 2048.0, np.float32)
    s.unscale_(g)
    np.testing.assert_array_equal(g, 2.0)
    from npgpt import Tensor
    t = s.scale_loss(Tensor(np.array(3.0, np.float32)))
    assert isinstance(t, Tensor) and float(t.data) == 3072.0


def test_scaler_step_matches_unscaled_step():
    opt, ref = _opt(), _opt()
    g = np.random.default_rng(8).standard_normal(opt.grad.size).astype(np.float32)
    s = DynamicLossScaler(init_scale=256.0)
    opt.grad[...] = g * 256.0
    stepped, norm = s.step(opt, lr=1e-2, grad_clip=1.0)
    ref.grad[...] = g
    ref_norm = ref.clip_grad_norm(1.0)
    ref.step(1e-2)
    assert stepped and math.isclose(float(norm), float(ref_norm), rel_tol=1e-6)
    np.testing.assert_allclose(opt.flat, ref.flat, rtol=1e-6, atol=1e-7)
    assert s.scale == 256.0 and s.good_steps == 1


def test_scaler_step_reads_the_gradient_norm_once(monkeypatch):
    # One reduction over the gradients per step: the unscaled norm is the scaled one / scale.
    opt = _opt()
    opt.grad[...] = np.random.default_rng(9).standard_normal(opt.grad.size).astype(np.float32) * 512.0
    calls = []
    real = opt.grad_norm
    monkeypatch.setattr(opt, "grad_norm", lambda: calls.append(1) or real())
    stepped, norm = DynamicLossScaler(init_scale=512.0).step(opt, lr=1e-2, grad_clip=0.5)
    assert stepped and len(calls) == 1
    # and the clipped, unscaled gradient really has the clip norm
    assert math.isclose(float(np.sqrt(np.dot(opt.grad, opt.grad))), 0.5, rel_tol=1e-4)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_scaler_skips_step_and_backs_off_on_overflow(bad):
    opt = _opt()
    before = opt.flat.copy()
    s = DynamicLossScaler(init_scale=2.0 ** 16)
    s.good_steps = 5
    opt.grad[...] = 1.0
    opt.grad[3] = bad
    stepped, norm = s.step(opt, lr=1e-2, grad_clip=1.0)
    assert not stepped and not math.isfinite(norm)
    np.testing.assert_array_equal(opt.flat, before)            # parameters untouched
    assert opt.t == 0 and np.all(opt.exp_avg == 0)              # nor the moments or the step count
    assert s.scale == 2.0 ** 15 and s.good_steps == 0 and s.skipped_steps == 1


def test_scaler_grows_after_interval_and_respects_bounds():
    s = DynamicLossScaler(init_scale=4.0, growth_interval=3, min_scale=2.0, max_scale=16.0)
    for _ in range(3):
        s.update(False)
    assert s.scale == 8.0 and s.good_steps == 0
    for _ in range(6):
        s.update(False)
    assert s.scale == 16.0                                      # capped at max_scale
    s.update(True)
    s.update(True)
    s.update(True)
    assert s.scale == 2.0                                       # floored at min_scale
    assert DynamicLossScaler().growth_interval == 2000


def test_scaler_state_dict_round_trip_and_validation():
    s = DynamicLossScaler(init_scale=512.0)
    s.update(True)
    s.update(False)
    t = DynamicLossScaler().load_state_dict(s.state_dict())
    assert (t.scale, t.good_steps, t.skipped_steps) == (256.0, 1, 1)
    import json
    json.dumps(s.state_dict())                                  # fits a checkpoint's state.json
    with pytest.raises(NpgptError):
        DynamicLossScaler().load_state_dict({"scale": -1.0, "good_steps": 0})
    with pytest.raises(NpgptError):
        DynamicLossScaler().load_state_dict({})
    with pytest.raises(NpgptError):
        DynamicLossScaler(backoff_factor=1.5)


def test_disabled_scaler_is_a_pass_through():
    s = DynamicLossScaler(enabled=False)
    assert s.scale == 1.0 and s.scale_loss(3.0) == 3.0
    s.update(True)
    assert s.scale == 1.0 and s.skipped_steps == 0


# ---- cuBLAS on the GPU ---------------------------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name,tol", [("fp32", 1e-5), ("tf32", 5e-3), ("fp16", 1e-2)])
@pytest.mark.parametrize("case", list(_layouts()), ids=lambda c: c[0])
def test_cublas_matmul_matches_numpy(name, tol, case):
    from npgpt.backend import asnumpy, cupy_module
    cp = cupy_module()
    _, a, b = case
    ga, gb = cp.asarray(a, dtype=cp.float32), cp.asarray(b, dtype=cp.float32)
    # rebuild the same views on the device (asarray of a view copies it contiguous)
    if not a.flags.c_contiguous and a.ndim == 2 and a.T.flags.c_contiguous:
        ga = cp.ascontiguousarray(ga.T).T
    if not b.flags.c_contiguous and b.ndim >= 2 and b.swapaxes(-1, -2).flags.c_contiguous:
        gb = cp.ascontiguousarray(gb.swapaxes(-1, -2)).swapaxes(-1, -2)
    calls = P.matmul_calls
    y = asnumpy(P.Precision(name).matmul(ga, gb)).astype(np.float64)
    ref = np.matmul(a, b)
    assert P.matmul_calls == calls + 1
    assert np.abs(y - ref).max() / np.abs(ref).max() < tol
