"""Lesson 02: the matmul backward and broadcasting, derived by matching shapes.

    python examples/learn/02_broadcasting_matmul.py

Y = X @ W + b  with X (N, I), W (I, O), b (O,), Y (N, O). Backward receives dY (N, O), the
gradient of the loss with respect to every entry of Y, and must return dX (N, I), dW (I, O), db (O,).

Entry by entry:  Y[n, o] = sum_i X[n, i] W[i, o] + b[o],  so
    dL/dX[n, i] = sum_o dY[n, o] W[i, o]     ->  dX = dY @ W.T      (N, O) @ (O, I) = (N, I)
    dL/dW[i, o] = sum_n X[n, i] dY[n, o]     ->  dW = X.T @ dY      (I, N) @ (N, O) = (I, O)
    dL/db[o]    = sum_n dY[n, o]             ->  db = dY.sum(0)     (O,)

The shortcut "match the shapes": when N, I and O all differ there is only one way to multiply dY
with W (or X) to get a result of dX's (or dW's) shape, so the shapes find the formula. It fails
for square weights: GPT-2's c_proj is C x C, and then dY @ W and dY @ W.T both have dX's shape
(N, C); only one is right (the lesson shows the wrong one differs). So derive entry by entry, as
above, and use the shapes as a check, not as the derivation. The bias is broadcast: the same b[o] is
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
from lesson_kit import check, parse, picture, title  # noqa: E402

import npgpt  # noqa: E402
from npgpt import Tensor  # noqa: E402


def main(argv=None):
    args = parse(argv, __doc__)
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

    title("square weights: the shapes no longer decide (c_proj is C x C)")
    C = 4
    Xs, Ws, dYs = rng.standard_normal((N, C)), rng.standard_normal((C, C)), rng.standard_normal((N, C))
    Xst, Wst = Tensor(Xs, requires_grad=True), Tensor(Ws, requires_grad=True)
    (Xst @ Wst).backward(dYs)
    right, wrong = dYs @ Ws.T, dYs @ Ws
    print(f"dY @ W.T and dY @ W both have shape {right.shape}; max |autograd - dY @ W.T| = "
          f"{np.abs(Xst.grad - right).max():.1e}, max |autograd - dY @ W| = {np.abs(Xst.grad - wrong).max():.2f}")
    check(right.shape == wrong.shape and np.allclose(Xst.grad, right) and not np.allclose(Xst.grad, wrong),
          "with a square W only the entry-by-entry derivation (dY @ W.T) is right")

    title("gradcheck: finite differences in float64 with a random upstream gradient")
    result = npgpt.gradcheck(lambda x, w, b: x @ w + b, X, W, b)
    print(result)
    check(bool(result), "gradcheck passes for x @ w + b")
    def draw(fig):
        panels = [("X (N, I)", X), ("dY (N, O)", dY), ("W (I, O)", W), ("dX = dY @ W.T (N, I)", dY @ W.T),
                  ("dW = X.T @ dY (I, O)", X.T @ dY), ("db = dY.sum(0) (O,)", dY.sum(0, keepdims=True))]
        for i, (name, a) in enumerate(panels):
            ax = fig.add_subplot(2, 3, i + 1)
            ax.imshow(a, cmap="coolwarm", vmin=-3, vmax=3)
            ax.set_title(name, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("each gradient has its input's shape; dW sums one outer product per row", fontsize=9)
    picture(args.out, "02_matmul_shapes.png", draw, size=(8, 4))
    return {"max_err": max(float(np.abs(a - h).max()) for a, h in formulas.values()), "gradcheck": result.errors}


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
