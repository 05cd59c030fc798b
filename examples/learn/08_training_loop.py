"""Lesson 08: the training loop: SGD, then AdamW, a schedule, clipping; flat buffers for speed.

    python examples/learn/08_training_loop.py [--fast]

One step: take a batch, run forward to the loss, zero the old gradients, run backward, update.

    SGD:    p <- p - lr * g
    Adam:   m <- b1 m + (1 - b1) g              (a running mean of the gradient: momentum)
            v <- b2 v + (1 - b2) g^2            (a running mean of its square: its scale)
            p <- p - lr * m_hat / (sqrt(v_hat) + eps),   m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)
    AdamW:  also p <- p * (1 - lr * wd), separately from the gradient ("decoupled" weight decay),
            and only on matrices (embeddings, linear weights), not on biases or LayerNorm scales.

Adam divides each parameter's step by its own gradient scale, so the embedding rows of rare
characters and the LayerNorm gains learn at comparable speeds; SGD with one lr cannot serve
both. The bias corrections undo the zero start of m and v in the first steps.

Schedule (npgpt.optim.get_lr): linear warmup (Adam's v is still a poor estimate in the first
steps, so big steps there are risky), then cosine decay to min_lr (smaller steps to settle into a
minimum). Clipping: if the global gradient norm exceeds 1, scale all gradients down to norm 1, so
one bad batch cannot throw the weights far.

These are insurance, not free improvements, and the lesson measures both sides. At a safe
learning rate (3e-3) over a short run, warmup spends its first 10% of steps at a smaller rate and
the cosine decay its last ones, so the scheduled run ends about level with the constant one (in
our run slightly worse: README has the figures). Their value shows when the learning rate is
pushed up: at 10x the rate (3e-2) the constant run is hurt by its big first steps, while the
warmed-up, decayed and clipped run still trains. Real runs use a rate near the largest that is
stable, which is where the insurance pays.

Performance: npgpt's AdamW (npgpt/optim.py) keeps all parameters in one flat buffer, all
gradients in another, and the moments in two more; each Parameter's `.data` and `.grad` are views
into them. The update is then a handful of whole-buffer NumPy operations instead of a Python loop
over ~50 tensors with a dozen small operations each, and zero_grad is one fill. The lesson writes
the per-tensor loop, checks it computes the same update, and times both.
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import batch, check, corpus, eval_loss, parse, picture, small_gpt, title  # noqa: E402

from npgpt.optim import AdamW, get_lr  # noqa: E402
from npgpt.tokenizer import CharTokenizer  # noqa: E402


class LoopAdamW:
    """AdamW written the obvious way: one loop over the parameters (the reference for the flat one)."""

    def __init__(self, named, lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1):
        self.params = [p for _, p in named]
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m = [np.zeros_like(p.data) for p in self.params]
        self.v = [np.zeros_like(p.data) for p in self.params]
        self.t = 0

    def step(self, lr):
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            if p.data.ndim >= 2:
                p.data *= 1 - lr * self.wd
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            m_hat = m / (1 - self.b1 ** self.t)
            v_hat = v / (1 - self.b2 ** self.t)
            p.data -= lr * m_hat / (np.sqrt(v_hat) + self.eps)


def run(model, ids, steps, block, update, rng_seed=0, clip=None):
    rng = np.random.default_rng(rng_seed)
    norms = []
    for it in range(steps):
        x, y = batch(ids, 16, block, rng)
        _, loss = model(x, y)
        model.zero_grad()
        loss.backward()
        norms.append(update(it, clip))
    return norms


def main(argv=None):
    args = parse(argv, __doc__)
    text, _ = corpus(None, args.fast)
    tok = CharTokenizer.train(text)
    ids = np.array(tok.encode(text), dtype=np.int64)
    n = int(0.9 * len(ids))
    train_ids, val_ids = ids[:n], ids[n:]
    block, steps = 32, (40 if args.fast else 300)
    results = {}

    title(f"SGD vs AdamW, {steps} steps each from the same initial weights")
    m = small_gpt(tok.vocab_size, args.fast, block=block)

    def sgd(it, clip, lr=0.5):
        for p in m.parameters():
            p.data -= lr * p.grad
    run(m, train_ids, steps, block, sgd)
    results["SGD lr 0.5"] = eval_loss(m, val_ids, block)

    m = small_gpt(tok.vocab_size, args.fast, block=block)
    opt = AdamW(m.named_parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)

    def adamw(it, clip, schedule=False):
        lr = get_lr(it, 3e-3, steps // 10, steps, 3e-4) if schedule else 3e-3
        norm = float(opt.clip_grad_norm(clip)) if clip else None
        opt.step(lr)
        return norm
    run(m, train_ids, steps, block, adamw)
    results["AdamW lr 3e-3"] = eval_loss(m, val_ids, block)

    m = small_gpt(tok.vocab_size, args.fast, block=block)
    opt = AdamW(m.named_parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    norms = run(m, train_ids, steps, block, lambda it, clip: adamw(it, clip, schedule=True), clip=1.0)
    results["AdamW + warmup/cosine + clip 1.0"] = eval_loss(m, val_ids, block)
    high = 3e-2                                   # 10x: where the insurance pays
    for label, schedule, clip in (("AdamW lr 3e-2", False, None), ("AdamW lr 3e-2 + warmup/cosine + clip", True, 1.0)):
        m = small_gpt(tok.vocab_size, args.fast, block=block)
        opt = AdamW(m.named_parameters(), lr=high, betas=(0.9, 0.99), weight_decay=0.1)
        curve = []

        def high_step(it, clip, schedule=schedule, opt=opt, curve=curve):
            lr = get_lr(it, high, steps // 10, steps, high / 10) if schedule else high
            norm = float(opt.clip_grad_norm(clip)) if clip else None
            opt.step(lr)
            return norm
        run(m, train_ids, steps, block, high_step, clip=clip)
        results[label] = eval_loss(m, val_ids, block)
    for k, v in results.items():
        print(f"  {k:38s} held-out loss {v:.3f}")
    print(f"  gradient norm before clipping: first step {norms[0]:.2f}, last step {norms[-1]:.2f} "
          f"(clipped in {sum(nm > 1.0 for nm in norms)} of {steps} steps)")
    print("  the schedule's learning rate at steps 0, 10%, 50%, 100%:",
          ", ".join(f"{get_lr(i, 3e-3, steps // 10, steps, 3e-4):.1e}" for i in (0, steps // 10, steps // 2, steps)))
    check(results["AdamW lr 3e-3"] < results["SGD lr 0.5"], "AdamW beats SGD in the same number of steps")
    gap_safe = results["AdamW + warmup/cosine + clip 1.0"] - results["AdamW lr 3e-3"]
    gap_high = results["AdamW lr 3e-2 + warmup/cosine + clip"] - results["AdamW lr 3e-2"]
    print(f"  schedule + clipping minus constant: {gap_safe:+.3f} nats at lr 3e-3, {gap_high:+.3f} at lr 3e-2")
    if not args.fast:
        check(gap_high < gap_safe, "the schedule and clipping help more at the high learning rate than at the safe one")
    sched = [get_lr(i, 3e-3, steps // 10, steps, 3e-4) for i in range(steps)]

    def draw(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        ax1.plot(sched)
        ax1.set(xlabel="step", ylabel="learning rate", title="linear warmup, then cosine decay")
        ax2.plot(norms)
        ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax2.set(xlabel="step", ylabel="gradient norm before clipping", yscale="log",
                title="clipping scales steps above the line down to 1")
    picture(args.out, "08_schedule_and_clipping.png", draw, size=(9, 3.5))

    title("flat buffers: the same update as a loop over tensors, in fewer operations")
    # float64, so the comparison shows the maths, not float32 rounding of two arrangements
    a = small_gpt(tok.vocab_size, args.fast, block=block, seed=5).astype(np.float64)
    b = small_gpt(tok.vocab_size, args.fast, block=block, seed=5).astype(np.float64)
    flat = AdamW(a.named_parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    loop = LoopAdamW(b.named_parameters(), lr=1e-2)
    p0 = a.parameters()[0]
    check(np.shares_memory(p0.data, flat.flat) and np.shares_memory(p0.grad, flat.grad),
          "every parameter's .data and .grad are views into the optimizer's flat buffers")
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, y = batch(train_ids, 8, block, rng)
        for model, step in ((a, lambda: flat.step(1e-2)), (b, lambda: loop.step(1e-2))):
            model.zero_grad() if model is b else flat.zero_grad()
            model(x, y)[1].backward()
            step()
    diff = max(float(np.abs(pa.data - pb.data).max()) for pa, pb in zip(a.parameters(), b.parameters()))
    print(f"max parameter difference after 3 steps: {diff:.1e}")
    check(diff < 1e-9, "the flat AdamW and the per-tensor loop compute the same update")
    reps = 20 if args.fast else 200
    t0 = time.perf_counter()
    for _ in range(reps):
        flat.step(1e-2)
    t_flat = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        loop.step(1e-2)
    t_loop = (time.perf_counter() - t0) / reps
    print(f"one update of {sum(p.size for p in a.parameters()):,} parameters in {len(a.parameters())} tensors: "
          f"flat {t_flat * 1e3:.2f} ms, per-tensor loop {t_loop * 1e3:.2f} ms ({t_loop / t_flat:.1f}x)")
    results["flat_ms"], results["loop_ms"] = t_flat * 1e3, t_loop * 1e3
    return results


if __name__ == "__main__":
    from npgpt.programs import run as run_program     # one `Error:` line for bad input, as the CLI
    run_program(main)    # (this file's own run() is the training loop: the name must not shadow it)
