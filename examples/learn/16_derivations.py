"""Lesson 16: the missing derivations, each written in NumPy and checked against npgpt's fused op.

    python examples/learn/16_derivations.py [--out DIR]

Try the exercises first (`npgpt exercise start attention work/` and the others): this lesson
shows one worked answer for each, with the reasoning.

1. Attention's backward. Forward, per head: S = q k^T / sqrt(hs), masked; P = softmax(S); Y = P v.
   Backward, line by line from the end:
       dP = dY v^T,  dv = P^T dY                       (Y = P v: a matmul, lesson 02)
       dS = P * (dP - rowsum(dP * P))                  (softmax's Jacobian, lesson 04; 0 where masked)
       dq = dS k / sqrt(hs),  dk = dS^T q / sqrt(hs)   (S = q k^T / sqrt(hs))
   then dq, dk, dv go back side by side into qkv's layout. Checked against the fused
   causal_self_attention's hand-written backward.
2. GELU and the MLP. y = 0.5 x (1 + tanh(u)), u = k (x + 0.044715 x^3), k = sqrt(2/pi):
       dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) k (1 + 3 * 0.044715 x^2)
   The MLP h = gelu(x W1 + b1), y = h W2 + b2 is three known backwards chained.
3. The embedding's backward and weight tying. x = wte[ids] copies rows, so the gradient of a row
   is the sum of the gradients of every position that read it (np.add.at; `dw[ids] += g` keeps
   only one of repeated ids). With a tied head (logits = x wte^T) the table is used twice, and its
   gradient is the sum of both uses: "gradients add" (lesson 01's g = a * a, on a matrix).
4. RMSNorm (Llama). y = x * r * w with r = 1 / sqrt(mean(x^2) + eps). With xhat = x r, g = dy * w:
       dx = r (g - xhat * mean(g * xhat)),   dw = sum over rows of dy * xhat
   LayerNorm's formula without the mean(g) term: no mean is subtracted, so the gradient keeps
   its mean.
5. RoPE: why a rotation makes the score depend on relative position. Rotate q at position m by
   angle m*theta and k at position n by n*theta (each channel pair its own theta). For one pair,
   R(a)^T R(b) = R(b - a), so (R(m theta) q) . (R(n theta) k) = q . R((n - m) theta) k: the score
   depends on n - m only. The lesson shows it numerically (the same score for every pair of
   positions with the same offset), and that learned absolute position vectors added to q and k
   (GPT-2's wpe) do not have this property. Backward: a rotation's inverse is its transpose, so
   the gradient turns back by the same angle.
6. SwiGLU (Llama's MLP). y = silu(g) * u, silu(g) = g sigmoid(g):
       du = dy silu(g),   dg = dy u sigmoid(g) (1 + g (1 - sigmoid(g)))
7. Grouped-query attention. nh query heads share nkv < nh key/value heads (query head h reads
   kv head h // (nh / nkv)). Forward equals multi-head attention with each kv head repeated
   nh / nkv times; backward then sums the repeated copies' gradients: a shared k or v collects the
   gradient of every query head in its group (gradients add, again). The K/V cache shrinks by
   nh / nkv.
"""

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, parse, picture, title  # noqa: E402

from npgpt import GPT, GPTConfig, Tensor  # noqa: E402
from npgpt.ops import nn as F  # noqa: E402
from npgpt.ops.llama import gqa_attention, rms_norm, rope, rope_inv_freq, rope_tables, swiglu  # noqa: E402


