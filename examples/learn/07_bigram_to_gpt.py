"""Lesson 07: the ladder from a bigram to the GPT, one part at a time, with the loss of each rung.

    python examples/learn/07_bigram_to_gpt.py [--text tinyshakespeare/input.txt] [--fast] [--out DIR]

Every rung is trained with the same recipe (AdamW, warmup + cosine, the same batches, the same
number of steps) at each learning rate of a small sweep (SWEEP: 3e-3, 1e-2, 3e-2; the bigram table
alone at 0.1); the run with the lowest loss on the first half of the held-out text (the last 10%:
"dev") is kept, and the table scores it on the other half ("test"), every window of it, in nats per
character. The sweep is part of the lesson: one learning rate for every rung suits some and starves
others, and a part can only show what it buys once its rung is trained about as well as it can be.

  uniform          every character equally likely: ln V (lesson 04). Not trained.
  bigram counts    P(next | current) from counting pairs (add-0.1 smoothing). Not trained: the
                   floor every one-character-of-context model can reach.
  1. bigram        a (V, V) table of logits, row x = the scores of every next character after x.
                   Trained by gradient descent, it learns the counts (the optimum of the
                   log-likelihood IS the normalised counts).
  2. + one head    the bigram's logits plus a correction from one causal self-attention head:
                   token embeddings (V, C), the head, a linear map (C, V) added to the table's row
                   (rungs 2-4 start from rung 1's trained table and learn the correction).
                   Each position can now read every earlier character, as a weighted average of
                   their values (no order: positions come at rung 7).
  3. multi-head    4 heads of C/4 each, then c_proj: several things looked up at once (the
                   previous character, the start of the word, ...) for the same cost.
  4. + MLP         after attention, a per-position MLP (C -> 4C -> GELU -> C): computation on
                   what attention gathered.
  5. + residual    x = wte[idx];  x = x + attn(x);  x = x + mlp(x);  logits = x @ lm_head. The
                   bigram table retires: the residual stream itself carries the current character
                   past the branches to the head (the table was a shortcut doing that one job),
                   and gradients reach the embeddings through the identity.
  6. + LayerNorm   pre-LN (x + attn(ln_1(x)), x + mlp(ln_2(x))) and a final ln_f: every branch
                   and the head see unit-variance inputs whatever the stream's scale.
  7. + positional  learned position embeddings wpe added to the token embeddings: attention
                   can now tell "the previous character" from "a character 10 back".
  8. GPT           npgpt's GPT: rung 7 with 2 blocks and the output head tied to wte (the
                   lesson checks that the ladder's code with every part switched on, 2 blocks and
                   a tied head computes exactly what npgpt.GPT computes, from the same seed).

Read the table as the lesson: which parts buy the most loss. What it shows on tiny Shakespeare
(README has the numbers): attention over the past beats the bigram, and several heads beat one.
The MLP and the residual each buy a little (about 0.01 nats each): without position embeddings an
attention layer sees the past as an unordered bag of characters (its weights depend on content
only), and no per-position computation can recover an order that was never given to it.
LayerNorm buys a little more at its best rate; the position embedding gives by far the largest
step (order), and the second block of the GPT (rung 8) builds on it. The ladder adds the parts in
the order a GPT-2 block is usually explained, not in the order that would make each pay off most.

Why the sweep: at one learning rate for all (3e-3, an earlier version of this lesson) the MLP and
the residual rungs came out 0.003-0.004 behind the rung before, because they were undertrained
there, not because they do nothing; and scored on 8,192 sampled positions, two samples disagreed
by 0.02 nats, more than some steps of the ladder. So each rung gets its best rate of the sweep,
chosen on text it is not scored on, and the table scores every held-out window.

The full run checks: the trained bigram reaches the counts, and every rung beats the one before on
the test windows. Fast mode (CI) trains each rung a few steps at two rates and checks only that
each learns and that the top rung is npgpt's GPT.

Read next: npgpt/model.py (Block, GPT), which is rung 8.
"""

import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, corpus, parse, picture, title, train_lm  # noqa: E402

