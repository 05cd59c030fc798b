"""npgpt against PyTorch eager on the CPU: the same training step, timed side by side.

    python examples/torch_compare.py                          # baby: 4/4/128, T 64, B 12
    python examples/torch_compare.py --size shakespeare-char  # 6/6/384, T 256, B 64
    python examples/torch_compare.py --size gpt2              # GPT-2 124M: 12/12/768, T 256, B 4
    python examples/torch_compare.py --size all               # the three, and a summary table
    python examples/torch_compare.py --family llama --size all             # the same shapes as Llamas
    python examples/torch_compare.py --compete 1 --size shakespeare-char   # quiet, then one competing process
    python examples/torch_compare.py --family llama --compete 1 --size baby
    python examples/torch_compare.py --decode                 # decoding against transformers' generate

--family gpt (default): the PyTorch model below is a nanoGPT-style GPT-2 written to match npgpt's
exactly: learned position embeddings, pre-LN blocks, GELU (tanh form), biases, tied LM head,
causal attention via F.scaled_dot_product_attention (what nanoGPT uses).

--family llama: npgpt's Llama of the same preset's sizes (`--set arch=llama`: LlamaConfig.from_gpt;
the same vocabulary, layers, heads and width, half as many key/value heads, a SwiGLU width of
8/3 n_embd, rotary positions, RMSNorm, tied embeddings) against transformers' LlamaForCausalLM
built from the transformers.LlamaConfig that npgpt's own config.json mapping writes
(LlamaConfig.to_hf: vocab, hidden and intermediate size, layers, heads, kv heads, rope theta,
rms eps, tied embeddings), with transformers' default attention (SDPA), what its users run.
Both sides print their parameter counts, which must be equal, and the class npgpt's step runs.

Both sides start from random weights, dropout 0, and run the same iteration on the same batches:
zero_grad, forward with cross-entropy loss (over every position, targets given, as npgpt's
model(x, y) does), backward, clip_grad_norm(1.0), AdamW(lr 6e-4, betas (0.9, 0.95), weight decay
0.1 on >= 2-D tensors, none on biases and norm gains), as npgpt's AdamW groups them.

They alternate in rounds (a few torch iterations, then a few npgpt ones, repeated) inside one
process, so a noisy neighbour slows both alike; the reported figure is each side's median.
Both sides use 2 threads by default (--threads for torch; numpy's BLAS takes OPENBLAS_NUM_THREADS).
MFU divides npgpt's model FLOPs (its flops_per_token) per second by the fp32 GEMM peak measured
in the same run. Peak memory: each side then runs two steps alone in a fresh process, which
reports its resident memory (VmRSS) before the first step and its peak (VmHWM).

--compete N (the shared CPU): the quiet rounds first, then N competing processes start (each a
single-threaded NumPy matmul loop, like another training run; they end with this script, also
on Ctrl-C or an error, and on their own if it dies) and the same rounds run again beside them.
Each side reports its quiet and contended medians and its slowdown (contended / quiet), and the
line that matters is npgpt's slowdown / PyTorch's. npgpt's thread choice is the one `npgpt train`
makes at its start (npgpt.perf.shared_cpu_threads, entered before each phase, as train enters it
before its loop) and is printed; PyTorch keeps --threads, as its users get. That choice reads the
1-minute load average, which lags (the kernel's exponential average, time constant one minute),
so before each phase this process sleeps until the load is within 0.5 of what a process starting
then would see (the load at this script's start, plus N while the competitors run) or --settle
seconds have passed, and prints the load it saw. The replicas line is quiet-only (replicas are
never switched on automatically). Without --compete nothing chooses threads (npgpt runs its
defaults, as `npgpt bench` does).

PyTorch is not a dependency of npgpt: without it this script says so and exits with status 0
(and so does --family llama without transformers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    torch = None


def torch_gpt(cfg, device="cpu"):
    """A nanoGPT-like GPT-2 with npgpt's config (cfg: npgpt.model.GPTConfig); also used by
    examples/gpu_check.py for the same comparison on a GPU."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            C = cfg.n_embd
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # (B, nh, T, hs)
            x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.n_embd)
            for p in self.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, idx, targets):
            T = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T                          # tied LM head
            return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))

    return GPT().to(device)


