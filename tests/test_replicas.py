"""In-process data-parallel replicas: the same gradient as one plain step, summed in a fixed order."""

import numpy as np
import pytest

from npgpt.model import GPT, GPTConfig
from npgpt.optim import AdamW
from npgpt.replicas import ThreadReplicas

from test_train import data_dir  # noqa: F401  (the prepared char corpus, shared with test_train)


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
    reps = ThreadReplicas(model, n=n, scale=0.5)
    opt.zero_grad()
    got_loss = reps.forward_backward(x, y)
    np.testing.assert_allclose(got_loss, plain_loss, rtol=1e-5)
    np.testing.assert_allclose(opt.grad, plain_grad, rtol=2e-4, atol=1e-7)
    assert all(sp.grad is None for _, pairs in reps.shadows for _, sp in pairs)   # handed over
    reps.close()


def test_distillation_splits_over_replicas_with_the_plain_gradient():
    """The teacher's forward runs under no_grad (a context variable): in one replica thread it does not
    switch off another replica's graph, so the split distillation gradient is the plain one, and the
    trainer's plugin no longer refuses a teacher."""
    from types import SimpleNamespace

    from npgpt import no_grad
    from npgpt.ops.distill import mixed_loss
    from npgpt.replicas import training_plugin
    from npgpt.train import Hooks

    teacher = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=7).eval()

    def distill(model, x, y):
        logits, _ = model(x, y)
        with no_grad():
            t_logits, _ = teacher(x)
        return mixed_loss(logits, t_logits, y, alpha=0.7, temperature=2.0)

    x, y = batch(ignore=True)
    model, opt = setup()
    opt.zero_grad()
    distill(model, x, y).backward()
    want = opt.grad.copy()
    assert np.abs(want).max() > 0
    for n in (2, 3):
        model, opt = setup()
        reps = ThreadReplicas(model, n=n, base_loss=distill)
        opt.zero_grad()
        reps.forward_backward(x, y)
        np.testing.assert_allclose(opt.grad, want, rtol=2e-4, atol=1e-7)
        reps.close()
    hooks = Hooks(loss_fn=distill)
    cfg = SimpleNamespace(replicas=2, device="cpu", precision="fp32", teacher="some/teacher",
                          gradient_accumulation_steps=1)
    reps = training_plugin(setup()[0], None, cfg, hooks)
    assert isinstance(reps, ThreadReplicas) and hooks.loss_fn == reps.loss_fn and reps.close in hooks.close
    reps.close()


def test_replicas_follow_the_weights_and_repeat_bitwise():
    x, y = batch()
    grads = []
    for _ in range(2):
        model, opt = setup()
        reps = ThreadReplicas(model, n=2)
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


def test_dropout_slices_draw_their_own_masks_reproducibly():
    x, y = batch(B=4)
    x[2:], y[2:] = x[:2], y[:2]                                   # slice 1 repeats slice 0
    grads = []
    for _ in range(2):
        model, opt = setup(dropout=0.5)
        reps = ThreadReplicas(model, n=2)
        opt.zero_grad()
        reps.forward_backward(x, y)
        grads.append(opt.grad.copy())
        ours, theirs = model.transformer.h[0].attn.rng, reps.shadows[0][0].transformer.h[0].attn.rng
        assert theirs is reps.shadows[0][0].transformer.h[1].attn.rng  # one generator per model, as in the model
        assert not np.array_equal(ours.random(4), theirs.random(4))
        reps.close()
    np.testing.assert_array_equal(grads[0], grads[1])
    model, opt = setup(dropout=0.5)
    model.eval()                                                  # no dropout: the slices agree
    reps = ThreadReplicas(model, n=2)
    loss = reps.loss_fn(model, x, y)
    reps.reduce()
    np.testing.assert_allclose(float(loss.data), float(model(x[:2], y[:2])[1].data), rtol=1e-6)
    reps.close()


def test_replicas_plug_into_micro_steps():
    """Two micro-batches through loss_fn + backward(loss / 2), one reduce: the mean of the two."""
    x, y = batch(B=6, ignore=True)
    model, opt = setup()
    opt.zero_grad()
    for sl in (slice(0, 3), slice(3, 6)):
        (model(x[sl], y[sl])[1] * 0.5).backward()
    want = opt.grad.copy()
    model, opt = setup()
    reps = ThreadReplicas(model, n=2, scale=0.5)
    opt.zero_grad()
    for sl in (slice(0, 3), slice(3, 6)):
        (reps.loss_fn(model, x[sl], y[sl]) * 0.5).backward()
    reps.reduce(opt.grad, y.size)
    np.testing.assert_allclose(opt.grad, want, rtol=2e-4, atol=1e-7)
    reps.close()


def test_trainer_with_replicas_follows_the_plain_run(data_dir, tmp_path, monkeypatch):
    """`replicas=2` in the training config: the same run up to float32 summation order."""
    from npgpt.train import TrainConfig, train

    reductions = []
    original = ThreadReplicas.reduce
    monkeypatch.setattr(ThreadReplicas, "reduce", lambda self, *a: reductions.append(1) or original(self, *a))

    def run(out, **kw):
        cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / out), n_layer=1, n_head=2, n_embd=16,
                          block_size=16, batch_size=4, gradient_accumulation_steps=2, max_iters=6,
                          eval_interval=3, eval_iters=1, log_interval=3, quiet=True, **kw)
        return train(cfg)

    plain = run("plain")
    assert not reductions
    split = run("split", replicas=2)
    assert len(reductions) == 6                                    # one per optimizer step
    assert split.iters == plain.iters
    np.testing.assert_allclose(split.last_train_loss, plain.last_train_loss, rtol=1e-4)
    np.testing.assert_allclose(split.best_val_loss, plain.best_val_loss, rtol=1e-4)


def test_an_error_inside_the_step_leaves_blas_and_row_blocks_as_they_were():
    """The BLAS limit is a `with` block the trainer owns (Hooks.step_context): a failure between
    loss_fn and reduce leaves it, and BLAS gets its threads back (it used to stay at one)."""
    from npgpt.ops import parallel
    from npgpt.replicas import blas_controller
    from npgpt.train import Hooks, train_step

    def blas_threads():
        return [lib["num_threads"] for lib in blas_controller().info() if lib["user_api"] == "blas"]

    before = blas_threads()
    model, opt = setup()
    reps = ThreadReplicas(model, n=2)
    inside = []

    def failing_reduce(flat_grad, n_tokens):
        inside.append((blas_threads(), parallel.SINGLE.get()))
        raise RuntimeError("boom between loss_fn and reduce")

    hooks = Hooks(loss_fn=reps.loss_fn, reduce_grads=failing_reduce, step_context=reps.threaded)
    x, y = batch()
    with pytest.raises(RuntimeError, match="boom"):
        train_step(model, opt, [(x, y)], 1, 1.0, 1e-3, hooks)
    assert inside and all(n == 1 for n in inside[0][0]) and inside[0][1] is True   # limited inside
    assert blas_threads() == before and parallel.SINGLE.get() is False             # restored after
    reps.close()
    assert reps._pool is None


def test_the_trainer_closes_the_replicas_threads(data_dir, tmp_path):
    import threading

    from npgpt.train import TrainConfig, train
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "r"), n_layer=1, n_head=2, n_embd=16, block_size=16,
                      batch_size=4, max_iters=2, eval_interval=2, eval_iters=1, log_interval=1, quiet=True, replicas=2)
    train(cfg)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("npgpt-replica")]
