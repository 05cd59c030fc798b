"""The raw CUDA kernels, run on the CPU by tests/cuda_emu in every CI run.

Each kernel source in npgpt.ops.cuda_kernels compiles unchanged with g++ against cuda_emu.h (one
std::thread per CUDA thread, __syncthreads a barrier over the block, warp shuffles a barrier over
one warp) and runs through npgpt's own wrappers on an emulated cupy, installed with the test seam
`npgpt.backend.substitute_cupy`. Every launch's Python arguments are checked against the kernel's
C parameters; outputs are NaN-filled first (debug mode), so an element a kernel forgets to write
fails the comparison with the float64 reference. The emulator's own promises (a barrier only some
threads reach is a report, not a hang; warps synchronise only themselves; shared memory lives for
one block; blocks run in a seeded shuffled order) and its sanitizer mode are tested here too.
"""

import contextlib
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cuda_emu import FakeCupy, KernelError, LaunchError, compile_all, compile_kernel, compiler_problem
from npgpt import Tensor, precision
from npgpt.backend import substitute_cupy
from npgpt.ops import cuda_kernels as K
from npgpt.ops import nn as N

pytestmark = pytest.mark.skipif(compiler_problem() is not None, reason=str(compiler_problem()))

EMU = FakeCupy(seed=2024)      # one emulated cupy for the module: each kernel compiles once


@pytest.fixture(scope="module", autouse=True)
def _built_kernels():
    """Build the six kernels up front, one g++ per CPU, before the tests launch them one by one."""
    compile_all((K.raw_source(n), "npgpt_" + n, None) for n in K.RAW_SOURCES)


@contextlib.contextmanager
def emulated(cp=EMU, debug=True):
    """npgpt sees `cp` as cupy, with NaN-filled outputs (debug) unless told otherwise."""
    prev = K.set_debug(debug)
    try:
        with substitute_cupy(cp):
            yield cp
    finally:
        K.set_debug(prev)


def rnd(seed, *shape, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def dev(cp, a, dtype=np.float32):
    return cp.asarray(np.asarray(a, dtype=dtype))


def check(out, ref, tol):
    """out (a device array) against a float64 reference: every element written and finite, and
    max |out - ref| <= tol * max(1, max |ref|)."""
    out = out.get().astype(np.float64)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out)), f"{np.sum(~np.isfinite(out))} non-finite (unwritten?) elements"
    err = np.abs(out - ref).max(initial=0.0)
    assert err <= tol * max(1.0, np.abs(ref).max(initial=0.0)), err


# ---- every raw kernel has a test here ----------------------------------------------------------------
COVERED = {"layernorm_forward", "layernorm_backward_dx", "layernorm_backward_params",
           "causal_softmax_forward", "causal_softmax_backward", "cross_entropy"}


def test_every_raw_kernel_is_covered_by_the_emulator_tests():
    """A kernel added to RAW_SOURCES must get its emulator test (and a name in COVERED)."""
    assert set(K.RAW_SOURCES) == COVERED


def test_a_missing_or_old_compiler_is_a_clear_skip_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-gxx")
    assert compiler_problem.__wrapped__() == "the CUDA emulator needs g++ >= 12 (C++20), and g++ is not on PATH"
    old = tmp_path / "g++"
    old.write_text("#!/bin/sh\necho 11.4.0\n")
    old.chmod(0o755)
    monkeypatch.setenv("CXX", str(old))
    assert "found g++ 11" in compiler_problem.__wrapped__()


# ---- kernels == float64 references, through npgpt's wrappers -----------------------------------------
# Shapes: rows not a multiple of anything, one column, columns beyond the threads of a block
# (K._threads gives about C/4 threads), more rows than one chunk of the parameter-gradient kernel.
@settings(max_examples=6)
@given(lead=st.lists(st.integers(1, 6), min_size=1, max_size=2), C=st.integers(1, 260),
       bias=st.booleans(), seed=st.integers(0, 2**16))
