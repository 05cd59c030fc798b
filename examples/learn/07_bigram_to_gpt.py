"""Lesson 07: the ladder from a bigram to the GPT, one part at a time, with the loss of each rung.

    python examples/learn/07_bigram_to_gpt.py [--text tinyshakespeare/input.txt] [--fast] [--out DIR]

Every rung is trained with the same recipe (AdamW, warmup + cosine, the same batches and steps)
and scored on the same held-out windows (the last 10% of the text), in nats per character:

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
Then the MLP and the residual, added one at a time, each gain nothing measurable (within 0.01
nats). They are not useless: without position embeddings an attention layer sees the past as an
unordered bag of characters (its weights depend on content only), and no per-position
computation can recover an order that was never given to it; and without normalisation the
unit-less stream trains slowly. LayerNorm is the first of the three to pay (every branch and the
head see unit-variance inputs, and the same parts train much further in the same steps); the
position embedding (rung 7) gives order, and the second block of the GPT (rung 8) builds on it.
The ladder adds the parts in the order a GPT-2 block is usually explained, not in the order that
would make each rung pay off alone: bringing positions in with the first head would let the MLP
and the residual work on ordered context from the start (this lesson does not measure that
variant).

Measured since (README, the notes on lesson 07): the MLP and residual rungs are also
undertrained at this one learning rate (3e-3): at 1e-2 multi-head, + MLP and + residual each
lose 0.03-0.04 more, the MLP then beats multi-head by 0.009, and the residual stays within the
noise of 8,192 sampled positions. Each rung at its own learning rate, chosen on held-out text
other than the text it is scored on, is what a strict ladder needs; this lesson keeps one rate.

So the full run checks what the measurements support: the trained bigram reaches the counts;
one head beats the bigram; multi-head beats one head; the MLP and the residual stay within 0.02
nats of multi-head; LayerNorm, positions and the second block each beat the rung before. Fast
mode (CI) trains each rung a few steps and checks only that each learns and that the top rung is
npgpt's GPT.

Read next: npgpt/model.py (Block, GPT), which is rung 8.
"""

import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import batch, check, corpus, parse, picture, title, train_lm  # noqa: E402

from npgpt import GPT, GPTConfig  # noqa: E402
from npgpt.model import MLP, CausalSelfAttention  # noqa: E402
from npgpt.nn import Embedding, LayerNorm, Linear, Module, ModuleList  # noqa: E402
from npgpt.ops.nn import cross_entropy, linear  # noqa: E402
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
    steps = args.steps or (40 if args.fast else 1500)
    batch_size = 16 if args.fast else 32
    vx, vy = batch(val_ids, 16 if args.fast else 128, block, np.random.default_rng(99))   # the held-out windows
    print(f"corpus: {name}, {len(ids):,} characters, vocabulary {V}; width {C}; every rung {steps} steps "
          f"of batch {batch_size} x {block}; scoring on {vx.size:,} held-out positions")

    title("the top rung is npgpt's GPT")
    dl, same = top_rung_is_gpt(V, block, C)
    print(f"|loss(ladder, all parts on) - loss(npgpt.GPT)| = {dl:.1e}; gradients equal: {same}")
    check(dl < 1e-12 and same, "the ladder's code with every part on is npgpt.GPT, weight for weight")

    losses = {"uniform": math.log(V)}
    counts = np.full((V, V), 0.1)
    np.add.at(counts, (train_ids[:-1], train_ids[1:]), 1)
    losses["bigram counts"] = float(-np.log(counts / counts.sum(1, keepdims=True))[vx, vy].mean())
    curves, sizes = {}, {}

    def held_out(model):
        with no_grad():
            return float(np.mean([float(model(vx[i:i + 16], vy[i:i + 16])[1].data) for i in range(0, len(vx), 16)]))

    models = [(label, lambda kw=kw: Rung(V, block, C, **kw)) for label, kw in RUNGS.items()]
    models.append(("8. GPT", lambda: GPT(GPTConfig(vocab_size=V, block_size=block, n_layer=2, n_head=4, n_embd=C))))
    for label, make in models:
        title(label)
        model = make()
        if label != "1. bigram" and getattr(model, "bigram", None) is not None:
            model.bigram.weight.data[...] = table        # rungs 2-4 start from rung 1's table: they add to it
        t0 = time.perf_counter()
        lr = 0.1 if label == "1. bigram" else 3e-3           # a lookup table alone has no depth: big steps are safe
        curves[label] = train_lm(model, train_ids, steps, block, batch_size=batch_size, lr=lr,
                                 log_every=max(1, steps // 3), weight_decay=0.0 if label == "1. bigram" else 0.1)
        losses[label] = held_out(model)
        if label == "1. bigram":
            table = model.bigram.weight.data.copy()
        sizes[label] = sum(p.size for p in model.parameters())
        print(f"{sizes[label]:,} parameters, {time.perf_counter() - t0:.0f}s: held-out loss {losses[label]:.3f}")

    title("the ladder (nats per character on the same held-out windows)")
    print(f"  {'rung':18s} {'params':>8s} {'val loss':>9s} {'vs the rung before':>19s}")
    prev = None
    for k, v in losses.items():
        trained = k not in ("uniform", "bigram counts")
        gain = f"{v - prev:+19.3f}" if trained and prev is not None else ""
        print(f"  {k:18s} {sizes.get(k, 0):8,d} {v:9.3f} {gain}")
        prev = v if trained else prev

    def draw(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        names = [k for k in losses if k not in ("uniform", "bigram counts")]
        ax1.barh(names[::-1], [losses[k] for k in names][::-1])
        ax1.axvline(losses["bigram counts"], color="grey", ls="--", lw=0.8, label="bigram counts")
        ax1.set(xlabel="held-out loss (nats/char)", title="the ladder", xlim=(min(losses.values()) - 0.2, None))
        ax1.legend(fontsize=7)
        for k in names:
            c = curves[k]
            w = max(1, len(c) // 30)
            sm = np.convolve([v for _, v in c], np.ones(w) / w, mode="valid")
            ax2.plot(sm, label=k, lw=0.9)
        ax2.set(xlabel="step", ylabel="training loss (smoothed)", title="training curves")
        ax2.legend(fontsize=6)
    picture(args.out, "07_ladder.png", draw, size=(10, 4))

    rungs = [k for k in losses if k not in ("uniform", "bigram counts")]
    check(all(losses[k] < losses["uniform"] - 0.3 for k in rungs), "every rung learns (0.3 nats below uniform)")
    if not args.fast:
        L = losses
        check(abs(L["1. bigram"] - L["bigram counts"]) < 0.05, "the trained bigram table reaches the counts")
        check(L["2. + one head"] < L["1. bigram"], "one attention head over the past beats the bigram")
        check(L["3. multi-head"] < L["2. + one head"], "four heads beat one")
        plateau = [L[k] - L["3. multi-head"] for k in ("4. + MLP", "5. + residual")]
        check(max(abs(d) for d in plateau) < 0.02,
              "without positions or normalisation, the MLP and the residual each stay within 0.02 nats")
        check(L["6. + LayerNorm"] < L["5. + residual"], "LayerNorm beats the rung before")
        check(L["7. + positional"] < L["6. + LayerNorm"], "position embeddings beat the rung before")
        check(L["8. GPT"] < L["7. + positional"], "the 2-block GPT with a tied head beats rung 7")
    return {"losses": losses, "params": sizes}


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