from npgpt import GPT, GPTConfig  # noqa: E402
from npgpt.model import MLP, CausalSelfAttention  # noqa: E402
from npgpt.nn import Embedding, LayerNorm, Linear, Module, ModuleList  # noqa: E402
from npgpt.ops.nn import cross_entropy, linear  # noqa: E402
from npgpt.programs import need_tokens  # noqa: E402
from npgpt.tensor import no_grad  # noqa: E402

# name -> which parts are on; every rung adds one part to the rung above it
RUNGS = {
    "1. bigram": dict(bigram=True),
    "2. + one head": dict(bigram=True, n_head=1),
    "3. multi-head": dict(bigram=True, n_head=4),
    "4. + MLP": dict(bigram=True, n_head=4, mlp=True),
    "5. + residual": dict(n_head=4, mlp=True, residual=True),
    "6. + LayerNorm": dict(n_head=4, mlp=True, residual=True, layernorm=True),
    "7. + positional": dict(n_head=4, mlp=True, residual=True, layernorm=True, positional=True),
}


class RungBlock(Module):
    """One block with parts switched on or off; all on = npgpt.model.Block."""

    def __init__(self, cfg, rng, resid_std, mlp, residual, layernorm):
        self.ln_1 = LayerNorm(cfg.n_embd) if layernorm else None
        self.attn = CausalSelfAttention(cfg, rng, resid_std)
        self.ln_2 = LayerNorm(cfg.n_embd) if layernorm and mlp else None
        self.mlp = MLP(cfg, rng, resid_std) if mlp else None
        self.residual = residual

    def forward(self, x):                                        # (B, T, C) -> (B, T, C)
        a = self.attn(self.ln_1(x) if self.ln_1 else x)
        x = x + a if self.residual else a
        if self.mlp:
            m = self.mlp(self.ln_2(x) if self.ln_2 else x)
            x = x + m if self.residual else m
        return x


class Rung(Module):
    """A rung of the ladder: a GPT with parts switched off (weights drawn in GPT's order, so the
    all-on rung with tied=True is npgpt.GPT from the same seed)."""

    def __init__(self, V, block, C, n_head=0, bigram=False, mlp=False, residual=False, layernorm=False,
                 positional=False, n_layer=1, tied=False, seed=0):
        rng = np.random.default_rng(seed)
        self.bigram = Embedding(V, V, rng=rng) if bigram else None     # (V, V): logits after each token
        if not n_head:
            return
        cfg = GPTConfig(vocab_size=V, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=C)
        resid_std = 0.02 / math.sqrt(2 * n_layer)
        self.wte = Embedding(V, C, rng=rng)
        self.wpe = Embedding(block, C, rng=rng) if positional else None
        self.h = ModuleList(RungBlock(cfg, rng, resid_std, mlp, residual, layernorm) for _ in range(n_layer))
        self.ln_f = LayerNorm(C) if layernorm else None
        self.lm_head = None if tied else Linear(C, V, bias=False, rng=rng)

    def forward(self, idx, targets=None):                        # (B, T) ids -> (B, T, V) logits, loss
        logits = self.bigram(idx) if self.bigram else None       # the row of the current character
        if getattr(self, "h", None):
            x = self.wte(idx)                                    # (B, T, C)
            if self.wpe:
                x = x + self.wpe.weight[:idx.shape[1]]
            for blk in self.h:
                x = blk(x)
            if self.ln_f:
                x = self.ln_f(x)
            head = self.lm_head(x) if self.lm_head else linear(x, self.wte.weight.T)
            logits = head if logits is None else logits + head
        return logits, (cross_entropy(logits, targets) if targets is not None else None)

    def num_params(self):
        return sum(p.size for p in self.parameters())


def windows(ids, block, limit=None):
    """Consecutive non-overlapping windows of `ids` (at most `limit`): (x, y), each (n, block)."""
    n = (len(ids) - 1) // block if limit is None else min(limit, (len(ids) - 1) // block)
    x = np.stack([ids[i * block:(i + 1) * block] for i in range(n)])
    return x, np.stack([ids[i * block + 1:(i + 1) * block + 1] for i in range(n)])