@example(lead=[5], C=1, bias=True, seed=1)                 # one column
@example(lead=[3, 1], C=257, bias=False, seed=2)           # 96 threads, 257 columns
@example(lead=[K.LN_CHUNK + 37], C=45, bias=True, seed=3)  # two row chunks; 45 = 32 + 13 columns
def test_layernorm_kernels(lead, C, bias, seed):
    shape = (*lead, C)
    x, w, b, dy = rnd(seed, *shape, scale=2.0) + 0.5, rnd(seed + 1, C), rnd(seed + 2, C), rnd(seed + 3, *shape)
    with emulated() as cp:
        y, mean, rstd = K.layernorm_forward(dev(cp, x), dev(cp, w), dev(cp, b) if bias else None, 1e-5)
        ry, rmean, rrstd = K.layernorm_forward_reference(x, w, b if bias else None, 1e-5)
        check(y, ry, 1e-5)
        check(mean, rmean, 1e-5)
        check(rstd, rrstd, 1e-5)
        dx, dw, db = K.layernorm_backward(dev(cp, dy), dev(cp, x), dev(cp, w), mean, rstd)
    rdx, rdw, rdb = K.layernorm_backward_reference(dy, x, w, rmean, rrstd)
    check(dx, rdx, 1e-4)
    check(dw, rdw, 1e-4)
    check(db, rdb, 1e-4)


def _softmax_case(B, Tq, Tk, offset, seed):
    x, dp = rnd(seed, B, Tq, Tk, scale=4.0), rnd(seed + 1, B, Tq, Tk)
    return x, dp, 0.125


@settings(max_examples=6)
@given(B=st.integers(1, 3), Tq=st.integers(1, 9), Tk=st.integers(1, 300),
       offset=st.one_of(st.none(), st.integers(-12, 12)), seed=st.integers(0, 2**16))
@example(B=2, Tq=7, Tk=7, offset=0, seed=1)              # plain causal attention
@example(B=1, Tq=6, Tk=3, offset=None, seed=2)           # default offset Tk - Tq < 0: rows with no key
@example(B=1, Tq=5, Tk=200, offset=-3, seed=3)           # every row sees no key: all zeros
@example(B=2, Tq=1, Tk=1, offset=None, seed=4)           # one column
def test_causal_softmax_kernels(B, Tq, Tk, offset, seed):
    x, dp, scale = _softmax_case(B, Tq, Tk, offset, seed)
    rp = K.causal_softmax_forward_reference(x, scale, offset)
    rdx = K.causal_softmax_backward_reference(rp, dp, scale, offset)
    with emulated() as cp:
        p = K.causal_softmax_forward(dev(cp, x), scale, offset)
        check(p, rp, 1e-5)
        check(K.causal_softmax_backward(p, dev(cp, dp), scale, offset), rdx, 1e-4)
        g = dev(cp, x)                                        # in place, as attention calls it
        assert K.causal_softmax_forward(g, scale, offset, out=g) is g
        check(g, rp, 1e-5)
        gdp = dev(cp, dp)                                     # backward into its input dp
        assert K.causal_softmax_backward(g, gdp, scale, offset, out=gdp) is gdp
        check(gdp, rdx, 1e-4)


@settings(max_examples=6)
@given(N=st.integers(1, 9), V=st.integers(1, 700), ignored=st.integers(0, 9), inplace=st.booleans(),
       seed=st.integers(0, 2**16))
@example(N=4, V=1, ignored=1, inplace=False, seed=1)         # one column
@example(N=3, V=520, ignored=0, inplace=True, seed=2)        # 160 threads over 520 logits, in place
@example(N=3, V=65, ignored=3, inplace=True, seed=3)         # every row ignored
@example(N=2, V=5000, ignored=0, inplace=False, seed=4)      # 1024 threads: 32 warps into block_sum
def test_cross_entropy_kernel(N, V, ignored, inplace, seed):
    z = rnd(seed, N, V, scale=3.0)
    t = np.random.default_rng(seed + 1).integers(0, V, N)
    t[:min(ignored, N)] = -1
    rloss, rlosses, rd = K.cross_entropy_reference(z, t)
    with emulated() as cp:
        gz = dev(cp, z)
        loss, losses, d = K.cross_entropy_forward_backward(gz, cp.asarray(t), -1, out=gz if inplace else None)
        assert np.shares_memory(d, gz) == inplace                # into the logits, or a fresh array
    assert abs(float(loss) - rloss) <= 1e-5 * max(1.0, abs(rloss))
    check(losses, rlosses, 1e-5)
    check(d, rd, 1e-5)


