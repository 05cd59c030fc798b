"""Lesson 07: from a bigram model to the GPT, one step at a time, with the loss at each step.

    python examples/learn/07_bigram_to_gpt.py [--text tinyshakespeare/input.txt] [--fast]

All models are scored on the same held-out windows of the corpus (the last 10%), in nats per
character (lower is better):

0. uniform: every character equally likely. Loss ln V, the loss of an untrained model (lesson 04).
1. bigram counts: P(next | current) = count(current, next) / count(current), from the training
   text (add-0.1 smoothing so unseen pairs are not infinitely surprising). No learning, one look
   back.
2. neural bigram: a (V, V) table of logits, row x = the scores of every next character after x,
   trained by gradient descent on cross-entropy. It learns the same thing as the counts (the
   optimum of the log-likelihood IS the normalised counts), so its loss approaches stage 1's.
3. GPT, 1 block, 1 head: token + position embeddings, one pre-LN block (attention + MLP), final
   LayerNorm, tied unembedding. Now each prediction can look at all earlier characters.
4. GPT, 2 blocks, 4 heads (fast mode: same shape, fewer steps): more capacity, several heads.

The gaps are the lesson: counting the previous character gets most of the way from ln V; looking
further back (attention) is what takes the loss below the bigram's floor.
"""

import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import batch, check, corpus, parse, small_gpt, title, train_lm  # noqa: E402

from npgpt import Tensor  # noqa: E402
from npgpt.ops.nn import cross_entropy  # noqa: E402
from npgpt.optim import AdamW  # noqa: E402
from npgpt.tokenizer import CharTokenizer  # noqa: E402


def main(argv=None):
    args = parse(argv, __doc__, corpus=True)
    text, name = corpus(args.text, args.fast)
    tok = CharTokenizer.train(text)
    V = tok.vocab_size
    ids = np.array(tok.encode(text), dtype=np.int64)
    n = int(0.9 * len(ids))
    train_ids, val_ids = ids[:n], ids[n:]
    block = 64
    vx, vy = batch(val_ids, 64 if not args.fast else 16, block, np.random.default_rng(99))   # the held-out windows
    print(f"corpus: {name}, {len(ids):,} characters, vocabulary {V}; scoring on {vx.size:,} held-out positions")
    losses = {}

    title("0. uniform")
    losses["uniform"] = math.log(V)
    print(f"loss = ln {V} = {losses['uniform']:.3f}")

    title("1. bigram counts")
    counts = np.full((V, V), 0.1)
    np.add.at(counts, (train_ids[:-1], train_ids[1:]), 1)
    logp = np.log(counts / counts.sum(1, keepdims=True))
    losses["bigram counts"] = float(-logp[vx, vy].mean())
    print(f"loss = {losses['bigram counts']:.3f}")

    title("2. neural bigram: a (V, V) logit table trained by gradient descent")
    table = Tensor(np.zeros((V, V), dtype=np.float32), requires_grad=True)
    opt = AdamW([("table", table)], lr=0.1 if not args.fast else 0.3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    steps = 40 if args.fast else 400
    for it in range(steps):
        x, y = batch(train_ids, 32, block, rng)
        loss = cross_entropy(table[x], y)          # logits of the next character = row of the current one
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses["neural bigram"] = float(cross_entropy(table[vx], vy).data)
    print(f"loss after {steps} steps = {losses['neural bigram']:.3f} (counts: {losses['bigram counts']:.3f})")

    steps = 40 if args.fast else 600
    for label, kw in [("GPT 1 block, 1 head", dict(n_layer=1, n_head=1, n_embd=64 if not args.fast else 32)),
                      ("GPT 2 blocks, 4 heads", dict(n_layer=2, n_head=4, n_embd=64 if not args.fast else 32))]:
        title(f"{3 if '1 head' in label else 4}. {label}")
        model = small_gpt(V, args.fast, block=block, **kw)
        t0 = time.perf_counter()
        train_lm(model, train_ids, steps, block, batch_size=16, lr=3e-3, log_every=steps // 4)
        losses[label] = float(model(vx, vy)[1].data)
        print(f"{model.num_params():,} parameters, {steps} steps in {time.perf_counter() - t0:.0f}s: "
              f"held-out loss {losses[label]:.3f}")

    title("summary (nats per character on the same held-out windows)")
    for k, v in losses.items():
        print(f"  {k:24s} {v:.3f}")
    check(losses["bigram counts"] < losses["uniform"] - 0.5, "one character of context beats uniform by > 0.5 nats")
    check(losses["neural bigram"] < losses["uniform"] - 0.3, "gradient descent learns the bigram table")
    if not args.fast:
        check(abs(losses["neural bigram"] - losses["bigram counts"]) < 0.1, "the neural bigram approaches the counts")
        check(losses["GPT 2 blocks, 4 heads"] < losses["bigram counts"] - 0.2,
              "attention over the whole context beats the bigram by > 0.2 nats")
    else:
        check(losses["GPT 2 blocks, 4 heads"] < losses["uniform"] - 0.5, "the GPT learns (fast mode: a few steps)")
    return losses


if __name__ == "__main__":
    main()
