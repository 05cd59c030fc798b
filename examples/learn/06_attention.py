"""Lesson 06: attention, from a running average to causal multi-head self-attention.

    python examples/learn/06_attention.py

1. Averaging the past. Token t should see tokens 0..t only. The mean of x_0..x_t for every t at
   once is one matmul: W = tril(ones) with rows divided by their sums, out = W @ x.
2. The same weights as a softmax: scores 0 on and below the diagonal, -inf above;
   softmax(scores) row by row is exactly that W. Now the scores can be anything: learned.
3. Learned scores. Each token emits a query q (what am I looking for?), a key k (what do I
   contain?) and a value v (what do I pass on if chosen), three linear maps of its vector
   (GPT-2's c_attn makes all three in one matmul). score(t, s) = q_t . k_s: high when token s
   has what token t looks for. out_t = sum_s softmax_s(score(t, s)) v_s.
4. The 1/sqrt(hs) scale is about head size. q . k is a sum of hs products: if q's and k's
   entries have variance s^2 each, the score has variance hs s^4, growing with the head size. At
   initialisation s is small (c_attn's weights have std 0.02, so q's entries have std about
   0.02 sqrt(C)) and the scores are near 0 with or without the scale (the lesson measures them in
   a fresh GPT); training grows q and k, and then a head of size 256 would see scores 4x as spread
   as a head of size 16 for the same entries. Dividing by sqrt(hs) makes the scores' spread
   independent of hs: what a score of 2 means is the same in every head shape. Why that matters:
   a softmax whose scores are spread far apart saturates (nearly one-hot), and a saturated
   softmax's Jacobian, dp_i/ds_j = p_i ([i = j] - p_j), vanishes in EVERY entry (p_i ~ 0 or 1
   makes each product ~ 0), so no gradient reaches the scores, q or k. The lesson measures, for
   unit-variance q, k (s = 1) and head sizes 16, 64 and 256, the largest softmax weight and the
   size of that Jacobian with and without the scale.
5. Multi-head. Split C channels into nh heads of hs = C / nh; each head attends on its own
   (one head can look at the previous token, another at the start of the word), the heads' outputs
   are concatenated back to C and mixed by c_proj. Same cost as one wide head.

The block around it (npgpt/model.py): x + attn(ln_1(x)), then x + mlp(ln_2(x)). Pre-LN (the
LayerNorm inside the branch, not after the sum) leaves the residual stream x an untouched sum, so
gradients reach the first layer through the identity paths. The residual projections (c_proj)
start with std 0.02 / sqrt(2 n_layer): 2 n_layer branches add into the stream, and this keeps
its variance from growing with depth. The output layer reuses the token embedding (weight tying):
the logit of token v is x . wte[v], so tokens used alike get alike embeddings.

The lesson ends by checking this multi-head attention, written out in NumPy, against npgpt's
fused causal_self_attention and its composed reference.
"""

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, parse, picture, title  # noqa: E402

from npgpt import Tensor  # noqa: E402
from npgpt.ops.nn import causal_self_attention, causal_self_attention_reference  # noqa: E402


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def multi_head(x, w_attn, n_head):
    """x (T, C), w_attn (C, 3C) -> (T, C): causal multi-head attention, before c_proj."""
    T, C = x.shape
    hs = C // n_head
    q, k, v = np.split(x @ w_attn, 3, axis=-1)                     # (T, C) each
    heads = []
    for h in range(n_head):
        sl = slice(h * hs, (h + 1) * hs)
        s = q[:, sl] @ k[:, sl].T / math.sqrt(hs)                  # (T, T) scores
        s = np.where(np.tril(np.ones((T, T))) > 0, s, -np.inf)     # no peeking at the future
        heads.append(softmax(s) @ v[:, sl])                        # (T, hs)
    return np.concatenate(heads, axis=-1)                          # (T, C)


