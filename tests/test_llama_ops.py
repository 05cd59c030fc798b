"""The Llama family's fused ops: each equals its composed reference and finite differences (float64,
random upstream gradient), over random shapes (hypothesis, bounded examples); RoPE's tables and
scalings against the formulas written out; grouped-query attention against repeated K/V and
against itself with nkv = nh."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npgpt import Tensor
from npgpt.ops import llama as L
from npgpt.ops.nn import dropout_mask

from test_nn_ops import grad_ok, rnd, same

seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 4)


# ---- RMSNorm -----------------------------------------------------------------------------------
# C >= 2: with C = 1 the normalised output is +-1 whatever x is (dx ~ 0, ill-conditioned)
@given(dims, st.integers(2, 6), seeds, st.sampled_from([1e-6, 1e-5, 0.1]))
def test_rms_norm(n, c, seed, eps):
    x, w = rnd(seed, 2, n, c, scale=2.0), rnd(seed + 1, c)
    same(lambda a, b: L.rms_norm(a, b, eps), lambda a, b: L.rms_norm_reference(a, b, eps), x, w)
    grad_ok(lambda a, b: L.rms_norm(a, b, eps), x, w)


def test_rms_norm_is_plain_formula():
    x, w = rnd(0, 3, 8), rnd(1, 8)
    y = L.rms_norm(Tensor(x), Tensor(w), 1e-6).data
    np.testing.assert_allclose(y, x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * w, rtol=1e-12)


# ---- RoPE --------------------------------------------------------------------------------------
def _tables(seed, B, T, hs, per_row):
    r = np.random.default_rng(seed)
    pos = r.integers(0, 50, size=(B, T)) if per_row else np.arange(T)
    inv = L.rope_inv_freq(hs, theta=float(r.choice([100.0, 10000.0])))
    return L.rope_tables(pos, inv, np.float64)


@given(dims, dims, dims, st.sampled_from([2, 4, 6]), seeds, st.booleans())
def test_rope(B, T, n, hs, seed, per_row):
    cos, sin = _tables(seed, B, T, hs, per_row)
    x = rnd(seed, B, T, n, hs)
    same(lambda t: L.rope(t, cos, sin), lambda t: L.rope_reference(t, cos, sin), x)
    grad_ok(lambda t: L.rope(t, cos, sin), x)


def test_rope_is_a_rotation_of_channel_pairs():
    """Hugging Face's rotate_half: q * cos(emb) + rotate_half(q) * sin(emb), emb = [freqs, freqs]."""
    B, T, n, hs, theta = 2, 5, 3, 8, 10000.0
    x = rnd(4, B, T, n, hs)
    inv = 1.0 / theta ** (np.arange(0, hs, 2) / hs)
    emb = np.concatenate([np.arange(T)[:, None] * inv] * 2, axis=-1)[None, :, None, :]   # (1, T, 1, hs)
    rot = np.concatenate([-x[..., hs // 2:], x[..., :hs // 2]], axis=-1)
    want = x * np.cos(emb) + rot * np.sin(emb)
    cos, sin = L.rope_tables(np.arange(T), L.rope_inv_freq(hs, theta), np.float64)
    np.testing.assert_allclose(L.rope(Tensor(x), cos, sin).data, want, rtol=1e-12, atol=1e-12)
    # relative: the score of a query at i and a key at j depends only on i - j
    q, k = rnd(5, 1, 1, 1, hs), rnd(6, 1, 1, 1, hs)
    cos, sin = L.rope_tables(np.arange(40), L.rope_inv_freq(hs, theta), np.float64)

    def at(v, p):
        return L.rope(Tensor(np.repeat(v, 40, axis=1)), cos, sin).data[0, p, 0]

    assert at(q, 7) @ at(k, 3) == pytest.approx(at(q, 30) @ at(k, 26), rel=1e-10)


def test_rope_scalings_follow_their_formulas():
    hs, theta = 64, 500000.0
    base = 1.0 / theta ** (np.arange(0, hs, 2) / hs)
    np.testing.assert_allclose(L.rope_inv_freq(hs, theta, {"rope_type": "linear", "factor": 4.0}), base / 4)
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    got = L.rope_inv_freq(hs, theta, sc)
    for f, g in zip(base, got):          # Llama 3.1's rule, one frequency at a time
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            want = f
        elif wavelen > 8192 / 1.0:
            want = f / 8.0
        else:
            s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want = (1 - s) * f / 8.0 + s * f
        assert g == pytest.approx(want, rel=1e-12)
    assert (got < base).any() and (got == base).any()   # both ends of the spectrum are exercised


def test_rope_rejects_tables_that_do_not_fit():
    cos, sin = L.rope_tables(np.arange(3), L.rope_inv_freq(4))
    with pytest.raises(ValueError, match="do not fit"):
        L.rope(Tensor(np.ones((1, 4, 1, 4))), cos, sin)
    with pytest.raises(ValueError, match="even"):
        L.rope(Tensor(np.ones((1, 3, 1, 5))), cos, sin)


# ---- SwiGLU ------------------------------------------------------------------------------------
@given(dims, dims, seeds)
def test_swiglu(n, h, seed):
    g, u = rnd(seed, 2, n, h, scale=2.0), rnd(seed + 1, 2, n, h)
    same(L.swiglu, L.swiglu_reference, g, u)
    grad_ok(L.swiglu, g, u)


def test_swiglu_does_not_overflow():
    g = np.array([-1000.0, 0.0, 1000.0], dtype=np.float32)
    y = L.swiglu(Tensor(g), Tensor(np.ones(3, np.float32))).data
    assert np.isfinite(y).all() and y[0] == 0 and y[2] == 1000


# ---- grouped-query attention -------------------------------------------------------------------
@given(st.integers(1, 2), st.integers(1, 5), st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3), (6, 2)]),
       st.sampled_from([1, 2, 3]), seeds)
