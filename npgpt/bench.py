"""Speed of training and decoding: `npgpt bench` and the library calls behind it.

`bench_train` times complete training iterations -- forward, backward, gradient clipping and an
AdamW step -- on random token batches, after a few warm-up iterations (BLAS thread start-up, first
allocations, GPU kernel selection). It reports milliseconds per iteration (median, min, max),
tokens per second, achieved GFLOP/s and MFU:

    FLOPs per iteration = B * T * model.flops_per_token(T)
                        = B * T * (6 N + 12 n_layer n_embd T)     (PaLM appendix B)

where N counts the non-embedding parameters (the tied LM head is counted; the position table is
not). MFU divides the achieved rate by the fp32 GEMM peak measured in the same process
(`npgpt.perf.gemm_peak_gflops`), so 100% means "every FLOP ran at the best matmul speed this
machine's BLAS reaches".

With `profile=True`, a second pass over the same number of iterations times every Function's
forward and backward through the engine's profiling hook (`npgpt.tensor.profiling`, free when
off) and groups them into op kinds; "other/Python" is whatever the ops and the optimizer do not
account for (the engine's own bookkeeping, gradient accumulation, the model's Python code).

`bench_generate` times greedy decoding with and without the KV cache. `bench_decode` sweeps the
batch (1, 4, 16 rows decoded together) on any model, a real one loaded from a GGUF file or a folder
included: prefill speed, the latency of one decode step, tokens/s, and memory-bandwidth use,

    bandwidth use = weight bytes read per step * steps/s / GEMV bandwidth

where the weight bytes are every weight a step reads (all of them but an untied input embedding
and a position table, of which a step reads a few rows) and the GEMV bandwidth is the best rate a
large float32 matrix-vector product streams its matrix at, measured in the same run
(`npgpt.perf.gemv_bandwidth_gbs`). At batch 1 that is decoding's ceiling (every weight is read
once per token); at batch B the weights are read once for B tokens.

`llama_cpp_decode` runs the same sweep in llama.cpp, when its `llama-batched-bench` program is at
hand (`npgpt bench --checkpoint X.gguf` finds it on PATH, or `--llama-cpp PATH`): it reads the GGUF
as it is (quantised), decodes B sequences of random tokens at once and reports tokens/s; npgpt
never links llama.cpp, it only runs that program and reads its JSON line.

`--set replicas=N` times the step with the batch split over N threads (`npgpt.replicas`), as
`npgpt train --set replicas=N` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from collections import defaultdict

import numpy as np

from npgpt.backend import get_xp, parse_device, require_gpu, synchronize, to_device, xp_for
from npgpt.errors import NpgptError
from npgpt.generate import generate
from npgpt.llama import build_model, preset_config
from npgpt.optim import AdamW
from npgpt.perf import gemm_peak_gflops, gemv_bandwidth_gbs, tune_malloc
from npgpt.replicas import ThreadReplicas
from npgpt.tensor import Tensor, profiling
from npgpt.training.config import TrainConfig, apply_overrides, parse_set_options

DEFAULT_PRESET = "baby"
DEFAULT_BATCH_SIZE = 12
FLOPS_FORMULA = "FLOPs/token = 6*N_non_embedding + 12*n_layer*n_embd*T (forward + backward, PaLM appendix B)"

# Function class name -> op kind in the profile. Anything not listed is a "shape/elementwise" op
# (the residual Add, the position-embedding slice, the LM head's transpose, ...).
OP_KINDS = {
    "Linear": "matmul", "MatMul": "matmul",
    "CausalSelfAttention": "attention", "Softmax": "attention", "GroupedQueryAttention": "attention",
    "LayerNorm": "layernorm", "RMSNorm": "rmsnorm",
    "GELU": "gelu", "SwiGLU": "swiglu", "Rope": "rope",
    "CrossEntropy": "cross-entropy", "LogSoftmax": "cross-entropy",
    "Embedding": "embedding",
    "Dropout": "dropout",
}
KIND_ORDER = ["matmul", "attention", "layernorm", "rmsnorm", "gelu", "swiglu", "rope", "cross-entropy", "embedding", "dropout",
              "shape/elementwise", "optimizer", "other/Python"]


# ---- configuration -----------------------------------------------------------------------------
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "arch")
RUN_KEYS = ("preset", "batch_size", "device", "seed", "learning_rate", "grad_clip",
            "zero_stage",                        # zero_stage: under mpiexec only (npgpt.distributed.launcher)
            "replicas")                          # the batch split over threads (npgpt.replicas)


def parse_overrides(pairs):
    """--set pairs -> {key: typed value}, with `npgpt train`'s key names and parser (npgpt.train).

    Model keys (n_layer, n_head, n_embd, block_size, dropout, bias) change the benchmarked model;
    run keys (preset, batch_size, device, seed, learning_rate, grad_clip, replicas) the benchmark itself."""
    raw = parse_set_options(pairs)
    for key in raw:
        if key not in MODEL_KEYS + RUN_KEYS:
            raise NpgptError(f"--set: unknown model setting {key!r} for npgpt bench; choose from "
                             f"{', '.join(MODEL_KEYS + RUN_KEYS)}")
    typed = apply_overrides(TrainConfig(), raw)
    return {k: getattr(typed, k) for k in raw}


def make_config(preset=DEFAULT_PRESET, overrides=None, block_size=None):
    """The model config for a benchmark. Dropout defaults to 0: timings measure the model's
    arithmetic, not the mask draws (pass overrides={"dropout": p} to include them)."""
    overrides = {k: v for k, v in (overrides or {}).items() if k in MODEL_KEYS}
    overrides.setdefault("dropout", 0.0)
    if block_size is not None:
        if int(block_size) <= 0:
            raise NpgptError(f"--block-size must be positive, got {block_size}")
        overrides["block_size"] = int(block_size)
    return preset_config(preset, overrides.pop("arch", "gpt"), **overrides)


def check_counts(iters, warmup, batch_size):
    """A clear NpgptError for a non-positive --iters or --batch-size or a negative --warmup."""
    if int(iters) <= 0:
        raise NpgptError(f"--iters must be positive, got {iters}")
    if int(warmup) < 0:
        raise NpgptError(f"--warmup must be >= 0, got {warmup}")
    if int(batch_size) <= 0:
        raise NpgptError(f"--batch-size must be positive, got {batch_size}")


# ---- the profiler ------------------------------------------------------------------------------
class OpProfiler:
    """Collects per-Function times from `npgpt.tensor.profiling` and groups them by kind."""

    def __init__(self, device):
        self.is_gpu = parse_device(device).is_gpu
        self.seconds = defaultdict(float)       # kind -> seconds
        self.by_op = defaultdict(float)         # "Name.forward" -> seconds

    def clock(self):
        if self.is_gpu:
            synchronize()    # GPU ops are queued: wait, or the time lands on a later op
        return time.perf_counter()

    def record(self, fn, phase, seconds):
        name = type(fn).__name__
        self.seconds[OP_KINDS.get(name, "shape/elementwise")] += seconds
        self.by_op[f"{name}.{phase}"] += seconds


# ---- training ----------------------------------------------------------------------------------
class TrainStep:
    """A model, its AdamW optimizer and a few random batches; calling it runs one training
    iteration: zero_grad, forward with loss, backward, clip_grad_norm(grad_clip), AdamW step.

    Batches are drawn up front (and moved to the device) so data preparation is never timed.
    examples/torch_compare.py drives the same object beside its PyTorch twin. With replicas > 1 it
    owns a thread pool: `close()` (or `with TrainStep(...) as step:`) shuts it down.
    """

    def __init__(self, preset=DEFAULT_PRESET, overrides=None, batch_size=DEFAULT_BATCH_SIZE, block_size=None,
                 device="cpu", seed=0, lr=6e-4, grad_clip=1.0, n_batches=8, replicas=1):
        if int(batch_size) <= 0:
            raise NpgptError(f"--batch-size must be positive, got {batch_size}")
        tune_malloc()
        self.device = parse_device(device)
        if self.device.is_gpu:
            require_gpu(self.device)
        self.config = cfg = make_config(preset, overrides, block_size)
        self.B, self.T = int(batch_size), cfg.block_size
        self.lr, self.grad_clip = lr, grad_clip
        self.model = build_model(cfg, seed=seed, device=str(self.device))
        self.model.train()
        self.opt = AdamW(self.model.named_parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        rng = np.random.default_rng(seed)
        self.batches = [tuple(to_device(rng.integers(0, cfg.vocab_size, (self.B, self.T)), self.device)
                              for _ in "xy") for _ in range(n_batches)]
        self.replicas = None
        if int(replicas) > 1:          # the batch split over threads (npgpt.replicas)
            self.replicas = ThreadReplicas(self.model, int(replicas))

    def close(self):
        """Shut the replicas' thread pool down (nothing to do without replicas); safe to call twice."""
        if self.replicas is not None:
            self.replicas.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def flops_per_iter(self):
        return self.model.flops_per_token(self.T) * self.B * self.T

    def __call__(self, i=0, prof=None):
        """One iteration on batch i (mod the number of batches); returns the loss (a Tensor, or a
        float with replicas)."""
        x, y = self.batches[i % len(self.batches)]
        t0 = prof.clock() if prof else 0.0
        self.opt.zero_grad()
        if prof:
            prof.seconds["optimizer"] += prof.clock() - t0
        if self.replicas is not None:
            loss = self.replicas.forward_backward(x, y)
        else:
            _, loss = self.model(x, y)
            loss.backward()
        if prof:
            t0 = prof.clock()
        self.opt.clip_grad_norm(self.grad_clip)
        self.opt.step(self.lr)
        if prof:
            prof.seconds["optimizer"] += prof.clock() - t0
        return loss


