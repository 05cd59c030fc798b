"""Lesson 03: write your own Function, break it, and watch gradcheck catch it.

    python examples/learn/03_write_a_function.py

A Function has `forward` (arrays in, array out; save what backward needs) directly above
`backward` (the upstream gradient in, one gradient per input out). We write softplus,
y = log(1 + e^x), a smooth ReLU:

    dy/dx = e^x / (1 + e^x) = sigmoid(x)        so    dx = dy * sigmoid(x)

Stable forms: log(1 + e^x) = max(x, 0) + log1p(e^-|x|) (no overflow for large x), and sigmoid(x)
= 1 / (1 + e^-x) computed from y itself: sigmoid(x) = 1 - e^-y. Written as `1 - exp(-y)` that
last form cancels catastrophically for very negative x: y ~ e^x is tiny, exp(-y) rounds to 1 and
the gradient becomes 0 (at x = -40 the true value is 4e-18). `-expm1(-y)` computes 1 - e^-y
without the cancellation; the lesson checks both at x = -40. Saving y (the output) instead of x
is the pattern npgpt's ops follow: save the smallest thing backward needs.

Then a broken backward (it forgets to multiply by the upstream gradient dy, a classic slip) and
another (it returns the derivative of a different function). `npgpt.gradcheck` compares backward
with finite differences along a random upstream gradient; with a plain `.sum()` as the loss, the
first slip would go unnoticed whenever dy happens to be all ones.

Read next: npgpt/gradcheck.py; tests/test_nn_ops.py (every op checked the same way).
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, parse, picture, title  # noqa: E402

import npgpt  # noqa: E402
from npgpt import Function, Tensor  # noqa: E402


class Softplus(Function):
    """y = log(1 + e^x), elementwise.  x: any shape -> same shape."""

    def forward(self, x):
        y = np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))
        self.save(y)                                  # backward needs sigmoid(x) = 1 - e^-y
        return y

    def backward(self, dy):
        (y,) = self.saved
        # forward: y = log(1 + e^x)  =>  dy/dx = sigmoid(x) = 1 - e^-y, as -expm1(-y) (no cancellation)
        return dy * -np.expm1(-y)


class SoftplusForgetsUpstream(Softplus):
    def backward(self, dy):
        (y,) = self.saved
        return np.ones_like(dy) * -np.expm1(-y)          # bug: dy dropped


class SoftplusWrongDerivative(Softplus):
    def backward(self, dy):
        (y,) = self.saved
        return dy * np.exp(-y)                           # bug: 1 - sigmoid(x) instead of sigmoid(x)


def main(argv=None):
    args = parse(argv, __doc__)
    x = np.random.default_rng(0).standard_normal((3, 4)) * 3
    results = {}
    for name, fn in [("correct", Softplus), ("forgets dy", SoftplusForgetsUpstream),
                     ("wrong derivative", SoftplusWrongDerivative)]:
        title(f"Softplus, {name}")
        r = npgpt.gradcheck(lambda t, fn=fn: fn.apply(t), x)
        print(r)
        results[name] = r.errors[0]
        check(bool(r) == (name == "correct"), "gradcheck " + ("passes" if name == "correct" else "catches the bug"))

    title("stability: 1 - exp(-y) against -expm1(-y) at x = -40")
    xs = np.array([-40.0])
    ys = np.maximum(xs, 0) + np.log1p(np.exp(-np.abs(xs)))
    naive, stable, true = 1.0 - np.exp(-ys[0]), -np.expm1(-ys[0]), 1 / (1 + np.exp(40.0))
    print(f"sigmoid(-40) = {true:.3e}; 1 - exp(-y) = {naive:.3e}; -expm1(-y) = {stable:.3e}")
    check(naive == 0.0 and abs(stable / true - 1) < 1e-9, "1 - exp(-y) loses everything; -expm1(-y) keeps it")

    title("why the random upstream gradient matters")
    t = Tensor(x, requires_grad=True)
    SoftplusForgetsUpstream.apply(t).sum().backward()     # with dy = ones the bug cancels out
    t2 = Tensor(x, requires_grad=True)
    Softplus.apply(t2).sum().backward()
    same = np.allclose(t.grad, t2.grad)
    print("with loss = y.sum() (dy all ones), the buggy and the correct backward agree:", same)
    check(same, "a plain .sum() hides the forgotten dy; gradcheck's random dy does not")

    def draw(fig):
        xs = np.linspace(-45, 5, 400)
        ys = np.maximum(xs, 0) + np.log1p(np.exp(-np.abs(xs)))
        true = 1 / (1 + np.exp(-xs))
        with np.errstate(divide="ignore"):
            naive = np.abs((1 - np.exp(-ys)) - true) / true
            stable = np.abs(-np.expm1(-ys) - true) / true
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        xz = np.linspace(-5, 5, 200)
        ax1.plot(xz, np.maximum(xz, 0) + np.log1p(np.exp(-np.abs(xz))), label="softplus y")
        ax1.plot(xz, 1 / (1 + np.exp(-xz)), label="dy/dx = sigmoid")
        ax1.legend(fontsize=7)
        ax1.set_title("softplus and its derivative", fontsize=9)
        ax2.semilogy(xs, np.maximum(naive, 1e-17), label="1 - exp(-y)")
        ax2.semilogy(xs, np.maximum(stable, 1e-17), label="-expm1(-y)")
        ax2.set(xlabel="x", ylabel="relative error of the derivative")
        ax2.set_title("cancellation: 1 - exp(-y) loses all digits for x < -37", fontsize=9)
        ax2.legend(fontsize=7)
    picture(args.out, "03_softplus_stability.png", draw, size=(9, 3.5))
    return results


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
