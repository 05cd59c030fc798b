"""npgpt's GPU backend checked in one run: correctness first, then speed, a short table last.

    python examples/gpu_check.py                         # full check, under 8 minutes on an H200
    python examples/gpu_check.py --quick                 # smaller sizes, fewer iterations
    python examples/gpu_check.py --dry-run-cpu           # the same structure on NumPy, tiny sizes
    python examples/gpu_check.py --precisions fp32,tf32 --out results/

Sections, each on its own (a failure prints FAIL with the error and the run goes on):
  env        versions (python, numpy, cupy, CUDA runtime and driver, NVRTC, torch), the device, and
             one kernel compiled and run first (a broken NVRTC shows here, before anything else)
  ceilings   device-to-device copy GB/s; GEMM TFLOP/s per precision through npgpt.precision;
             precision.matmul on strided / transposed / batched layouts against float64
  kernels    every fused kernel (npgpt.ops.cuda_kernels) against its float64 NumPy reference on
             fresh random inputs, outputs pre-filled with NaN; max |out - ref| / max |ref|; time
  model      loss and every parameter gradient, CuPy vs NumPy on identical weights, per precision
             (tf32 / fp16 show "n/a" until the model routes its matmuls through npgpt.precision)
  train      ms/iter, tokens/s, MFU for shakespeare-char (B 64, T 256) and GPT-2 124M (B 16,
             T 1024) per precision, timed with CUDA events after warm-up
  torch      the same configurations in PyTorch eager on the same GPU, and npgpt / torch

Only this script may import torch (and only when present). Full numbers go to --out (default
$OUT when set) as gpu_check.json, rewritten after every section so a run cut short keeps what it had.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from npgpt import precision as P  # noqa: E402
from npgpt.ops import cuda_kernels as K  # noqa: E402
from npgpt.optim import adamw_update  # noqa: E402
from npgpt.training.scaler import DynamicLossScaler  # noqa: E402

# Dense datasheet peaks of an H100/H200 SXM (TFLOP/s), used for MFU only when a GEMM wasn't measured.
DATASHEET_TFLOPS = {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4}
MODEL_TOL = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 5e-2}
KERNEL_TOL = 1e-4           # float32 kernels against float64 references (max-abs, relative)
MATMUL_TOL = {"fp32": 1e-5, "tf32": 5e-3, "fp16": 1e-2}


# ---- bookkeeping -------------------------------------------------------------------------------
class Check:
    """Settings, the array module, timers and the result rows of one run."""

    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run_cpu
        self.quick = args.quick or self.dry
        self.precisions = [p.strip().lower() for p in args.precisions.split(",") if p.strip()]
        for p in self.precisions:
            P.Precision(p)                                   # validates the name
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget_s
        self.rows = []                                       # (section, item, value, status)
        self.data = {}                                       # everything, for the JSON file
        self.ceilings = {}                                   # precision -> measured GEMM TFLOP/s
        if self.dry:
            self.xp = np
        else:
            from npgpt.backend import require_gpu, parse_device
            self.xp = require_gpu(parse_device("gpu"))

    @property
    def gpu(self):
        return not self.dry

    def left(self):
        return self.deadline - time.perf_counter()

    def row(self, section, item, value, status=""):
        self.rows.append((section, item, value, status))
        print(f"  {section:9s} {item:44s} {value:>28s}  {status}", flush=True)

    def sync(self):
        if self.gpu:
            self.xp.cuda.Stream.null.synchronize()

    def time_ms(self, fn, warmup=2, iters=10, budget_s=10.0):
        """Median ms of fn() over up to `iters` runs (fewer when the budget runs out), after
        `warmup` runs. CUDA events on the GPU, perf_counter on the CPU."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        t_end = time.perf_counter() + min(budget_s, max(self.left() - 5, 1))
        while len(times) < iters and (not times or time.perf_counter() < t_end):
            if self.gpu:
                cp = self.xp
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record()
                fn()
                e1.record()
                e1.synchronize()
                times.append(cp.cuda.get_elapsed_time(e0, e1))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), times

    def free(self):
        if self.gpu:
            self.xp.get_default_memory_pool().free_all_blocks()


