"""Fast paths against their plain references: the stable softmax helpers, the bounded causal mask,
the path record of the fused ops, and the blocked quantised matmul."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt import Tensor
from npgpt.ops import nn as N
from npgpt.ops.reduce import log_softmax_array, softmax_array

seeds = st.integers(0, 2**32 - 1)


def naive_log_softmax(x, axis=-1):
    """In float64 with Python's own max shift, written independently of the helper."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(1, 4), st.integers(1, 9), st.sampled_from([1.0, 30.0, 1e3]), st.sampled_from([0, 1, -1]))
def test_softmax_helpers_match_float64(seed, rows, cols, scale, axis):
    x = (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)
    want = naive_log_softmax(x, axis)
    np.testing.assert_allclose(log_softmax_array(x, axis=axis), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(softmax_array(x, axis=axis), np.exp(want), rtol=1e-5, atol=1e-6)
    y, m, log_sum = softmax_array(x, axis=axis, return_stats=True)
    np.testing.assert_allclose(x - m - log_sum, want, rtol=1e-5, atol=1e-4)
    assert np.isfinite(y).all() and y.dtype == np.float32


def test_softmax_helper_in_place_and_keeps_input():
    x = np.array([[1e3, -1e3, 0.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    keep = x.copy()
    y = softmax_array(x)
    np.testing.assert_array_equal(x, keep)                  # out=None never touches the input
    out = softmax_array(x, out=x)
    assert out is x
    np.testing.assert_allclose(x, y)
    np.testing.assert_allclose(x[0], [1, 0, 0], atol=1e-7)
    np.testing.assert_allclose(x[1], [1 / 3] * 3, rtol=1e-6)


def test_cross_entropy_keeps_precision_at_large_logits():
    # the target holds nearly all the mass at logits around 1e3: the loss is tiny, and must not be
    # rounded to a multiple of float32's spacing at 1e3 (6e-5)
    z = np.array([[1000.0, 990.0, 985.0]], dtype=np.float32)
    want = -naive_log_softmax(z)[0, 0]
    got = float(N.cross_entropy(Tensor(z), np.array([0])).data)
    assert abs(got - want) < 1e-7 * max(want, 1.0) + 1e-9, (got, want)


def test_causal_bias_is_a_slice_of_one_mask_per_dtype():
    N._masks.clear()
    for Tq, Tk in [(1, 1), (3, 3), (1, 7), (2, 5), (5, 65), (64, 64), (1, 200), (7, 130)]:
        for dtype in (np.float32, np.float64):
            got = N.causal_bias(Tq, Tk, dtype)
            assert got.shape == (Tq, Tk) and got.dtype == dtype
            np.testing.assert_array_equal(got, N.causal_bias_reference(Tq, Tk, dtype))
    assert len(N._masks) == 2                               # one per dtype, however many lengths
    assert all(m.shape == (256, 256) for m in N._masks.values())   # the longest (200), rounded up


def test_fused_ops_record_their_path():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 3, 6)).astype(np.float32), requires_grad=True)
    w = Tensor(np.ones(6, np.float32), requires_grad=True)
    b = Tensor(np.zeros(6, np.float32), requires_grad=True)
    outs = [N.layer_norm(x, w, b), N.gelu(x), N.causal_self_attention(x, 2),
            N.cross_entropy(x, np.zeros((2, 3), int))]
    for y in outs:
        assert y._ctx.kernel is False, type(y._ctx).__name__    # CPU arrays: the NumPy path
        y.backward(np.ones(y.shape, np.float32))                # and backward follows the record


@settings(max_examples=25, deadline=None)
@given(seeds, st.sampled_from([8, 4]), st.sampled_from([None, 2, 3]), st.integers(1, 3), st.integers(1, 600))
def test_blocked_quantized_matmul_matches_dequantize_then_multiply(seed, bits, group, n_rows, n_out):
    from npgpt import layers as Q
    n_in = 6 if group else 7                                 # odd: the int4 packing pads a row
    rng = np.random.default_rng(seed)
    stored, scales = Q.encode_weight(rng.standard_normal((n_in, n_out)).astype(np.float32), bits, group)
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    want = x @ Q.decode_weight(stored, scales, n_in, bits)
    got = Q.quantized_matmul(x, stored, scales, n_in, bits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_quantized_linear_fast_and_reference_paths_agree():
    from npgpt import no_grad
    from npgpt import layers as Q
    from npgpt.nn import Linear
    lin = Linear(8, 700, rng=np.random.default_rng(0))
    for bits, group in [(8, None), (4, 4)]:
        ql = Q.QuantizedLinear.from_linear(lin, bits, group)
        x = Tensor(np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32))
        with no_grad():
            fast = ql(x)
        np.testing.assert_allclose(fast.data, ql.forward_reference(x).data, rtol=1e-5, atol=1e-5)
        xg = Tensor(x.data, requires_grad=True)                # a gradient wants the reference path
        ql(xg).sum().backward()
        assert xg.grad is not None and xg.grad.shape == x.shape


def test_bpe_encode_all_cached_pass_matches_reference():
    from npgpt.tokenizer.bpe import BPETokenizer
    text = "the cat sat on the mat; the dog sat on the log. " * 20
    tok = BPETokenizer.train(text, vocab_size=270)
    first = tok.encode(text)                                # fills the cache (the KeyError path)
    assert tok.encode(text) == first == tok._reference_encode(text)   # every piece cached: one pass
    assert tok.encode(text + " zebra") == tok._reference_encode(text + " zebra")   # a new piece again


@pytest.mark.parametrize("B,T,nh,hs", [(2, 5, 2, 3), (4, 260, 2, 4)])   # the second spans several blocks
def test_attention_recompute_matches_saved_probabilities(B, T, nh, hs):
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, 3 * nh * hs))
    dy = rng.standard_normal((B, T, nh * hs))
    results = []
    for recompute in (True, False):
        N.CausalSelfAttention.recompute_scores = recompute
        try:
            x = Tensor(qkv.copy(), requires_grad=True)
            y = N.causal_self_attention(x, nh)
            assert y._ctx.recompute is recompute
            y.backward(dy)
        finally:
            N.CausalSelfAttention.recompute_scores = True
        results.append((y.data, x.grad))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shape", [(2, 3, 5), (70, 4000)])   # the second spans several row blocks
def test_gelu_recomputed_tanh_matches_kept_tanh(shape):
    rng = np.random.default_rng(0)
    x0, dy = rng.standard_normal(shape) * 3, rng.standard_normal(shape)
    results = []
    for keep in (False, True):
        N.GELU.keep_tanh = keep
        try:
            x = Tensor(x0.copy(), requires_grad=True)
            y = N.gelu(x)
            assert (y._ctx.saved[1] is None) is (not keep)
            y.backward(dy)
        finally:
            N.GELU.keep_tanh = False
        results.append((y.data, x.grad))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