def torch_llama(cfg, device="cpu"):
    """transformers' LlamaForCausalLM of npgpt's config (cfg: npgpt.llama.LlamaConfig), its default
    attention (SDPA), random init; calling it with (idx, targets) returns the cross-entropy loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(**cfg.to_hf())      # npgpt's config.json for this model, as transformers reads it

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = LlamaForCausalLM(hf_config)

        def forward(self, idx, targets):
            # the loss over every position with the targets given (npgpt's model(x, y)), not transformers'
            # labels= loss, which shifts the labels and drops the last position
            logits = self.lm(input_ids=idx, use_cache=False).logits                # (B, T, V)
            return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))

    return WithLoss().to(device).train()


def torch_model(cfg, device="cpu"):
    """The PyTorch twin of npgpt's config: torch_llama for a LlamaConfig, torch_gpt for a GPTConfig."""
    from npgpt.llama import LlamaConfig
    return torch_llama(cfg, device) if isinstance(cfg, LlamaConfig) else torch_gpt(cfg, device)


class TorchStep:
    def __init__(self, cfg, batches, lr=6e-4):
        torch.manual_seed(0)
        self.model = torch_model(cfg)
        lm = getattr(self.model, "lm", None)          # transformers' model inside torch_llama's wrapper
        self.label = "transformers" if lm is not None else "pytorch eager"
        self.about = (f"transformers {lm.__class__.__name__}, eager, attention {lm.config._attn_implementation}"
                      if lm is not None else "nanoGPT-style GPT-2, eager, F.scaled_dot_product_attention")
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
        self.batches = [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in batches]

    def __call__(self, i):
        x, y = self.batches[i % len(self.batches)]
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss


def timed(step, i):
    t = time.perf_counter()
    step(i)
    return time.perf_counter() - t


def time_rounds(sides, iters, rnd, start=0):
    """{name: [seconds]}: `iters` timed calls of each step in `sides` ({name: step}), alternating in
    rounds of `rnd` (each side runs its round in turn, then the next round)."""
    times = {k: [] for k in sides}
    done = 0
    while done < iters:
        n = min(rnd, iters - done)
        for name, step in sides.items():
            times[name] += [timed(step, start + done + j) for j in range(n)]
        done += n
    return times


# The three sizes the speed issue targets: (npgpt preset, batch, block size, timed iterations).
SIZES = {
    "baby": ("baby", 12, 64, 30),
    "shakespeare-char": ("shakespeare-char", 64, 256, 3),
    "gpt2": ("gpt2", 4, 256, 3),
}
FAMILIES = ("gpt", "llama")     # a preset's GPT, or its Llama (LlamaConfig.from_gpt: --set arch=llama)


def rss_kib(field="VmRSS"):
    """This process's resident memory (VmRSS) or its peak so far (VmHWM), in KiB (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_rss(side, size, family, threads, steps=2):
    """Run in a fresh process: build one side's model, optimizer and batches, run `steps` training
    steps, print 'RSS <before> <peak>' in KiB (resident memory before the first step and the peak)."""
    from npgpt.bench import TrainStep, make_config

    torch.set_num_threads(threads)
    preset, B, T, _ = SIZES[size]
    if side == "torch":   # the same batches as TrainStep draws, without building npgpt's model
        cfg = make_config(preset, {"arch": family}, block_size=T)
        rng = np.random.default_rng(0)
        step = TorchStep(cfg, [tuple(rng.integers(0, cfg.vocab_size, (B, T)) for _ in "xy") for _ in range(8)])
    else:
        step = TrainStep(preset, {"arch": family}, batch_size=B, block_size=T,
                         replicas=2 if side == "replicas" else 1)
    before = rss_kib()
    for i in range(steps):
        step(i)
    print(f"RSS {before} {rss_kib('VmHWM')}")
    if side != "torch":
        step.close()                    # the replicas' thread pool


def rss_of(side, size, family, threads):
    """(before, peak) resident KiB of one side's training steps, each side in its own process
    so neither's memory counts against the other."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-of", side, "--size", size,
                          "--family", family, "--threads", str(threads)],
                         capture_output=True, text=True, check=True).stdout
    before, peak = out.split("RSS ")[-1].split()[:2]
    return int(before), int(peak)


