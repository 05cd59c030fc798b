"""Lesson 03: write your own Function, break it, and watch gradcheck catch it.

    python examples/learn/03_write_a_function.py

A Function has `forward` (arrays in, array out; save what backward needs) directly above
`backward` (the upstream gradient in, one gradient per input out). We write softplus,
y = log(1 + e^x), a smooth ReLU:

    dy/dx = e^x / (1 + e^x) = sigmoid(x)        so    dx = dy * sigmoid(x)

Stable forms: log(1 + e^x) = max(x, 0) + log1p(e^-|x|) (no overflow for large x), and sigmoid(x)
= 1 / (1 + e^-x) computed from y itself: sigmoid(x) = 1 - e^-y. Saving y (the output) instead of
x is the pattern npgpt's ops follow: save the smallest thing backward needs.

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
from lesson_kit import check, parse, title  # noqa: E402

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
        # forward: y = log(1 + e^x)  =>  dy/dx = sigmoid(x) = 1 - e^-y
        return dy * (1.0 - np.exp(-y))


class SoftplusForgetsUpstream(Softplus):
    def backward(self, dy):
        (y,) = self.saved
        return np.ones_like(dy) * (1.0 - np.exp(-y))     # bug: dy dropped


class SoftplusWrongDerivative(Softplus):
    def backward(self, dy):
        (y,) = self.saved
        return dy * np.exp(-y)                           # bug: 1 - sigmoid(x) instead of sigmoid(x)


def main(argv=None):
    parse(argv, __doc__)
    x = np.random.default_rng(0).standard_normal((3, 4)) * 3
    results = {}
    for name, fn in [("correct", Softplus), ("forgets dy", SoftplusForgetsUpstream),
                     ("wrong derivative", SoftplusWrongDerivative)]:
        title(f"Softplus, {name}")
        r = npgpt.gradcheck(lambda t, fn=fn: fn.apply(t), x)
        print(r)
        results[name] = r.errors[0]
        check(bool(r) == (name == "correct"), "gradcheck " + ("passes" if name == "correct" else "catches the bug"))

    title("why the random upstream gradient matters")
    t = Tensor(x, requires_grad=True)
    SoftplusForgetsUpstream.apply(t).sum().backward()     # with dy = ones the bug cancels out
    t2 = Tensor(x, requires_grad=True)
    Softplus.apply(t2).sum().backward()
    same = np.allclose(t.grad, t2.grad)
    print("with loss = y.sum() (dy all ones), the buggy and the correct backward agree:", same)
    check(same, "a plain .sum() hides the forgotten dy; gradcheck's random dy does not")
    return results


if __name__ == "__main__":
    main()
