"""The training library: config handling, gradient accumulation, exact resume, checkpoints."""

import json

import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.checkpoint import find_checkpoint
from npgpt.data import TokenData, prepare
from npgpt.errors import NpgptError
from npgpt.optim import AdamW
from npgpt.training.config import TrainConfig, apply_overrides, load_config_file, parse_set_options
from npgpt.train import (train,
                         train_step)

from helpers import corpus


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "corpus.txt").write_text(corpus())
    prepare([str(d / "corpus.txt")], str(d / "prep"), tokenizer="char")
    return d / "prep"


def tiny_cfg(data_dir, out, **kw):
    base = dict(data=str(data_dir), out=str(out), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                max_iters=6, eval_interval=3, eval_iters=2, log_interval=2, warmup_iters=2, quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def test_overrides_are_type_checked():
    cfg = apply_overrides(TrainConfig(), parse_set_options(["dropout=0.1", "max_iters=5", "bias=false",
                                                            "lr_decay_iters=none"]))
    assert cfg.dropout == 0.1 and cfg.max_iters == 5 and cfg.bias is False and cfg.lr_decay_iters is None
    with pytest.raises(NpgptError, match="unknown config key 'lerning_rate'; valid keys: .*learning_rate"):
        apply_overrides(TrainConfig(), {"lerning_rate": "1"})
    with pytest.raises(NpgptError, match="max_iters: 'ten' is not a valid int"):
        apply_overrides(TrainConfig(), {"max_iters": "ten"})
    with pytest.raises(NpgptError, match="bias: 'maybe' is not a valid bool"):
        apply_overrides(TrainConfig(), {"bias": "maybe"})
    with pytest.raises(NpgptError, match="expected key=value"):
        parse_set_options(["dropout"])


@pytest.mark.parametrize("field, value", [("max_iters", 0), ("learning_rate", -1.0), ("batch_size", 0),
                                          ("dropout", 1.0), ("eval_iters", 0)])
def test_non_positive_values_rejected(field, value):
    with pytest.raises(NpgptError, match=field):
        TrainConfig(**{field: value}).validate()


def test_config_files(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"max_iters": 7, "dropout": 0.2}))
    (tmp_path / "c.toml").write_text("[train]\nmax_iters = 9\nlearning_rate = 3e-4\n")
    assert load_config_file(tmp_path / "c.json") == {"max_iters": 7, "dropout": 0.2}
    assert load_config_file(tmp_path / "c.toml") == {"max_iters": 9, "learning_rate": 3e-4}
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(NpgptError, match="not valid JSON"):
        load_config_file(tmp_path / "bad.json")


def test_gradient_accumulation_equals_one_big_batch(data_dir):
    """k micro-batches of B/k give the same update as one batch of B, clipping included."""
    td = TokenData(data_dir)
    x, y = td.get_batch("train", 8, 16, np.random.default_rng(0))
    cfg = GPTConfig(vocab_size=td.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    results = []
    for k in (1, 2, 4):
        model = GPT(cfg, seed=3).astype(np.float64)
        opt = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
        batches = [(x[i::k], y[i::k]) for i in range(k)]
        train_step(model, opt, batches, k, grad_clip=0.05, lr=1e-2)    # a tight clip: it is active
        results.append(opt.flat.copy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-10, atol=1e-12)


def test_training_lowers_loss_and_writes_metrics(data_dir, tmp_path):
    r = train(tiny_cfg(data_dir, tmp_path / "run", max_iters=40, eval_interval=20, learning_rate=1e-2))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in evals if e["kind"] == "eval"] == [0, 20, 40]
    assert r.history[-1]["val_loss"] < r.history[0]["val_loss"] - 0.3
    assert any(e["kind"] == "train" and "tokens_per_s" in e and "mfu" in e for e in evals)
    ckpt = find_checkpoint(tmp_path / "run")
    for f in ("config.json", "model.safetensors", "optimizer.safetensors", "state.json", "manifest.json",
              "tokenizer_npgpt.json"):
        assert (ckpt / f).exists(), f
    state = json.loads((ckpt / "state.json").read_text())
    assert state["iter"] == 40 and state["config"]["max_iters"] == 40 and "rng" in state


def _weights(run):
    from safetensors.numpy import load_file
    return load_file(str(find_checkpoint(run) / "model.safetensors"))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_bit_exact(data_dir, tmp_path, dropout):
    # the same schedule (lr_decay_iters=12) for both; run b stops at 6 and is resumed to 12
    straight = train(tiny_cfg(data_dir, tmp_path / "a", max_iters=12, eval_interval=6, dropout=dropout,
                              lr_decay_iters=12))
    train(tiny_cfg(data_dir, tmp_path / "b", max_iters=6, eval_interval=6, dropout=dropout, lr_decay_iters=12))
    from npgpt.train import config_for_resume
    resumed = train(config_for_resume(tmp_path / "b", {"max_iters": 12, "quiet": True}))
    assert [h["val_loss"] for h in straight.history][-1] == [h["val_loss"] for h in resumed.history][-1]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
          if json.loads(x)["kind"] == "train"]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
          if json.loads(x)["kind"] == "train"]
    assert la == lb


def test_best_val_checkpointing_keeps_only_improvements(data_dir, tmp_path):
    # lr so high the model diverges after learning a bit: later evals are worse and are not saved
    cfg = tiny_cfg(data_dir, tmp_path / "r", max_iters=40, eval_interval=10, always_save_checkpoint=False,
                   learning_rate=3e-3, decay_lr=False)
    r = train(cfg)
    state = json.loads((find_checkpoint(tmp_path / "r") / "state.json").read_text())
    best = min(h["val_loss"] for h in r.history)
    assert state["best_val_loss"] == best
    assert state["iter"] == [h["iter"] for h in r.history if h["val_loss"] == best][0]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    train(tiny_cfg(data_dir, tmp_path / "r", max_iters=3, eval_interval=3))
    before = _weights(tmp_path / "r")
    from npgpt.train import config_for_resume
    with pytest.raises(NpgptError, match="loss became nan"):
        train(config_for_resume(tmp_path / "r", {"max_iters": 9, "learning_rate": 1e30, "quiet": True,
                                                 "grad_clip": 0.0}))
    after = _weights(tmp_path / "r")
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_bad_inputs(data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NpgptError, match="is a file"):
        train(tiny_cfg(data_dir, tmp_path / "file"))
    train(tiny_cfg(data_dir, tmp_path / "r", max_iters=3, eval_interval=3))
    with pytest.raises(NpgptError, match="already holds a checkpoint; pass --resume .* or --force"):
        train(tiny_cfg(data_dir, tmp_path / "r"))
    with pytest.raises(NpgptError, match="no checkpoint"):
        train(tiny_cfg(data_dir, tmp_path / "empty", resume=True))
    with pytest.raises(NpgptError, match="larger than the model's n_positions"):
        train(tiny_cfg(data_dir, tmp_path / "x", init_from=str(tmp_path / "r"), block_size=64))
    with pytest.raises(NpgptError, match="block_size"):
        train(tiny_cfg(data_dir, tmp_path / "y", block_size=100000))