def test_cross_entropy_target_out_of_range_makes_its_row_nan():
    """The kernel's contract: a target outside [0, V) that is not ignore_index gives a NaN loss and
    NaN gradient for that row (the model validates ids; the kernel does not read out of bounds)."""
    z, t = rnd(5, 3, 40), np.array([3, 40, -7])
    with emulated() as cp:
        _, losses, d = K.cross_entropy_forward_backward(dev(cp, z), cp.asarray(t), ignore_index=-1)
    losses, d = losses.get(), d.get()
    assert np.isfinite(losses[0]) and np.isnan(losses[1:]).all() and np.isnan(d[1:]).all()


def test_kernels_run_through_npgpt_ops_on_the_emulator(monkeypatch):
    """The ops of npgpt/ops/nn.py take their GPU branch on emulated device arrays (LayerNorm,
    attention's softmax in place, cross-entropy into its saved gradient) and agree with the same
    ops on NumPy float64, forward and backward. Matmuls take precision.py's cupy.matmul fallback
    (NPGPT_DIRECT_CUBLAS=0): cuBLAS is not emulated."""
    monkeypatch.setattr(precision, "DIRECT_CUBLAS", False)
    B, T, C, nh, V = 2, 5, 64, 2, 33
    x, w, b = rnd(40, B, T, C), rnd(41, C), rnd(42, C)
    qkv, dout = rnd(43, B, T, 3 * C, scale=0.5), rnd(44, B, T, C)
    z, t = rnd(45, B, T, V), np.random.default_rng(46).integers(0, V, (B, T))
    t[0, :2] = -1

    def run(to):
        xs, ws, bs = (Tensor(to(a), requires_grad=True) for a in (x, w, b))
        y = N.layer_norm(xs, ws, bs, eps=1e-5)
        y.backward(to(dout))
        q = Tensor(to(qkv), requires_grad=True)
        a = N.causal_self_attention(q, n_head=nh)
        a.backward(to(dout))
        zs = Tensor(to(z), requires_grad=True)
        loss = N.cross_entropy(zs, to(t) if t.dtype.kind == "f" else t)
        loss.backward(to(np.array(1.0)))
        return [y.data, xs.grad, ws.grad, bs.grad, a.data, q.grad, loss.data, zs.grad]

    ref = run(lambda a: np.array(a, dtype=np.float64) if np.asarray(a).dtype.kind == "f" else a)
    with emulated() as cp:
        before = len(cp.launched)
        got = run(lambda a: dev(cp, a) if np.asarray(a).dtype.kind == "f" else a)
        used = set(cp.launched[before:])
    assert used == {"npgpt_" + n for n in COVERED}, used
    for out, r in zip(got, ref):
        check(out, np.asarray(r), 1e-4)


# ---- debug mode: fresh outputs are NaN before the launch; in-place outputs keep their input ----------
def test_debug_mode_prefills_fresh_outputs_with_nan():
    seen = {}

    def record(name, args):
        seen.setdefault(name, []).append([np.isnan(a.get()).all() if isinstance(a, np.ndarray) and a.dtype == np.float32
                                          else None for a in args])

    x, dp = rnd(50, 3, 40), rnd(51, 3, 40)
    with emulated() as cp:
        cp.before_launch.append(record)
        try:
            gx = dev(cp, x)
            y, mean, rstd = K.layernorm_forward(gx, dev(cp, rnd(52, 40)), None)
            K.layernorm_backward(dev(cp, dp), gx, dev(cp, rnd(52, 40)), mean, rstd)
            p = K.causal_softmax_forward(dev(cp, x[None]), 0.5)
            K.causal_softmax_forward(p, 0.5, out=p)
            gdp = dev(cp, dp[None])
            K.causal_softmax_backward(p, gdp, 0.5, out=gdp)
            gz = dev(cp, x)
            K.cross_entropy_forward_backward(gz, cp.asarray(np.array([1, 2, 3])), out=gz)
        finally:
            cp.before_launch.remove(record)
    # argument order as in each kernel's C parameter list; True = all NaN before the launch
    assert seen["npgpt_layernorm_forward"] == [[False, False, False, True, True, True, None, None, None, None]]
    assert seen["npgpt_layernorm_backward_dx"] == [[False, False, False, False, False, True, None, None]]
    assert seen["npgpt_layernorm_backward_params"] == [[False, False, False, False, True, True, None, None, None]]
    assert seen["npgpt_causal_softmax_forward"] == [[False, True] + [None] * 5, [False, False] + [None] * 5]
    assert seen["npgpt_causal_softmax_backward"] == [[False, False, False] + [None] * 5]
    assert seen["npgpt_cross_entropy"] == [[False, None, False, True, False, None, None, None]]


