"""npgpt against PyTorch eager on the CPU: the same GPT-2 training step, timed side by side.

    python examples/torch_compare.py                          # baby: 4/4/128, T 64, B 12
    python examples/torch_compare.py --size shakespeare-char  # 6/6/384, T 256, B 64
    python examples/torch_compare.py --size gpt2              # GPT-2 124M: 12/12/768, T 256, B 4
    python examples/torch_compare.py --size all               # the three, and a summary table
    python examples/torch_compare.py --decode                 # decoding against transformers' generate

The PyTorch model below is a nanoGPT-style GPT-2 written to match npgpt's exactly: learned
position embeddings, pre-LN blocks, GELU (tanh form), biases, tied LM head, dropout 0, causal
attention via F.scaled_dot_product_attention (what nanoGPT uses). Both sides run the same
iteration on the same shapes: zero_grad, forward with cross-entropy loss, backward,
clip_grad_norm(1.0), AdamW(lr 6e-4, betas (0.9, 0.95), weight decay 0.1 on >= 2-D tensors).

They alternate in rounds (a few torch iterations, then a few npgpt ones, repeated) inside one
process, so a noisy neighbour slows both alike; the reported figure is each side's median.
Both sides use 2 threads by default (--threads for torch; numpy's BLAS takes OPENBLAS_NUM_THREADS).
Peak memory: each side then runs two steps alone in a fresh process, which reports its resident
memory (VmRSS) before the first step and its peak (VmHWM).
PyTorch is not a dependency of npgpt: without it this script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

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


class TorchStep:
    def __init__(self, cfg, batches, lr=6e-4):
        torch.manual_seed(0)
        self.model = torch_gpt(cfg)
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


# The three sizes the speed issue targets: (npgpt preset, batch, block size, timed iterations).
SIZES = {
    "baby": ("baby", 12, 64, 30),
    "shakespeare-char": ("shakespeare-char", 64, 256, 3),
    "gpt2": ("gpt2", 4, 256, 3),
}


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


def measure_rss(side, size, threads, steps=2):
    """Run in a fresh process: build one side's model, optimizer and batches, run `steps` training
    steps, print 'RSS <before> <peak>' in KiB (resident memory before the first step and the peak)."""
    from npgpt.bench import TrainStep, make_config

    torch.set_num_threads(threads)
    preset, B, T, _ = SIZES[size]
    if side == "torch":   # the same batches as TrainStep draws, without building npgpt's model
        cfg = make_config(preset, block_size=T)
        rng = np.random.default_rng(0)
        step = TorchStep(cfg, [tuple(rng.integers(0, cfg.vocab_size, (B, T)) for _ in "xy") for _ in range(8)])
    else:
        step = TrainStep(preset, batch_size=B, block_size=T, replicas=2 if side == "replicas" else 1)
    before = rss_kib()
    for i in range(steps):
        step(i)
    print(f"RSS {before} {rss_kib('VmHWM')}")
    if side != "torch":
        step.close()                    # the replicas' thread pool


def rss_of(side, size, threads):
    """(before, peak) resident KiB of one side's training steps, each side in its own process
    so neither's memory counts against the other."""
    import subprocess
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-of", side, "--size", size,
                          "--threads", str(threads)], capture_output=True, text=True, check=True).stdout
    before, peak = out.split("RSS ")[-1].split()[:2]
    return int(before), int(peak)


