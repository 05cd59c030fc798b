"""GGUF <-> npgpt models: export a trained GPT-2 and its BPE tokenizer, read it back (same logits, same
tokens), load it through the CLI, and refuse what has no GGUF form."""

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import TINY, corpus
from npgpt.cli.main import cli
from npgpt.errors import NpgptError
from npgpt.evaluate import load_model_and_tokenizer
from npgpt.gguf import GGUFFile, quantize, write_gguf
from npgpt.gguf_models import export_gguf, load_gguf_model, load_gguf_tokenizer


def _ok(args):
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-run")
    (root / "corpus.txt").write_text(corpus(1500))
    _ok(["prepare", "--input", str(root / "corpus.txt"), "--out", str(root / "data"), "--tokenizer", "bpe",
         "--vocab-size", "300"])
    _ok(["train", "--data", str(root / "data"), "--out", str(root / "run"), "--max-iters", "3", "--quiet", *TINY,
         "--set", "n_embd=32"])
    return root


@pytest.mark.parametrize("type_name, tol", [("f32", 0), ("f16", 2e-2), ("q8_0", 5e-2)])
def test_export_round_trips_logits_and_tokens(bpe_run, tmp_path, type_name, tol):
    model, tok, _ = load_model_and_tokenizer(bpe_run / "run")
    out = tmp_path / f"m.{type_name}.gguf"
    _ok(["export", "--checkpoint", str(bpe_run / "run"), "--gguf", str(out), "--type", type_name])
    back = load_gguf_model(out)
    idx = np.array([tok.encode("the quick brown fox jumps over")[:16]])
    a, _ = model(idx)
    b, _ = back(idx)
    if tol == 0:
        np.testing.assert_array_equal(a.data, b.data)
    else:
        assert np.abs(a.data - b.data).max() < tol
    tok2 = load_gguf_tokenizer(out)
    text = "seven wizards hex jolly zebras <|endoftext|> ünïcode 123"
    assert tok2.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert tok2.special_tokens == tok.special_tokens and tok2.vocab_size == tok.vocab_size


def test_exported_file_has_llama_cpp_layout(bpe_run, tmp_path):
    out = tmp_path / "m.gguf"
    _ok(["export", "--checkpoint", str(bpe_run / "run"), "--gguf", str(out), "--type", "q8_0"])
    g = GGUFFile(out)
    assert g.metadata["general.architecture"] == "gpt2" and g.metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert g.metadata["gpt2.block_count"] == 1 and g.metadata["gpt2.embedding_length"] == 32
    assert g.tensors["blk.0.attn_qkv.weight"].shape == (96, 32)          # (out, in) like nn.Linear
    assert g.tensors["blk.0.attn_qkv.weight"].type == "Q8_0"
    assert g.tensors["blk.0.attn_norm.weight"].type == "F32"
    assert "output.weight" in g.tensors and "position_embd.weight" in g.tensors
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(out)
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == g.tensors["token_embd.weight"].shape[0]


def test_cli_samples_and_evaluates_from_a_gguf_file(bpe_run, tmp_path):
    out = tmp_path / "m.gguf"
    _ok(["export", "--checkpoint", str(bpe_run / "run"), "--gguf", str(out), "--type", "f32"])
    a = _ok(["sample", "--checkpoint", str(bpe_run / "run"), "--prompt", "the quick", "--max-new-tokens", "8",
             "--temperature", "0", "--no-stream"]).output
    b = _ok(["sample", "--checkpoint", str(out), "--prompt", "the quick", "--max-new-tokens", "8",
             "--temperature", "0", "--no-stream"]).output
    assert a.splitlines()[0] == b.splitlines()[0] and len(a.splitlines()[0]) > len("the quick")


def test_export_refusals(bpe_run, tmp_path):
    root = tmp_path
    (root / "c.txt").write_text(corpus(300))
    _ok(["prepare", "--input", str(root / "c.txt"), "--out", str(root / "d"), "--tokenizer", "char"])
    _ok(["train", "--data", str(root / "d"), "--out", str(root / "run"), "--max-iters", "1", "--quiet", *TINY])
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(root / "run"), "--gguf", str(root / "c.gguf")])
    assert r.exit_code == 1 and "no GGUF form" in r.output and not (root / "c.gguf").exists()
    (root / "x.gguf").write_bytes(b"keep me")
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(bpe_run / "run"), "--gguf", str(root / "x.gguf")])
    assert r.exit_code == 1 and "--force" in r.output and (root / "x.gguf").read_bytes() == b"keep me"
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(bpe_run / "run"), "--gguf", str(root / "x.bin")])
    assert r.exit_code == 1 and "end in .gguf" in r.output


def test_mismatched_tensors_are_refused(tmp_path):
    w = np.zeros((10, 8), np.float32)
    meta = {"general.architecture": "gpt2", "gpt2.embedding_length": 8, "gpt2.context_length": 4,
            "gpt2.block_count": 1, "gpt2.attention.head_count": 2}
    write_gguf(tmp_path / "m.gguf", meta, [("token_embd.weight", w.shape, "F32", quantize(w, "F32"))])
    with pytest.raises(NpgptError, match="missing position_embd.weight"):
        load_gguf_model(tmp_path / "m.gguf")
    write_gguf(tmp_path / "a.gguf", {**meta, "general.architecture": "mamba"}, [])
    with pytest.raises(NpgptError, match="architecture 'mamba' is not supported"):
        load_gguf_model(tmp_path / "a.gguf")


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0", "q4_1"])
def test_keep_quantized_computes_what_the_dequantised_model_does(bpe_run, tmp_path, type_name):
    from npgpt.quant import QuantizedLinear
    model, tok, _ = load_model_and_tokenizer(bpe_run / "run")
    out = export_gguf(model, tok, tmp_path / f"m.{type_name}.gguf", type_name)
    flt = load_gguf_model(out)
    kept = load_gguf_model(out, keep_quantized=True)
    layers = [m for m in kept.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 and all((m.mins is not None) == (type_name == "q4_1") for m in layers)
    # the kept layer holds exactly the dequantised weight
    np.testing.assert_array_equal(kept.transformer.h[0].mlp.c_fc.dequantized(),
                                  flt.transformer.h[0].mlp.c_fc.weight.data)
    idx = np.array([tok.encode("the quick brown fox")[:16]])
    a, _ = flt(idx)
    b, _ = kept(idx)
    np.testing.assert_allclose(a.data, b.data, rtol=1e-4, atol=1e-4)
    ref = kept.transformer.h[0].mlp.c_fc
    x = np.random.default_rng(0).normal(size=(3, ref.n_in)).astype(np.float32)
    from npgpt.tensor import Tensor
    np.testing.assert_allclose(ref(Tensor(x)).data, ref.forward_reference(Tensor(x)).data, rtol=1e-5, atol=1e-5)
