"""Shared helpers of the lessons: flags, the corpus, a small training loop, checks.

Every lesson is a plain script with `main(argv=None) -> dict` (what it measured), so the tests can
run it in fast mode (`--fast`, or NPGPT_FAST=1 in the environment) and check what it claims.
The training loop here is the one lesson 08 builds step by step; the lessons before 08 use it
as a black box.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from npgpt import GPT, GPTConfig
from npgpt.errors import NpgptError
from npgpt.optim import AdamW, get_lr
from npgpt.programs import ClaimFailed, need_tokens, out_dir, positive_int, text_file
from npgpt.tensor import no_grad


def parse(argv, doc, corpus=False, steps=None):
    """The lesson's flags: --fast (tiny sizes, seconds), --out DIR (pictures), [--text FILE],
    [--steps N] (when the lesson passes its default `steps`)."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    p.add_argument("--fast", action="store_true", help="tiny sizes, for CI (also NPGPT_FAST=1)")
    p.add_argument("--out", default=None, type=out_dir, help="folder for pictures (PNG when matplotlib is installed)")
    if corpus:
        p.add_argument("--text", default=None, type=text_file,
                       help="a text file to train on, e.g. tiny Shakespeare's input.txt "
                            "(default: the Python docs that ship with CPython)")
    if steps is not None:
        p.add_argument("--steps", type=positive_int, default=None,
                       help=f"training steps (default {steps}; fast mode: fewer)")
    args = p.parse_args(argv)      # --out is created (or refused) as it is read: see npgpt.programs
    args.fast = args.fast or os.environ.get("NPGPT_FAST") == "1"
    return args


def title(text):
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)))


def check(cond, what):
    """Print the claim and whether it held; a failed claim stops the lesson (and fails its test)."""
    print(f"check: {what} ... {'ok' if cond else 'FAILED'}")
    if not cond:
        raise ClaimFailed(what)       # an AssertionError: the tests see it; `run` prints it as one line


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def picture(out, name, draw, size=(7, 4)):
    """Draw one figure with `draw(fig)` and write it to OUT/NAME (a PNG) when --out was given and
    matplotlib is installed; print where it went. Returns the path, or None when nothing was drawn."""
    if not out:
        return None
    if not have_matplotlib():
        print(f"(--out: {name} needs matplotlib: pip install 'npgpt[plot]')")
        return None
    from npgpt.viz import _pyplot, save_figure
    plt = _pyplot("a lesson's picture")
    fig = plt.figure(figsize=size)
    draw(fig)
    fig.tight_layout()
    path = Path(out) / name
    save_figure(plt, fig, path)
    print(f"wrote {path}")
    return path


def corpus(path=None, fast=False, min_chars=0, why=""):
    """(text, name): the file at `path` (tiny Shakespeare, say) or the Python docs built into CPython.
    A --text shorter than `min_chars` characters is one clear error (`why` says what needs them)."""
    if path:
        text, name = Path(path).read_text(encoding="utf-8"), Path(path).name
        if len(text) < min_chars:
            raise NpgptError(f"{path} has {len(text):,} characters; this lesson needs at least {min_chars:,}"
                             + (f" ({why})" if why else "") + "; give a longer --text")
    else:
        from npgpt.data import pydoc_text
        text, name = pydoc_text(), "the Python docs (pydoc_data)"
    if fast:
        text = text[:60_000]
    return text, name


def split_ids(tok, text, val_fraction=0.1):
    ids = np.array(tok.encode(text), dtype=np.int64)
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:]


def batch(ids, batch_size, block, rng):
    need_tokens(len(ids), block)        # a 2-character --text: one line, not NumPy's "high <= 0"
    ix = rng.integers(0, len(ids) - block - 1, batch_size)
    x = np.stack([ids[i:i + block] for i in ix])
    y = np.stack([ids[i + 1:i + block + 1] for i in ix])
    return x, y


@no_grad()
def eval_loss(model, ids, block, n_batches=8, batch_size=16, seed=1234):
    """Mean loss on fixed random windows of `ids` (the same windows every call: comparable numbers)."""
    was = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    losses = [float(model(*batch(ids, batch_size, block, rng))[1].data) for _ in range(n_batches)]
    model.train(was)
    return float(np.mean(losses))


def train_lm(model, train_ids, steps, block, batch_size=16, lr=3e-3, seed=0, log_every=0, warmup=None,
             val_ids=None, grad_clip=1.0, weight_decay=0.1):
    """AdamW with linear warmup and cosine decay (lesson 08). Returns [(step, train loss)]."""
    opt = AdamW(model.named_parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    warmup = max(1, steps // 10) if warmup is None else warmup
    model.train()
    history = []
    t0 = time.perf_counter()
    for it in range(steps):
        x, y = batch(train_ids, batch_size, block, rng)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.clip_grad_norm(grad_clip)
        opt.step(get_lr(it, lr, warmup, steps, lr / 10))
        history.append((it, float(loss.data)))
        if log_every and (it % log_every == 0 or it == steps - 1):
            extra = f", val {eval_loss(model, val_ids, block, 4):.3f}" if val_ids is not None else ""
            print(f"  step {it:4d}: train loss {history[-1][1]:.3f}{extra}  ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return history


def small_gpt(vocab_size, fast, block=64, seed=0, **kw):
    """The lessons' model: 2 layers, 4 heads, 64 wide (fast: 1 layer, 2 heads, 32 wide)."""
    size = dict(n_layer=1, n_head=2, n_embd=32) if fast else dict(n_layer=2, n_head=4, n_embd=64)
    size.update(kw)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block, **size), seed=seed)


def pretrained(fast, text_path=None, steps=None, seed=0, log=True):
    """A small character-level GPT trained on the corpus (lessons 11-14 study it).

    Returns (model, tokenizer, train_ids, val_ids, block). Fast mode: 1 layer, 60 steps (seconds);
    otherwise 2 layers x 4 heads x 64 wide, 600 steps (a minute or two on a laptop CPU core).
    The trained model is cached under the npgpt data folder (lessons/pretrained-<key>, the key a
    hash of the text and the settings), so lessons 11-14 train it once between them; delete the
    folder to train again.
    """
    import hashlib
    import shutil
    import tempfile

    from npgpt.data import npgpt_home
    from npgpt.tokenizer import CharTokenizer
    text, name = corpus(text_path, fast)
    tok = CharTokenizer.train(text)
    train_ids, val_ids = split_ids(tok, text)
    block = 64
    steps = steps or (60 if fast else 600)
    key = hashlib.sha256(f"{fast}|{steps}|{seed}|{block}|".encode() + text.encode("utf-8")).hexdigest()[:16]
    folder = npgpt_home() / "lessons" / f"pretrained-{key}"
    if (folder / "model.safetensors").is_file():
        model = GPT.from_pretrained(folder)
        if log:
            print(f"the {model.num_params():,}-parameter GPT pretrained on {name} for {steps} steps, "
                  f"from the cache {folder}")
        return model, tok, train_ids, val_ids, block
    model = small_gpt(tok.vocab_size, fast, block=block, seed=seed)
    if log:
        print(f"pretraining a {model.num_params():,}-parameter GPT on {name} for {steps} steps")
    train_lm(model, train_ids, steps, block, batch_size=16 if fast else 32, lr=3e-3, seed=seed,
             log_every=steps // 3 if log else 0)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)                   # write aside, then rename: a reader never sees half a model
    try:
        tmp.rename(folder)
    except OSError:                              # another lesson cached it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        if log:
            print(f"cached in {folder} (lessons 11-14 reuse it)")
    return model, tok, train_ids, val_ids, block