def compare(size, threads, iters, rnd, warmup, rss=True, replicas=2):
    from npgpt.bench import TrainStep, blas_threads

    preset, B, T, default_iters = SIZES[size]
    iters = iters or default_iters
    ours = TrainStep(preset, batch_size=B, block_size=T)
    reps = TrainStep(preset, batch_size=B, block_size=T, replicas=replicas) if replicas > 1 else None
    batches = [tuple(np.asarray(a) for a in b) for b in ours.batches]
    theirs = TorchStep(ours.config, batches)
    n_ours = sum(p.size for p in ours.model.parameters())
    n_theirs = sum(p.numel() for p in theirs.model.parameters())
    assert n_ours == n_theirs, f"parameter counts differ: npgpt {n_ours}, torch {n_theirs}"

    for i in range(warmup):
        theirs(i)
        ours(i)
        if reps:
            reps(i)
    t_theirs, t_ours, t_reps = [], [], []
    i = 0
    while len(t_ours) < iters:
        n = min(rnd, iters - len(t_ours))
        t_theirs += [timed(theirs, i + j) for j in range(n)]
        t_ours += [timed(ours, i + j) for j in range(n)]
        if reps:
            t_reps += [timed(reps, i + j) for j in range(n)]
        i += n
    if reps:
        reps.close()                    # the replicas' thread pool

    cfg = ours.config
    ms_theirs, ms_ours = statistics.median(t_theirs) * 1e3, statistics.median(t_ours) * 1e3
    print(f"{size}: {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, "
          f"batch {B} x block {T}, {n_ours:,} parameters, dropout 0")
    print(f"threads: torch {torch.get_num_threads()} (torch {torch.__version__}), "
          f"numpy BLAS {blas_threads()} (numpy {np.__version__})")
    print(f"{iters} iterations each, alternating in rounds of {rnd}, after {warmup} warm-up")
    print(f"pytorch eager  ms/iter median {ms_theirs:9.2f}  min {min(t_theirs) * 1e3:9.2f}")
    print(f"npgpt          ms/iter median {ms_ours:9.2f}  min {min(t_ours) * 1e3:9.2f}")
    print(f"npgpt / pytorch = {ms_ours / ms_theirs:.2f}  ({'npgpt faster' if ms_ours < ms_theirs else 'pytorch faster'})")
    from npgpt.perf import gemm_peak_gflops
    peak = gemm_peak_gflops()
    gflops = ours.flops_per_iter / (ms_ours / 1e3) / 1e9
    print(f"npgpt {B * T / (ms_ours / 1e3):,.0f} tokens/s, {gflops:.1f} GFLOP/s, MFU {gflops / peak:.1%} of the "
          f"fp32 GEMM peak measured now ({peak:.1f} GFLOP/s)")
    if reps:
        ms_reps = statistics.median(t_reps) * 1e3
        print(f"npgpt {replicas} replicas ms/iter median {ms_reps:9.2f}  min {min(t_reps) * 1e3:9.2f}   "
              f"/ pytorch = {ms_reps / ms_theirs:.2f}  (min / min {min(t_reps) / min(t_theirs):.2f}), MFU "
              f"{ours.flops_per_iter / (ms_reps / 1e3) / 1e9 / peak:.1%}")
    row = {"size": size, "ms_torch": ms_theirs, "ms_npgpt": ms_ours, "ratio": ms_ours / ms_theirs, "mfu": gflops / peak,
           "tokens_per_s": B * T / (ms_ours / 1e3), "flops_per_iter": ours.flops_per_iter}
    if reps:
        row.update(ms_replicas=ms_reps, ratio_replicas=ms_reps / ms_theirs)
    del ours, theirs
    reps = None
    if rss:
        (tb, tp), (nb, npk) = rss_of("torch", size, threads), rss_of("npgpt", size, threads)
        print(f"peak RSS of 2 steps (own process): pytorch {tp / 1024:7.0f} MiB (step adds {(tp - tb) / 1024:.0f}), "
              f"npgpt {npk / 1024:7.0f} MiB (step adds {(npk - nb) / 1024:.0f});  npgpt / pytorch = {npk / tp:.2f}")
        row.update(rss_torch_mib=tp / 1024, rss_npgpt_mib=npk / 1024, rss_step_torch_mib=(tp - tb) / 1024,
                   rss_step_npgpt_mib=(npk - nb) / 1024)
        if reps is not None or replicas > 1:
            rb, rp = rss_of("replicas", size, threads)
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
    from npgpt.programs import non_negative_int, positive_int   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="baby", choices=[*SIZES, "all"],
                    help="baby (4/4/128, T 64, B 12), shakespeare-char (6/6/384, T 256, B 64), "
                         "gpt2 (12/12/768, T 256, B 4, vocab 50257) or all three")
    ap.add_argument("--iters", type=positive_int, default=None, help="timed iterations per side (default per size)")
    ap.add_argument("--round", type=int, default=5, help="iterations per side per round")
    ap.add_argument("--warmup", type=non_negative_int, default=1)
    ap.add_argument("--threads", type=positive_int, default=2, help="torch threads (numpy's BLAS: OPENBLAS_NUM_THREADS)")
    ap.add_argument("--replicas", type=positive_int, default=2,
                    help="also time npgpt with the batch split over this many threads (1: skip)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--decode", action="store_true",
                    help="compare greedy decoding with transformers' generate instead (GPT-2 124M shape)")
    ap.add_argument("--new-tokens", type=int, default=32, help="--decode: new tokens per prompt")
    ap.add_argument("--rss-of", choices=["torch", "npgpt", "replicas"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if torch is None:
        print("PyTorch is not installed: nothing to compare against (npgpt itself never needs it). "
              "Run this script with a Python that has torch (pip install torch in a separate venv).")
        return 0
    torch.set_num_threads(args.threads)
    if args.rss_of:
        measure_rss(args.rss_of, args.size, args.threads)
        return 0
    if args.decode:
        decode_compare(args.threads, new_tokens=args.new_tokens)
        return 0
    rows = [compare(s, args.threads, args.iters, args.round, args.warmup, rss=not args.no_rss,
                    replicas=args.replicas)
            for s in (SIZES if args.size == "all" else [args.size])]
    if len(rows) > 1:
        print("size              npgpt ms  pytorch ms  ratio  tokens/s    MFU  RSS npgpt  RSS pytorch (MiB)")
        for r in rows:
            print(f"{r['size']:16s} {r['ms_npgpt']:9.1f} {r['ms_torch']:11.1f} {r['ratio']:6.2f} "
                  f"{r['tokens_per_s']:9.0f} {r['mfu']:6.1%} {r.get('rss_npgpt_mib', 0):10.0f} "
                  f"{r.get('rss_torch_mib', 0):12.0f}")
    return 0


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
