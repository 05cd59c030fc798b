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

Why the first loss is about ln(V): at initialisation all weights are small (std 0.02), so the
logits are near 0 and the softmax is near uniform, p_i ~ 1/V. Then L = -log(1/V) = ln V: 4.17 for
65 characters, 10.8 for GPT-2's 50,257 tokens. A first loss far above ln V means the model starts
confidently wrong (init too large); training then lowers it.

Stability: e^{z} overflows for z > 88 in float32, so every implementation subtracts max(z) first
(softmax is unchanged by a shift shared by all logits).
"""

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, parse, title  # noqa: E402

from npgpt import GPT, GPTConfig, Tensor  # noqa: E402
from npgpt.ops.nn import cross_entropy, cross_entropy_reference  # noqa: E402


def main(argv=None):
    parse(argv, __doc__)
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

    title("the first loss of a fresh model is about ln(V)")
    out = {}
    for V in (65, 512):
        model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32), seed=0)
        x = rng.integers(0, V, (4, 32))
        _, loss = model(x, np.roll(x, -1, 1))
        print(f"V = {V:4d}: first loss {float(loss.data):.3f}, ln V = {math.log(V):.3f}")
        out[V] = float(loss.data)
        check(abs(out[V] - math.log(V)) < 0.1, f"first loss within 0.1 of ln {V}")
    return {"first_loss": out}


if __name__ == "__main__":
    main()
