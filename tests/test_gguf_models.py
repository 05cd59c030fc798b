"""GGUF <-> npgpt models: export a trained GPT-2 and its BPE tokenizer, read it back (same logits, same
tokens), load it through the CLI, and refuse what has no GGUF form."""

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import TINY, corpus
from npgpt.cli.main import cli
from npgpt.errors import NpgptError
from npgpt.loading import load_run
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
    model, tok = load_run(bpe_run / "run")[:2]
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
    from npgpt.layers import QuantizedLinear
    model, tok = load_run(bpe_run / "run")[:2]
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


# ---- the Llama family --------------------------------------------------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_tokenizer(bpe_folder, pre="smollm"):
    """An HFTokenizer (SmolLM2's pipeline) from a trained npgpt BPE folder, plus ChatML tokens."""
    from npgpt.tokenizer import load
    from npgpt.tokenizer.hf import AddedToken, HFTokenizer
    tok = load(bpe_folder)
    vocab = {tok.token_bytes(i): i for i in range(tok.vocab_size) if i not in tok.special_tokens.values()}
    table = {i: tok.token_bytes(i) for i in range(tok.vocab_size)}
    merges = [(table[a], table[b]) for a, b in tok.merges]
    n = tok.vocab_size
    added = [AddedToken(i, s) for s, i in tok.special_tokens.items()] + \
            [AddedToken(n, "<|im_start|>"), AddedToken(n + 1, "<|im_end|>")]
    return HFTokenizer(vocab, merges, added, pre_tokenizer=pre, bos_token="<|im_start|>", eos_token="<|im_end|>",
                       chat_template=CHATML)


def tiny_llama(vocab_size, **kw):
    from npgpt.llama import Llama, LlamaConfig
    fields = dict(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, n_inner=96,
                  tie_word_embeddings=True, rope_theta=500.0)
    cfg = LlamaConfig(**{**fields, **kw})
    return Llama(cfg, seed=3)


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": False}, {"qkv_bias": True, "model_type": "qwen2"}])
def test_llama_round_trips_exactly_in_f32(bpe_run, tmp_path, kw):
    tok = hf_tokenizer(bpe_run / "data")
    model = tiny_llama(tok.vocab_size, **kw)
    if kw.get("qkv_bias"):                                   # non-zero biases, so a wrong mapping shows
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.data[...] = np.linspace(-1, 1, layer.self_attn.q_proj.bias.shape[0])
    out = export_gguf(model, tok, tmp_path / "l.gguf", "f32")
    g = GGUFFile(out)
    assert g.architecture == ("qwen2" if kw.get("qkv_bias") else "llama")
    assert ("output.weight" in g.tensors) == (kw.get("tie_word_embeddings") is False)
    back = load_gguf_model(out)
    idx = np.array([tok.encode("the quick brown fox jumps over the lazy dog")[:20]])
    np.testing.assert_array_equal(model(idx)[0].data, back(idx)[0].data)
    tok2 = load_gguf_tokenizer(out)
    text = "<|im_start|>user\nseven wizards 2024 hex<|im_end|>"
    assert tok2.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert tok2.chat_template == CHATML and tok2.eos_token == "<|im_end|>" and tok2.bos_token == "<|im_start|>"
    assert g.metadata["tokenizer.ggml.pre"] == "smollm"


def test_llama_q_k_rows_are_in_llama_cpp_order(bpe_run, tmp_path):
    tok = hf_tokenizer(bpe_run / "data")
    model = tiny_llama(tok.vocab_size)
    g = GGUFFile(export_gguf(model, tok, tmp_path / "l.gguf", "f32"))
    # llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) on Hugging Face's (out, in) weight
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
    attn = model.model.layers[1].self_attn
    np.testing.assert_array_equal(g.dequantize("blk.1.attn_q.weight"), permute(attn.q_proj.weight.data.T, 4))
    np.testing.assert_array_equal(g.dequantize("blk.1.attn_k.weight"), permute(attn.k_proj.weight.data.T, 2))
    np.testing.assert_array_equal(g.dequantize("blk.1.attn_v.weight"), attn.v_proj.weight.data.T)
    assert g.metadata["llama.attention.head_count_kv"] == 2 and g.metadata["llama.rope.freq_base"] == 500.0


