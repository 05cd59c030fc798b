"""Shared machinery of the applications: prompt/answer data, masked training, greedy answers, scoring.

Each application is a task of (prompt, answer) text pairs it generates itself, so every answer
can be checked exactly. The recipe is supervised fine-tuning (SFT) from scratch:

    ids     = prompt + answer + <|endoftext|>            (character-level tokens)
    targets = -1 on the prompt, the next token on the answer and its end   (loss on answers only)

then greedy decoding (temperature 0) of held-out prompts until <|endoftext|>, and exact-match
accuracy against the true answers. Chat-shaped tasks (the dialogue app) use npgpt.sft's chat
template instead of plain prompt/answer text.

`--fast` (or NPGPT_FAST=1) shrinks the model and the number of steps so the test suite can run
every app in seconds; the accuracies it then reaches are low and the tests check only that
training helps. The full sizes reach the accuracies in README.md's applications table.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from npgpt import GPT, GPTConfig
from npgpt.generate import generate
from npgpt.optim import AdamW, get_lr
from npgpt.programs import ClaimFailed, positive_int
from npgpt.tokenizer import CharTokenizer
from npgpt.verifiable import split  # noqa: F401  (the apps' held-out split: the library's, as --rl uses it)


def parse(argv, doc, steps, extra=None):
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    p.add_argument("--fast", action="store_true", help="tiny model and few steps, for CI (also NPGPT_FAST=1)")
    p.add_argument("--steps", type=positive_int, default=None, help=f"training steps (default {steps}; fast: {steps // 10})")
    p.add_argument("--seed", type=int, default=0)
    if extra:
        extra(p)
    args = p.parse_args(argv)
    args.fast = args.fast or os.environ.get("NPGPT_FAST") == "1"
    args.full = not args.fast and (args.steps is None or args.steps >= steps)   # the README's sizes
    if args.steps is None:
        args.steps = steps // 10 if args.fast else steps
    return args


def check(cond, what):
    """Print a claim and whether it held; a failed claim stops the app (and fails its test)."""
    print(f"check: {what} ... {'ok' if cond else 'FAILED'}")
    if not cond:
        raise ClaimFailed(what)       # an AssertionError: the tests see it; `run` prints it as one line


def check_claims(args, history, acc, claim):
    """Every size: training lowered the loss. Full size: held-out accuracy reaches README's claim."""
    first = np.mean([h[1] for h in history[:3]])
    last = np.mean([h[1] for h in history[-3:]])
    check(last < 0.8 * first, f"training lowered the loss on answers ({first:.2f} -> {last:.2f})")
    if args.full:
        check(acc >= claim, f"held-out exact match {acc:.1%} >= {claim:.0%}, the figure README states")


def model_for(vocab_size, block, fast, seed=0, n_layer=2, n_head=4, n_embd=64):
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block, n_layer=1 if fast else n_layer,
                    n_head=2 if fast else n_head, n_embd=32 if fast else n_embd)
    return GPT(cfg, seed=seed)


def char_tokenizer(texts):
    return CharTokenizer.train("".join(texts))


def encode_pairs(tok, pairs):
    """[(prompt, answer)] -> [(ids, loss mask)]: the loss counts the answer and the closing token."""
    rows = []
    for prompt, answer in pairs:
        p, a = tok.encode(prompt), tok.encode(answer)
        rows.append((p + a + [tok.eot_id], [False] * len(p) + [True] * (len(a) + 1)))
    return rows


def batches(rows, batch_size, block, rng, pad_id):
    """Random rows, right-padded to `block`: x (B, block), y (B, block) with -1 where no loss counts."""
    idx = rng.integers(0, len(rows), batch_size)
    x = np.full((batch_size, block), pad_id, dtype=np.int64)
    y = np.full((batch_size, block), -1, dtype=np.int64)
    for r, i in enumerate(idx):
        ids, mask = rows[i]
        ids, mask = ids[:block + 1], mask[:block + 1]
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(mask[1:], ids[1:], -1)      # predict token t+1 from tokens 0..t
    return x, y


def train_rows(model, rows, steps, block, pad_id, batch_size=32, lr=3e-3, seed=0, log=True):
    """AdamW, warmup + cosine, clipping at 1 (lesson 08); returns [(step, loss)]."""
    opt = AdamW(model.named_parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    model.train()
    history, t0 = [], time.perf_counter()
    for it in range(steps):
        x, y = batches(rows, batch_size, block, rng, pad_id)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.clip_grad_norm(1.0)
        opt.step(get_lr(it, lr, max(1, steps // 20), steps, lr / 10))
        history.append((it, float(loss.data)))
        if log and (it % max(1, steps // 5) == 0 or it == steps - 1):
            print(f"  step {it:5d}: loss on answers {history[-1][1]:.3f}  ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return history


def answer(model, tok, prompts, max_new_tokens, stop_id=None, batch=256):
    """Greedy answers to prompts (text, or token-id lists), decoded together (ragged prompts are
    left-padded); each answer stops at `stop_id` (default <|endoftext|>)."""
    stop_id = tok.eot_id if stop_id is None else stop_id
    out = []
    for i in range(0, len(prompts), batch):
        chunk = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts[i:i + batch]]
        rows = generate(model, chunk, max_new_tokens, temperature=0, eot_id=stop_id)
        rows = [rows] if len(chunk) == 1 and rows and isinstance(rows[0], int) else rows
        out += [tok.decode([t for t in r if t != stop_id]) for r in rows]
    return out


def score(model, tok, pairs, max_new_tokens, show=5, stop_id=None, prompts=None, label=""):
    """Exact-match accuracy of greedy answers on `pairs`; prints `show` examples (right and wrong)."""
    prompts = prompts or [p for p, _ in pairs]
    got = answer(model, tok, prompts, max_new_tokens, stop_id)
    right = [g == a for g, (_, a) in zip(got, pairs)]
    acc = float(np.mean(right))
    print(f"{label}exact match on {len(pairs)} held-out items: {acc:.1%}")
    shown = [i for i in range(len(pairs)) if right[i]][:show - show // 2] + \
            [i for i in range(len(pairs)) if not right[i]][:show // 2]
    for i in shown:
        p = str(pairs[i][0]).replace("\n", " / ")
        print(f"  {'ok ' if right[i] else 'XX '} {p[-60:]!s:>60} -> {got[i]!r}"
              + ("" if right[i] else f"   (want {pairs[i][1]!r})"))
    return acc, got
