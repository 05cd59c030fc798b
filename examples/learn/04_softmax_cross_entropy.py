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

What the seed gets wrong: negative sampling. The tutorial npgpt grew out of says GPT pretraining
uses negative sampling. It does not: it uses the full softmax and cross-entropy above, and its
gradient p - onehot already treats EVERY wrong token as a negative, pushed down in proportion to
the probability the model gave it (no sampling, no noise distribution). Negative sampling is
word2vec's trick (Mikolov et al. 2013): for a pair (context c, word w) and k words drawn from a
noise distribution Q, minimise  -log sigma(s(c, w)) - sum_i log sigma(-s(c, n_i)).  Its optimum is
not a language model: sigma(s) = P(w|c) / (P(w|c) + k Q(w)), i.e. s = log P(w|c) - log(k Q(w)), a
score shifted by the noise's log-probability (with word2vec's unigram^0.75 noise, frequent words are
pushed down). Adding log(k Q) back recovers log P; with uniform noise the shift is the same for
every word and the softmax ignores it. Sampled softmax (Jean et al. 2015) is the estimator meant for
language models: a softmax over the target and k sampled words with each logit corrected by
-log(k Q(word)); without the correction it is biased the same way. The lesson trains a bigram
logit table (V x V) five ways on the same pairs and scores each table as a language model
(full softmax on held-out pairs):

    full softmax + cross-entropy              the GPT's loss
    negative sampling, uniform noise          a language model up to a constant shift
    negative sampling, unigram^0.75 noise     learns log P/(kQ): a poor model until log(kQ) is added back
    sampled softmax, log Q correction         close to the full softmax
    sampled softmax, no correction            biased

Why a GPT can afford the full softmax: word2vec had millions of words and a 300-wide dot product
per word, so a full softmax cost ~10^4-10^6 times the rest of the step. A GPT's head is one
(C, V) matmul per position beside 12 C^2 multiply-adds per layer: for GPT-2 small (V = 50,257,
C = 768, 12 layers) the head is 38.6M of the 123M multiply-adds per token, about a third, and it
runs as one dense matmul, the operation the hardware is best at.

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


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))                     # no overflow for large |x|


def train_table(kind, pairs, V, Q=None, k=5, steps=3000, batch_size=512, lr=0.05, seed=0):
    """A (V, V) bigram logit table trained with Adam on one of five losses (gradients by hand)."""
    c_all, w_all = pairs
    rng = np.random.default_rng(seed)
    W, m, v = np.zeros((V, V)), np.zeros((V, V)), np.zeros((V, V))
    rows = np.arange(batch_size)
    for t in range(1, steps + 1):
        j = rng.integers(0, len(c_all), batch_size)
        c, w = c_all[j], w_all[j]
        G = np.zeros_like(W)
        if kind == "full":                                     # dz = p - onehot over all V words
            z = W[c]
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[rows, w] -= 1
            np.add.at(G, c, p / batch_size)
        elif kind == "ns":                                     # d/ds of -log sig(s) = sig(s) - 1; of -log sig(-s) = sig(s)
            neg = rng.choice(V, size=(batch_size, k), p=Q)
            np.add.at(G, (c, w), (sigmoid(W[c, w]) - 1) / batch_size)
            np.add.at(G, (np.repeat(c, k), neg.ravel()), (sigmoid(W[c[:, None], neg]) / batch_size).ravel())
        else:                                                  # sampled softmax over [target, k samples]
            cand = np.concatenate([w[:, None], rng.choice(V, size=(batch_size, k), p=Q)], 1)
            z = W[c[:, None], cand] - (np.log(k * Q[cand]) if kind == "sampled, corrected" else 0.0)
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[:, 0] -= 1
            np.add.at(G, (np.repeat(c, k + 1), cand.ravel()), (p / batch_size).ravel())
        m = 0.9 * m + 0.1 * G
        v = 0.999 * v + 0.001 * G * G
        W -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    return W


def negative_sampling(args):
    """Section 5: the five losses on a bigram table, scored as language models."""
    from lesson_kit import corpus
    from npgpt.tokenizer import CharTokenizer
    title("what the seed gets wrong: negative sampling is not how a GPT is trained")
    text, name = corpus(None, args.fast)
    tok = CharTokenizer.train(text)
    V = tok.vocab_size
    ids = np.array(tok.encode(text), dtype=np.int64)
    n = int(0.9 * len(ids))
    train_pairs, (c_val, w_val) = (ids[:n - 1], ids[1:n]), (ids[n:-1], ids[n + 1:])

    def lm_loss(W, shift=0.0):                                 # held-out cross-entropy of softmax(W[c] + shift)
        z = W[c_val] + shift
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(w_val)), w_val]))

    unigram = np.bincount(ids[:n], minlength=V) + 1.0
    unigram /= unigram.sum()
    q75 = unigram ** 0.75
    q75 /= q75.sum()
    uniform = np.full(V, 1.0 / V)
    k, steps = 5, (300 if args.fast else 3000)
    print(f"{name}: bigram tables over {V} characters, {steps} Adam steps of 512 pairs each, k = {k} samples")
    rows = {}
    for label, kind, Q in [("full softmax + cross-entropy", "full", None),
                           ("negative sampling, uniform noise", "ns", uniform),
                           ("negative sampling, unigram^0.75 noise", "ns", q75),
                           ("sampled softmax, log Q correction", "sampled, corrected", q75),
                           ("sampled softmax, no correction", "sampled", q75)]:
        W = train_table(kind, train_pairs, V, Q, k=k, steps=steps)
        rows[label] = {"as trained": lm_loss(W)}
        if kind == "ns":
            rows[label]["+ log(kQ)"] = lm_loss(W, np.log(k * Q))
    print(f"  {'loss trained with':40s} {'held-out CE of softmax(W)':>26s} {'of softmax(W + log kQ)':>23s}")
    for label, r in rows.items():
        extra = f"{r['+ log(kQ)']:23.3f}" if "+ log(kQ)" in r else ""
        print(f"  {label:40s} {r['as trained']:26.3f} {extra}")
    full = rows["full softmax + cross-entropy"]["as trained"]
    ns75 = rows["negative sampling, unigram^0.75 noise"]
    nsu = rows["negative sampling, uniform noise"]
    check(abs(nsu["as trained"] - nsu["+ log(kQ)"]) < 1e-9,
          "uniform noise: log(kQ) is one constant, which the softmax ignores")
    check(ns75["as trained"] > full + 0.5 and abs(ns75["+ log(kQ)"] - full) < 0.1,
          "unigram^0.75 noise learns log P - log(kQ): a poor model as is, close to the full softmax once shifted back")
    sampled = rows["sampled softmax, log Q correction"]["as trained"]
    raw = rows["sampled softmax, no correction"]["as trained"]
    check(sampled - full < 0.1 and raw > sampled + 0.2,
          "sampled softmax needs its log Q correction to approach the full softmax")
    gpt2_head, gpt2_body = 50257 * 768, 12 * 12 * 768 ** 2
    print(f"GPT-2 small, multiply-adds per token: head {gpt2_head / 1e6:.1f}M, blocks {gpt2_body / 1e6:.1f}M: "
          f"the full softmax is {gpt2_head / (gpt2_head + gpt2_body):.0%} of the forward")
    return rows


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
    out["negative_sampling"] = negative_sampling(args)
    return {"first_loss": out}


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