# ---- the shared CPU: competing processes, and npgpt's thread choice beside them ----------------
# One competitor: a single-threaded float32 matmul loop (a CPU-bound neighbour, like another
# training run). It stops on its own when its parent is gone (even after a SIGKILL of this script).
COMPETITOR = """
import os
import numpy as np
parent = os.getppid()
a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
while os.getppid() == parent:
    for _ in range(100):
        b = a @ a
"""


@contextmanager
def competitors(n):
    """Run the block with n competing processes (single-threaded BLAS each); they are terminated
    and waited for when the block ends, however it ends (an error, Ctrl-C)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NPGPT_THREADS="1")
    procs = []
    try:
        for _ in range(n):   # own session: Ctrl-C reaches this script, whose finally below ends them quietly
            procs.append(subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stderr.close()


def check_alive(procs):
    from npgpt.errors import NpgptError
    for p in procs:
        if p.poll() is not None:
            err = p.stderr.read().decode(errors="replace").strip().splitlines()
            raise NpgptError(f"a competing process ended early (exit status {p.returncode}"
                             f"{': ' + err[-1] if err else ''}); the contended figures would be wrong")


def settle_load(target, limit, procs=()):
    """Sleep (this process idle) until the 1-minute load average is within 0.5 of `target` or `limit`
    seconds have passed; returns (load, seconds waited, settled). Within 0.5 of a whole number of
    busy threads, choose_threads' rounding gives the choice the steady load would."""
    t0 = time.monotonic()
    while True:
        load, waited = os.getloadavg()[0], time.monotonic() - t0
        if abs(load - target) < 0.5 or waited >= limit:
            return load, waited, abs(load - target) < 0.5
        check_alive(procs)
        time.sleep(1.0)


@contextmanager
def npgpt_threads(label, target, limit, procs=()):
    """The block runs with the thread choice `npgpt train` makes at its start (npgpt.perf.
    shared_cpu_threads), made after the load average has settled near `target`; prints both."""
    from npgpt.perf import shared_cpu_threads

    load, waited, settled = settle_load(target, limit, procs)
    with shared_cpu_threads() as (n, why):
        print(f"  {label}: load average {load:.2f} after {waited:.0f} s (target {target:.2f}"
              f"{'' if settled else f', not reached within --settle {limit} s: the choice may differ from a settled one'}"
              f"); npgpt threads: {n if n is not None else 'as they are'} ({why})")
        yield n


