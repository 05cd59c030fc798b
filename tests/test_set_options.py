"""One `--set key=value` parser, with train's key names, for train, finetune and bench."""

import json

import pytest
from click.testing import CliRunner

from npgpt.bench import parse_overrides
from npgpt.cli.main import cli
from npgpt.errors import NpgptError

TINY = ["--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2", "--block-size", "8", "--iters", "1",
        "--warmup", "0", "--json"]


def test_bench_takes_train_keys_batch_size_included():
    r = CliRunner().invoke(cli, ["bench", "--set", "batch_size=3", "--set", "bias=false", "--set", "dropout=0.25",
                                 *TINY])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["batch_size"] == 3 and out["dropout"] == 0.25
    r = CliRunner().invoke(cli, ["bench", "--set", "batch_size=3", "--batch-size", "2", *TINY])
    assert json.loads(r.output)["batch_size"] == 2               # the direct flag wins


def test_bench_types_values_as_train_does():
    assert parse_overrides(["n-layer=2", "bias=no", "learning_rate=1e-3", "seed=1_000"]) == \
        {"n_layer": 2, "bias": False, "learning_rate": 1e-3, "seed": 1000}
    with pytest.raises(NpgptError, match="config key dropout: 'lots' is not a valid float"):
        parse_overrides(["dropout=lots"])
    with pytest.raises(NpgptError, match="unknown model setting 'max_iters'"):
        parse_overrides(["max_iters=3"])