def bench_train(preset=DEFAULT_PRESET, overrides=None, batch_size=DEFAULT_BATCH_SIZE, block_size=None,
                device="cpu", iters=20, warmup=3, profile=False, seed=0, lr=6e-4, grad_clip=1.0,
                peak_gflops=None, replicas=1):
    """Time `iters` training iterations (see TrainStep) after `warmup` ones; returns a dict of
    the figures (see the module doc). peak_gflops: reuse a measured GEMM peak."""
    check_counts(iters, warmup, batch_size)
    iters, warmup = int(iters), int(warmup)
    with TrainStep(preset, overrides, batch_size, block_size, device, seed, lr, grad_clip, replicas=replicas) as step:
        model, cfg, dev, B, T = step.model, step.config, step.device, step.B, step.T

        times, loss = [], None
        for i in range(warmup + iters):
            synchronize()
            t0 = time.perf_counter()
            loss = step(i)
            synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        final_loss = float(getattr(loss, "data", loss))

        if peak_gflops is None:
            peak_gflops = gemm_peak_gflops(xp_for(dev))
        flops_per_iter = step.flops_per_iter
        med = statistics.median(times)
        result = {
            "preset": preset, "device": str(dev), "batch_size": B, "block_size": T,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
            "dropout": cfg.dropout, "params": int(model.num_params()),
            "params_non_embedding": int(model.num_params(non_embedding=True)),
            "iters": iters, "warmup": warmup,
            "ms_per_iter": med * 1e3, "ms_median": med * 1e3, "ms_min": min(times) * 1e3, "ms_max": max(times) * 1e3,
            "tokens_per_s": B * T / med,
            "flops_per_token": model.flops_per_token(T), "flops_per_iter": flops_per_iter,
            "flops_formula": FLOPS_FORMULA,
            "gflops": flops_per_iter / med / 1e9,
            "gemm_peak_gflops": peak_gflops,
            "mfu": flops_per_iter / med / 1e9 / peak_gflops,
            "final_loss": final_loss,
            "blas_threads": blas_threads(),
            "replicas": int(replicas),
        }

        if profile:
            prof = OpProfiler(dev)
            total = 0.0
            with profiling(prof):
                for i in range(iters):
                    synchronize()
                    t0 = time.perf_counter()
                    step(i, prof)
                    synchronize()
                    total += time.perf_counter() - t0
            measured = sum(prof.seconds.values())
            prof.seconds["other/Python"] = max(total - measured, 0.0)
            result["profile"] = {
                "ms_per_iter": total / iters * 1e3,
                "kinds_ms": {k: prof.seconds.get(k, 0.0) / iters * 1e3 for k in KIND_ORDER},
                "ops_ms": {k: v / iters * 1e3 for k, v in sorted(prof.by_op.items(), key=lambda kv: -kv[1])},
            }
    return result