def test_debug_prefill_exposes_an_unwritten_element(monkeypatch):
    """A kernel that skips the last column leaves NaN there in debug mode, and the check fails."""
    mutant = K.LAYERNORM_FORWARD_SRC.replace("for (int j = threadIdx.x; j < C; j += blockDim.x)\n        yr[j]",
                                             "for (int j = threadIdx.x; j < C - 1; j += blockDim.x)\n        yr[j]")
    assert mutant != K.LAYERNORM_FORWARD_SRC
    monkeypatch.setitem(K.RAW_SOURCES, "layernorm_forward", mutant)
    x, w = rnd(53, 4, 50), rnd(54, 50)
    with emulated(FakeCupy(seed=1)) as cp:
        y, _, _ = K.layernorm_forward(dev(cp, x), dev(cp, w), None)
    y = y.get()
    assert np.isnan(y[:, -1]).all() and np.isfinite(y[:, :-1]).all()
    with pytest.raises(AssertionError, match="non-finite"):
        check(cp.asarray(y), K.layernorm_forward_reference(x, w, None)[0], 1e-5)


# ---- each launch's Python arguments are checked against the C parameters -------------------------------
def _ln_args(cp, N=2, C=8):
    x, w = dev(cp, rnd(60, N, C)), dev(cp, rnd(61, C))
    y, mean, rstd = cp.empty((N, C), np.float32), cp.empty(N, np.float32), cp.empty(N, np.float32)
    return [x, w, w, y, mean, rstd, np.int32(N), np.int32(C), np.float32(1e-5), np.int32(1)]


@pytest.mark.parametrize("index,make,message", [
    (6, lambda cp, a: 2, r"argument 6 \(int N\) takes np.int32\(...\), got int 2"),
    (8, lambda cp, a: 1e-5, r"argument 8 \(float eps\) takes np.float32\(...\), got float"),
    (7, lambda cp, a: np.int64(8), r"argument 7 \(int C\) takes np.int32\(...\), got np.int64"),
    (0, lambda cp, a: a[0].get(), r"argument 0 \(const float\* __restrict__ x\) is a host NumPy array"),
    (1, lambda cp, a: a[1].astype(np.float64), r"takes float32 elements, got a float64 array"),
    (3, lambda cp, a: cp.empty((8, 2), np.float32).T, r"not C-contiguous"),
    (4, lambda cp, a: 0, r"argument 4 \(float\* __restrict__ mean\) is a int"),
    (3, lambda cp, a: a[0], r"overlap in memory, but one is __restrict__"),
])
def test_launch_arguments_are_checked_against_the_c_parameters(index, make, message):
    with emulated() as cp:
        kern = cp.RawKernel(K.raw_source("layernorm_forward"), "npgpt_layernorm_forward")
        args = _ln_args(cp)
        kern((2,), (32,), tuple(args))                                  # the right arguments run
        args[index] = make(cp, args)
        with pytest.raises(LaunchError, match=message):
            kern((2,), (32,), tuple(args))