def section(check, name, fn):
    """Run one section; on failure print FAIL with the error and carry on."""
    t0 = time.perf_counter()
    print(f"== {name} (at {t0 - check.start:.0f} s)", flush=True)
    if check.left() < 5:
        check.row(name, "(section)", "skipped", "SKIP: out of time")
        return
    try:
        fn(check)
    except Exception as e:  # a broken section must not stop the others
        traceback.print_exc()
        check.row(name, "(section)", type(e).__name__, f"FAIL: {str(e).splitlines()[0][:120] if str(e) else ''}")
    finally:
        check.data.setdefault("section_s", {})[name] = time.perf_counter() - t0
        check.free()
        write_json(check)


def write_json(check):
    """Everything so far to OUT/gpu_check.json (after each section: a timeout keeps the rest)."""
    if check.args.out:
        from npgpt.fileio import atomic_write_text     # a link or device in OUT: npgpt.fileio's rules
        atomic_write_text(os.path.join(check.args.out, "gpu_check.json"),
                          json.dumps({"rows": check.rows, **check.data}, indent=1, default=str))


def rel_err(out, ref):
    """max |out - ref| / max |ref| (out on any device); inf when out has a NaN or inf."""
    from npgpt.backend import asnumpy
    out = np.asarray(asnumpy(out), dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape {out.shape} != reference {ref.shape}")
    if not np.all(np.isfinite(out)):
        return math.inf
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)) if ref.size else 0.0


def status(err, tol):
    return "PASS" if err <= tol else f"FAIL (tol {tol:g})"


def guarded(c, sec, label, fn):
    """Run one item of a section; on failure print FAIL with the error and go on with the next."""
    try:
        fn()
    except Exception as e:
        traceback.print_exc()
        c.row(sec, label, type(e).__name__, f"FAIL: {str(e).splitlines()[0][:100] if str(e) else ''}")
    finally:
        c.free()


# ---- env ---------------------------------------------------------------------------------------
def check_env(c):
    info = {"python": platform.python_version(), "numpy": np.__version__}
    if c.gpu:
        cp = c.xp
        rt = cp.cuda.runtime
        props = rt.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        v = rt.runtimeGetVersion()
        d = rt.driverGetVersion()
        info.update({"cupy": cp.__version__, "cuda_runtime": f"{v // 1000}.{v % 1000 // 10}",
                     "cuda_driver": f"{d // 1000}.{d % 1000 // 10}", "device": name,
                     "compute_capability": f"{props['major']}.{props['minor']}",
                     "sms": props["multiProcessorCount"], "memory_gib": props["totalGlobalMem"] / 2**30})
    else:
        info.update({"cupy": "n/a (dry run)", "device": f"CPU ({os.cpu_count()} cores)"})
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = "not installed"
    c.data["env"] = info
    for k, v in info.items():
        c.row("env", k, f"{v:.1f}" if isinstance(v, float) else str(v))
    if c.gpu:
        first_compile(c)


def first_compile(c):
    """NVRTC's version, then one kernel compiled, run and checked: if the toolchain is broken,
    this is the first row that says so, with the compiler's message."""
    cp = c.xp
    try:
        major, minor = cp.cuda.nvrtc.getVersion()
        c.row("env", "nvrtc", f"{major}.{minor}")
        c.data["env"]["nvrtc"] = f"{major}.{minor}"
    except Exception as e:
        c.row("env", "nvrtc", type(e).__name__, f"FAIL: {str(e).splitlines()[0][:100] if str(e) else ''}")
    t0 = time.perf_counter()
    x = np.random.default_rng(0).standard_normal((4, 96))
    w = np.ones(96)
    y, _, _ = K.layernorm_forward(cp.asarray(x, dtype=cp.float32), cp.asarray(w, dtype=cp.float32), None, 1e-5)
    c.sync()
    err = rel_err(y, K.layernorm_forward_reference(x, w, None, 1e-5)[0])
    c.row("env", "first kernel (layernorm_forward) compile + run",
          f"{(time.perf_counter() - t0) * 1e3:,.0f} ms, err {err:.1e}", status(err, KERNEL_TOL))


