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
4. The 1/sqrt(hs) scale. If q and k have independent unit-variance entries, q . k is a sum of
   hs such products: variance hs. Scores with std 8 (hs = 64) push softmax to near one-hot, so
   a token sees one other token and the gradients through the others vanish. Dividing by
   sqrt(hs) brings the variance back to 1. The lesson measures both.
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
from lesson_kit import check, parse, title  # noqa: E402

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
    parse(argv, __doc__)
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

    title("4. why divide by sqrt(hs)")
    hs = 64
    q, k = rng.standard_normal((1000, hs)), rng.standard_normal((1000, hs))
    raw = (q * k).sum(1)
    print(f"var(q.k) = {raw.var():.1f} (hs = {hs});  var(q.k / sqrt(hs)) = {(raw / 8).var():.2f}")
    s_raw = rng.standard_normal((200, 16)) * math.sqrt(hs)         # 16 keys, scores with variance hs
    peak_raw = softmax(s_raw).max(1).mean()
    peak_scaled = softmax(s_raw / math.sqrt(hs)).max(1).mean()
    print(f"mean largest softmax weight over 16 keys: unscaled {peak_raw:.2f}, scaled {peak_scaled:.2f}")
    check(abs(raw.var() / hs - 1) < 0.2 and peak_raw > 0.8 > peak_scaled,
          "unscaled scores have variance ~hs and make softmax nearly one-hot")

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
    return {"var_raw": float(raw.var()), "peak_raw": float(peak_raw), "peak_scaled": float(peak_scaled)}


if __name__ == "__main__":
    main()