# ---- one size, one family: both sides' training steps ------------------------------------------
def compare(size, family="gpt", threads=2, iters=None, rnd=5, warmup=1, rss=True, replicas=2, compete=0,
            settle=120, start_load=0.0):
    from npgpt.bench import TrainStep, blas_threads
    from npgpt.errors import NpgptError
    from npgpt.llama import Llama
    from npgpt.model import GPT

    preset, B, T, default_iters = SIZES[size]
    iters = iters or default_iters
    ours = TrainStep(preset, {"arch": family}, batch_size=B, block_size=T)
    expected = Llama if family == "llama" else GPT
    if type(ours.model) is not expected:      # the step must run the family asked for
        raise NpgptError(f"--family {family}: npgpt built a {type(ours.model).__name__}, not a {expected.__name__}")
    reps = TrainStep(preset, {"arch": family}, batch_size=B, block_size=T, replicas=replicas) if replicas > 1 else None
    batches = [tuple(np.asarray(a) for a in b) for b in ours.batches]
    theirs = TorchStep(ours.config, batches)
    n_ours = sum(p.size for p in ours.model.parameters())
    n_theirs = sum(p.numel() for p in theirs.model.parameters())
    if n_ours != n_theirs:
        raise NpgptError(f"parameter counts differ: npgpt {n_ours:,}, torch {n_theirs:,}")

    cfg = ours.config
    shape = (f"{cfg.n_layer} layers, {cfg.n_head} heads ({cfg.n_kv_head} key/value), n_embd {cfg.n_embd}, "
             f"SwiGLU width {cfg.n_inner}, rope theta {cfg.rope_theta:g}, rms eps {cfg.rms_norm_eps:g}, "
             f"tied embeddings {cfg.tie_word_embeddings}" if family == "llama" else
             f"{cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}")
    print(f"{size} ({family}): {shape}, vocab {cfg.vocab_size}, batch {B} x block {T}, dropout 0")
    print(f"parameters: npgpt {type(ours.model).__name__} {n_ours:,}, pytorch {n_theirs:,} (equal)")
    print(f"pytorch side: {theirs.about}")
    print(f"threads: torch {torch.get_num_threads()} (torch {torch.__version__}), "
          f"numpy BLAS {blas_threads()} (numpy {np.__version__})")
    sides = {"torch": theirs, "npgpt": ours, **({"replicas": reps} if reps else {})}

    def warm(steps):
        for i in range(warmup):
            for step in steps.values():
                step(i)

    if compete:
        print(f"quiet rounds first, then the same rounds beside {compete} competing process(es):")
        with npgpt_threads("quiet", start_load, settle) as quiet_threads:
            warm(sides)
            t = time_rounds(sides, iters, rnd)
    else:
        warm(sides)
        t = time_rounds(sides, iters, rnd)
    if reps:
        reps.close()                    # the replicas' thread pool
    if compete:
        with competitors(compete) as procs:
            with npgpt_threads(f"{compete} competing", start_load + compete, settle, procs) as busy_threads:
                contended = {"torch": theirs, "npgpt": ours}
                warm(contended)
                tc = time_rounds(contended, iters, rnd)
                check_alive(procs)          # they ran the whole time
            load_after = os.getloadavg()[0]

    ms_theirs, ms_ours = statistics.median(t["torch"]) * 1e3, statistics.median(t["npgpt"]) * 1e3
    print(f"{iters} iterations each, alternating in rounds of {rnd}, after {warmup} warm-up"
          f"{'' if compete else f'; load average {os.getloadavg()[0]:.2f}'}")
    print(f"{theirs.label:14s} ms/iter median {ms_theirs:9.2f}  min {min(t['torch']) * 1e3:9.2f}")
    print(f"{'npgpt':14s} ms/iter median {ms_ours:9.2f}  min {min(t['npgpt']) * 1e3:9.2f}")
    print(f"npgpt / pytorch = {ms_ours / ms_theirs:.2f}  ({'npgpt faster' if ms_ours < ms_theirs else 'pytorch faster'})")
    from npgpt.perf import gemm_peak_gflops
    peak = gemm_peak_gflops()
    gflops = ours.flops_per_iter / (ms_ours / 1e3) / 1e9
    print(f"npgpt {B * T / (ms_ours / 1e3):,.0f} tokens/s, {gflops:.1f} GFLOP/s, MFU {gflops / peak:.1%} of the "
          f"fp32 GEMM peak measured now ({peak:.1f} GFLOP/s)")
    row = {"size": size, "family": family, "ms_torch": ms_theirs, "ms_npgpt": ms_ours, "ratio": ms_ours / ms_theirs,
           "mfu": gflops / peak, "tokens_per_s": B * T / (ms_ours / 1e3), "flops_per_iter": ours.flops_per_iter,
           "params": n_ours}
    if reps:
        ms_reps = statistics.median(t["replicas"]) * 1e3
        print(f"npgpt {replicas} replicas ms/iter median {ms_reps:9.2f}  min {min(t['replicas']) * 1e3:9.2f}   "
              f"/ pytorch = {ms_reps / ms_theirs:.2f}  (min / min {min(t['replicas']) / min(t['torch']):.2f}), MFU "
              f"{ours.flops_per_iter / (ms_reps / 1e3) / 1e9 / peak:.1%}")
        row.update(ms_replicas=ms_reps, ratio_replicas=ms_reps / ms_theirs)
    if compete:
        cm_theirs, cm_ours = statistics.median(tc["torch"]) * 1e3, statistics.median(tc["npgpt"]) * 1e3
        s_theirs, s_ours = cm_theirs / ms_theirs, cm_ours / ms_ours
        print(f"shared CPU, {compete} competing process(es) (single-threaded NumPy matmul loops); load average "
              f"{load_after:.2f} at the end; medians:")
        print(f"  {'':14s} {'quiet ms':>10s} {'contended ms':>13s} {'slowdown':>9s}  npgpt threads quiet / contended: "
              f"{quiet_threads} / {busy_threads}")
        print(f"  {'pytorch':14s} {ms_theirs:10.2f} {cm_theirs:13.2f} {s_theirs:8.2f}x")
        print(f"  {'npgpt':14s} {ms_ours:10.2f} {cm_ours:13.2f} {s_ours:8.2f}x")
        print(f"  npgpt slowdown / pytorch slowdown = {s_ours / s_theirs:.2f}  "
              f"({'npgpt degrades no more' if s_ours <= s_theirs else 'npgpt degrades more'}); "
              f"contended npgpt / pytorch = {cm_ours / cm_theirs:.2f}")
        row.update(compete=compete, ms_torch_contended=cm_theirs, ms_npgpt_contended=cm_ours, slowdown_torch=s_theirs,
                   slowdown_npgpt=s_ours, slowdown_ratio=s_ours / s_theirs, threads_quiet=quiet_threads,
                   threads_contended=busy_threads)
    del ours, theirs
    reps = None
    if rss:
        (tb, tp), (nb, npk) = rss_of("torch", size, family, threads), rss_of("npgpt", size, family, threads)
        print(f"peak RSS of 2 steps (own process): pytorch {tp / 1024:7.0f} MiB (step adds {(tp - tb) / 1024:.0f}), "
              f"npgpt {npk / 1024:7.0f} MiB (step adds {(npk - nb) / 1024:.0f});  npgpt / pytorch = {npk / tp:.2f}")
        row.update(rss_torch_mib=tp / 1024, rss_npgpt_mib=npk / 1024, rss_step_torch_mib=(tp - tb) / 1024,
                   rss_step_npgpt_mib=(npk - nb) / 1024)
        if replicas > 1:
            rb, rp = rss_of("replicas", size, family, threads)
            print(f"  npgpt with 2 replicas: {rp / 1024:7.0f} MiB (step adds {(rp - rb) / 1024:.0f});  / pytorch = {rp / tp:.2f}")
            row.update(rss_replicas_mib=rp / 1024)
    return row


