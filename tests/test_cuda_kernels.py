"""The fused CUDA kernels' contracts.

On the CPU: each NumPy reference in npgpt.ops.cuda_kernels equals npgpt's fused op (ops/nn.py,
optim.py) forward and backward in float64, and the CUDA sources compile with nvcc (when nvcc is
installed). On a GPU (marked gpu): each kernel equals its reference on fresh random inputs, with
NaN-filled outputs so an unwritten element fails. Without a GPU, the raw kernels run on the CPU
through the CUDA emulator in tests/test_cuda_emulator.py.
"""

import math
import re
import shutil
import subprocess

import numpy as np
import pytest

from npgpt import Tensor
from npgpt.backend import gpu_available
from npgpt.ops import cuda_kernels as K
from npgpt.ops import nn as N
from npgpt.optim import AdamW, adamw_update

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")


def rnd(seed, *shape, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def run_op(fn, arrays, dout, **kw):
    """Forward and backward of an npgpt op on float64 Tensors -> (out, [grads])."""
    ts = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    y = fn(*ts, **kw)
    y.backward(dout)
    return y.data, [t.grad for t in ts]


def close(a, b, tol=1e-10):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# ---- references == npgpt's ops (CPU, float64) ----------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 33)])
def test_layernorm_reference_matches_op(shape):
    x, w, b = rnd(0, *shape, scale=2.0) + 0.5, rnd(1, shape[-1]), rnd(2, shape[-1])
    dy = rnd(3, *shape)
    y_op, (dx_op, dw_op, db_op) = run_op(N.layer_norm, [x, w, b], dy, eps=1e-5)
    y, mean, rstd = K.layernorm_forward_reference(x, w, b, 1e-5)
    close(y, y_op)
    assert mean.shape == rstd.shape == shape[:-1]
    dx, dw, db = K.layernorm_backward_reference(dy, x, w, mean, rstd)
    close(dx, dx_op)
    close(dw, dw_op)
    close(db, db_op)
    y_nob, _, _ = K.layernorm_forward_reference(x, w, None, 1e-5)
    close(y_nob + b, y)


def test_gelu_references_match_op():
    x = np.clip(rnd(4, 6, 9, scale=2.0), -4, 4)
    dout = rnd(5, 6, 9)
    y_op, (dx_op,) = run_op(N.gelu, [x], dout)
    close(K.gelu_forward_reference(x), y_op)
    close(K.gelu_backward_reference(dout, x), dx_op)


def test_causal_softmax_references_match_attention():
    """softmax(scale * q k^T, causal) and its backward, as CausalSelfAttention computes them."""
    B, T, nh, hs = 2, 6, 2, 4
    qkv = rnd(6, B, T, 3 * nh * hs)
    dout = rnd(7, B, T, nh * hs)
    y_op, (dqkv_op,) = run_op(N.causal_self_attention, [qkv], dout, n_head=nh)
    q, k, v = N.split_heads(qkv, nh)
    scale = 1.0 / math.sqrt(hs)
    att = K.causal_softmax_forward_reference(q @ k.swapaxes(-1, -2), scale)        # (B, nh, T, T)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, nh * hs)
    close(y, y_op)
    dy = dout.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
    ds = K.causal_softmax_backward_reference(att, dy @ v.swapaxes(-1, -2), scale)
    dq, dk, dv = ds @ k, ds.swapaxes(-1, -2) @ q, att.swapaxes(-1, -2) @ dy
    dqkv = np.stack([dq, dk, dv], axis=2).transpose(0, 3, 2, 1, 4).reshape(B, T, 3 * nh * hs)
    close(dqkv, dqkv_op)


def test_causal_softmax_reference_offset_matches_attention_probs():
    """With a KV cache the queries are the last Tq of Tk keys (offset Tk - Tq), as attention_probs."""
    q, k = rnd(8, 1, 2, 3, 4), rnd(9, 1, 2, 7, 4)
    ref = N.attention_probs(q, k)
    s = q @ k.swapaxes(-1, -2)
    close(K.causal_softmax_forward_reference(s, 0.5), ref)
    close(K.causal_softmax_forward_reference(s, 0.5, offset=4), ref)
    p0 = K.causal_softmax_forward_reference(s, 0.5, offset=0)   # plain causal: the first 3 keys
    assert np.all(p0[..., 3:] == 0) and np.allclose(p0.sum(-1), 1.0)
    none = K.causal_softmax_forward_reference(s, 0.5, offset=-5)  # no visible key: zeros, not NaN
    assert np.all(none == 0)


@pytest.mark.parametrize("ignore", [False, True])
def test_cross_entropy_reference_matches_op(ignore):
    z = rnd(10, 2, 5, 11, scale=3.0)
    t = np.random.default_rng(11).integers(0, 11, (2, 5))
    if ignore:
        t[0, :3] = -1
    ts = Tensor(z.copy(), requires_grad=True)
    loss = N.cross_entropy(ts, t)
    loss.backward(np.array(1.0))
    ref_loss, losses, d = K.cross_entropy_reference(z.reshape(-1, 11), t.reshape(-1))
    close(ref_loss, float(loss.data))
    close(d.reshape(z.shape), ts.grad)
    assert np.all(losses[t.reshape(-1) == -1] == 0)


def test_cross_entropy_reference_all_ignored_is_zero():
    loss, losses, d = K.cross_entropy_reference(rnd(12, 3, 4), np.full(3, -1))
    assert loss == 0 and np.all(losses == 0) and np.all(d == 0)


def adamw_reference(p, g, m, v, lr, b1, b2, eps, wd, step, n_decay, grad_scale=1.0):
    """npgpt.optim.adamw_update (the one AdamW formula) on copies -> new (p, m, v)."""
    p, m, v = p.copy(), m.copy(), v.copy()
    return adamw_update(p, g, m, v, n_decay, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, step=step,
                        grad_scale=grad_scale)


def test_adamw_update_grad_scale_is_a_scaled_gradient():
    r = np.random.default_rng(14)
    p, g, m, v = (r.standard_normal(6) for _ in range(4))
    v = np.abs(v)
    a = adamw_reference(p, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 2, 3, grad_scale=0.25)
    b = adamw_reference(p, g * 0.25, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 2, 3)
    for x, y in zip(a, b):
        close(x, y)


def test_grad_norm_reference_matches_optimizer():
    class P:
        def __init__(self, a):
            self.data, self.grad = a, None

    opt = AdamW([("w", P(np.ones((2, 3), np.float32)))])
    opt.grad[...] = np.arange(6, dtype=np.float32)
    assert math.isclose(K.grad_norm_reference(opt.grad), float(opt.grad_norm()), rel_tol=1e-6)


def test_debug_fill_spares_an_output_that_aliases_an_input():
    """NPGPT_KERNEL_DEBUG NaN-fills fresh outputs only: filling `out=dp` or `out=logits` (or a view of
    them) would poison the very input the kernel is about to read."""
    a, b = np.zeros((4, 8), np.float32), np.zeros((4, 8), np.float32)
    share = np.may_share_memory
    assert K.may_poison(np.empty((4, 8), np.float32), (a, b), share)
    assert not K.may_poison(a, (a,), share)
    assert not K.may_poison(b, (a, b), share)                    # out=dp in the softmax backward
    assert not K.may_poison(a.reshape(32), (a,), share)          # a view of an input
    assert not K.may_poison(a[1:], (None, a), share)
    assert K.may_poison(a, (b, None), share)


def test_thread_counts_are_whole_warps():
    for n in (1, 31, 64, 768, 1000, 4096, 50257):
        t = K._threads(n)
        assert t % 32 == 0 and 32 <= t <= 1024


def test_wrappers_need_cupy_arrays():
    """Without CuPy: a clear NpgptError; with it: NumPy input is refused with a TypeError."""
    from npgpt.errors import NpgptError
    with pytest.raises((NpgptError, TypeError)):
        K.layernorm_forward(np.ones((2, 3), np.float32), np.ones(3, np.float32), np.zeros(3, np.float32))
    assert not K.use_kernels(np.ones(3, np.float32))


# ---- the CUDA sources compile (nvcc, when installed) ---------------------------------------------
_CTYPES = {"T": "T", "float32": "float", "float16": "__half", "int64": "long long", "int32": "int"}


def _elementwise_harness(name, in_params, out_params, body):
    """A kernel laid out as CuPy's ElementwiseKernel expands the spec: arrays are references to
    element i, scalars are values, `raw` params are pointers, `i` is the index."""
    params, binds = [], []
    for kind, spec in (("in", in_params), ("out", out_params)):
        for p in spec.split(","):
            words = p.split()
            raw = words[0] == "raw"
            ctype, pname = _CTYPES[words[-2]], words[-1]
            if raw:
                params.append(f"const {ctype}* {pname}")
            elif words[-2] == "T":
                params.append(f"{'const ' if kind == 'in' else ''}T* _raw_{pname}")
                binds.append(f"{'const ' if kind == 'in' else ''}T& {pname} = _raw_{pname}[i];")
            else:
                params.append(f"const {ctype} {pname}")
    return (f'extern "C" __global__ void harness_{name}({", ".join(params)}, const long long _n) {{\n'
            f"  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < _n;"
            f" i += (long long)gridDim.x * blockDim.x) {{\n    {' '.join(binds)}\n    {body}\n  }}\n}}\n")


def cuda_test_source():
    parts = ["#include <cuda_fp16.h>\ntypedef float T;\n", K.PREAMBLE]
    parts += list(K.RAW_SOURCES.values())
    for name, (in_p, out_p, body) in K.ELEMENTWISE_SPECS.items():
        parts.append(_elementwise_harness(name, in_p, out_p, body))
    in_p, out_p, map_e, red_e, post_e, ident = K.GRAD_NORM
    (in_name,), (out_name,) = (p.split()[-1:] for p in (in_p, out_p))   # declare them as the spec names them
    parts.append("__device__ float harness_reduce(const T %s) { float a = %s; float b = %s; a = %s; float %s; %s;"
                 " return %s; }\n" % (in_name, map_e, ident, red_e, out_name, post_e, out_name))
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    src = tmp_path / "kernels.cu"
    src.write_text(cuda_test_source())
    proc = subprocess.run(["nvcc", "-c", "-x", "cu", "-arch=sm_90", "-Werror", "all-warnings",
                           str(src), "-o", str(tmp_path / "kernels.o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = set(re.findall(r'extern "C" __global__ void (npgpt_\w+)', "\n".join(K.RAW_SOURCES.values())))
    assert names == {"npgpt_" + n for n in K.RAW_SOURCES}     # each kernel is named as _launch calls it


# ---- kernels == references on the GPU ------------------------------------------------------------
@pytest.fixture
def cp():
    from npgpt.backend import cupy_module
    prev = K.set_debug(True)       # NaN-filled outputs: an unwritten element fails the comparison
    yield cupy_module()
    K.set_debug(prev)


def rel_err(out, ref):
    from npgpt.backend import asnumpy
    out = asnumpy(out).astype(np.float64)
    assert np.all(np.isfinite(out)), "non-finite output (an element left unwritten?)"
    return np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)


@pytest.mark.parametrize("shape", [(7, 768), (3, 5, 1000), (2, 4097)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.gpu
@needs_gpu
def test_layernorm_kernels_on_gpu(cp, shape, bias):
    x, w, b, dy = rnd(20, *shape) + 1.0, rnd(21, shape[-1]), rnd(22, shape[-1]), rnd(23, *shape)
    g = [cp.asarray(a, dtype=cp.float32) for a in (x, w, b, dy)]
    y, mean, rstd = K.layernorm_forward(g[0], g[1], g[2] if bias else None, 1e-5)
    ry, rmean, rrstd = K.layernorm_forward_reference(x, w, b if bias else None, 1e-5)
    assert rel_err(y, ry) < 1e-5 and rel_err(mean, rmean) < 1e-5 and rel_err(rstd, rrstd) < 1e-5
    dx, dw, db = K.layernorm_backward(g[3], g[0], g[1], mean, rstd)
    for out, ref in zip((dx, dw, db), K.layernorm_backward_reference(dy, x, w, rmean, rrstd)):
        assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("shape", [(5, 3072), (2, 3, 1001)])
@pytest.mark.gpu
@needs_gpu
def test_gelu_kernels_on_gpu(cp, shape):
    h, d = rnd(24, *shape, scale=2.0), rnd(26, *shape)
    gh, gd = (cp.asarray(a, dtype=cp.float32) for a in (h, d))
    assert rel_err(K.gelu_forward(gh), K.gelu_forward_reference(h)) < 1e-5
    assert rel_err(K.gelu_backward(gd, gh), K.gelu_backward_reference(d, h)) < 1e-5


@pytest.mark.parametrize("Tq,Tk,offset", [(64, 64, None), (1, 1000, None), (7, 300, 0), (257, 1030, None)])
@pytest.mark.gpu
@needs_gpu
def test_causal_softmax_kernels_on_gpu(cp, Tq, Tk, offset):
    x, dp = rnd(27, 2, 3, Tq, Tk, scale=4.0), rnd(28, 2, 3, Tq, Tk)
    scale = 0.125
    p = K.causal_softmax_forward(cp.asarray(x, dtype=cp.float32), scale, offset)
    rp = K.causal_softmax_forward_reference(x, scale, offset)
    assert rel_err(p, rp) < 1e-5
    dx = K.causal_softmax_backward(p, cp.asarray(dp, dtype=cp.float32), scale, offset)
    assert rel_err(dx, K.causal_softmax_backward_reference(rp, dp, scale, offset)) < 1e-4
    g = cp.asarray(x, dtype=cp.float32)                  # in place
    assert K.causal_softmax_forward(g, scale, offset, out=g) is g
    assert rel_err(g, rp) < 1e-5
    gdp = cp.asarray(dp, dtype=cp.float32)              # backward in place, as attention calls it
    assert K.causal_softmax_backward(g, gdp, scale, offset, out=gdp) is gdp
    assert rel_err(gdp, K.causal_softmax_backward_reference(rp, dp, scale, offset)) < 1e-4


@pytest.mark.parametrize("N,V", [(8, 65), (33, 50257)])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.gpu
@needs_gpu
def test_cross_entropy_kernel_on_gpu(cp, N, V, inplace):
    z = rnd(29, N, V, scale=3.0)
    t = np.random.default_rng(30).integers(0, V, N)
    t[::3] = -1
    gz = cp.asarray(z, dtype=cp.float32)
    loss, losses, d = K.cross_entropy_forward_backward(gz, cp.asarray(t), -1, out=gz if inplace else None)
    rloss, rlosses, rd = K.cross_entropy_reference(z, t)
    assert abs(float(loss) - rloss) <= 1e-5 * abs(rloss)
    assert rel_err(losses, rlosses) < 1e-5 and rel_err(d, rd) < 1e-5
    if inplace:
        assert d.data.ptr == gz.data.ptr


@pytest.mark.gpu
@needs_gpu
def test_adamw_and_grad_norm_kernels_on_gpu(cp):
    r = np.random.default_rng(31)
    n, n_decay = 100_003, 60_001
    p, g, m = (r.standard_normal(n) for _ in range(3))
    v = np.abs(r.standard_normal(n))
    gp, gg, gm, gv = (cp.asarray(a, dtype=cp.float32) for a in (p, g, m, v))
    K.adamw_step(gp, gg, gm, gv, 1e-3, 0.9, 0.95, 1e-8, 0.1, 3, n_decay, grad_scale=cp.full(1, 0.5, cp.float32))
    rp, rm, rv = adamw_reference(p, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 3, n_decay, grad_scale=0.5)
    assert rel_err(gp, rp) < 1e-6 and rel_err(gm, rm) < 1e-6 and rel_err(gv, rv) < 1e-6
    assert abs(float(K.grad_norm(gg)) - K.grad_norm_reference(g)) <= 1e-5 * K.grad_norm_reference(g)



# ---- the device check's structure runs on NumPy --------------------------------------------------
def test_gpu_check_dry_run_passes(capsys):
    """examples/gpu_check.py --dry-run-cpu: every section's code (tables, references, the model
    comparison, timing) runs on NumPy with tiny sizes and reports no FAIL."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--dry-run-cpu", "--sections", "env,ceilings,kernels,model,train", "--out", ""])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "0 FAIL" in out and "kernels    cross_entropy" in out