def top_rung_is_gpt(V, block, C):
    """The ladder's code, every part on, 2 blocks, tied head == npgpt.GPT: same loss, same gradients."""
    x = np.random.default_rng(5).integers(0, V, (2, 16))
    y = np.roll(x, -1, 1)
    mine = Rung(V, block, C, n_head=4, mlp=True, residual=True, layernorm=True, positional=True, n_layer=2,
                tied=True, seed=3).astype(np.float64)
    gpt = GPT(GPTConfig(vocab_size=V, block_size=block, n_layer=2, n_head=4, n_embd=C), seed=3).astype(np.float64)
    l1, l2 = mine(x, y)[1], gpt(x, y)[1]
    l1.backward()
    l2.backward()
    g1 = {n: p.grad for n, p in mine.named_parameters()}
    g2 = {n.removeprefix("transformer."): p.grad for n, p in gpt.named_parameters()}
    same = set(g1) == set(g2) and all(np.allclose(g1[n], g2[n], rtol=1e-9, atol=1e-12) for n in g1)
    return abs(float(l1.data) - float(l2.data)), same


SWEEP = (3e-3, 1e-2, 3e-2)      # the learning rates every trained rung tries (the bigram table: BIGRAM_LR)
FAST_SWEEP = (3e-3, 1e-2)
BIGRAM_LR = 0.1                 # a lookup table alone has no depth: big steps are safe, and it reaches the counts


