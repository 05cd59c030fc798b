"""AdamW over flat buffers, the LR schedule and clipping, checked against plain per-parameter NumPy."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from npgpt.backend import asnumpy
from npgpt.errors import NpgptError
from npgpt.optim import AdamW, adamw_update, get_lr

SHAPES = {  # a miniature GPT's parameter names and shapes; 2-D ones decay
    "transformer.wte.weight": (11, 4),
    "transformer.h.0.ln_1.weight": (4,),
    "transformer.h.0.ln_1.bias": (4,),
    "transformer.h.0.attn.c_attn.weight": (4, 12),
    "transformer.h.0.attn.c_attn.bias": (12,),
    "transformer.ln_f.weight": (4,),
}


def make_params(xp, seed=0):
    r = np.random.default_rng(seed)
    return [(name, SimpleNamespace(data=xp.asarray(r.standard_normal(shape).astype(np.float32)), grad=None))
            for name, shape in SHAPES.items()]


def reference_adamw(params, grads_per_step, lrs, betas=(0.9, 0.95), eps=1e-8, wd=0.1):
    """Per-parameter AdamW in float64, written from the PyTorch docs."""
    b1, b2 = betas
    p = {n: v.astype(np.float64) for n, v in params.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    v2 = {n: np.zeros_like(v) for n, v in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for n in p:
            g = grads[n].astype(np.float64)
            if p[n].ndim >= 2:
                p[n] = p[n] - lr * wd * p[n]
            m[n] = b1 * m[n] + (1 - b1) * g
            v2[n] = b2 * v2[n] + (1 - b2) * g * g
            mhat = m[n] / (1 - b1 ** t)
            vhat = v2[n] / (1 - b2 ** t)
            p[n] = p[n] - lr * mhat / (np.sqrt(vhat) + eps)
    return p


def test_adamw_matches_reference_over_several_steps(xp):
    named = make_params(xp)
    start = {n: asnumpy(p.data).copy() for n, p in named}
    opt = AdamW(named, lr=1e-2, weight_decay=0.1)
    r = np.random.default_rng(1)
    grads_per_step, lrs = [], []
    for step in range(5):
        opt.zero_grad()
        grads = {n: r.standard_normal(SHAPES[n]).astype(np.float32) for n in SHAPES}
        for n, p in named:
            p.grad += xp.asarray(grads[n])          # the autograd engine accumulates in place
        lr = 1e-2 * (step + 1) / 5
        opt.step(lr)
        grads_per_step.append(grads)
        lrs.append(lr)
    ref = reference_adamw(start, grads_per_step, lrs)
    for n, p in named:
        got = asnumpy(p.data)
        assert got.dtype == np.float32, "the update must not promote to float64"
        np.testing.assert_allclose(got, ref[n], rtol=1e-5, atol=1e-6, err_msg=n)
    # weight decay really touched only the matrices: without it, only they would differ
    nodecay = reference_adamw(start, grads_per_step, lrs, wd=0.0)
    for n in SHAPES:
        moved = not np.allclose(ref[n], nodecay[n], rtol=0, atol=1e-7)
        assert moved == (len(SHAPES[n]) >= 2), n


def test_decay_groups_and_describe():
    named = make_params(np)
    opt = AdamW(named)
    n_decay = 11 * 4 + 4 * 12
    n_other = 4 + 4 + 12 + 4
    assert opt.n_decay == n_decay and opt.flat.size == n_decay + n_other
    assert opt.describe() == (f"num decayed parameter tensors: 2, with {n_decay:,} parameters; "
                              f"num non-decayed parameter tensors: 4, with {n_other:,} parameters")
    # decayed tensors come first in the flat buffer
    assert [s.name for s in opt.slots[:2]] == ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"]


def test_params_and_grads_are_views_of_the_flat_buffers():
    named = make_params(np)
    before = {n: p.data.copy() for n, p in named}
    opt = AdamW(named)
    for n, p in named:
        assert np.shares_memory(p.data, opt.flat) and np.shares_memory(p.grad, opt.grad)
        np.testing.assert_array_equal(p.data, before[n])   # values copied in
        assert not p.grad.any()
    named[0][1].grad += 1.0
    assert opt.grad[:44].sum() == 44.0
    opt.step()
    assert np.shares_memory(named[0][1].data, opt.flat)


def test_replaced_grad_and_data_are_copied_back_in():
    named = make_params(np)
    opt = AdamW(named, lr=0.1, weight_decay=0.0)
    name, p = named[1]
    p.grad = np.ones(SHAPES[name], np.float32)               # someone replaced the view
    other = named[2][1]
    other.grad = None                                         # or dropped it
    new_data = np.full(SHAPES[name], 3.0, np.float32)
    p.data = new_data
    opt.step()
    assert np.shares_memory(p.data, opt.flat) and np.shares_memory(p.grad, opt.grad)
    assert np.shares_memory(other.grad, opt.grad) and not other.grad.any()
    np.testing.assert_allclose(p.data, 3.0 - 0.1, rtol=1e-5)  # first Adam step moves by ~lr * sign(g)
    opt.zero_grad()
    assert not opt.grad.any()


def test_clip_grad_norm_value_and_scaling(xp):
    named = make_params(xp)
    opt = AdamW(named)
    r = np.random.default_rng(2)
    g = r.standard_normal(opt.grad.size).astype(np.float32)
    opt.grad[...] = xp.asarray(g)
    true_norm = float(np.linalg.norm(g.astype(np.float64)))
    norm = opt.clip_grad_norm(0.0)                            # disabled: only reports
    assert math.isclose(float(norm), true_norm, rel_tol=1e-5)
    np.testing.assert_array_equal(asnumpy(opt.grad), g)
    norm = opt.clip_grad_norm(true_norm * 2)                  # above the norm: untouched
    np.testing.assert_array_equal(asnumpy(opt.grad), g)
    norm = opt.clip_grad_norm(1.0)
    assert math.isclose(float(norm), true_norm, rel_tol=1e-5)
    clipped = asnumpy(opt.grad)
    assert clipped.dtype == np.float32
    assert math.isclose(float(np.linalg.norm(clipped)), 1.0, rel_tol=1e-5)
    np.testing.assert_allclose(clipped, g / true_norm, rtol=1e-5)   # direction kept
    # the parameters' own views see the clipped values
    np.testing.assert_array_equal(asnumpy(named[0][1].grad).reshape(-1), clipped[:44])


def test_schedule_key_points():
    lr, warm, decay, lo = 1e-3, 10, 110, 1e-4
    assert get_lr(0, lr, warm, decay, lo) == pytest.approx(lr * 1 / 11)
    assert get_lr(9, lr, warm, decay, lo) == pytest.approx(lr * 10 / 11)
    assert get_lr(warm, lr, warm, decay, lo) == pytest.approx(lr)                 # warmup end: peak
    assert get_lr(60, lr, warm, decay, lo) == pytest.approx((lr + lo) / 2)        # cosine midpoint
    assert get_lr(decay, lr, warm, decay, lo) == pytest.approx(lo)
    assert get_lr(10 * decay, lr, warm, decay, lo) == lo
    values = [get_lr(i, lr, warm, decay, lo) for i in range(warm, decay + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))                       # monotone decay
    assert get_lr(0, lr, 0, 0, lo) == lo                                         # no decay span at all
    assert get_lr(0, lr, 0, 100, lo) == pytest.approx(lr)                        # no warmup


def test_state_dict_round_trip_continues_bit_identically(xp):
    r = np.random.default_rng(3)
    grads = [{n: r.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(6)]

    def run(named, opt, steps):
        for g in steps:
            opt.zero_grad()
            for n, p in named:
                p.grad += xp.asarray(g[n])
            opt.clip_grad_norm(1.0)
            opt.step(3e-3)

    a = make_params(xp)
    opt_a = AdamW(a)
    run(a, opt_a, grads)

    b = make_params(xp)
    opt_b = AdamW(b)
    run(b, opt_b, grads[:3])
    tensors, meta = opt_b.state_dict()
    assert set(tensors) == {f"{k}.{n}" for n in SHAPES for k in ("exp_avg", "exp_avg_sq")}
    assert all(isinstance(t, np.ndarray) and t.shape == SHAPES[k.split(".", 1)[1]] for k, t in tensors.items())
    assert meta["step"] == 3
    snapshot = {n: asnumpy(p.data).copy() for n, p in b}

    c = [(n, type(p)(data=xp.asarray(snapshot[n]), grad=None)) for n, p in b]   # a fresh model + optimizer
    opt_c = AdamW(c)
    opt_c.load_state_dict(tensors, meta)
    run(c, opt_c, grads[3:])
    for (n, pa), (_, pc) in zip(a, c):
        np.testing.assert_array_equal(asnumpy(pa.data), asnumpy(pc.data), err_msg=n)


def test_load_state_dict_rejects_mismatched_state():
    opt = AdamW(make_params(np))
    tensors, meta = opt.state_dict()
    missing = dict(tensors)
    del missing["exp_avg.transformer.ln_f.weight"]
    with pytest.raises(NpgptError, match="lacks 1 tensor"):
        opt.load_state_dict(missing, meta)
    wrong = dict(tensors, **{"exp_avg.transformer.ln_f.weight": np.zeros(5, np.float32)})
    with pytest.raises(NpgptError, match="has shape"):
        opt.load_state_dict(wrong, meta)
    extra = dict(tensors, **{"exp_avg.other": np.zeros(5, np.float32)})
    with pytest.raises(NpgptError, match="unknown parameters"):
        opt.load_state_dict(extra, meta)
    with pytest.raises(NpgptError, match="step"):
        opt.load_state_dict(tensors, {})


def test_constructor_errors():
    with pytest.raises(NpgptError, match="no parameters"):
        AdamW([])
    p = make_params(np)
    with pytest.raises(NpgptError, match="unique"):
        AdamW([p[0], (p[0][0], p[1][1])])
    with pytest.raises(NpgptError, match="dtype"):
        AdamW([("a", SimpleNamespace(data=np.zeros((2, 2), np.float32), grad=None)),
               ("b", SimpleNamespace(data=np.zeros(2, np.float64), grad=None))])


def test_gradient_accumulation_with_scaling_equals_one_big_batch():
    """k micro-batches, each loss scaled by 1/k, accumulated into the flat buffer == one big batch."""
    r = np.random.default_rng(4)
    n, d_in, d_out, k = 24, 5, 3, 4
    X = r.standard_normal((n, d_in)).astype(np.float32)
    Y = r.standard_normal((n, d_out)).astype(np.float32)
    W0 = r.standard_normal((d_in, d_out)).astype(np.float32)
    b0 = r.standard_normal(d_out).astype(np.float32)

    def grads(W, b, x, y):
        # loss = mean over rows of 0.5 * |x W + b - y|^2  ->  dW = x^T (xW+b-y) / N, db = sum(xW+b-y) / N
        err = x @ W + b - y                                  # (N, d_out)
        return x.T @ err / len(x), err.sum(axis=0) / len(x)

    def build():
        W = SimpleNamespace(data=W0.copy(), grad=None)
        b = SimpleNamespace(data=b0.copy(), grad=None)
        return W, b, AdamW([("w", W), ("b", b)], lr=1e-2)

    W, b, big = build()
    big.zero_grad()
    dW, db = grads(W.data, b.data, X, Y)
    W.grad += dW
    b.grad += db
    norm_big = float(big.clip_grad_norm(0.5))

    W2, b2, acc = build()
    acc.zero_grad()
    for xs, ys in zip(np.split(X, k), np.split(Y, k)):
        dW, db = grads(W2.data, b2.data, xs, ys)
        W2.grad += dW * (1.0 / k)                             # loss scaled by 1/k before backward
        b2.grad += db * (1.0 / k)
    norm_acc = float(acc.clip_grad_norm(0.5))                 # clip once, after all micro-steps

    assert norm_big > 0.5 and math.isclose(norm_acc, norm_big, rel_tol=1e-5)
    np.testing.assert_allclose(acc.grad, big.grad, rtol=1e-5, atol=1e-7)
    big.step()
    acc.step()
    np.testing.assert_allclose(W2.data, W.data, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b2.data, b.data, rtol=1e-5, atol=1e-6)


def test_adamw_update_is_the_pytorch_formula_on_flat_arrays():
    """The one update, on its own: in place on p, m, v; decay only on p[:n_decay]; pure (the same
    inputs give the same outputs, nothing kept between calls)."""
    r = np.random.default_rng(5)
    p0, g = r.standard_normal(50), r.standard_normal(50)
    m0, v0 = r.standard_normal(50), np.abs(r.standard_normal(50))
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)
    p, m, v = p0.copy(), m0.copy(), v0.copy()
    out = adamw_update(p, g, m, v, 20, **kw)
    assert out[0] is p and out[1] is m and out[2] is v
    want_m = 0.9 * m0 + 0.1 * g
    want_v = 0.95 * v0 + 0.05 * g * g
    decayed = np.where(np.arange(50) < 20, p0 * (1 - 1e-2 * 0.1), p0)
    want_p = decayed - 1e-2 * (want_m / (1 - 0.9 ** 3)) / (np.sqrt(want_v / (1 - 0.95 ** 3)) + 1e-8)
    np.testing.assert_allclose(m, want_m, rtol=1e-12)
    np.testing.assert_allclose(v, want_v, rtol=1e-12)
    np.testing.assert_allclose(p, want_p, rtol=1e-12)
    again = adamw_update(p0.copy(), g, m0.copy(), v0.copy(), 20, **kw)
    for a, b in zip(again, (p, m, v)):
        np.testing.assert_array_equal(a, b)


def test_model_zero_grad_after_the_optimizer_is_built_changes_nothing():
    """model.zero_grad() drops the bound views (grad = None); the flat buffer's owner binds them
    again when the optimizer reads its buffers, so the step is the same as with opt.zero_grad()."""
    from npgpt.model import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    x = np.random.default_rng(0).integers(0, 11, (2, 8))
    weights = []
    for use_model in (False, True):
        model = GPT(cfg, seed=1)
        opt = AdamW(model.named_parameters(), lr=1e-2)
        for _ in range(2):
            (model if use_model else opt).zero_grad()
            model(x, x)[1].backward()
            opt.step()
        weights.append(opt.flat.copy())
        assert all(np.shares_memory(p.grad, opt.grad) for p in model.parameters())
    np.testing.assert_array_equal(weights[0], weights[1])