def test_launch_checks_counts_dims_and_pointer_element_types():
    with emulated() as cp:
        kern = cp.RawKernel(K.raw_source("cross_entropy"), "npgpt_cross_entropy")
        z, losses, nv = cp.zeros((2, 5), np.float32), cp.empty(2, np.float32), cp.ones(1, np.float32)
        ok = (z, cp.asarray(np.array([1, 2])), cp.empty((2, 5), np.float32), losses, nv,
              np.int32(2), np.int32(5), np.int64(-1))
        kern((2,), (32,), ok)
        with pytest.raises(LaunchError, match=r"argument 1 \(const long long\* __restrict__ targets\) takes int64"):
            kern((2,), (32,), ok[:1] + (cp.asarray(np.array([1, 2], np.int32)),) + ok[2:])
        with pytest.raises(LaunchError, match=r"argument 7 \(long long ignore_index\) takes np.int64\(...\), got int"):
            kern((2,), (32,), ok[:7] + (-1,))
        with pytest.raises(LaunchError, match="7 arguments for 8 parameters"):
            kern((2,), (32,), ok[:7])
        with pytest.raises(LaunchError, match="exceeds CUDA's limits"):
            kern((2,), (2048,), ok)
        with pytest.raises(LaunchError, match="zero or negative"):
            kern((0,), (32,), ok)


# ---- the emulator's own promises ---------------------------------------------------------------------
def _launch(src, name, grid, block, args, **kw):
    compile_kernel(src, name).launch(grid, block, args, **kw)


def test_a_barrier_only_some_threads_reach_is_reported_not_a_hang():
    src = r'''
extern "C" __global__ void early_exit(float* out) {
    if (threadIdx.x < 16) return;          // 16 threads leave
    __syncthreads();                       // the other 48 wait for them forever on a GPU
    out[threadIdx.x] = 1.0f;
}
'''
    with emulated() as cp:
        out = cp.zeros(64, np.float32)
        with pytest.raises(KernelError) as e:
            _launch(src, "early_exit", (1,), (64,), (out,))
    msg = str(e.value)
    assert "deadlock in block (0,0,0)" in msg
    assert "16 thread(s) finished the kernel (returned): threadIdx (0,0,0)..(15,0,0)" in msg
    assert "48 thread(s) wait at __syncthreads() in void early_exit(float*), line 4: threadIdx (16,0,0)..(63,0,0)" in msg


def test_threads_at_different_syncthreads_are_reported():
    src = r'''
extern "C" __global__ void two_sites(float* out) {
    if (threadIdx.x & 1) __syncthreads();
    else __syncthreads();
    out[threadIdx.x] = 1.0f;
}
'''
    with emulated() as cp, pytest.raises(KernelError, match="different __syncthreads call sites"):
        _launch(src, "two_sites", (1,), (64,), (cp.zeros(64, np.float32),))


SHUFFLES = r'''
extern "C" __global__ void shuffles(const float* v, float* out, int* order) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (warp == 1) {                      // one warp shuffles; warp 0 and warp 2 go on and finish
        const float x = v[threadIdx.x];
        out[0 * 32 + lane] = __shfl_xor_sync(0xffffffffu, x, 5);
        out[1 * 32 + lane] = __shfl_down_sync(0xffffffffu, x, 3);
        out[2 * 32 + lane] = __shfl_up_sync(0xffffffffu, x, 2);
        out[3 * 32 + lane] = __shfl_sync(0xffffffffu, x, 7);
        out[4 * 32 + lane] = __shfl_xor_sync(0xffffffffu, x, 1, 8);
    }
    if (threadIdx.x == 0) order[blockIdx.x] = atomicAdd(order + gridDim.x, 1);
}
'''


def test_warp_shuffles_synchronise_one_warp_only():
    """A shuffle inside `if (warp == 1)` completes (warps 0 and 2 never join it), with CUDA's
    lane arithmetic: xor, down/up keeping their own value at the edge, indexed, widths."""
    v = np.arange(96, dtype=np.float32) * 1.5
    with emulated() as cp:
        out, order = cp.zeros(5 * 32, np.float32), cp.zeros(1 + 1, np.int32)
        _launch(SHUFFLES, "shuffles", (1,), (96,), (cp.asarray(v), out, order))
    w = v[32:64]
    lane = np.arange(32)
    expect = [w[lane ^ 5], np.where(lane + 3 < 32, w[np.minimum(lane + 3, 31)], w),
              np.where(lane >= 2, w[np.maximum(lane - 2, 0)], w), np.full(32, w[7]), w[lane ^ 1]]
    np.testing.assert_array_equal(out.get().reshape(5, 32), np.stack(expect))


