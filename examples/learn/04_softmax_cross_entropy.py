"""Lesson 04: softmax + cross-entropy, derived down to  softmax - onehot.

    python examples/learn/04_softmax_cross_entropy.py

The model's last layer gives V logits z; the loss of the true next token t is

    p_i = e^{z_i} / sum_j e^{z_j}            (softmax)
    L   = -log p_t = logsumexp(z) - z_t      (cross-entropy, the negative log-likelihood)

Differentiate the second form. d logsumexp(z) / dz_i = e^{z_i} / sum_j e^{z_j} = p_i, and
d z_t / dz_i = 1 if i = t else 0. So

    dL/dz_i = p_i - [i = t]          i.e.   dz = softmax(z) - onehot(t)

No Jacobian of the softmax is needed when the two are fused: that is why npgpt's CrossEntropy
(npgpt/ops/nn.py) takes logits, keeps the probabilities from its forward and returns
(probs - onehot) / n_valid. Averaging over the N positions divides by N; positions with target
-1 (prompts in fine-tuning, padding) count for nothing.

Softmax alone (npgpt/ops/reduce.py) does need its Jacobian: dp_i/dz_j = p_i ([i = j] - p_j), so
dz = p * (dp - sum_j dp_j p_j). Composing that with d(-log p_t) gives the same p - onehot, with
more work and more rounding; the lesson checks both routes agree.

Why the first loss is about ln V + sigma^2 / 2: at initialisation the weights are small (std
0.02), so the logits are near 0 and the softmax near uniform, p_i ~ 1/V, and L ~ -log(1/V) = ln V.
Not exactly: the final LayerNorm hands the unembedding a vector x with unit-variance entries, and
the logit of token v is x . wte[v], a sum of C products with wte's std 0.02, so the logits have
std sigma ~ 0.02 sqrt(C) (0.11 at C = 32, 0.55 at GPT-2's C = 768). For Gaussian logits,
E[logsumexp(z)] ~ ln V + sigma^2 / 2 (the mean of e^z is e^{sigma^2/2}) while E[z_t] = 0, so

    first loss ~ ln V + sigma^2 / 2

4.17 + 0.006 for 65 characters at C = 32; 10.82 + 0.15 = 10.98 for GPT-2's 50,257 tokens at
C = 768 (the lesson measures about 10.95 at full size). A first loss far above this means the model
starts confidently wrong (init too large); training lowers it from there.

Stability: e^{z} overflows for z > 88 in float32, so every implementation subtracts max(z) first
(softmax is unchanged by a shift shared by all logits).
"""

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, parse, picture, title  # noqa: E402

from npgpt import GPT, GPTConfig, Tensor  # noqa: E402
from npgpt.ops.nn import cross_entropy, cross_entropy_reference  # noqa: E402


def draw(fig, p, onehot):
    """One row: the softmax, the one-hot target, and their difference (the gradient)."""
    ax = fig.add_subplot(1, 1, 1)
    i = np.arange(len(p))
    ax.bar(i - 0.27, p, 0.27, label="softmax p")
    ax.bar(i, onehot, 0.27, label="one-hot target")
    ax.bar(i + 0.27, p - onehot, 0.27, label="dL/dz = p - onehot")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("token")
    ax.set_title("cross-entropy's gradient: every wrong token is pushed down by its p, the right one up by 1 - p",
                 fontsize=8)
    ax.legend(fontsize=7)


def main(argv=None):
    args = parse(argv, __doc__)
    rng = np.random.default_rng(0)
    N, V = 5, 7
    z = rng.standard_normal((N, V))
    t = rng.integers(0, V, N)

    title("the gradient, three ways")
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(V)[t]
    by_hand = (p - onehot) / N                                  # mean over N positions

    fused = Tensor(z, requires_grad=True)
    cross_entropy(fused, t).backward()                          # the fused op's hand-written backward
    composed = Tensor(z, requires_grad=True)
    cross_entropy_reference(composed, t).backward()             # log_softmax + pick + mean, by autograd
    print(f"max |fused - (p - onehot)/N|    = {np.abs(fused.grad - by_hand).max():.1e}")
    print(f"max |composed - (p - onehot)/N| = {np.abs(composed.grad - by_hand).max():.1e}")
    check(np.allclose(fused.grad, by_hand) and np.allclose(composed.grad, by_hand),
          "dL/dz = (softmax(z) - onehot(t)) / N")
    check(np.allclose(fused.grad.sum(1), 0), "each row of the gradient sums to 0 (probabilities sum to 1)")

    title("through softmax's Jacobian: the same answer")
    zt = Tensor(z, requires_grad=True)
    probs = zt.softmax(axis=-1)
    loss = -(probs[np.arange(N), t].log()).mean()
    loss.backward()
    check(np.allclose(zt.grad, by_hand), "softmax Jacobian chained with -log p_t gives p - onehot too")

    title("ignored positions (target -1) count for nothing")
    t2 = t.copy()
    t2[:2] = -1
    g = Tensor(z, requires_grad=True)
    cross_entropy(g, t2).backward()
    check(np.all(g.grad[:2] == 0) and np.allclose(g.grad[2:], (p[2:] - onehot[2:]) / 3),
          "rows with target -1 get zero gradient; the mean is over the 3 valid rows")

    title("the first loss of a fresh model: ln V + sigma^2 / 2, sigma = std of the logits")
    out = {}
    shapes = [(65, 32, 2), (512, 32, 2)] + ([] if args.fast else [(50257, 768, 1)])   # (V, C, layers)
    for V, C, L in shapes:
        model = GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=L, n_head=2, n_embd=C), seed=0)
        x = rng.integers(0, V, (8, 64))          # 512 positions: the mean of z_t (std sigma) is within ~0.03
        logits, loss = model(x, np.roll(x, -1, 1))
        sigma = float(logits.data.std())
        predicted = math.log(V) + sigma ** 2 / 2
        print(f"V = {V:5d}, C = {C:3d}: logit std {sigma:.3f} (0.02 sqrt(C) = {0.02 * math.sqrt(C):.3f}); "
              f"first loss {float(loss.data):.3f}, ln V = {math.log(V):.3f}, ln V + sigma^2/2 = {predicted:.3f}")
        out[V] = float(loss.data)
        check(abs(sigma / (0.02 * math.sqrt(C)) - 1) < 0.15, f"logit std ~ 0.02 sqrt({C}) (unit-variance LayerNorm output)")
        check(abs(out[V] - predicted) < 0.05, f"first loss within 0.05 of ln {V} + sigma^2/2")
    picture(args.out, "04_softmax_minus_onehot.png", lambda fig: draw(fig, p[0], onehot[0]))
    return {"first_loss": out}


if __name__ == "__main__":
    main()