def format_train(r):
    """Human-readable lines for a bench_train result."""
    lines = [
        f"npgpt bench: {r['preset']} ({r['n_layer']} layers, {r['n_head']} heads, n_embd {r['n_embd']}, "
        f"vocab {r['vocab_size']}, dropout {r['dropout']}), batch {r['batch_size']} x block {r['block_size']}, "
        f"device {r['device']}, {r['params']:,} parameters",
        f"one iteration = forward + backward + clip_grad_norm + AdamW step; {r['iters']} timed after "
        f"{r['warmup']} warm-up" + (f"; the batch split over {r['replicas']} threads (replicas)"
                                    if r.get("replicas", 1) > 1 else ""),
        f"ms/iter     median {r['ms_median']:.2f}   min {r['ms_min']:.2f}   max {r['ms_max']:.2f}",
        f"tokens/s    {r['tokens_per_s']:,.0f}",
        f"GFLOP/s     {r['gflops']:.1f}   ({r['flops_formula']})",
        f"MFU         {r['mfu']:.1%} of the fp32 GEMM peak measured in this run "
        f"({r['gemm_peak_gflops']:.1f} GFLOP/s, BLAS threads: {r['blas_threads']})",
    ]
    if "profile" in r:
        p = r["profile"]
        total = p["ms_per_iter"]
        lines.append(f"profile (time by op kind, forward + backward, {total:.2f} ms/iter with the profiler on):")
        for kind in KIND_ORDER:
            ms = p["kinds_ms"][kind]
            if ms > 0 or kind == "other/Python":             # a GPT has no RMSNorm, a Llama no GELU
                lines.append(f"  {kind:18s} {ms:9.2f} ms  {ms / total:6.1%}")
    return "\n".join(lines)