def err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- 1. attention ------------------------------------------------------------------------------
def attention_forward(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = (a.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, axis=-1))
    S = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)                        # (B, nh, T, T)
    S = np.where(np.tril(np.ones((T, T), dtype=bool)), S, -np.inf)
    P = softmax(S)
    Y = (P @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return Y, (q, k, v, P)


def attention_backward(dY, cache):
    q, k, v, P = cache
    B, nh, T, hs = q.shape
    dYh = dY.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)                   # (B, nh, T, hs)
    dP = dYh @ v.transpose(0, 1, 3, 2)                                      # Y = P v
    dv = P.transpose(0, 1, 3, 2) @ dYh
    dS = P * (dP - (dP * P).sum(-1, keepdims=True))                         # softmax, row by row
    dq = dS @ k / math.sqrt(hs)                                             # S = q k^T / sqrt(hs)
    dk = dS.transpose(0, 1, 3, 2) @ q / math.sqrt(hs)
    return np.concatenate([a.transpose(0, 2, 1, 3).reshape(B, T, nh * hs) for a in (dq, dk, dv)], axis=-1)


def section_attention(rng):
    title("1. attention's backward, by hand, against the fused op")
    qkv, dY = rng.standard_normal((2, 6, 3 * 8)), rng.standard_normal((2, 6, 8))
    Y, cache = attention_forward(qkv, 2)
    mine = attention_backward(dY, cache)
    t = Tensor(qkv, requires_grad=True)
    F.causal_self_attention(t, 2).backward(dY)
    print(f"max |Y - fused| = {err(Y, F.causal_self_attention(Tensor(qkv), 2).data):.1e}, "
          f"max |dqkv - fused backward| = {err(mine, t.grad):.1e}")
    check(err(mine, t.grad) < 1e-12, "the hand-derived attention backward equals the fused op's")
    return err(mine, t.grad)


# ---- 2. GELU and the MLP -----------------------------------------------------------------------
K = math.sqrt(2 / math.pi)


def gelu(x):
    return 0.5 * x * (1 + np.tanh(K * (x + 0.044715 * x ** 3)))


def gelu_grad(x):
    t = np.tanh(K * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * K * (1 + 3 * 0.044715 * x * x)


def section_mlp(rng):
    title("2. GELU and the MLP")
    x, W1, b1 = rng.standard_normal((5, 4)), rng.standard_normal((4, 16)) * 0.5, rng.standard_normal(16) * 0.1
    W2, b2, dy = rng.standard_normal((16, 4)) * 0.5, rng.standard_normal(4) * 0.1, rng.standard_normal((5, 4))
    a = x @ W1 + b1
    h = gelu(a)
    dh = dy @ W2.T                                      # y = h W2 + b2
    dW2, db2 = h.T @ dy, dy.sum(0)
    da = dh * gelu_grad(a)                              # h = gelu(a)
    dx, dW1, db1 = da @ W1.T, x.T @ da, da.sum(0)       # a = x W1 + b1
    ts = [Tensor(v, requires_grad=True) for v in (x, W1, b1, W2, b2)]
    F.linear(F.gelu(F.linear(ts[0], ts[1], ts[2])), ts[3], ts[4]).backward(dy)
    worst = max(err(m, t.grad) for m, t in zip((dx, dW1, db1, dW2, db2), ts))
    print(f"max |hand - npgpt| over dx, dW1, db1, dW2, db2 = {worst:.1e}")
    check(worst < 1e-12, "GELU's derivative chained through the MLP equals npgpt's")


# ---- 3. embedding and tying --------------------------------------------------------------------
def section_embedding(rng):
    title("3. the embedding's backward and weight tying: gradients add")
    V, C = 6, 4
    ids = np.array([[1, 3, 3, 0], [3, 5, 1, 2]])       # token 3 read three times
    g = rng.standard_normal((2, 4, C))                  # the gradient arriving at x = wte[ids]
    right = np.zeros((V, C))
    np.add.at(right, ids.reshape(-1), g.reshape(-1, C))
    wrong = np.zeros((V, C))
    wrong[ids.reshape(-1)] += g.reshape(-1, C)          # fancy-index += keeps one of repeated ids
    print(f"row 3 (read 3 times): np.add.at gives {np.round(right[3], 3)}, dw[ids] += g gives {np.round(wrong[3], 3)}")
    check(np.allclose(right[3], g.reshape(-1, C)[ids.reshape(-1) == 3].sum(0)) and not np.allclose(right[3], wrong[3]),
          "a row's gradient is the sum over every position that read it (np.add.at, not +=)")
    model = GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=C), seed=0).astype(np.float64)
    targets = rng.integers(0, V, ids.shape)
    tr = model.transformer
    # the two uses of wte, differentiated separately: freeze one use by passing a constant copy
    wte = tr.wte.weight
    const = Tensor(wte.data.copy())

    def loss_with(lookup, head):
        x = F.embedding(lookup, ids) + tr.wpe.weight[:ids.shape[1]]
        for block in tr.h:
            x = block(x)
        return F.cross_entropy(F.linear(tr.ln_f(x), head.T), targets)
    model.zero_grad()
    loss_with(wte, const).backward()
    g_lookup = wte.grad.copy()
    model.zero_grad()
    loss_with(const, wte).backward()
    g_head = wte.grad.copy()
    model.zero_grad()
    model(ids, targets)[1].backward()
    print(f"|lookup part| = {np.abs(g_lookup).sum():.3f}, |head part| = {np.abs(g_head).sum():.3f}; "
          f"max |(lookup + head) - tied model's wte.grad| = {err(g_lookup + g_head, wte.grad):.1e}")
    check(err(g_lookup + g_head, wte.grad) < 1e-12, "the tied table's gradient is the lookup's plus the head's")