def test_blocks_run_in_a_seeded_shuffled_order():
    def order(seed):
        with emulated() as cp:
            out, o = cp.zeros(5 * 32, np.float32), cp.zeros(17, np.int32)
            _launch(SHUFFLES, "shuffles", (16,), (32,), (cp.zeros(32, np.float32), out, o), seed=seed)
        return o.get()[:16]

    a, b, c = order(1), order(1), order(2)
    assert sorted(a) == list(range(16)) and (a == b).all()
    assert not (a == np.arange(16)).all() and not (a == c).all()


def test_a_shuffle_some_lanes_skip_is_reported():
    src = r'''
extern "C" __global__ void half_warp(float* out) {
    float v = threadIdx.x;
    if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}
'''
    with emulated() as cp, pytest.raises(KernelError) as e:
        _launch(src, "half_warp", (1,), (32,), (cp.zeros(32, np.float32),))
    assert "deadlock" in str(e.value) and "16 thread(s) wait at __shfl_xor_sync()" in str(e.value)


def test_a_partial_shuffle_mask_is_refused():
    src = r'''
extern "C" __global__ void masked(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}
'''
    with emulated() as cp, pytest.raises(KernelError, match="only the full mask of existing lanes"):
        _launch(src, "masked", (1,), (32,), (cp.zeros(32, np.float32),))


def test_shared_memory_lives_for_one_block_and_starts_as_garbage():
    """Each block's shared memory is refilled with NaN bytes: a block never sees another's writes."""
    src = r'''
extern "C" __global__ void fresh_shared(float* out) {
    __shared__ float s[64];
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];   // read before any write: garbage
    __syncthreads();
    s[threadIdx.x] = 1.0f;
}
'''
    with emulated() as cp:
        out = cp.zeros(4 * 64, np.float32)
        _launch(src, "fresh_shared", (4,), (64,), (out,))
    assert np.isnan(out.get()).all()


def test_the_watchdog_reports_a_kernel_that_never_finishes():
    src = r'''
extern "C" __global__ void spin(volatile int* flag) {
    if (threadIdx.x == 0) { while (flag[0] == 0) {} }
}
'''
    with emulated() as cp, pytest.raises(KernelError) as e:
        compile_kernel(src, "spin").launch((1,), (32,), (cp.zeros(1, np.int32),), watchdog_s=1.0)
    assert "no progress for 1 s" in str(e.value) and "1 thread(s) still running kernel code" in str(e.value)


def test_printf_reaches_stderr_and_trap_fails_the_launch(capsys):
    src = r'''
extern "C" __global__ void talk(float* out, const int trap) {
    if (threadIdx.x == 0) printf("block %d says hi\n", (int)blockIdx.x);
    out[blockIdx.x * blockDim.x + threadIdx.x] = 2.0f;
    if (trap && blockIdx.x == 1 && threadIdx.x == 3) __trap();
}
'''
    with emulated() as cp:
        out = cp.zeros(64, np.float32)
        _launch(src, "talk", (2,), (32,), (out, np.int32(0)))
        assert (out.get() == 2).all()                    # the printed text did not mix into the data
        assert {"block 0 says hi", "block 1 says hi"} <= set(capsys.readouterr().err.splitlines())
        with pytest.raises(KernelError, match=r"__trap\(\) called in block \(1,0,0\)"):
            _launch(src, "talk", (2,), (32,), (out, np.int32(1)))


