"""One parameter count (GPTConfig.num_params) behind GPT.num_params, `npgpt info` and compress."""

import json

import pytest
from click.testing import CliRunner

from npgpt.cli.main import cli
from npgpt.compress import count_params
from npgpt.model import GPT, GPTConfig
from npgpt.tokenizer import CharTokenizer


@pytest.mark.parametrize("bias, n_inner, expected", [(False, None, 27_328), (True, None, 28_064), (False, 40, None)])
def test_config_count_matches_the_parameters(bias, n_inner, expected):
    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=bias, n_inner=n_inner)
    model = GPT(cfg)
    counted = sum(p.size for p in model.parameters())          # what the model actually holds
    assert cfg.num_params() == counted == model.num_params() == count_params(model)[0]
    assert cfg.num_params(non_embedding=True) == counted - 16 * 32
    if expected is not None:
        assert counted == expected


def test_npgpt_info_counts_a_model_without_bias(tmp_path):
    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False)
    GPT(cfg).save_pretrained(tmp_path)
    CharTokenizer.train("".join(chr(32 + i) for i in range(60))).save(tmp_path)
    r = CliRunner().invoke(cli, ["info", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["parameters"] == 27_328
    r = CliRunner().invoke(cli, ["info", str(tmp_path)])
    assert "parameters: 27,328" in r.output