# ---- 4. RMSNorm --------------------------------------------------------------------------------
def section_rmsnorm(rng):
    title("4. RMSNorm (Llama)")
    x, w, dy = rng.standard_normal((3, 8)) * 2 + 0.5, rng.standard_normal(8), rng.standard_normal((3, 8))
    r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    xhat, g = x * r, dy * w
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    dw = (dy * xhat).sum(0)
    tx, tw = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    rms_norm(tx, tw, eps=1e-6).backward(dy)
    print(f"max |dx - fused| = {err(dx, tx.grad):.1e}, max |dw - fused| = {err(dw, tw.grad):.1e}; "
          f"mean of dx per row (not 0, unlike LayerNorm's): {np.round(dx.mean(-1), 3)}")
    check(err(dx, tx.grad) < 1e-12 and err(dw, tw.grad) < 1e-12, "the derived RMSNorm backward equals the fused op's")


# ---- 5. RoPE -----------------------------------------------------------------------------------
def section_rope(rng, out):
    title("5. RoPE: the score depends on the offset n - m only")
    hs, T = 8, 12
    inv = rope_inv_freq(hs)
    cos, sin = rope_tables(np.arange(T), inv, dtype=np.float64)         # (T, hs/2)
    q, k = rng.standard_normal(hs), rng.standard_normal(hs)
    # the same q at every position and the same k at every position, each turned by its position
    Q = rope(Tensor(np.broadcast_to(q, (1, T, 1, hs)).copy()), cos, sin).data[0, :, 0]
    Kr = rope(Tensor(np.broadcast_to(k, (1, T, 1, hs)).copy()), cos, sin).data[0, :, 0]
    S = Q @ Kr.T                                                          # S[m, n]: query at m, key at n
    spread = max(float(np.ptp(np.diagonal(S, d))) for d in range(-T + 1, T))
    print("scores of the same q, k at positions (m, n), rows m = 0..5, columns n = 0..5:")
    print(np.round(S[:6, :6], 2))
    print(f"largest spread of the scores along any diagonal (fixed n - m): {spread:.1e}")
    check(spread < 1e-12, "with RoPE, score(m, n) depends only on n - m")
    wpe = rng.standard_normal((T, hs)) * 0.5                              # learned absolute positions
    A = (q + wpe) @ (k + wpe).T
    spread_abs = max(float(np.ptp(np.diagonal(A, d))) for d in range(-T + 2, T - 1))
    print(f"with absolute position vectors added instead: spread along a diagonal {spread_abs:.2f}")
    check(spread_abs > 0.1, "added absolute positions do not make the score relative")
    x, dy = rng.standard_normal((1, T, 2, hs)), rng.standard_normal((1, T, 2, hs))
    t = Tensor(x, requires_grad=True)
    rope(t, cos, sin).backward(dy)
    back = rope(Tensor(dy), cos, -sin).data                              # turn back: the inverse angle
    check(err(back, t.grad) < 1e-12, "RoPE's backward turns the gradient back by the same angle")

    def draw(fig):
        for i, (M, name) in enumerate(((S, "RoPE: constant along diagonals"), (A, "absolute positions added"))):
            ax = fig.add_subplot(1, 2, i + 1)
            im = ax.imshow(M, cmap="coolwarm")
            ax.set(xlabel="key position n", ylabel="query position m", title=name)
            fig.colorbar(im, ax=ax, shrink=0.8)
    picture(out, "16_rope_relative.png", draw, size=(9, 4))