def test_gqa_attention(B, T, heads, hs, seed):
    nh, nkv = heads
    q, k, v = rnd(seed, B, T, nh, hs), rnd(seed + 1, B, T, nkv, hs), rnd(seed + 2, B, T, nkv, hs)
    same(L.gqa_attention, L.gqa_attention_reference, q, k, v)
    grad_ok(L.gqa_attention, q, k, v)


def test_gqa_with_one_kv_head_per_query_head_is_multi_head_attention():
    """nkv = nh: the GPT op (npgpt.ops.nn.causal_self_attention) on the same heads gives the same output."""
    from npgpt.ops.nn import causal_self_attention
    B, T, nh, hs = 2, 6, 3, 4
    q, k, v = rnd(1, B, T, nh, hs), rnd(2, B, T, nh, hs), rnd(3, B, T, nh, hs)
    qkv = np.concatenate([a.reshape(B, T, nh * hs) for a in (q, k, v)], axis=-1)
    want = causal_self_attention(Tensor(qkv), nh).data
    np.testing.assert_allclose(L.gqa_attention(Tensor(q), Tensor(k), Tensor(v)).data, want, rtol=1e-12)


def test_gqa_with_dropout_matches_the_mask_it_draws():
    B, T, nh, nkv, hs = 2, 5, 4, 2, 3
    q, k, v = rnd(1, B, T, nh, hs), rnd(2, B, T, nkv, hs), rnd(3, B, T, nkv, hs)
    y = L.gqa_attention(Tensor(q), Tensor(k), Tensor(v), dropout=0.3, rng=np.random.default_rng(5)).data
    att = L.gqa_probs(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3))           # (B, nh, T, T)
    keep = dropout_mask((B, nkv, nh // nkv * T, T), 0.3, np.random.default_rng(5), np, att.dtype)
    keep = keep.reshape(B, nh, T, T)
    vr = np.repeat(v, nh // nkv, axis=2).transpose(0, 2, 1, 3)                     # (B, nh, T, hs)
    want = ((att * keep) @ vr).transpose(0, 2, 1, 3).reshape(B, T, nh * hs)
    np.testing.assert_allclose(y, want, rtol=1e-12)
    grad_ok(lambda a, b, c: L.gqa_attention(a, b, c, dropout=0.3, rng=np.random.default_rng(5)), q, k, v)


def test_gqa_probs_with_a_cache_equals_the_full_forward():
    """Queries at the last Tq of Tk positions see the same rows as a full causal pass; padded keys vanish."""
    B, T, nh, nkv, hs = 2, 6, 4, 2, 3
    q, k = rnd(1, B, nh, T, hs), rnd(2, B, nkv, T, hs)
    full = L.gqa_probs(q, k)
    np.testing.assert_allclose(L.gqa_probs(q[:, :, 4:], k), full[:, :, 4:], rtol=1e-12)
    mask = np.ones((B, T), dtype=bool)
    mask[0, :2] = False
    masked = L.gqa_probs(q, k, mask)
    assert np.all(masked[0, :, 2:, :2] == 0) and np.allclose(masked.sum(-1), 1)


def test_gqa_rejects_heads_that_do_not_group():
    with pytest.raises(ValueError, match="grouped-query"):
        L.gqa_attention(Tensor(np.ones((1, 2, 3, 2))), Tensor(np.ones((1, 2, 2, 2))), Tensor(np.ones((1, 2, 2, 2))))


def test_ops_keep_float32():
    x = np.ones((2, 3, 2, 4), np.float32)
    cos, sin = L.rope_tables(np.arange(3), L.rope_inv_freq(4))
    assert L.rope(Tensor(x), cos, sin).dtype == np.float32
    assert L.rms_norm(Tensor(x), Tensor(np.ones(4, np.float32))).dtype == np.float32
    assert L.swiglu(Tensor(x), Tensor(x)).dtype == np.float32
    assert L.gqa_attention(Tensor(x), Tensor(x), Tensor(x)).dtype == np.float32