# ---- decoding ----------------------------------------------------------------------------------
def decode_model(preset=DEFAULT_PRESET, overrides=None, block_size=None, device="cpu", seed=0):
    """The preset's model (random weights, eval mode) for bench_decode."""
    model = build_model(make_config(preset, overrides, block_size), seed=seed, device=str(parse_device(device)))
    return model.eval()


def bench_generate(preset=DEFAULT_PRESET, overrides=None, block_size=None, device="cpu", new_tokens=None,
                   prompt_len=8, seed=0, repeats=3):
    """Greedy decoding speed (tokens/s) of one prompt, with and without the KV cache (best of
    `repeats`). new_tokens defaults to block_size - prompt_len, so the cache is never rebuilt."""
    cfg = make_config(preset, overrides, block_size)
    prompt_len = max(1, min(int(prompt_len), cfg.block_size - 1))
    n = int(new_tokens) if new_tokens is not None else cfg.block_size - prompt_len
    if n <= 0:
        raise NpgptError(f"new tokens must be positive, got {n}")
    model = build_model(cfg, seed=seed, device=str(parse_device(device)))
    model.eval()
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, prompt_len).tolist()
    out = {"prompt_len": prompt_len, "new_tokens": n, "repeats": repeats}
    generate(model, prompt, 2, temperature=0, use_cache=True)     # warm-up
    for use_cache, key in ((True, "tokens_per_s_cache"), (False, "tokens_per_s_no_cache")):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            generate(model, prompt, n, temperature=0, use_cache=use_cache)
            synchronize()
            best = min(best, time.perf_counter() - t0)
        out[key] = n / best
    out["cache_speedup"] = out["tokens_per_s_cache"] / out["tokens_per_s_no_cache"]
    return out