def main(argv=None):
    args = parse(argv, __doc__)
    rng = np.random.default_rng(0)
    T, C = 6, 4
    x = rng.standard_normal((T, C))

    title("1-2. the running mean as a matmul, and as a masked softmax")
    loop = np.stack([x[:t + 1].mean(0) for t in range(T)])
    W = np.tril(np.ones((T, T)))
    W /= W.sum(1, keepdims=True)
    W_soft = softmax(np.where(np.tril(np.ones((T, T))) > 0, 0.0, -np.inf))
    print(np.round(W_soft, 2))
    check(np.allclose(W @ x, loop) and np.allclose(W_soft, W), "tril-average == masked softmax of zeros")

    title("4. the scale at initialisation: a fresh GPT's scores are small either way")
    from npgpt import GPT, GPTConfig
    gpt = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=1, n_head=4, n_embd=64), seed=0)
    h0 = gpt.transformer.h[0]
    xe = gpt.transformer.wte.weight.data[rng.integers(0, 65, 32)] + gpt.transformer.wpe.weight.data[:32]
    qkv0 = h0.attn.c_attn(h0.ln_1(Tensor(xe[None]))).data[0]               # (T, 3C)
    q0, k0 = qkv0[:, :16], qkv0[:, 64:80]                                  # head 0, hs = 16
    s0 = q0 @ k0.T
    print(f"fresh GPT (C = 64, hs = 16): std of q's entries {q0.std():.3f}; scores q.k std {s0.std():.3f}, "
          f"q.k / sqrt(16) std {(s0 / 4).std():.3f}: nothing saturates at init")
    check(s0.std() < 0.5, "at initialisation the unscaled scores are already small")

    title("4. why divide by sqrt(hs): saturation, with unit-variance q and k")
    sat = {}
    print(f"{'hs':>4} {'var(q.k)':>9} {'peak unscaled':>14} {'peak scaled':>12} {'|J| unscaled':>13} {'|J| scaled':>11}"
          f" {'dead rows unscaled':>19} {'scaled':>7}")
    for hs in (16, 64, 256):    # unit-variance entries: what training can reach, not the init
        q, k = rng.standard_normal((400, 16, hs)), rng.standard_normal((400, 16, hs))   # 400 queries x 16 keys
        raw = np.einsum("nd,nkd->nk", q[:, 0], k)                                       # (400, 16) scores
        row = {}
        for label, sc in (("unscaled", raw), ("scaled", raw / math.sqrt(hs))):
            p = softmax(sc)
            J = p[:, :, None] * (np.eye(16) - p[:, None, :])                            # (400, 16, 16) dp_i/ds_j
            dead = float(np.mean(np.abs(J).max((1, 2)) < 0.01))                        # every entry < 0.01
            row[label] = (float(p.max(1).mean()), float(np.sqrt((J ** 2).sum((1, 2))).mean()), dead)
        sat[hs] = dict(var=float(raw.var()), **row)
        print(f"{hs:4d} {raw.var():9.1f} {row['unscaled'][0]:14.2f} {row['scaled'][0]:12.2f} "
              f"{row['unscaled'][1]:13.3f} {row['scaled'][1]:11.3f} {row['unscaled'][2]:19.0%} {row['scaled'][2]:7.0%}")
    check(all(abs(sat[h]["var"] / h - 1) < 0.2 for h in sat), "var(q.k) ~ hs for unit-variance entries")
    check(sat[256]["unscaled"][0] > 0.9 and sat[256]["unscaled"][1] < 0.4 * sat[256]["scaled"][1]
          and sat[256]["unscaled"][2] > 0.2 and sat[256]["scaled"][2] == 0,
          "hs = 256 unscaled: nearly one-hot; the Jacobian shrinks, and in many rows every entry is < 0.01")
    spread = [sat[h]["scaled"][1] for h in sat]
    check(max(spread) / min(spread) < 1.3, "scaled: the same softmax behaviour (Jacobian size) for every head size")
    peak_raw, peak_scaled = sat[64]["unscaled"][0], sat[64]["scaled"][0]

    def draw(fig):
        hss = list(sat)
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for label, style in (("unscaled", "o-"), ("scaled", "s-")):
            ax1.plot(hss, [sat[h][label][0] for h in hss], style, label=f"q.k {'/ sqrt(hs)' if label == 'scaled' else ''}")
            ax2.plot(hss, [sat[h][label][1] for h in hss], style, label=label)
        ax1.set(xscale="log", xlabel="head size hs", ylabel="mean largest softmax weight (16 keys)",
                title="saturation")
        ax2.set(xscale="log", xlabel="head size hs", ylabel="mean Frobenius norm of dp/ds",
                title="the gradient through softmax")
        for ax in (ax1, ax2):
            ax.minorticks_off()
            ax.set_xticks(hss, [str(h) for h in hss])
            ax.legend(fontsize=7)
    picture(args.out, "06_saturation.png", draw, size=(9, 3.5))

    title("5. multi-head attention by hand == npgpt's fused and reference ops")
    B, n_head, C = 2, 2, 8
    xb = rng.standard_normal((B, T, C))
    w_attn = rng.standard_normal((C, 3 * C)) * 0.3
    mine = np.stack([multi_head(xb[b], w_attn, n_head) for b in range(B)])
    qkv = xb @ w_attn
    fused = causal_self_attention(Tensor(qkv), n_head).data
    ref = causal_self_attention_reference(Tensor(qkv), n_head).data
    print(f"max |mine - fused| = {np.abs(mine - fused).max():.1e}, max |mine - reference| = {np.abs(mine - ref).max():.1e}")
    check(np.allclose(mine, fused) and np.allclose(mine, ref), "same outputs")

    title("causality: changing a later token leaves earlier outputs alone")
    xb2 = xb.copy()
    xb2[:, -1] += 10
    out2 = causal_self_attention(Tensor(xb2 @ w_attn), n_head).data
    check(np.allclose(out2[:, :-1], fused[:, :-1]) and not np.allclose(out2[:, -1], fused[:, -1]),
          "output t depends on tokens 0..t only")
    return {"saturation": sat, "peak_raw": float(peak_raw), "peak_scaled": float(peak_scaled)}


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
