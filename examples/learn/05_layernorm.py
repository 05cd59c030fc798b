"""Lesson 05: LayerNorm's backward, derived, from the composed reference to the fused op.

    python examples/learn/05_layernorm.py

Forward, over the C features of one row x:

    mean = (1/C) sum_i x_i
    var  = (1/C) sum_i (x_i - mean)^2
    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd                  (zero mean, unit variance)
    y    = xhat * w + b                       (learned scale w and shift b, both (C,))

The easy part: dw = sum over rows of dy * xhat, db = sum over rows of dy, dxhat = dy * w.

The hard part is dx, because mean and rstd depend on every x_j. Write g = dxhat for one row.
xhat_i = (x_i - mean) rstd, with d mean / d x_j = 1/C and d rstd / d x_j = -rstd^3 (x_j - mean) / C
(from var's derivative 2 (x_j - mean) / C). So

    d xhat_i / d x_j = rstd ([i = j] - 1/C) - (x_i - mean) rstd^3 (x_j - mean) / C
                     = rstd ([i = j] - 1/C - xhat_i xhat_j / C)

and dx_j = sum_i g_i d xhat_i / d x_j:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))

Reading it: the gradient loses its mean (moving all x_i together changes nothing after
normalisation) and its component along xhat (scaling x changes nothing either). That is the
formula in npgpt/ops/nn.py's LayerNorm.backward (as in llm.c's layernorm write-up), which saves
mean and rstd (two numbers per row) rather than xhat (C numbers per row) and recomputes xhat.

The fused op also runs over blocks of rows on several cores; the lesson checks three things
agree: this derivation in plain NumPy, autograd through `layer_norm_reference` (mean, var,
sqrt, divide, each a primitive with its own backward), and the fused op.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, parse, picture, title  # noqa: E402

import npgpt  # noqa: E402
from npgpt import Tensor  # noqa: E402
from npgpt.ops.nn import layer_norm, layer_norm_reference  # noqa: E402


def layernorm_backward_by_hand(dy, x, w, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    return dx, (dy * xhat).sum(rows), dy.sum(rows)


def main(argv=None):
    args = parse(argv, __doc__)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)) * 2 + 1
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    dy = rng.standard_normal(x.shape)

    by_hand = layernorm_backward_by_hand(dy, x, w)
    results = {}
    for name, op in [("reference (composed)", layer_norm_reference), ("fused", layer_norm)]:
        ts = [Tensor(v, requires_grad=True) for v in (x, w, b)]
        op(*ts).backward(dy)
        errs = [float(np.abs(t.grad - h).max()) for t, h in zip(ts, by_hand)]
        results[name] = max(errs)
        print(f"{name:22s}: max |autograd - derivation| for dx, dw, db = " + ", ".join(f"{e:.1e}" for e in errs))
        check(max(errs) < 1e-10, f"{name} matches dx = rstd (g - mean(g) - xhat mean(g xhat))")

    title("the gradient has no mean and no component along xhat")
    dx = by_hand[0]
    mean = x.mean(-1, keepdims=True)
    xhat = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    print("max |mean(dx)| per row:", f"{np.abs(dx.mean(-1)).max():.1e}",
          "  max |mean(dx * xhat)| per row:", f"{np.abs((dx * xhat).mean(-1)).max():.1e}")
    # mean(xhat^2) is var / (var + eps), a hair below 1, so the second is 0 only up to eps
    check(np.abs(dx.mean(-1)).max() < 1e-10 and np.abs((dx * xhat).mean(-1)).max() < 1e-4,
          "shifting or scaling a row's input does not move the loss (the second up to eps)")

    title("gradcheck of the fused op")
    r = npgpt.gradcheck(lambda x, w, b: layer_norm(x, w, b), x, w, b)
    print(r)
    check(bool(r), "the fused LayerNorm passes gradcheck")

    def draw(fig):
        row = x[0, 0]
        m, sd = row.mean(), row.std()
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        i = np.arange(len(row))
        ax1.bar(i - 0.2, row, 0.4, label=f"x (mean {m:.2f}, std {sd:.2f})")
        ax1.bar(i + 0.2, (row - m) / sd, 0.4, label="xhat (mean 0, std 1)")
        ax1.legend(fontsize=7)
        ax1.set_title("LayerNorm: one row, before and after", fontsize=9)
        ax2.bar(i, dx[0, 0])
        ax2.set_title(f"dx of that row: mean {dx[0, 0].mean():.0e}, no part along xhat", fontsize=9)
    picture(args.out, "05_layernorm_row.png", draw, size=(9, 3.5))
    return results


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