# ---- decoding: npgpt's generate against transformers' generate (KV cache, greedy) ----------------
def decode_compare(threads, new_tokens=32, prompt_len=8, prefill_len=256, repeats=3):
    """Greedy decoding tokens/s on a randomly initialised GPT-2 124M shape: batch 1, batch 8, a
    prefill of `prefill_len` tokens, and npgpt's int8 model (blocked dequantisation and, for the
    'before' figure, the dequantise-then-multiply reference). Sides alternate, best of `repeats`."""
    import tempfile

    from npgpt import layers as Q
    from npgpt.generate import generate
    from npgpt.loading import from_pretrained
    from npgpt.quant import save_quantized
    from npgpt.model import GPT, GPTConfig
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        GPT2LMHeadModel = None
        print("transformers is not installed: npgpt's figures only")

    cfg = GPTConfig.preset("gpt2")
    model = GPT(cfg, seed=0)
    model.eval()
    rng = np.random.default_rng(0)
    prompt1 = rng.integers(0, cfg.vocab_size, (1, prompt_len))
    prompt8 = rng.integers(0, cfg.vocab_size, (8, prompt_len))
    long = rng.integers(0, cfg.vocab_size, (1, prefill_len))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp).eval() if GPT2LMHeadModel else None
        save_quantized(model, tmp + "/q8", bits=8)
        q8 = from_pretrained(tmp + "/q8")

    def ours(m, ids, n):
        return lambda: generate(m, ids.tolist(), n, temperature=0)

    def theirs(ids, n):
        x = torch.from_numpy(ids).long()
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                  attention_mask=torch.ones_like(x))
        return lambda: hf.generate(x, **kw)

    reference_forward = Q.QuantizedLinear.forward

    def q8_reference():
        Q.QuantizedLinear.forward = Q.QuantizedLinear.forward_reference
        try:
            generate(q8, prompt1.tolist(), new_tokens, temperature=0)
        finally:
            Q.QuantizedLinear.forward = reference_forward

    cases = [  # (label, tokens counted per call, {side: callable})
        (f"batch 1, {new_tokens} new tokens", new_tokens,
         {"npgpt": ours(model, prompt1, new_tokens), "npgpt int8": ours(q8, prompt1, new_tokens),
          "npgpt int8 (dequantise whole weight)": q8_reference,
          **({"transformers": theirs(prompt1, new_tokens)} if hf else {})}),
        (f"batch 8, {new_tokens} new tokens each", 8 * new_tokens,
         {"npgpt": ours(model, prompt8, new_tokens), **({"transformers": theirs(prompt8, new_tokens)} if hf else {})}),
        (f"prefill: prompt of {prefill_len} tokens (+1 new)", prefill_len,
         {"npgpt": ours(model, long, 1), **({"transformers": theirs(long, 1)} if hf else {})}),
    ]
    print(f"decoding, GPT-2 124M shape (random weights), greedy, KV cache, {threads} threads, best of {repeats}")
    with torch.inference_mode():
        for label, n_tok, sides in cases:
            best = {k: float("inf") for k in sides}
            for f in sides.values():
                f()                                               # warm-up
            for _ in range(repeats):
                for k, f in sides.items():
                    best[k] = min(best[k], timed(lambda i: f(), 0))
            rates = {k: n_tok / v for k, v in best.items()}
            print(f"  {label}:  " + ",  ".join(f"{k} {v:,.1f} tokens/s" for k, v in rates.items()))
            if "transformers" in rates:
                print(f"    npgpt / transformers = {rates['npgpt'] / rates['transformers']:.2f}x")
            if "npgpt int8" in rates:
                print(f"    int8 / float32 = {rates['npgpt int8'] / rates['npgpt']:.2f}  "
                      f"(dequantise-whole-weight reference: "
                      f"{rates['npgpt int8 (dequantise whole weight)'] / rates['npgpt']:.2f})")

    def weight_bytes(m):
        n = sum(p.data.nbytes for p in m.parameters())
        n += sum(lin.qweight.nbytes + lin.scales.nbytes for _, _, _, lin in Q.linear_layers(m)
                 if isinstance(lin, Q.QuantizedLinear))
        return n
    fb, qb = weight_bytes(model), weight_bytes(q8)
    lin_f = sum(lin.weight.data.nbytes for _, _, _, lin in Q.linear_layers(model))
    lin_q = sum(lin.qweight.nbytes + lin.scales.nbytes for _, _, _, lin in Q.linear_layers(q8))
    print(f"  resident weights: float32 {fb / 2**20:.0f} MiB, int8 {qb / 2**20:.0f} MiB ({fb / qb:.2f}x less); "
          f"the blocks' linear layers alone {lin_f / 2**20:.0f} -> {lin_q / 2**20:.0f} MiB ({lin_f / lin_q:.2f}x); "
          f"the tied embedding / LM head stays float32")


