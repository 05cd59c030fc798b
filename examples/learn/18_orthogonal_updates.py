"""Lesson 18: why orthogonalising the update helps (Muon), and the Newton-Schulz polynomial that does it.

    python examples/learn/18_orthogonal_updates.py [--fast] [--out pictures/]

1. A hidden weight's gradient is lopsided. Write the gradient (or its momentum) of a weight matrix
   as G = U S V^T. In a transformer a few singular values dominate: SGD or Adam then move the
   weights mostly along a few directions, and the many directions with small singular values,
   which can matter just as much for the loss, barely move. The stable rank ||G||_F^2 / ||G||_2^2
   (how many directions carry the update, roughly) of a real gradient below is a few, out of 128.
2. Orthogonalise: replace G by U V^T. Same singular vectors, every singular value set to 1: each
   direction the gradient points in gets the same step. Muon (Keller Jordan 2024) does exactly
   this to the momentum of every hidden matrix, then scales the step by sqrt(max(1, out/in)).
3. Without an SVD. An SVD per matrix per step is slow (and serial on a GPU). Instead: divide by the
   Frobenius norm, so every singular value is in [0, 1], and apply an odd polynomial a few times:
   p(X) = a X + b (X X^T) X + c (X X^T)^2 X acts on each singular value on its own,
   s -> a s + b s^3 + c s^5, and leaves U and V alone. The classic cubic (1.5, -0.5, 0) converges
   to exactly 1 but slowly from small s (the slope at 0 is 1.5); Muon's quintic
   (3.4445, -4.7750, 2.0315) has slope 3.4 at 0, so five steps lift everything above ~0.003 into
   a band [0.68, 1.21] around 1. Not exact, and it does not need to be.
4. The picture: the singular values of a real gradient before and after five Newton-Schulz steps
   (and the scalar map p^5 beside them). The check: the output has the gradient's singular vectors,
   its values sit in the band, and its stable rank is many times the gradient's.
5. Does it train faster? A small race, same steps and batches: AdamW on every weight against Muon
   on the hidden matrices (AdamW on the rest). examples/speedrun.py measures this properly, with
   seeds and a t-test, on tiny Shakespeare.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import batch, check, corpus, eval_loss, have_matplotlib, parse, small_gpt, split_ids, title  # noqa: E402

from npgpt.optim import NS_BAND_HI, NS_BAND_LO, NS_COEFFS, AdamW, Muon, get_lr, newton_schulz  # noqa: E402
from npgpt.tokenizer import CharTokenizer  # noqa: E402
from npgpt.viz import save_figure  # noqa: E402


def stable_rank(a):
    s = np.linalg.svd(a, compute_uv=False)
    return float((s ** 2).sum() / s[0] ** 2)


def iterate(coeffs, s, steps):
    a, b, c = coeffs
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def race(make_opt, model, train_ids, val_ids, steps, block, lr):
    opt = make_opt(model)
    rng = np.random.default_rng(0)
    for it in range(steps):
        x, y = batch(train_ids, 16, block, rng)
        opt.zero_grad()
        model(x, y)[1].backward()
        opt.clip_grad_norm(1.0)
        opt.step(get_lr(it, lr, steps // 10, steps, lr / 10))
    return eval_loss(model, val_ids, block)


def main(argv=None):
    args = parse(argv, __doc__)
    res = {}
    text, name = corpus(fast=args.fast)
    tok = CharTokenizer.train(text)
    train_ids, val_ids = split_ids(tok, text)
    block = 32

    title("1. a real gradient is lopsided")
    model = small_gpt(tok.vocab_size, args.fast, block=block, n_embd=64 if args.fast else 128)
    warm = 20 if args.fast else 100
    race(lambda m: AdamW(m.named_parameters(), lr=3e-3), model, train_ids, val_ids, warm, block, 3e-3)
    model.train()
    x, y = batch(train_ids, 16, block, np.random.default_rng(1))
    model.zero_grad()
    model(x, y)[1].backward()
    w = model.transformer.h[0].mlp.c_fc.weight
    G = np.asarray(w.grad, dtype=np.float64)                   # (C, 4C)
    s = np.linalg.svd(G, compute_uv=False)
    print(f"mlp.c_fc gradient of layer 0 after {warm} AdamW steps on {name}: shape {G.shape}")
    print(f"  largest singular values: {', '.join(f'{v:.2e}' for v in s[:5])}")
    print(f"  median {np.median(s):.2e}, smallest {s[-1]:.2e}; the top one is {s[0] / np.median(s):.0f}x the median")
    res["grad_stable_rank"] = stable_rank(G)
    print(f"  stable rank {res['grad_stable_rank']:.1f} of {min(G.shape)} directions")

    title("2-3. orthogonalise with Newton-Schulz")
    print("each step maps a singular value s (of G / ||G||_F) to a s + b s^3 + c s^5:")
    print(f"  {'s':>8} | {'cubic x5':>9} | {'quintic x1':>10} {'x3':>7} {'x5':>7}")
    for s0 in (1e-3, 1e-2, 0.1, 0.5, 1.0):
        cub = iterate((1.5, -0.5, 0.0), s0, 5)
        q1, q3, q5 = (iterate(NS_COEFFS, s0, k) for k in (1, 3, 5))
        print(f"  {s0:8.3f} | {cub:9.3f} | {q1:10.3f} {q3:7.3f} {q5:7.3f}")
    O = newton_schulz(G, 5)
    U, S, Vt = np.linalg.svd(G, full_matrices=False)
    so = np.linalg.svd(O, compute_uv=False)
    print(f"after 5 steps: singular values in [{so.min():.3f}, {so.max():.3f}] (band [{NS_BAND_LO}, {NS_BAND_HI}])")
    D = U.T @ O @ Vt.T                                          # diagonal when U and V are kept
    off = float(np.abs(D - np.diag(np.diag(D))).max())
    cos = float((O * (U @ Vt)).sum() / (np.linalg.norm(O) * np.linalg.norm(U @ Vt)))
    res.update(ns_min=float(so.min()), ns_max=float(so.max()), ns_stable_rank=stable_rank(O), cos_uv=cos)
    print(f"  U^T O V is diagonal to {off:.1e}; cosine with the exact U V^T: {cos:.4f}")
    print(f"  stable rank {res['ns_stable_rank']:.1f} (the gradient's: {res['grad_stable_rank']:.1f})")
    check(off < 1e-8 * np.abs(D).max(), "Newton-Schulz keeps the gradient's singular vectors")
    small_ok = S / np.linalg.norm(G) >= 3e-3
    check(NS_BAND_LO <= np.diag(D)[small_ok].min() and so.max() <= NS_BAND_HI,
          f"every singular value above the floor lands in [{NS_BAND_LO}, {NS_BAND_HI}]")
    check(res["ns_stable_rank"] > 5 * res["grad_stable_rank"],
          "the orthogonalised update spreads over many more directions (stable rank > 5x the gradient's)")

    if args.out and have_matplotlib():
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        a1.semilogy(S / np.linalg.norm(G), "o-", ms=3, label="gradient G / ||G||_F")
        a1.semilogy(so, "s-", ms=3, label="after 5 Newton-Schulz steps")
        a1.axhspan(NS_BAND_LO, NS_BAND_HI, color="green", alpha=0.15, label="the band")
        a1.set_xlabel("index (largest first)")
        a1.set_ylabel("singular value")
        a1.set_title("singular values of a real gradient")
        a1.legend()
        grid = np.logspace(-4, 0, 800)
        for k in (1, 2, 5):
            a2.semilogx(grid, iterate(NS_COEFFS, grid, k), label=f"quintic x{k}")
        a2.semilogx(grid, iterate((1.5, -0.5, 0.0), grid, 5), "--", label="cubic x5")
        a2.axvline(3e-3, color="grey", lw=0.8)
        a2.axhspan(NS_BAND_LO, NS_BAND_HI, color="green", alpha=0.15)
        a2.set_xlabel("s (input singular value; grey: the floor 3e-3)")
        a2.set_ylabel("output")
        a2.set_title("the polynomial, iterated")
        a2.legend()
        fig.tight_layout()
        path = Path(args.out) / "18_singular_values.png"
        save_figure(plt, fig, path, dpi=90)      # atomic; a link or device: npgpt.fileio's rules
        print(f"picture: {path}")

    title("5. a small race: AdamW against Muon, same batches")
    steps = 30 if args.fast else 300
    a = race(lambda m: AdamW(m.named_parameters(), lr=3e-3), small_gpt(tok.vocab_size, args.fast, block=block),
             train_ids, val_ids, steps, block, 3e-3)
    m = race(lambda m: Muon(m.named_parameters(), lr=3e-3, muon_lr=0.02),
             small_gpt(tok.vocab_size, args.fast, block=block), train_ids, val_ids, steps, block, 3e-3)
    res.update(adamw_val=a, muon_val=m)
    print(f"val loss after {steps} steps: AdamW {a:.3f}, Muon {m:.3f} (one seed: a demonstration, not a "
          f"measurement; see examples/speedrun.py for one)")
    start = np.log(tok.vocab_size)
    check(a < start and m < start, f"both optimizers learn (below ln V = {start:.2f})")
    return res


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
