"""Distillation loss: the hand formula, gradients (float64, random upstream), masking, the mix."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt.errors import NpgptError
from npgpt.gradcheck import gradcheck
from npgpt.ops.distill import check_distill_args, distill_loss, distill_loss_reference, mixed_loss
from npgpt.ops.nn import cross_entropy
from npgpt.tensor import Tensor


def hand_formula(s, t, T, ignore=None):
    """T^2 * mean over kept positions of sum_v p (log p - log q), straight from the definition."""
    def log_softmax(z):
        z = z / T
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    log_p, log_q = log_softmax(t.astype(np.float64)), log_softmax(s.astype(np.float64))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    keep = np.ones(kl.shape, bool) if ignore is None else ~ignore
    return T * T * kl[keep].sum() / max(keep.sum(), 1)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(2, 7))   # (B, T, V)


@settings(max_examples=20, deadline=None)
@given(shape=shapes, T=st.floats(0.5, 5.0), seed=st.integers(0, 2**16), masked=st.booleans())
def test_equals_hand_formula(shape, T, seed, masked):
    r = np.random.default_rng(seed)
    s, t = r.standard_normal(shape) * 3, r.standard_normal(shape) * 3
    ignore = r.random(shape[:-1]) < 0.3 if masked else None
    got = distill_loss(Tensor(s), t, temperature=T, ignore_mask=ignore)
    assert float(got.data) == pytest.approx(hand_formula(s, t, T, ignore), rel=1e-10, abs=1e-12)
    if not masked:
        ref = distill_loss_reference(Tensor(s), t, temperature=T)
        assert float(ref.data) == pytest.approx(float(got.data), rel=1e-10, abs=1e-12)


@settings(max_examples=15, deadline=None)
@given(shape=shapes, T=st.floats(0.5, 4.0), seed=st.integers(0, 2**16), masked=st.booleans())
def test_gradcheck(shape, T, seed, masked):
    r = np.random.default_rng(seed)
    s, t = r.standard_normal(shape), r.standard_normal(shape)
    ignore = r.random(shape[:-1]) < 0.3 if masked else None
    res = gradcheck(lambda x: distill_loss(x, t, temperature=T, ignore_mask=ignore), s, seed=seed)
    assert res.ok, str(res)


def test_float32_forward_stays_float32_and_matches():
    r = np.random.default_rng(0)
    s, t = r.standard_normal((2, 3, 5)).astype(np.float32), r.standard_normal((2, 3, 5)).astype(np.float32)
    out = distill_loss(Tensor(s), t)
    assert out.dtype == np.float32
    assert float(out.data) == pytest.approx(hand_formula(s, t, 2.0), rel=1e-5)


def test_no_gradient_to_the_teacher_and_zero_at_equal_logits():
    r = np.random.default_rng(1)
    s = Tensor(r.standard_normal((2, 4, 6)), requires_grad=True)
    teacher = Tensor(s.data.copy(), requires_grad=True)
    loss = distill_loss(s, teacher, temperature=3.0)
    assert abs(float(loss.data)) < 1e-12
    loss.backward()
    assert teacher.grad is None and np.abs(s.grad).max() < 1e-12


def test_all_positions_ignored_gives_zero_not_nan():
    s = Tensor(np.ones((1, 3, 4)), requires_grad=True)
    loss = distill_loss(s, np.zeros((1, 3, 4)) + np.arange(4), ignore_mask=np.ones((1, 3), bool))
    loss.backward()
    assert float(loss.data) == 0.0 and np.all(s.grad == 0)


def test_mixed_loss_is_the_documented_mix():
    r = np.random.default_rng(2)
    s, t = r.standard_normal((2, 3, 5)), r.standard_normal((2, 3, 5))
    y = r.integers(0, 5, size=(2, 3))
    y[0, 1] = -1                                                       # ignored in both terms
    ce = float(cross_entropy(Tensor(s), y).data)
    kd = float(distill_loss(Tensor(s), t, 2.0, ignore_mask=y == -1).data)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        got = float(mixed_loss(Tensor(s), t, y, alpha=alpha, temperature=2.0).data)
        assert got == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-12)
    res = gradcheck(lambda x: mixed_loss(x, t, y, alpha=0.5).reshape(1), s)
    assert res.ok, str(res)


@pytest.mark.parametrize("alpha,T,msg", [(1.5, 2.0, "--distill-alpha"), (-0.1, 2.0, "--distill-alpha"),
                                         (0.5, 0.0, "--distill-temperature")])
def test_bad_distill_args(alpha, T, msg):
    with pytest.raises(NpgptError, match=msg):
        check_distill_args(alpha, T)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        distill_loss(Tensor(np.zeros((2, 3))), np.zeros((2, 4)))


def test_distillation_step_moves_student_towards_teacher():
    """End to end: one model learns from another through the loss (the finetune --teacher loop)."""
    from npgpt.model import GPT, GPTConfig
    from npgpt.optim import AdamW
    from npgpt.tensor import no_grad
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    teacher, student = GPT(cfg, seed=1).eval(), GPT(cfg, seed=2).train()
    x = np.random.default_rng(0).integers(0, 11, size=(4, 8))
    opt = AdamW(student.named_parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        with no_grad():
            t_logits, _ = teacher(x)
        logits, _ = student(x)
        loss = distill_loss(logits, t_logits)
        loss.backward()
        opt.step()
        losses.append(float(loss.data))
    assert losses[-1] < 0.5 * losses[0]
