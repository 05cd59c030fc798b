"""Lesson 02: the matmul backward and broadcasting, derived by matching shapes.

    python examples/learn/02_broadcasting_matmul.py

Y = X @ W + b  with X (N, I), W (I, O), b (O,), Y (N, O). Backward receives dY (N, O), the
gradient of the loss with respect to every entry of Y, and must return dX (N, I), dW (I, O), db (O,).

Entry by entry:  Y[n, o] = sum_i X[n, i] W[i, o] + b[o],  so
    dL/dX[n, i] = sum_o dY[n, o] W[i, o]     ->  dX = dY @ W.T      (N, O) @ (O, I) = (N, I)
    dL/dW[i, o] = sum_n X[n, i] dY[n, o]     ->  dW = X.T @ dY      (I, N) @ (N, O) = (I, O)
    dL/db[o]    = sum_n dY[n, o]             ->  db = dY.sum(0)     (O,)

The shortcut: there is only one way to multiply dY with W (or X) to get a result of dX's (or
dW's) shape, so "match the shapes" finds the formula. The bias is broadcast: the same b[o] is
added to all N rows, so its gradient is the sum over the rows it was copied to. In general a
broadcast input's gradient is summed over every axis broadcasting stretched (npgpt's one helper
for that is `unbroadcast` in npgpt/ops/elementwise.py).

Read next: npgpt/ops/linalg.py (MatMul, also batched), npgpt/ops/elementwise.py (Add, unbroadcast),
npgpt/ops/nn.py (Linear: the same formulas in GPT-2's layout).
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, parse, title  # noqa: E402

import npgpt  # noqa: E402
from npgpt import Tensor  # noqa: E402


def main(argv=None):
    parse(argv, __doc__)
    rng = np.random.default_rng(0)
    N, I, O = 4, 3, 5
    X, W, b = rng.standard_normal((N, I)), rng.standard_normal((I, O)), rng.standard_normal(O)
    dY = rng.standard_normal((N, O))          # a random upstream gradient: L = sum(Y * dY)

    title("autograd vs the formulas found by matching shapes")
    Xt, Wt, bt = (Tensor(v, requires_grad=True) for v in (X, W, b))
    Y = Xt @ Wt + bt
    Y.backward(dY)
    formulas = {"dX = dY @ W.T": (Xt.grad, dY @ W.T), "dW = X.T @ dY": (Wt.grad, X.T @ dY),
                "db = dY.sum(0)": (bt.grad, dY.sum(0))}
    for name, (auto, hand) in formulas.items():
        print(f"{name:16s} shape {hand.shape}: max |autograd - formula| = {np.abs(auto - hand).max():.1e}")
    check(all(np.allclose(a, h) for a, h in formulas.values()), "the three formulas are the backward")

    title("broadcasting: a (1, O) row added to an (N, O) matrix")
    row = Tensor(rng.standard_normal((1, O)), requires_grad=True)
    M = Tensor(rng.standard_normal((N, O)), requires_grad=True)
    (M + row).backward(dY)
    print("row.grad == dY.sum(axis=0, keepdims=True):", np.allclose(row.grad, dY.sum(0, keepdims=True)))
    check(row.grad.shape == (1, O) and np.allclose(row.grad, dY.sum(0, keepdims=True)),
          "a broadcast input's gradient is summed over the stretched axis")

    title("batched matmul (B, T, C) @ (C, O): the weight gradient sums over batch and time")
    A = rng.standard_normal((2, 3, I))
    At, Wt2 = Tensor(A, requires_grad=True), Tensor(W, requires_grad=True)
    dZ = rng.standard_normal((2, 3, O))
    (At @ Wt2).backward(dZ)
    hand = np.einsum("bti,bto->io", A, dZ)
    check(np.allclose(Wt2.grad, hand), "dW = sum over (b, t) of outer(A[b, t], dZ[b, t])")

    title("gradcheck: finite differences in float64 with a random upstream gradient")
    result = npgpt.gradcheck(lambda x, w, b: x @ w + b, X, W, b)
    print(result)
    check(bool(result), "gradcheck passes for x @ w + b")
    return {"max_err": max(float(np.abs(a - h).max()) for a, h in formulas.values()), "gradcheck": result.errors}


if __name__ == "__main__":
    main()