# ---- sanitizer mode: a missing barrier is a race, an off-by-one read an overflow ------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sanitize", ["thread", "address"])
def test_every_kernel_runs_clean_under_the_sanitizers(sanitize):
    """All six kernels through their wrappers (in place where they can be) with no race reported by
    ThreadSanitizer and no out-of-bounds access by AddressSanitizer (each array its own malloc)."""
    compile_all((K.raw_source(n), "npgpt_" + n, sanitize) for n in K.RAW_SOURCES)
    cp = FakeCupy(seed=5, sanitize=sanitize)
    x, w, s, dp, z = rnd(80, 5, 150), rnd(81, 150), rnd(82, 2, 5, 150), rnd(83, 2, 5, 150), rnd(84, 4, 300)
    with emulated(cp):
        y, mean, rstd = K.layernorm_forward(dev(cp, x), dev(cp, w), dev(cp, w))
        dx, dw, db = K.layernorm_backward(dev(cp, dp[0]), dev(cp, x), dev(cp, w), mean, rstd)
        g = dev(cp, s)
        p = K.causal_softmax_forward(g, 0.3, None, out=g)
        gdp = dev(cp, dp)
        K.causal_softmax_backward(p, gdp, 0.3, out=gdp)
        gz = dev(cp, z)
        K.cross_entropy_forward_backward(gz, cp.asarray(np.array([1, -1, 299, 0])), out=gz)
    assert set(cp.launched) == {"npgpt_" + n for n in COVERED}
    rp = K.causal_softmax_forward_reference(s, 0.3)
    check(gdp, K.causal_softmax_backward_reference(rp, dp, 0.3), 1e-4)
    check(dx, K.layernorm_backward_reference(dp[0], x, w, mean.get(), rstd.get())[0], 1e-4)


def _without_second_barrier(preamble):
    """block_sum without the barrier between lane 0's `buf[warp] = v` and warp 0 reading buf."""
    old = "    if (lane == 0) buf[warp] = v;\n    __syncthreads();\n    if (warp == 0) {\n        float s = lane < nwarps ? buf[lane] : 0.0f;"
    assert preamble.count(old) == 1
    return preamble.replace(old, old.replace("    __syncthreads();\n", "", 1))


@pytest.mark.slow
def test_thread_sanitizer_reports_a_removed_syncthreads_as_a_race():
    x, w = rnd(70, 3, 200), rnd(71, 200)                   # 200 columns: 64 threads, two warps
    src = K.LAYERNORM_FORWARD_SRC
    for preamble, races in ((K.PREAMBLE, False), (_without_second_barrier(K.PREAMBLE), True)):
        cp = FakeCupy(seed=3, sanitize="thread")
        kern = cp.RawKernel(preamble + src, "npgpt_layernorm_forward")
        with emulated(cp):
            args = [dev(cp, x), dev(cp, w), dev(cp, w), cp.empty((3, 200), np.float32), cp.empty(3, np.float32),
                    cp.empty(3, np.float32), np.int32(3), np.int32(200), np.float32(1e-5), np.int32(0)]
            if not races:
                kern((3,), (64,), tuple(args))            # the kernel as shipped: no report
                check(args[3], K.layernorm_forward_reference(x, w, None)[0], 1e-5)
                continue
            with pytest.raises(KernelError) as e:
                kern((3,), (64,), tuple(args))
    assert "ThreadSanitizer: data race" in str(e.value) and "block_sum" in str(e.value)


@pytest.mark.slow
def test_address_sanitizer_reports_an_off_by_one_read_as_an_overflow():
    x, w = rnd(72, 3, 40), rnd(73, 40)
    fixed = K.LAYERNORM_FORWARD_SRC
    mutant = fixed.replace("for (int j = threadIdx.x; j < C; j += blockDim.x) s += xr[j];",
                           "for (int j = threadIdx.x; j <= C; j += blockDim.x) s += xr[j];")
    assert mutant != fixed
    for src, overflows in ((fixed, False), (mutant, True)):
        cp = FakeCupy(seed=4, sanitize="address")
        kern = cp.RawKernel(K.PREAMBLE + src, "npgpt_layernorm_forward")
        with emulated(cp):
            args = (dev(cp, x), dev(cp, w), dev(cp, w), cp.empty((3, 40), np.float32), cp.empty(3, np.float32),
                    cp.empty(3, np.float32), np.int32(3), np.int32(40), np.float32(1e-5), np.int32(0))
            if not overflows:
                kern((3,), (32,), args)
                continue
            with pytest.raises(KernelError) as e:
                kern((3,), (32,), args)
    assert "AddressSanitizer: heap-buffer-overflow" in str(e.value)
    assert "READ of size 4" in str(e.value) and "npgpt_layernorm_forward" in str(e.value)