def test_llama_keep_quantized_holds_the_embedding_as_int8(bpe_run, tmp_path):
    from npgpt.layers import QuantizedEmbedding, QuantizedLinear
    tok = hf_tokenizer(bpe_run / "data")
    model = tiny_llama(tok.vocab_size)
    out = export_gguf(model, tok, tmp_path / "l.gguf", "q8_0")
    flt = load_gguf_model(out)
    kept = load_gguf_model(out, keep_quantized=True)
    assert isinstance(kept.model.embed_tokens, QuantizedEmbedding)
    assert sum(isinstance(m, QuantizedLinear) for m in kept.modules()) == 2 * 7 + 1
    np.testing.assert_array_equal(kept.model.embed_tokens.dequantized(), flt.model.embed_tokens.weight.data)
    idx = np.array([tok.encode("the quick brown fox jumps")[:12]])
    a, b = flt(idx)[0].data, kept(idx)[0].data
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    cache = kept.new_cache(1)
    np.testing.assert_allclose(kept.forward_cached(idx, cache), b, rtol=1e-4, atol=1e-4)
    with pytest.raises(NpgptError, match="kept quantised"):
        kept.resize_token_embeddings(tok.vocab_size + 1)


def test_unsupported_tokenizers_and_pre_tokenizers_are_named(tmp_path):
    w = np.zeros((4, 32), np.float32)
    base = {"general.architecture": "llama", "tokenizer.ggml.tokens": ["a", "b", "c", "d"]}
    for meta, match in [({"tokenizer.ggml.model": "llama"}, "SentencePiece"),
                        ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm"},
                         "pre-tokenizer 'deepseek-llm' is not supported"),
                        ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                          "tokenizer.ggml.eos_token_id": 9}, "eos_token_id 9 is not a token id")]:
        write_gguf(tmp_path / "t.gguf", {**base, **meta}, [("x", w.shape, "F32", quantize(w, "F32"))])
        with pytest.raises(NpgptError, match=match):
            load_gguf_tokenizer(tmp_path / "t.gguf")


def test_keep_quantized_flag_is_for_gguf_files_only(bpe_run):
    r = CliRunner().invoke(cli, ["sample", "--checkpoint", str(bpe_run / "run"), "--keep-quantized",
                                 "--max-new-tokens", "2"])
    assert r.exit_code == 1 and "--keep-quantized applies to .gguf files" in r.output


def test_from_pretrained_and_tokenizer_load_accept_gguf(bpe_run, tmp_path):
    import npgpt
    from npgpt.tokenizer import load
    out = tmp_path / "m.gguf"
    _ok(["export", "--checkpoint", str(bpe_run / "run"), "--gguf", str(out), "--type", "q8_0"])
    kept = npgpt.from_pretrained(out, keep_quantized=True)
    assert kept.quantization["source"] == "gguf"
    assert load(out).vocab_size == kept.config.vocab_size
    r = _ok(["eval", "--checkpoint", str(out), "--input", str(bpe_run / "corpus.txt"), "--keep-quantized", "--json"])
    assert '"loss"' in r.output


def test_lora_finetune_on_a_kept_quantized_gguf_base(bpe_run, tmp_path):
    import json
    from npgpt.layers import LoRALinear, QuantizedLinear
    from npgpt.loading import load_run
    tok = hf_tokenizer(bpe_run / "data")
    model = tiny_llama(tok.vocab_size)
    base = export_gguf(model, tok, tmp_path / "base.gguf", "q8_0")
    records = [{"messages": [{"role": "user", "content": "hex"}, {"role": "assistant", "content": "zebras waltz"}]}] * 8
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    r = _ok(["finetune", "--init-from", str(base), "--sft", str(tmp_path / "sft.jsonl"), "--keep-quantized",
             "--lora-rank", "4", "--lr", "3e-2",
             "--max-iters", "80", "--out", str(out), "--quiet",
             "--set", "eval_interval=80", "--set", "eval_iters=1", "--set", "warmup_iters=0", "--batch-size", "4"])
    tuned, tok2 = load_run(out)[:2]
    assert any(isinstance(m, LoRALinear) for m in tuned.modules())
    kept = load_gguf_model(base, keep_quantized=True)
    assert any(isinstance(m, QuantizedLinear) for m in kept.modules())
    from npgpt.sft import render_chat
    ids, mask = render_chat(tok, records[0]["messages"])
    x, y = np.array([ids[:-1]]), np.array([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
    before, after = float(kept(x, y)[1].data), float(tuned(x, y)[1].data)
    assert after < before - 1.0, (before, after, r.output)
    # the LoRA run exported to GGUF: the adapter merged into the dequantised base
    _ok(["export", "--checkpoint", str(out), "--gguf", str(tmp_path / "merged.gguf"), "--type", "f32"])
    merged = load_gguf_model(tmp_path / "merged.gguf")
    np.testing.assert_allclose(merged(x)[0].data, tuned(x)[0].data, rtol=1e-4, atol=1e-4)
