"""What a new user reads in the first hour: log lines that add up and say what they mean."""

import re

import pytest
from click.testing import CliRunner

from npgpt.cli.main import cli

from helpers import TINY, corpus


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("first-hour")
    (d / "corpus.txt").write_text(corpus())
    assert run("prepare", "--input", d / "corpus.txt", "--out", d / "data").exit_code == 0
    r = run("train", "--data", d / "data", "--out", d / "base", "--max-iters", 4, "--eval-interval", 2,
            "--set", "n_layer=1", *[a for a in TINY if a not in ("n_layer=2",)])
    assert r.exit_code == 0, r.output
    return d, r.output


def test_training_log_counts_and_words(base):
    _, output = base
    model_line = next(line for line in output.splitlines() if line.startswith("model:"))
    assert re.search(r"\b1 layer,", model_line) and "1 layers" not in model_line, model_line
    assert "MFU" not in output                       # the per-step line no longer shows a misleading MFU


def test_lora_percentage_is_of_the_whole_base(base):
    d, _ = base
    r = run("finetune", "--init-from", d / "base", "--data", d / "data", "--out", d / "lora", "--lora-rank", 4,
            "--max-iters", 2, "--eval-interval", 2, "--set", "eval_iters=1", "--batch-size", 2)
    assert r.exit_code == 0, r.output
    total = int(re.search(r"model: .*: ([\d,]+) parameters", r.output).group(1).replace(",", ""))
    m = re.search(r"([\d,]+) trainable parameters \(([\d.]+)% of the base's ([\d,]+)\)", r.output)
    assert m, r.output
    n_train, pct, n_base = int(m.group(1).replace(",", "")), float(m.group(2)), int(m.group(3).replace(",", ""))
    assert n_base == total                           # the base is the model the "model:" line counts
    assert abs(pct - 100 * n_train / n_base) < 0.01


def test_resume_with_another_batch_says_tokens_per_iteration_changed(base, tmp_path):
    d, _ = base
    out = tmp_path / "run"
    common = ["--data", d / "data", "--out", out, "--eval-interval", 2, *TINY]
    assert run("train", "--max-iters", 2, *common).exit_code == 0
    r = run("train", "--resume", "--max-iters", 4, *common, "--batch-size", 8)     # later flags win
    assert r.exit_code == 0, r.output
    note = [line for line in r.output.splitlines() if line.startswith("note: this run took")]
    assert len(note) == 1 and "it now takes" in note[0], r.output
