"""TrainConfig's sections (npgpt.training.config): flat keys, one check per section; the BatchSource
protocol the trainer reads batches through; train_step's StepStats."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.data import BatchSource, TokenData
from npgpt.errors import NpgptError
from npgpt.optim import AdamW
from npgpt.sft import SFTData
from npgpt.train import StepStats, read_state, train_step
from npgpt.training.config import (SECTIONS, DistillSettings, LoRASettings, TrainConfig, apply_overrides,
                                   parse_set_options)
from npgpt.training.scaler import DynamicLossScaler

from test_train import data_dir  # noqa: F401  (the prepared char corpus, shared with test_train)

ROOT = Path(__file__).resolve().parent.parent


def test_the_sections_share_out_the_flat_keys():
    names = [f.name for s in SECTIONS for f in dataclasses.fields(s)]
    assert len(names) == len(set(names))                                  # each key in one section
    assert set(names) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert issubclass(TrainConfig, SECTIONS)


def test_keys_stay_flat_on_the_command_line_and_in_state_json(tmp_path):
    cfg = apply_overrides(TrainConfig(), parse_set_options(["lora_rank=8", "arch=llama", "optimizer=muon",
                                                             "teacher=t", "distill_alpha=0.25"])).validate()
    lora = cfg.section(LoRASettings)
    assert isinstance(lora, LoRASettings) and lora.lora_rank == 8 and lora.lora_config().r == 8
    assert lora.lora_config().alpha == 16.0 and cfg.arch == "llama" and cfg.optimizer == "muon"
    assert cfg.section(DistillSettings) == DistillSettings(teacher="t", distill_alpha=0.25)
    # state.json keeps one flat config object, as every npgpt version wrote it, and reads back
    (tmp_path / "state.json").write_text(json.dumps({"iter": 3, "best_val_loss": 2.0, "config": dataclasses.asdict(cfg)}))
    assert read_state(tmp_path)["config"] == cfg
    old = {"max_iters": 50, "lora_rank": 4, "preset": "baby"}          # an older run's subset of keys
    (tmp_path / "state.json").write_text(json.dumps({"iter": 3, "config": old}))
    assert read_state(tmp_path)["config"] == TrainConfig(max_iters=50, lora_rank=4)


@pytest.mark.parametrize("key, value, message", [
    ("lora_rank", "0", "--lora-rank must be a positive integer"),
    ("lora_alpha", "-1", "--lora-alpha must be positive"),          # checked without a rank too
    ("lora_dropout", "1", r"--lora-dropout must be in \[0, 1\)"),
    ("lora_targets", ",", "--lora-targets needs at least one module name"),
    ("replicas", "0", "replicas must be positive"),
    ("zero_stage", "2", "zero_stage must be 0 or 1"),
    ("arch", "rnn", "arch must be one of"),
    ("optimizer", "sgd", "optimizer must be one of"),
    ("sft_val_fraction", "1", "sft_val_fraction must be in"),
    ("eval_iters", "0", "eval_iters must be positive"),
    ("n_head", "0", "n_head must be positive"),
    ("dropout", "nan", "finite"),
])
def test_each_section_checks_its_keys(key, value, message):
    with pytest.raises(NpgptError, match=message):
        apply_overrides(TrainConfig(), {key: value}).validate()


def test_a_teacher_setting_is_checked_by_its_section():
    with pytest.raises(NpgptError, match="alpha"):
        TrainConfig(teacher="t", distill_alpha=2.0).validate()
    TrainConfig(distill_alpha=2.0).validate()                      # no teacher: the section does not apply


def test_lora_settings_are_checked_in_one_place():
    """The LoRA messages exist once in the library: LoRAConfig's, which the section calls."""
    text = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "npgpt").rglob("*.py"))
    for message in ("--lora-rank must be a positive integer", "--lora-alpha must be positive",
                    "--lora-dropout must be in [0, 1)"):
        assert text.count(message) == 1, message


def test_prepared_data_and_sft_rows_are_batch_sources(data_dir):  # noqa: F811
    data = TokenData(data_dir)
    assert isinstance(data, BatchSource)
    assert data.grow_vocab is False and data.block_size is None and data.path == Path(data_dir)
    sft = SFTData(tok=data.tokenizer(), block_size=8)
    assert isinstance(sft, BatchSource) and sft.grow_vocab is True and sft.block_size == 8
    assert not isinstance(object(), BatchSource)


def test_train_step_returns_loss_norm_and_whether_it_stepped():
    cfg = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg, seed=1)
    opt = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.0)
    r = np.random.default_rng(0)
    x, y = r.integers(0, 20, (2, 8)), r.integers(0, 20, (2, 8))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    stats = train_step(model, opt, [(x, y)], 1, grad_clip=0.0, lr=1e-2)
    assert isinstance(stats, StepStats) and not stats.skipped
    np.testing.assert_allclose(float(stats.loss), float(GPT(cfg, seed=1)(x, y)[1].data), rtol=1e-6)
    assert np.isfinite(stats.grad_norm) and stats.grad_norm > 0
    assert not hasattr(opt, "last_grad_norm")
    # an fp16 overflow: the scaler skips the step, and the stats say so
    moved = {k: v.copy() for k, v in model.state_dict().items()}
    assert any(not np.array_equal(moved[k], before[k]) for k in before)
    scaler = DynamicLossScaler(init_scale=2.0 ** 127)             # the scaled loss overflows to inf
    with np.errstate(over="ignore", invalid="ignore"):
        stats = train_step(model, opt, [(x, y)], 1, grad_clip=1.0, lr=1e-2, scaler=scaler)
    assert stats.skipped and stats.grad_norm == float("inf") and scaler.skipped_steps == 1
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, moved[k])