def main():
    start_load = os.getloadavg()[0]      # before this script loads the CPU: what --compete's choices compare with
    from npgpt.programs import non_negative_int, positive_int   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="baby", choices=[*SIZES, "all"],
                    help="baby (4/4/128, T 64, B 12), shakespeare-char (6/6/384, T 256, B 64), "
                         "gpt2 (12/12/768, T 256, B 4, vocab 50257) or all three")
    ap.add_argument("--family", default="gpt", choices=FAMILIES,
                    help="gpt: GPT-2 against a nanoGPT-style twin; llama: npgpt's Llama of the same sizes "
                         "(--set arch=llama) against transformers' LlamaForCausalLM (SDPA attention)")
    ap.add_argument("--iters", type=positive_int, default=None, help="timed iterations per side (default per size)")
    ap.add_argument("--round", type=positive_int, default=5, help="iterations per side per round")
    ap.add_argument("--warmup", type=non_negative_int, default=1)
    ap.add_argument("--threads", type=positive_int, default=2, help="torch threads (numpy's BLAS: OPENBLAS_NUM_THREADS)")
    ap.add_argument("--replicas", type=positive_int, default=2,
                    help="also time npgpt with the batch split over this many threads (1: skip)")
    ap.add_argument("--compete", type=non_negative_int, default=0,
                    help="then time both sides again beside this many CPU-bound processes (single-threaded "
                         "NumPy matmul loops) and report each side's slowdown; npgpt picks its threads as "
                         "`npgpt train` does (0: no competition)")
    ap.add_argument("--settle", type=non_negative_int, default=120,
                    help="--compete: the longest wait, in seconds, for the 1-minute load average to show the "
                         "competitors (or their absence) before npgpt picks its threads")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--decode", action="store_true",
                    help="compare greedy decoding with transformers' generate instead (GPT-2 124M shape)")
    ap.add_argument("--new-tokens", type=int, default=32, help="--decode: new tokens per prompt")
    ap.add_argument("--rss-of", choices=["torch", "npgpt", "replicas"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.decode and (args.compete or args.family != "gpt"):
        ap.error("--decode compares GPT-2 decoding only: drop --compete and --family")
    if torch is None:
        print("PyTorch is not installed: nothing to compare against (npgpt itself never needs it). "
              "Run this script with a Python that has torch (pip install torch in a separate venv).")
        return 0
    if args.family == "llama":
        try:
            import transformers  # noqa: F401  (the Llama baseline is transformers' LlamaForCausalLM)
        except ImportError:
            print("transformers is not installed: no Llama to compare against (pip install transformers "
                  "beside torch); --family gpt needs torch only.")
            return 0
    torch.set_num_threads(args.threads)
    if args.rss_of:
        measure_rss(args.rss_of, args.size, args.family, args.threads)
        return 0
    if args.decode:
        decode_compare(args.threads, new_tokens=args.new_tokens)
        return 0
    rows = [compare(s, args.family, args.threads, args.iters, args.round, args.warmup, rss=not args.no_rss,
                    replicas=args.replicas, compete=args.compete, settle=args.settle, start_load=start_load)
            for s in (SIZES if args.size == "all" else [args.size])]
    if len(rows) > 1:
        print("size             family  npgpt ms  pytorch ms  ratio  tokens/s    MFU  RSS npgpt  RSS pytorch (MiB)"
              + ("  slowdown npgpt  pytorch  ratio" if args.compete else ""))
        for r in rows:
            print(f"{r['size']:16s} {r['family']:6s} {r['ms_npgpt']:9.1f} {r['ms_torch']:11.1f} {r['ratio']:6.2f} "
                  f"{r['tokens_per_s']:9.0f} {r['mfu']:6.1%} {r.get('rss_npgpt_mib', 0):10.0f} "
                  f"{r.get('rss_torch_mib', 0):12.0f}"
                  + (f" {r['slowdown_npgpt']:14.2f}x {r['slowdown_torch']:7.2f}x {r['slowdown_ratio']:6.2f}"
                     if args.compete else ""))
    return 0


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