def format_generate(g):
    return (f"decoding (greedy, 1 prompt of {g['prompt_len']} tokens, {g['new_tokens']} new tokens, best of {g['repeats']}): "
            f"{g['tokens_per_s_cache']:,.0f} tokens/s with the KV cache, "
            f"{g['tokens_per_s_no_cache']:,.0f} without ({g['cache_speedup']:.1f}x)")


def decode_weight_bytes(model):
    """Bytes of weights one cached decoding step reads: every parameter and quantised buffer once
    (a tied head counts its table once), except an untied input embedding table and a position
    table (a step reads only its rows of those)."""
    seen, total = set(), 0
    skip = set()
    if model.lm_head is not None:
        skip.add(id(getattr(model.input_embedding, "data", model.input_embedding)))
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    if wpe is not None:
        skip.add(id(wpe.weight.data))
    for m in model.modules():
        for v in vars(m).values():
            a = v.data if isinstance(v, Tensor) else v
            if hasattr(a, "nbytes") and hasattr(a, "dtype") and id(a) not in seen:
                seen.add(id(a))
                if id(a) not in skip:
                    total += int(a.nbytes)
    return total


def bench_decode(model, batches=(1, 4, 16), new_tokens=32, prompt_len=64, seed=0, bandwidth_mb=256):
    """Greedy cached decoding of `model` at each batch size: prefill tokens/s (one row of
    prompt_len tokens), the median latency of one decode step (ms), tokens/s over all rows, and
    the bandwidth use of the weight stream (see the module doc). Returns a dict with `rows`."""
    cfg = model.config
    prompt_len = max(1, min(int(prompt_len), cfg.block_size - new_tokens - 1))
    if new_tokens < 1 or prompt_len + new_tokens > cfg.block_size:
        raise NpgptError(f"prompt ({prompt_len}) + new tokens ({new_tokens}) must fit the context ({cfg.block_size})")
    rng = np.random.default_rng(seed)
    xp = get_xp(model.anchor.data)
    bw = gemv_bandwidth_gbs(xp, bandwidth_mb)
    wbytes = decode_weight_bytes(model)
    prompt = rng.integers(0, cfg.vocab_size, (1, prompt_len))
    model.forward_cached(prompt[:, :8], model.new_cache(1))                       # warm-up
    t = time.perf_counter()
    logits = model.forward_cached(prompt, model.new_cache(1))
    synchronize(logits)
    prefill = prompt_len / (time.perf_counter() - t)
    rows = []
    for B in batches:
        cache = model.new_cache(B)
        logits = model.forward_cached(np.repeat(prompt, B, axis=0), cache)
        tok = logits[:, -1].argmax(-1)[:, None]
        times = []
        for _ in range(new_tokens):
            t = time.perf_counter()
            logits = model.forward_cached(tok, cache)
            tok = logits[:, -1].argmax(-1)[:, None]
            synchronize(tok)
            times.append(time.perf_counter() - t)
        step = statistics.median(times)
        rows.append({"batch": B, "step_ms": 1e3 * step, "tokens_per_s": B / step,
                     "bandwidth_use": wbytes / step / 1e9 / bw})
    return {"weight_mb": wbytes / 1e6, "gemv_gbs": bw, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_tokens_per_s": prefill, "limit_tokens_per_s": bw * 1e9 / wbytes, "rows": rows}


def find_llama_batched_bench(given=None):
    """llama.cpp's `llama-batched-bench` program: `given` (the program or its folder), else the one on
    PATH; None when there is none and none was given."""
    if given is None:
        found = shutil.which("llama-batched-bench")
        return Path(found) if found else None
    p = Path(given)
    p = p / "llama-batched-bench" if p.is_dir() else p
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise NpgptError(f"--llama-cpp: no llama-batched-bench program at {given}; build llama.cpp's "
                         f"llama-batched-bench target, or leave the option out")
    return p


def llama_cpp_decode(program, gguf, batches=(1, 4, 16), new_tokens=32, prompt_len=64, threads=None, timeout=1800):
    """The decoding sweep of `bench_decode` in llama.cpp, on the same GGUF file read as it is.

    One run of llama-batched-bench per batch size B: B sequences of prompt_len random tokens
    prefilled, then new_tokens steps of B tokens (one per sequence). Its JSON line gives tokens/s
    over those steps (`speed_tg`), so one step of B tokens takes B / speed_tg. Returns the prefill
    tokens/s of one sequence (from the first batch size's run) and `rows` with bench_decode's keys
    (no bandwidth use: llama.cpp reads the quantised weights, not float32)."""
    threads = threads or len(os.sched_getaffinity(0))
    rows, prefill = [], None
    for B in batches:
        cmd = [str(program), "-m", str(gguf), "-c", str(B * (prompt_len + new_tokens) + 64), "-b", "2048",
               "-ub", "512", "-npp", str(prompt_len), "-ntg", str(new_tokens), "-npl", str(B), "-t", str(threads),
               "--output-format", "jsonl"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NpgptError(f"llama-batched-bench did not run ({e})") from None
        try:
            r = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")][-1]
            speed_tg, speed_pp = float(r["speed_tg"]), float(r["speed_pp"])
        except (IndexError, KeyError, TypeError, ValueError):
            tail = " ".join(out.stderr.split()[-30:])
            raise NpgptError(f"llama-batched-bench gave no result for batch {B} (exit {out.returncode}): {tail}") from None
        if not (speed_tg > 0 and speed_pp > 0):
            raise NpgptError(f"llama-batched-bench reported a speed of {speed_tg} tokens/s for batch {B}")
        prefill = prefill or (speed_pp if B == 1 else speed_pp / B)
        rows.append({"batch": B, "step_ms": 1e3 * B / speed_tg, "tokens_per_s": speed_tg})
    return {"program": str(program), "threads": threads, "prefill_tokens_per_s": prefill, "rows": rows}


def format_decode(d, name="npgpt"):
    lc = {r["batch"]: r for r in d["llama_cpp"]["rows"]} if d.get("llama_cpp") else {}
    lines = [f"decoding {name}: weights read per step {d['weight_mb']:,.0f} MB, GEMV bandwidth {d['gemv_gbs']:.1f} GB/s "
             f"(batch-1 limit {d['limit_tokens_per_s']:,.1f} tokens/s); prefill {d['prefill_tokens_per_s']:,.0f} "
             f"tokens/s ({d['prompt_len']} tokens); {d['new_tokens']} steps, median"]
    if lc:
        lines.append(f"llama.cpp ({d['llama_cpp']['program']}, {d['llama_cpp']['threads']} threads, the GGUF as it is): "
                     f"prefill {d['llama_cpp']['prefill_tokens_per_s']:,.0f} tokens/s")
    lines.append(f"{'batch':>5} {'step ms':>8} {'tokens/s':>9} {'bandwidth use':>13}"
                 + (f" {'llama.cpp tokens/s':>18} {'npgpt / llama.cpp':>17}" if lc else ""))
    for r in d["rows"]:
        line = f"{r['batch']:>5} {r['step_ms']:8.2f} {r['tokens_per_s']:9.1f} {r['bandwidth_use']:12.0%}"
        if r["batch"] in lc:
            other = lc[r["batch"]]["tokens_per_s"]
            line += f" {other:18.1f} {r['tokens_per_s'] / other:17.2f}"
        lines.append(line)
    return "\n".join(lines)


def blas_threads():
    """BLAS thread count as far as we can tell without extra packages (threadpoolctl if present,
    else the usual environment variables, else 'default')."""
    try:
        from threadpoolctl import threadpool_info    # optional, not a dependency: imported only if present
        for info in threadpool_info():
            if info.get("user_api") == "blas":
                return int(info["num_threads"])
    except Exception:
        pass
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            return os.environ[var]
    return f"default ({os.cpu_count()} CPUs)"