# ---- 6. SwiGLU ---------------------------------------------------------------------------------
def section_swiglu(rng):
    title("6. SwiGLU (Llama's MLP)")
    g, u, dy = rng.standard_normal((4, 6)) * 2, rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    s = 1 / (1 + np.exp(-g))
    du = dy * g * s
    dg = dy * u * s * (1 + g * (1 - s))
    tg, tu = Tensor(g, requires_grad=True), Tensor(u, requires_grad=True)
    swiglu(tg, tu).backward(dy)
    print(f"max |dg - fused| = {err(dg, tg.grad):.1e}, max |du - fused| = {err(du, tu.grad):.1e}")
    check(err(dg, tg.grad) < 1e-12 and err(du, tu.grad) < 1e-12, "silu's derivative s (1 + g (1 - s)) is the fused op's")


# ---- 7. GQA ------------------------------------------------------------------------------------
def section_gqa(rng):
    title("7. grouped-query attention: shared k, v heads collect their group's gradients")
    B, T, nh, nkv, hs = 2, 5, 4, 2, 3
    q, k, v = rng.standard_normal((B, T, nh, hs)), rng.standard_normal((B, T, nkv, hs)), rng.standard_normal((B, T, nkv, hs))
    dy = rng.standard_normal((B, T, nh * hs))
    # multi-head attention with each kv head repeated for its group of nh / nkv query heads
    rep = nh // nkv
    k_rep, v_rep = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)     # head h reads kv head h // rep
    qkv = np.concatenate([a.reshape(B, T, nh * hs) for a in (q, k_rep, v_rep)], axis=-1)
    y, cache = attention_forward(qkv, nh)
    dqkv = attention_backward(dy, cache)
    dq, dk_rep, dv_rep = (a.reshape(B, T, nh, hs) for a in np.split(dqkv, 3, axis=-1))
    dk = dk_rep.reshape(B, T, nkv, rep, hs).sum(3)                         # the copies' gradients add
    dv = dv_rep.reshape(B, T, nkv, rep, hs).sum(3)
    tq, tk, tv = (Tensor(a, requires_grad=True) for a in (q, k, v))
    fused = gqa_attention(tq, tk, tv)
    fused.backward(dy)
    worst = max(err(y, fused.data), err(dq, tq.grad), err(dk, tk.grad), err(dv, tv.grad))
    print(f"max |repeat-then-sum - fused GQA| over y, dq, dk, dv = {worst:.1e}; "
          f"K/V cache: {nkv} heads instead of {nh} ({nh // nkv}x smaller)")
    check(worst < 1e-12, "GQA = attention with repeated kv heads, whose gradients sum back per group")


def main(argv=None):
    args = parse(argv, __doc__)
    rng = np.random.default_rng(0)
    res = {"attention": section_attention(rng)}
    section_mlp(rng)
    section_embedding(rng)
    section_rmsnorm(rng)
    section_rope(rng, args.out)
    section_swiglu(rng)
    section_gqa(rng)
    return res


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
