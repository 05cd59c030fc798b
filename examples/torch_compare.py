"""npgpt against PyTorch eager on the CPU: the same GPT-2 training step, timed side by side.

    python examples/torch_compare.py                          # baby preset, batch 12
    python examples/torch_compare.py --preset shakespeare-char --batch-size 64 --iters 5

The PyTorch model below is a nanoGPT-style GPT-2 written to match npgpt's exactly: learned
position embeddings, pre-LN blocks, GELU (tanh form), biases, tied LM head, dropout 0, causal
attention via F.scaled_dot_product_attention (what nanoGPT uses). Both sides run the same
iteration on the same shapes: zero_grad, forward with cross-entropy loss, backward,
clip_grad_norm(1.0), AdamW(lr 6e-4, betas (0.9, 0.95), weight decay 0.1 on >= 2-D tensors).

They alternate in rounds (a few torch iterations, then a few npgpt ones, repeated) inside one
process, so a noisy neighbour slows both alike; the reported figure is each side's median.
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


def main():
    if torch is None:
        print("PyTorch is not installed: nothing to compare against (npgpt itself never needs it). "
              "Run this script with a Python that has torch, e.g. /tmp/tvenv/bin/python.")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="baby")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--iters", type=int, default=30, help="timed iterations per side")
    ap.add_argument("--round", type=int, default=5, help="iterations per side per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    args = ap.parse_args()

    from npgpt.bench import TrainStep, blas_threads

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    ours = TrainStep(args.preset, batch_size=args.batch_size)
    batches = [tuple(np.asarray(a) for a in b) for b in ours.batches]
    theirs = TorchStep(ours.config, batches)
    n_ours = sum(p.size for p in ours.model.parameters())
    n_theirs = sum(p.numel() for p in theirs.model.parameters())
    assert n_ours == n_theirs, f"parameter counts differ: npgpt {n_ours}, torch {n_theirs}"

    for i in range(args.warmup):
        theirs(i)
        ours(i)
    t_theirs, t_ours = [], []
    i = 0
    while len(t_ours) < args.iters:
        n = min(args.round, args.iters - len(t_ours))
        t_theirs += [timed(theirs, i + j) for j in range(n)]
        t_ours += [timed(ours, i + j) for j in range(n)]
        i += n

    cfg = ours.config
    ms_theirs, ms_ours = statistics.median(t_theirs) * 1e3, statistics.median(t_ours) * 1e3
    print(f"{args.preset}: {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, "
          f"batch {args.batch_size} x block {cfg.block_size}, {n_ours:,} parameters, dropout 0")
    print(f"threads: torch {torch.get_num_threads()} (torch {torch.__version__}), "
          f"numpy BLAS {blas_threads()} (numpy {np.__version__})")
    print(f"{args.iters} iterations each, alternating in rounds of {args.round}, after {args.warmup} warm-up")
    print(f"pytorch eager  ms/iter median {ms_theirs:8.2f}  min {min(t_theirs) * 1e3:8.2f}")
    print(f"npgpt          ms/iter median {ms_ours:8.2f}  min {min(t_ours) * 1e3:8.2f}")
    print(f"npgpt / pytorch = {ms_ours / ms_theirs:.2f}  ({'npgpt faster' if ms_ours < ms_theirs else 'pytorch faster'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