def main(argv=None):
    args = parse(argv, __doc__, corpus=True, steps=1500)
    text, name = corpus(args.text, args.fast)
    from npgpt.tokenizer import CharTokenizer
    tok = CharTokenizer.train(text)
    V = tok.vocab_size
    ids = np.array(tok.encode(text), dtype=np.int64)
    n = int(0.9 * len(ids))
    train_ids, val_ids = ids[:n], ids[n:]
    block, C = 64, (32 if args.fast else 64)
    steps = args.steps or (20 if args.fast else 1500)
    sweep = FAST_SWEEP if args.fast else SWEEP
    batch_size = 16 if args.fast else 32
    # every held-out window, in two halves: "dev" picks each rung's learning rate, "test" is the
    # table (choosing on the windows you report would flatter every rung a little). All of them,
    # not a sample: on 8,192 sampled positions two samples disagreed by 0.02 nats, more than the
    # step between some rungs
    half = len(val_ids) // 2
    need_tokens(half, block, "each half of the held-out text (the last 10%)")   # one line, not NumPy's
    dx, dy = windows(val_ids[:half], block, 16 if args.fast else None)
    vx, vy = windows(val_ids[half:], block, 16 if args.fast else None)
    print(f"corpus: {name}, {len(ids):,} characters, vocabulary {V}; width {C}; every rung {steps} steps "
          f"of batch {batch_size} x {block} at each learning rate of {', '.join(f'{lr:g}' for lr in sweep)}; "
          f"the rate is chosen on {dx.size:,} dev positions, the table scores {vx.size:,} other test positions")

    title("the top rung is npgpt's GPT")
    dl, same = top_rung_is_gpt(V, block, C)
    print(f"|loss(ladder, all parts on) - loss(npgpt.GPT)| = {dl:.1e}; gradients equal: {same}")
    check(dl < 1e-12 and same, "the ladder's code with every part on is npgpt.GPT, weight for weight")

    losses = {"uniform": math.log(V)}
    counts = np.full((V, V), 0.1)
    np.add.at(counts, (train_ids[:-1], train_ids[1:]), 1)
    losses["bigram counts"] = float(-np.log(counts / counts.sum(1, keepdims=True))[vx, vy].mean())
    curves, sizes, chosen, dev = {}, {}, {}, {}

    def held_out(model, x, y):                               # mean loss per position over all windows
        with no_grad():
            return sum(float(model(x[i:i + 64], y[i:i + 64])[1].data) * len(x[i:i + 64])
                       for i in range(0, len(x), 64)) / len(x)

    models = [(label, lambda kw=kw: Rung(V, block, C, **kw)) for label, kw in RUNGS.items()]
    models.append(("8. GPT", lambda: GPT(GPTConfig(vocab_size=V, block_size=block, n_layer=2, n_head=4, n_embd=C))))
    table = None
    for label, make in models:
        title(label)
        t0 = time.perf_counter()
        best = None
        for lr in ([BIGRAM_LR] if label == "1. bigram" else sweep):
            model = make()                                   # the same seed, batches and steps at every rate
            if table is not None and getattr(model, "bigram", None) is not None:
                model.bigram.weight.data[...] = table        # rungs 2-4 start from rung 1's table: they add to it
            curve = train_lm(model, train_ids, steps, block, batch_size=batch_size, lr=lr, log_every=0,
                             weight_decay=0.0 if label == "1. bigram" else 0.1)
            dev[label, lr] = held_out(model, dx, dy)
            print(f"  lr {lr:g}: train loss {np.mean([v for _, v in curve[-20:]]):.3f}, dev loss {dev[label, lr]:.3f}")
            if best is None or dev[label, lr] < dev[label, best[0]]:
                best = (lr, model, curve)
        chosen[label], model, curves[label] = best
        losses[label] = held_out(model, vx, vy)
        if label == "1. bigram":
            table = model.bigram.weight.data.copy()
        sizes[label] = sum(p.size for p in model.parameters())
        print(f"{sizes[label]:,} parameters, {time.perf_counter() - t0:.0f}s: lr {chosen[label]:g} chosen on dev; "
              f"test loss {losses[label]:.3f}")

    title("the ladder (nats per character on the same test windows)")
    print(f"  {'rung':18s} {'params':>8s} {'lr':>6s} {'test loss':>9s} {'vs the rung before':>19s}")
    prev = None
    for k, v in losses.items():
        trained = k not in ("uniform", "bigram counts")
        gain = f"{v - prev:+19.3f}" if trained and prev is not None else ""
        lr = f"{chosen[k]:6g}" if trained else ""
        print(f"  {k:18s} {sizes.get(k, 0):8,d} {lr:>6s} {v:9.3f} {gain}")
        prev = v if trained else prev
    rungs = [k for k in losses if k not in ("uniform", "bigram counts")]
    print("\n  the sweep (dev loss at each learning rate; * the rate kept):")
    print("  " + " " * 18 + "".join(f"{lr:>9g}" for lr in sweep))
    for k in rungs[1:]:
        print(f"  {k:18s}" + "".join(f"{dev[k, lr]:8.3f}{'*' if lr == chosen[k] else ' '}" for lr in sweep))

    def draw(fig):
        ax1, ax2, ax3 = fig.add_subplot(1, 3, 1), fig.add_subplot(1, 3, 2), fig.add_subplot(1, 3, 3)
        ax1.barh(rungs[::-1], [losses[k] for k in rungs][::-1])
        ax1.axvline(losses["bigram counts"], color="grey", ls="--", lw=0.8, label="bigram counts")
        ax1.set(xlabel="test loss (nats/char)", title="the ladder", xlim=(min(losses.values()) - 0.2, None))
        ax1.legend(fontsize=7)
        for k in rungs[1:]:
            ax2.plot(sweep, [dev[k, lr] for lr in sweep], marker="o", lw=0.9, label=k)
        ax2.set(xscale="log", xlabel="learning rate", ylabel="dev loss", title="each rung's sweep")
        ax2.legend(fontsize=6)
        for k in rungs:
            c = curves[k]
            w = max(1, len(c) // 30)
            sm = np.convolve([v for _, v in c], np.ones(w) / w, mode="valid")
            ax3.plot(sm, label=f"{k} (lr {chosen[k]:g})", lw=0.9)
        ax3.set(xlabel="step", ylabel="training loss (smoothed)", title="training curves at the chosen rates")
        ax3.legend(fontsize=6)
    picture(args.out, "07_ladder.png", draw, size=(14, 4))

    check(all(losses[k] < losses["uniform"] - 0.3 for k in rungs), "every rung learns (0.3 nats below uniform)")
    if not args.fast:
        L = losses
        check(abs(L["1. bigram"] - L["bigram counts"]) < 0.05, "the trained bigram table reaches the counts")
        for before, after in zip(rungs, rungs[1:]):
            check(L[after] < L[before], f"{after} beats {before} on the test windows")
    return {"losses": losses, "params": sizes, "lr": chosen}


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
