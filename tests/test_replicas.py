"""In-process data-parallel replicas: the same gradient as one plain step, summed in a fixed order."""

import numpy as np
import pytest

from npgpt.model import GPT, GPTConfig
from npgpt.optim import AdamW
from npgpt.replicas import ThreadReplicas

pytest.importorskip("threadpoolctl")


def setup(seed=0, dropout=0.0):
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=dropout)
    model = GPT(cfg, seed=seed)
    model.train()
    opt = AdamW(model.named_parameters())
    return model, opt


def batch(B=5, T=8, ignore=False):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 11, (B, T)), rng.integers(0, 11, (B, T))
    if ignore:
        y[0, :6] = -1          # slices with different numbers of counted targets
        y[3, 2:] = -1
    return x, y


@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_replica_gradient_equals_plain_gradient(n, ignore):
    x, y = batch(ignore=ignore)
    model, opt = setup()
    opt.zero_grad()
    _, loss = model(x, y)
    (loss * 0.5).backward()
    plain_grad, plain_loss = opt.grad.copy(), float(loss.data)

    model, opt = setup()
    reps = ThreadReplicas(model, opt, n=n)
    opt.zero_grad()
    got_loss = reps.forward_backward(x, y, scale=0.5)
    np.testing.assert_allclose(got_loss, plain_loss, rtol=1e-5)
    np.testing.assert_allclose(opt.grad, plain_grad, rtol=2e-4, atol=1e-7)
    assert all(not g.any() for _, g, _ in reps.shadows)          # shadow buffers left zeroed
    reps.close()


def test_replicas_follow_the_weights_and_repeat_bitwise():
    x, y = batch()
    grads = []
    for _ in range(2):
        model, opt = setup()
        reps = ThreadReplicas(model, opt, n=2)
        for step in range(3):                                    # the shadow must see each update
            opt.zero_grad()
            reps.forward_backward(x, y)
            opt.step(1e-2)
        grads.append(opt.grad.copy())
        reps.close()
    model, opt = setup()
    for step in range(3):
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step(1e-2)
    np.testing.assert_array_equal(grads[0], grads[1])            # a fixed order: the same bits
    np.testing.assert_allclose(grads[0], opt.grad, rtol=1e-3, atol=1e-6)


def test_shadow_dropout_draws_its_own_masks():
    model, opt = setup(dropout=0.5)
    reps = ThreadReplicas(model, opt, n=2)
    shadow = reps.shadows[0][0]
    a = model.transformer.h[0].attn.rng.random(4)
    b = shadow.transformer.h[0].attn.rng.random(4)
    assert not np.allclose(a, b)
    assert shadow.transformer.h[0].attn.rng is shadow.transformer.h[1].attn.rng   # still one per model
    reps.close()