# ---- ceilings ----------------------------------------------------------------------------------
def check_ceilings(c):
    xp = c.xp
    nbytes = (64 << 20) if c.dry else ((1 << 30) if c.quick else (4 << 30))
    a = xp.asarray(np.arange(nbytes // 4, dtype=np.float32)) if c.dry else xp.arange(nbytes // 4, dtype=xp.float32)
    b = xp.empty_like(a)
    if c.gpu:
        def copy():
            b.data.copy_from_device_async(a.data, nbytes)
    else:
        def copy():
            np.copyto(b, a)
    ms, _ = c.time_ms(copy, warmup=2, iters=20, budget_s=10)
    if not bool((b[-3:] == a[-3:]).all()):
        raise RuntimeError("device copy did not copy")
    gbs = 2 * nbytes / (ms / 1e3) / 1e9
    c.data["copy_GBps"] = gbs
    c.row("ceilings", f"device-to-device copy ({nbytes >> 20} MiB, read+write)", f"{gbs:,.0f} GB/s")
    del a, b

    n = 256 if c.dry else (4096 if c.quick else 8192)
    r = np.random.default_rng(0)
    a32 = xp.asarray(r.standard_normal((n, n), dtype=np.float32))
    b32 = xp.asarray(r.standard_normal((n, n), dtype=np.float32))
    if c.gpu:
        ms, _ = c.time_ms(lambda: a32 @ b32, warmup=2, iters=10, budget_s=8)
        c.row("ceilings", f"cupy a @ b fp32 (n={n})", f"{2 * n ** 3 / ms / 1e9:,.1f} TFLOP/s")
    for name in c.precisions:
        prec = P.Precision(name)
        aa, bb = (P.to_half(a32), P.to_half(b32)) if name == "fp16" else (a32, b32)
        out = prec.matmul(aa, bb)
        ms, _ = c.time_ms(lambda: prec.matmul(aa, bb, out=out), warmup=2, iters=10, budget_s=8)
        tflops = 2 * n ** 3 / ms / 1e9
        c.ceilings[name] = tflops
        c.row("ceilings", f"GEMM {name} via precision.matmul (n={n})", f"{tflops:,.1f} TFLOP/s")
    c.data["gemm_tflops"] = dict(c.ceilings)
    a32 = b32 = aa = bb = out = None                         # let the pool free them

    # precision.matmul on the layouts the model uses, against float64
    for name in c.precisions:
        worst, where = 0.0, ""
        for label, a, b in matmul_layouts(np.random.default_rng(1), xp):
            y = P.Precision(name).matmul(a, b)
            from npgpt.backend import asnumpy
            ref = np.matmul(asnumpy(a).astype(np.float64), asnumpy(b).astype(np.float64))
            e = rel_err(y, ref)
            if e >= worst:
                worst, where = e, label
        c.row("ceilings", f"precision.matmul {name} layouts vs float64", f"{worst:.2e} ({where})",
              status(worst, MATMUL_TOL[name]))


def matmul_layouts(r, xp):
    """(label, a, b) on the device, with the strides the model produces."""
    def dev(x):
        return xp.asarray(x.astype(np.float32))
    B, T, nh, hs = 2, 65, 3, 16
    qkv = dev(r.standard_normal((B, T, 3, nh, hs)))
    q, k = qkv[:, :, 0].transpose(0, 2, 1, 3), qkv[:, :, 1].transpose(0, 2, 1, 3)
    w = dev(r.standard_normal((96, 200)))
    x = dev(r.standard_normal((B, T, 96)))
    yield "x @ w (batched @ 2-D)", x, w
    yield "x2 @ w^T view (LM head)", x.reshape(-1, 96)[:, :96], dev(r.standard_normal((200, 96))).T
    yield "x2^T @ dy (dW)", x.reshape(-1, 96).T, dev(r.standard_normal((B * T, 200)))
    yield "q @ k^T (strided heads)", q, k.swapaxes(-1, -2)
    yield "att @ v (batched)", dev(r.standard_normal((B, nh, T, T))), k


# ---- kernels -----------------------------------------------------------------------------------
class _Refs:
    """Stand-ins for the kernels in a dry run: the references, run on float32 NumPy arrays."""
    layernorm_forward = staticmethod(K.layernorm_forward_reference)
    layernorm_backward = staticmethod(K.layernorm_backward_reference)
    gelu_forward = staticmethod(K.gelu_forward_reference)
    gelu_backward = staticmethod(K.gelu_backward_reference)
    causal_softmax_forward = staticmethod(lambda x, s, o=None, out=None: K.causal_softmax_forward_reference(x, s, o))
    causal_softmax_backward = staticmethod(lambda p, d, s, o=None, out=None: K.causal_softmax_backward_reference(p, d, s, o))

    @staticmethod
    def cross_entropy_forward_backward(z, t, ignore_index=-1, out=None):
        return K.cross_entropy_reference(z, t, ignore_index)

    @staticmethod
    def adamw_step(p, g, m, v, lr, b1, b2, eps, wd, step, n_decay, grad_scale=None):
        return adamw_update(p, g, m, v, n_decay, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                            step=step, grad_scale=1.0 if grad_scale is None else float(grad_scale))

    grad_norm = staticmethod(lambda g: np.sqrt(np.sum(g * g)))


def adamw_reference(p, g, m, v, lr, b1, b2, eps, wd, step, n_decay, grad_scale=1.0):
    """npgpt.optim.adamw_update, the one AdamW formula, on copies -> new (p, m, v)."""
    p, m, v = p.copy(), m.copy(), v.copy()
    return adamw_update(p, g, m, v, n_decay, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, step=step,
                        grad_scale=grad_scale)


def kernel_cases(c):
    """(name, inputs (float64 host arrays), run(impl, dev_inputs) -> outputs,
    ref(inputs) -> outputs, bytes moved per launch)."""
    q = c.quick
    N, C = (64, 96) if c.dry else ((2048, 768) if q else (16384, 768))
    H = 4 * C
    B, nh, T = (1, 2, 64) if c.dry else ((4, 12, 256) if q else (4, 12, 1024))
    NV, V = (16, 65) if c.dry else ((512, 50257) if q else (2048, 50257))
    n_opt = 10_000 if c.dry else (10_000_000 if q else 50_000_000)
    seed = int(time.time())
    c.data["kernel_seed"] = seed
    r = np.random.default_rng(seed)                        # fresh inputs on every run
    s = 1.0 / math.sqrt(64)
    cases = []

    x, w, b, dy = r.standard_normal((N, C)) + 0.5, r.standard_normal(C), r.standard_normal(C), r.standard_normal((N, C))
    ln = K.layernorm_forward_reference(x, w, b, 1e-5)
    cases.append(("layernorm_forward", [x, w, b], lambda k, a: k.layernorm_forward(a[0], a[1], a[2], 1e-5),
                  lambda a: ln, 8 * N * C + 8 * N))
    cases.append(("layernorm_backward", [dy, x, w, ln[1], ln[2]], lambda k, a: k.layernorm_backward(*a),
                  lambda a: K.layernorm_backward_reference(*a), 12 * N * C))
    odd = r.standard_normal((N // 4 + 3, 1001))
    cases.append(("layernorm_forward (C=1001, no bias)", [odd, r.standard_normal(1001)],
                  lambda k, a: k.layernorm_forward(a[0], a[1], None, 1e-5),
                  lambda a: K.layernorm_forward_reference(a[0], a[1], None, 1e-5), None))

    h, dh = r.standard_normal((N, H)) * 2, r.standard_normal((N, H))
    cases.append(("gelu_forward", [h], lambda k, a: k.gelu_forward(a[0]),
                  lambda a: K.gelu_forward_reference(a[0]), 8 * N * H))
    cases.append(("gelu_backward", [dh, h], lambda k, a: k.gelu_backward(*a),
                  lambda a: K.gelu_backward_reference(*a), 12 * N * H))

    att, datt = r.standard_normal((B, nh, T, T)) * 3, r.standard_normal((B, nh, T, T))
    p = K.causal_softmax_forward_reference(att, s)
    cases.append(("causal_softmax_forward", [att], lambda k, a: k.causal_softmax_forward(a[0], s),
                  lambda a: p, 8 * B * nh * T * T))
    cases.append(("causal_softmax_backward", [p, datt], lambda k, a: k.causal_softmax_backward(a[0], a[1], s),
                  lambda a: K.causal_softmax_backward_reference(a[0], a[1], s), 12 * B * nh * T * T))
    # In place, as attention calls them (debug mode must not NaN-fill an output that is an input).
    cases.append(("causal_softmax_forward in place", [att], lambda k, a: k.causal_softmax_forward(a[0], s, out=a[0]),
                  lambda a: p, None))
    cases.append(("causal_softmax_backward in place", [p, datt],
                  lambda k, a: k.causal_softmax_backward(a[0], a[1], s, out=a[1]),
                  lambda a: K.causal_softmax_backward_reference(a[0], a[1], s), None))
    for tq, tk, off in ((1, T - 3, None), (7, T + 37, 0)):
        xs = r.standard_normal((2, 3, tq, tk)) * 3
        cases.append((f"causal_softmax_forward (Tq={tq}, Tk={tk}, offset={off})", [xs],
                      lambda k, a, off=off: k.causal_softmax_forward(a[0], s, off),
                      lambda a, off=off: K.causal_softmax_forward_reference(a[0], s, off), None))

    z = r.standard_normal((NV, V)) * 3
    t = r.integers(0, V, NV)
    t[::5] = -1
    ce = K.cross_entropy_reference(z, t, -1)
    cases.append(("cross_entropy (loss, losses, dlogits)", [z, t],
                  lambda k, a: k.cross_entropy_forward_backward(a[0], a[1], -1), lambda a: ce, 8 * NV * V))
    cases.append(("cross_entropy in place", [z, t],
                  lambda k, a: k.cross_entropy_forward_backward(a[0], a[1], -1, out=a[0]), lambda a: ce, None))

    pp, g, m = (r.standard_normal(n_opt) for _ in range(3))
    v = np.abs(r.standard_normal(n_opt))
    n_decay = n_opt * 2 // 3 + 1
    args = (1e-3, 0.9, 0.95, 1e-8, 0.1, 5, n_decay)
    cases.append(("adamw_step (grad_scale 0.5)", [pp, g, m, v],
                  lambda k, a: k.adamw_step(*a, *args, grad_scale=0.5),
                  lambda a: adamw_reference(*a, *args, grad_scale=0.5), 28 * n_opt))
    cases.append(("grad_norm", [g], lambda k, a: (k.grad_norm(a[0]),),
                  lambda a: (np.array(K.grad_norm_reference(a[0])),), 4 * n_opt))
    return cases


def check_kernels(c):
    xp = c.xp
    impl = _Refs if c.dry else K
    prev = K.set_debug(True)                      # NaN-prefilled outputs
    try:
        for name, inputs, run, ref, nbytes in kernel_cases(c):
            if c.left() < 30:
                c.row("kernels", name, "skipped", "SKIP: out of time")
                continue
            try:
                def dev():
                    return [xp.asarray(a.astype(np.float32)) if a.dtype.kind == "f" else xp.asarray(a)
                            for a in inputs]
                outs = run(impl, dev())
                outs = outs if isinstance(outs, tuple) else (outs,)
                refs = ref(inputs)
                refs = refs if isinstance(refs, tuple) else (refs,)
                errs = [rel_err(o, rr) for o, rr in zip(outs, refs)]
                if len(outs) != len(refs):
                    raise ValueError(f"{len(outs)} outputs, reference has {len(refs)}")
                worst = max(errs)
                timing = ""
                if nbytes and not c.dry:
                    K.set_debug(False)
                    args = dev()
                    ms, _ = c.time_ms(lambda: run(impl, args), warmup=1, iters=5, budget_s=3)
                    timing = f", {ms:.3f} ms, {nbytes / ms / 1e6:,.0f} GB/s"
                    K.set_debug(True)
                c.data.setdefault("kernels", {})[name] = {"errors": errs, "timing": timing}
                c.row("kernels", name, f"{worst:.1e}{timing}", status(worst, KERNEL_TOL))
            except Exception as e:
                traceback.print_exc()
                c.row("kernels", name, type(e).__name__, f"FAIL: {str(e).splitlines()[0][:100] if str(e) else ''}")
            finally:
                K.set_debug(True)
    finally:
        K.set_debug(prev)


# ---- model: CuPy vs NumPy, every gradient ------------------------------------------------------
def check_model(c):
    from npgpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=96 if c.dry else 512, block_size=32 if c.dry else 128, n_layer=2,
                    n_head=4, n_embd=64 if c.dry else 128)
    B = 2 if c.dry else 4
    r = np.random.default_rng(3)
    x, y = r.integers(0, cfg.vocab_size, (B, cfg.block_size)), r.integers(0, cfg.vocab_size, (B, cfg.block_size))
    ref = GPT(cfg, seed=1)
    _, loss_ref = ref(x, y)
    loss_ref.backward()
    ref_grads = {n: p.grad.astype(np.float64) for n, p in ref.named_parameters()}
    for name in c.precisions:
        guarded(c, "model", f"{name}: loss and gradients",
                lambda: model_one(c, GPT, cfg, x, y, float(loss_ref.data), ref_grads, name))


def model_one(c, GPT, cfg, x, y, loss_ref, ref_grads, name):
    """The same model on the device under precision `name` against the NumPy fp32 one."""
    from npgpt.backend import asnumpy, to_device
    device = "cpu" if c.dry else "gpu"
    model = GPT(cfg, seed=1, device=device)              # initialised on the host: identical weights
    calls, launches = P.matmul_calls, sum(K.launches.values())
    scale = 1024.0 if name == "fp16" else 1.0            # fp16 gradients need loss scaling
    with P.use_precision(name):
        _, loss = model(to_device(x, device), to_device(y, device))
        (loss * scale).backward()
    wired = P.matmul_calls > calls
    used_kernels = sum(K.launches.values()) - launches
    if name != "fp32" and not wired:
        c.row("model", f"{name}: loss and gradients vs NumPy fp32", "n/a",
              "n/a: precision not wired into the model")
        return
    e_loss = abs(float(asnumpy(loss.data)) - loss_ref) / abs(loss_ref)
    worst, where = 0.0, ""
    for n, p in model.named_parameters():
        e = rel_err(asnumpy(p.grad) / scale, ref_grads[n])
        if e >= worst:
            worst, where = e, n
    tol = MODEL_TOL[name]
    c.data.setdefault("model", {})[name] = {"loss_err": e_loss, "worst_grad_err": worst, "worst_param": where,
                                            "precision_matmuls": P.matmul_calls - calls,
                                            "kernel_launches": used_kernels}
    c.row("model", f"{name}: loss rel err", f"{e_loss:.1e}", status(e_loss, tol))
    c.row("model", f"{name}: worst gradient ({len(ref_grads)} params)", f"{worst:.1e} {where[-28:]}",
          status(worst, tol))
    if name == "fp32":
        c.row("model", "fused kernels used by the model", f"{used_kernels} launches",
              "" if used_kernels or c.dry else "note: kernels not wired into ops/nn.py yet")


# ---- training speed ----------------------------------------------------------------------------
def speed_configs(c):
    if c.dry:
        return [("baby", 2, 32)]
    return [("shakespeare-char", 64, 256), ("gpt2", 16, 1024)]


def npgpt_step(step, scaler):
    """One training iteration on a bench.TrainStep (fp16: with loss scaling)."""
    def run(i):
        x, y = step.batches[i % len(step.batches)]
        step.opt.zero_grad()
        _, loss = step.model(x, y)
        if scaler is None:
            loss.backward()
            step.opt.clip_grad_norm(step.grad_clip)
            step.opt.step(step.lr)
        else:
            scaler.scale_loss(loss).backward()
            scaler.step(step.opt, step.lr, step.grad_clip)
        return loss
    run.scaler = scaler
    return run


def check_train(c):
    from npgpt.bench import TrainStep

    iters, warmup = (2, 1) if c.quick else (4, 2)
    c.data["train"] = {}
    for preset, B, T in speed_configs(c):
        if c.left() < 40:
            c.row("train", f"{preset} B{B} T{T}", "skipped", "SKIP: out of time")
            continue
        holder = {}
        guarded(c, "train", f"npgpt {preset} B{B}x{T} (build)", lambda: holder.update(step=TrainStep(
            preset, overrides={"dropout": 0.0}, batch_size=B, block_size=T, device="cpu" if c.dry else "gpu",
            n_batches=4)))
        step = holder.pop("step", None)
        if step is None:
            continue
        for name in c.precisions:
            if c.left() < 25:
                c.row("train", f"{preset} B{B}x{T} {name}", "skipped", "SKIP: out of time")
                continue
            guarded(c, "train", f"npgpt {preset} B{B}x{T} {name}",
                    lambda: train_one(c, step, preset, B, T, name, iters, warmup))
        step = None
        c.free()


def train_one(c, step, preset, B, T, name, iters, warmup):
    calls = P.matmul_calls
    with P.use_precision(name):
        run = npgpt_step(step, DynamicLossScaler() if name == "fp16" else None)
        run(0)
        if name != "fp32" and P.matmul_calls == calls:
            c.row("train", f"{preset} B{B}x{T} {name}", "n/a", "n/a: precision not wired into the model")
            return
        counter = iter(range(1, 10 ** 6))
        ms, times = c.time_ms(lambda: run(next(counter)), warmup=warmup, iters=iters,
                              budget_s=25 if preset == "gpt2" else 15)
    flops = step.flops_per_iter
    tok_s = B * T / (ms / 1e3)
    peak = c.ceilings.get(name) or DATASHEET_TFLOPS[name]
    mfu = flops / (ms / 1e3) / (peak * 1e12)
    c.data["train"][f"{preset}/{name}"] = {"ms": ms, "times_ms": times, "tokens_per_s": tok_s, "mfu": mfu,
                                           "peak_tflops": peak, "flops_per_iter": flops}
    c.row("train", f"npgpt {preset} B{B}x{T} {name}",
          f"{ms:,.1f} ms {tok_s:,.0f} tok/s", f"MFU {mfu:.1%} of {peak:,.1f} TFLOP/s")
    if run.scaler is not None:                 # fp16: steps skipped for overflow are not training
        sk = run.scaler.skipped_steps
        c.data["train"][f"{preset}/{name}"].update(skipped_steps=sk, loss_scale=run.scaler.scale)
        c.row("train", f"npgpt {preset} B{B}x{T} fp16 skipped steps", f"{sk} (scale {run.scaler.scale:g})",
              "" if sk <= 2 else "WARN: many overflow skips")


# ---- PyTorch eager -----------------------------------------------------------------------------
def check_torch(c):
    try:
        import torch
    except ImportError:
        c.row("torch", "PyTorch eager", "n/a", "n/a: torch not installed")
        return
    device = "cpu" if c.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        c.row("torch", "PyTorch eager", "n/a", "n/a: torch sees no GPU")
        return
    c.data["torch"] = {}
    for preset, B, T in speed_configs(c):
        for name in c.precisions:
            if c.left() < 15:
                c.row("torch", f"{preset} B{B}x{T} {name}", "skipped", "SKIP: out of time")
                continue
            guarded(c, "torch", f"torch {preset} B{B}x{T} {name}",
                    lambda: torch_one(c, torch, device, preset, B, T, name))
        if device == "cuda":
            set_torch_tf32(torch, False)
            torch.cuda.empty_cache()


def set_torch_tf32(torch, on):
    """TF32 for float32 matmuls on or off, through PyTorch's current switch where it exists
    (`fp32_precision`, PyTorch 2.9+), else the older allow_tf32 flags."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        m.fp32_precision = "tf32" if on else "ieee"
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            conv.fp32_precision = "tf32" if on else "ieee"
    else:
        m.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def torch_one(c, torch, device, preset, B, T, name):
    """Time one configuration in PyTorch eager: fp32 (TF32 off), tf32 (TF32 matmuls), fp16 (autocast
    + GradScaler); the same iteration as npgpt's: zero_grad, forward, backward, clip 1.0, AdamW."""
    from npgpt.bench import make_config
    cfg = make_config(preset, {"dropout": 0.0}, T)
    iters, warmup = (2, 1) if c.quick else (6, 3)
    torch.manual_seed(0)
    from torch_compare import torch_gpt     # the same PyTorch model the CPU comparison uses
    model = torch_gpt(cfg, device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95))
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    if device == "cuda":
        set_torch_tf32(torch, name == "tf32")
    half = name == "fp16" and device == "cuda"
    scaler = torch.amp.GradScaler("cuda") if half else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.float16, enabled=half):
            loss = model(x, y)
        if scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            step()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    ours = c.data.get("train", {}).get(f"{preset}/{name}")
    ratio = f"npgpt/torch {ours['ms'] / ms:.2f}x" if ours else "npgpt n/a"
    c.data["torch"][f"{preset}/{name}"] = {"ms": ms, "times_ms": times}
    c.row("torch", f"torch {preset} B{B}x{T} {name}", f"{ms:,.1f} ms {B * T / (ms / 1e3):,.0f} tok/s", ratio)


# ---- main --------------------------------------------------------------------------------------
def print_table(c):
    w_item = max([len(r[1]) for r in c.rows] + [10])
    w_val = max([len(r[2]) for r in c.rows] + [10])
    bar = "-" * (11 + w_item + w_val + 30)
    print()
    print(bar)
    mode = "DRY RUN on NumPy (no GPU)" if c.dry else ("quick" if c.quick else "full")
    print(f"npgpt gpu_check ({mode}), precisions {','.join(c.precisions)}, {time.perf_counter() - c.start:.0f} s")
    print(bar)
    for sec, item, value, st in c.rows:
        print(f"{sec:9s}  {item:{w_item}s}  {value:>{w_val}s}  {st}")
    fails = sum(1 for r in c.rows if r[3].startswith("FAIL"))
    print(bar)
    print(f"{fails} FAIL, {sum(1 for r in c.rows if r[3].startswith('PASS'))} PASS, "
          f"{sum(1 for r in c.rows if r[3].startswith(('n/a', 'SKIP')))} n/a or skipped")
    return fails


def main(argv=None):
    from npgpt.programs import out_dir   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer iterations")
    ap.add_argument("--dry-run-cpu", action="store_true", help="run every section on NumPy with tiny sizes")
    ap.add_argument("--precisions", default="fp32,tf32,fp16", help="comma-separated: fp32,tf32,fp16")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; late sections are skipped")
    ap.add_argument("--out", default=os.environ.get("OUT"), type=out_dir, help="folder for gpu_check.json (default $OUT)")
    ap.add_argument("--sections", default="env,ceilings,kernels,model,train,torch", help="which sections to run")
    args = ap.parse_args(argv)
    try:
        c = Check(args)
    except Exception as e:                             # no usable GPU, or a bad --precisions value
        print(f"gpu_check: cannot start: {e}")
        return 2
    table = {"env": check_env, "ceilings": check_ceilings, "kernels": check_kernels, "model": check_model,
             "train": check_train, "torch": check_torch}
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        section(c, name, table[name])
    write_json(c)
    fails = print_table(c)
    return 1 if fails else 0


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
