"""Attention inspection: the maps (normalised, causal, equal to an independent computation), the text
views, and `npgpt inspect` including its missing-matplotlib error."""

import sys
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from npgpt.errors import NpgptError
from npgpt.interpret import SHADES, attention_maps, format_top, select, shade_matrix, top_attended
from npgpt.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
TEXT = "abcd efghi"          # 10 characters + <|endoftext|> = 11 tokens


def tiny(**kw):
    return GPT(replace(TINY, **kw), seed=0).eval()


@pytest.fixture
def model_dir(tmp_path):
    from npgpt.tokenizer import CharTokenizer
    d = tmp_path / "m"
    tiny().save_pretrained(d)
    CharTokenizer.train(TEXT).save(d)
    return d


def test_rows_sum_to_one_and_respect_causality():
    ids = [1, 5, 2, 9, 3, 3, 0]
    maps = attention_maps(tiny(), ids)
    assert len(maps) == TINY.n_layer
    for att in maps:
        assert att.shape == (TINY.n_head, 7, 7) and isinstance(att, np.ndarray)
        np.testing.assert_allclose(att.sum(axis=-1), 1.0, atol=1e-5)
        assert np.all(att[:, np.triu_indices(7, k=1)[0], np.triu_indices(7, k=1)[1]] == 0)
        assert np.all(att >= 0)


def test_first_layer_matches_an_independent_computation():
    m = tiny()
    ids = np.array([4, 1, 7, 7, 2])
    tr, T = m.transformer, len(ids)
    x = tr.wte.weight.data[ids] + tr.wpe.weight.data[:T]
    ln = tr.h[0].ln_1
    h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * ln.weight.data + ln.bias.data
    qkv = h @ tr.h[0].attn.c_attn.weight.data + tr.h[0].attn.c_attn.bias.data      # (T, 3C)
    q, k, _ = np.split(qkv, 3, axis=-1)
    hs = TINY.n_embd // TINY.n_head
    for head in range(TINY.n_head):
        qh, kh = q[:, head * hs:(head + 1) * hs], k[:, head * hs:(head + 1) * hs]
        s = qh @ kh.T / np.sqrt(hs) + np.where(np.tril(np.ones((T, T))) > 0, 0, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(attention_maps(m, ids)[0][head], p, rtol=1e-4, atol=1e-6)


def test_select_heads_and_layers():
    maps = attention_maps(tiny(), [1, 2, 3])
    (layer, mean), = select(maps, layer=1)
    assert layer == 1 and np.allclose(mean, maps[1].mean(axis=0))
    assert np.array_equal(select(maps, 0, 1)[0][1], maps[0][1])
    assert len(select(maps)) == TINY.n_layer
    with pytest.raises(NpgptError, match="--layer 2 is out of range"):
        select(maps, layer=2)
    with pytest.raises(NpgptError, match="--head 5 is out of range"):
        select(maps, head=5)


def test_bad_prompts():
    with pytest.raises(NpgptError, match="empty"):
        attention_maps(tiny(), [])
    with pytest.raises(NpgptError, match="block_size"):
        attention_maps(tiny(), list(range(9)))


def test_text_views():
    att = np.array([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.05, 0.35, 0.6]])
    assert top_attended(att, k=2) == [[(0, 1.0)], [(1, 0.75), (0, 0.25)], [(2, 0.6), (1, 0.35)]]
    assert shade_matrix(att) == ["@  ", ":# ", " -*"]
    assert shade_matrix(att, ["a", "b", "c"])[1] == "b |:# |"
    lines = format_top(att, ["a", "b", "c"], k=2)
    assert lines[2].split() == ["2", "c", "->", "c[2]", "0.60", "b[1]", "0.35"]
    assert SHADES[0] == " " and SHADES[-1] == "@"


def _cli(args):
    from npgpt.cli.main import cli
    return CliRunner().invoke(cli, args)


def test_cli_inspect_prints_heat_map(model_dir):
    r = _cli(["inspect", "--checkpoint", str(model_dir), "--prompt", "abcab", "--layer", "1"])
    assert r.exit_code == 0, r.output
    assert "== layer 1, mean of 2 heads ==" in r.output and "layer 0" not in r.output
    assert r.output.count("->") == 5 and r.output.count("|") == 10
    r = _cli(["inspect", "--checkpoint", str(model_dir), "--prompt", "ab", "--head", "0"])
    assert r.exit_code == 0 and "layer 0, head 0" in r.output and "layer 1, head 0" in r.output


@pytest.mark.parametrize("args,msg", [(["--layer", "9"], "--layer 9 is out of range"),
                                      (["--head", "-1"], "--head -1 is out of range"),
                                      (["--prompt", "abcdefghi"], "block_size")])
def test_cli_inspect_bad_inputs(model_dir, args, msg):
    base = ["inspect", "--checkpoint", str(model_dir), "--prompt", "abc"]
    r = _cli(base + args)
    assert r.exit_code == 1 and "Error:" in r.output and msg in r.output, r.output
    assert "Traceback" not in r.output


def test_cli_inspect_missing_checkpoint(tmp_path):
    r = _cli(["inspect", "--checkpoint", str(tmp_path / "none"), "--prompt", "a"])
    assert r.exit_code == 1 and "Error:" in r.output and "does not exist" in r.output


def test_png_without_matplotlib_names_the_extra(model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # import matplotlib -> ImportError
    r = _cli(["inspect", "--checkpoint", str(model_dir), "--prompt", "ab", "--png", str(tmp_path / "a.png")])
    assert r.exit_code == 1 and "pip install 'npgpt[plot]'" in r.output and "Traceback" not in r.output
    from npgpt.interpret import save_heatmap_png
    with pytest.raises(NpgptError, match=r"npgpt\[plot\]"):
        save_heatmap_png([(0, np.eye(2))], ["a", "b"], tmp_path / "b.png")
    assert not (tmp_path / "a.png").exists()
