"""The trainer's seams (npgpt.train.Hooks): loss function, gradient reduction, after-step callbacks,
extra checkpoint files, and the plugins that fill them (npgpt.training.plugins, always on)."""

import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.checkpoint import find_checkpoint
from npgpt.compress import prune_model
from npgpt.training.plugins import apply_prune_masks, load_prune_masks, save_prune_masks
from npgpt.errors import NpgptError
from npgpt.optim import AdamW
from npgpt.train import Hooks, TrainConfig, model_loss, train, train_step

from test_train import data_dir  # noqa: F401  (the prepared char corpus, shared with test_train)

CFG = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8)


def batches(n, B=2, T=8, seed=0):
    r = np.random.default_rng(seed)
    return [(r.integers(0, 20, (B, T)), r.integers(0, 20, (B, T))) for _ in range(n)]


def test_step_runs_loss_fn_then_reduce_grads_before_the_update():
    model = GPT(CFG, seed=1)
    opt = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.0)
    calls = []

    def loss_fn(model, x, y):
        calls.append("loss")
        return model_loss(model, x, y)

    def reduce_grads(flat_grad, n_tokens):
        calls.append(("reduce", n_tokens, float(np.abs(flat_grad).sum()) > 0))
        flat_grad[...] = 0.0                          # what arrives here is what the update uses

    before = {k: v.copy() for k, v in model.state_dict().items()}
    train_step(model, opt, batches(3), 3, grad_clip=1.0, lr=1e-2, hooks=Hooks(loss_fn=loss_fn, reduce_grads=reduce_grads))
    assert calls == ["loss", "loss", "loss", ("reduce", 3 * 2 * 8, True)]
    for k, v in model.state_dict().items():           # zero gradients, no weight decay: nothing moves
        np.testing.assert_array_equal(v, before[k])


def tiny(data_dir, out, **kw):
    return TrainConfig(**{**dict(data=str(data_dir), out=str(out), n_layer=1, n_head=2, n_embd=16, block_size=16,
                                 batch_size=2, max_iters=4, eval_interval=2, eval_iters=1, log_interval=2, quiet=True),
                          **kw})


def test_plugins_fill_the_hooks(data_dir, tmp_path):
    steps = []

    def plugin(model, src, cfg, hooks):
        assert src is None and cfg.max_iters == 4
        hooks.after_step.append(lambda model, it: steps.append(it))
        hooks.save_files.append(lambda folder: (folder / "extra.txt").write_text("hello"))

    train(tiny(data_dir, tmp_path / "run"), plugins=[plugin])
    assert steps == [1, 2, 3, 4]
    assert (find_checkpoint(tmp_path / "run") / "extra.txt").read_text() == "hello"


def test_a_teacher_is_never_ignored(data_dir, tmp_path):
    """train(cfg) with a teacher distils without the caller passing a plugin: the run differs from the
    same run without it, and a teacher that is not a model is an error, not a silent plain run."""
    train(tiny(data_dir, tmp_path / "base"))
    base = str(find_checkpoint(tmp_path / "base"))
    plain = train(tiny(data_dir, tmp_path / "plain", init_from=base))
    taught = train(tiny(data_dir, tmp_path / "taught", init_from=base, teacher=base, distill_alpha=1.0,
                        distill_temperature=4.0))
    assert plain.last_train_loss != taught.last_train_loss
    with pytest.raises(NpgptError, match="no checkpoint"):
        train(tiny(data_dir, tmp_path / "run", init_from=base, teacher=str(tmp_path)))


def test_pruned_weights_stay_zero_through_training(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path / "base"))
    src = find_checkpoint(tmp_path / "base")
    model = GPT.from_pretrained(src)
    masks = prune_model(model, 0.5)
    model.save_pretrained(tmp_path / "pruned")
    save_prune_masks(tmp_path / "pruned", masks)
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            (tmp_path / "pruned" / f.name).write_bytes(f.read_bytes())
    train(tiny(data_dir, tmp_path / "ft", init_from=str(tmp_path / "pruned")))       # no plugin to pass
    ckpt = find_checkpoint(tmp_path / "ft")
    tuned = dict(GPT.from_pretrained(ckpt).named_parameters())
    saved = load_prune_masks(ckpt)
    assert set(saved) == set(masks)
    for name, m in masks.items():
        assert not np.any(tuned[name].data[~m])              # pruned entries are still exactly zero
        assert np.any(tuned[name].data[m] != model.state_dict()[name][m])   # the rest trained
    apply_prune_masks(GPT.from_pretrained(ckpt), saved)
