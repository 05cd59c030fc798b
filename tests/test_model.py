"""The GPT model: shapes, gradients of every parameter, causality, KV cache, save/load, learning."""

import json

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, no_grad
from npgpt.errors import NpgptError
from npgpt.gradcheck import gradcheck_module

TINY = GPTConfig(vocab_size=11, block_size=7, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def tiny(seed=0, **kw):
    from dataclasses import replace
    return GPT(replace(TINY, **kw), seed=seed)


def ids(seed, B, T, V=11):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def test_presets():
    assert GPTConfig.preset("baby").n_embd == 128 and GPTConfig.preset("baby").block_size == 64
    sc = GPTConfig.preset("shakespeare-char")
    assert (sc.n_layer, sc.n_head, sc.n_embd, sc.block_size) == (6, 6, 384, 256)
    for name, layers in [("gpt2", 12), ("gpt2-medium", 24), ("gpt2-large", 36), ("gpt2-xl", 48)]:
        c = GPTConfig.preset(name)
        assert c.n_layer == layers and c.vocab_size == 50257 and c.block_size == 1024
    with pytest.raises(NpgptError, match="unknown preset"):
        GPTConfig.preset("gpt5")


def test_gpt2_parameter_count_and_names():
    # The real GPT-2 124M: 124,439,808 parameters (wte tied to the head)
    m = GPT(GPTConfig.preset("gpt2", n_layer=1))
    names = [n for n, _ in m.named_parameters()]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.ln_f.bias" in names
    assert dict(m.named_parameters())["transformer.h.0.attn.c_attn.weight"].shape == (768, 2304)
    per_block = 7087872
    assert m.num_params() == 124439808 - 11 * per_block


def test_flops_formula():
    m = tiny()
    assert m.flops_per_token(7) == 6 * m.num_params(non_embedding=True) + 12 * 2 * 16 * 7


def test_init_statistics():
    m = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=8, n_head=2, n_embd=64))
    p = dict(m.named_parameters())
    assert abs(p["transformer.h.0.mlp.c_fc.weight"].data.std() - 0.02) < 0.002
    assert abs(p["transformer.h.0.mlp.c_proj.weight"].data.std() - 0.02 / np.sqrt(16)) < 0.001
    assert np.all(p["transformer.h.0.attn.c_attn.bias"].data == 0)
    assert p["transformer.h.0.ln_1.weight"].data.dtype == np.float32


def test_forward_shapes_and_loss():
    m = tiny()
    logits, loss = m(ids(0, 3, 7), ids(1, 3, 7))
    assert logits.shape == (3, 7, 11) and loss.shape == () and abs(float(loss.data) - np.log(11)) < 0.2
    logits, loss = m(ids(0, 3, 5))
    assert loss is None and logits.shape == (3, 5, 11)


def test_whole_model_gradients_match_finite_differences():
    m = tiny(seed=3).astype(np.float64)
    x, y = ids(5, 2, 7), ids(6, 2, 7)
    errors = gradcheck_module(m, lambda mod: mod(x, y)[1])
    assert len(errors) == len(m.named_parameters())
    worst = max(errors.values())
    assert worst < 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_causality():
    m = tiny(seed=1)
    a = ids(2, 2, 7)
    b = a.copy()
    b[:, 4:] = (b[:, 4:] + 3) % 11
    with no_grad():
        la, lb = m(a)[0].data, m(b)[0].data
    np.testing.assert_array_equal(la[:, :4], lb[:, :4])
    assert not np.allclose(la[:, 4:], lb[:, 4:])


def test_kv_cache_matches_full_forward():
    m = tiny(seed=2).eval()
    x = ids(3, 2, 7)
    with no_grad():
        full = m(x)[0].data
    cache = m.new_cache(2)
    parts = [m.forward_cached(x[:, :3], cache)]
    parts += [m.forward_cached(x[:, t:t + 1], cache) for t in range(3, 7)]
    cached = np.concatenate(parts, axis=1)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    with pytest.raises(NpgptError, match="KV cache overflow"):
        m.forward_cached(x[:, :1], cache)


def test_kv_cache_left_padding_matches_unpadded():
    m = tiny(seed=4).eval()
    short = ids(7, 1, 3)
    padded = np.concatenate([np.zeros((1, 2), int), short], axis=1)   # two pad tokens on the left
    c1, c2 = m.new_cache(1), m.new_cache(1)
    c2.reset(pad=[2])
    a = m.forward_cached(short, c1)
    b = m.forward_cached(padded, c2)
    np.testing.assert_allclose(a[:, -1], b[:, -1], rtol=1e-5, atol=1e-6)
    step = np.array([[5]])
    np.testing.assert_allclose(m.forward_cached(step, c1), m.forward_cached(step, c2), rtol=1e-5, atol=1e-6)


def test_token_ids_validated():
    m = tiny()
    with pytest.raises(NpgptError, match="token id 11 is out of range for vocab_size 11"):
        m(np.array([[1, 11]]))
    with pytest.raises(NpgptError, match="token id -1"):
        m(np.array([[-1, 2]]))
    with pytest.raises(NpgptError, match="exceeds block_size"):
        m(ids(0, 1, 8))
    with pytest.raises(NpgptError, match="integers"):
        m(np.ones((1, 2)))


def test_save_load_identical_logits(tmp_path):
    m = tiny(seed=5)
    m.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["n_inner"] is None
    assert cfg["activation_function"] == "gelu_new" and cfg["n_positions"] == 7
    m2 = GPT.from_pretrained(tmp_path / "m")
    x = ids(1, 2, 7)
    with no_grad():
        np.testing.assert_array_equal(m(x)[0].data, m2(x)[0].data)


def test_loads_hf_style_keys(tmp_path):
    """A transformers-written folder: no `transformer.` prefix or explicit lm_head, attn.bias buffers."""
    from safetensors.numpy import save_file
    m = tiny(seed=6)
    m.save_pretrained(tmp_path / "a")
    state = {n.removeprefix("transformer."): p.data for n, p in m.named_parameters()}
    state["lm_head.weight"] = m.transformer.wte.weight.data.copy()
    state["h.0.attn.bias"] = np.tril(np.ones((1, 1, 7, 7), np.float32))
    state["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    (tmp_path / "b").mkdir()
    save_file(state, str(tmp_path / "b" / "model.safetensors"))
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    m2 = GPT.from_pretrained(tmp_path / "b")
    x = ids(2, 1, 7)
    with no_grad():
        np.testing.assert_array_equal(m(x)[0].data, m2(x)[0].data)


def test_bad_folders(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path / "ok")
    with pytest.raises(NpgptError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NpgptError, match="config.json is missing"):
        GPT.from_pretrained(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(NpgptError, match="not valid JSON"):
        GPT.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NpgptError, match="unsupported model_type 'llama'"):
        GPT.from_pretrained(bad)
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NpgptError, match="model.safetensors is missing"):
        GPT.from_pretrained(bad)
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NpgptError, match="truncated or corrupt"):
        GPT.from_pretrained(bad)
    cfg["n_embd"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(data)
    with pytest.raises(NpgptError, match="n_embd is 32"):
        GPT.from_pretrained(bad)


def test_load_state_dict_lists_problems():
    m = tiny()
    sd = dict(m.state_dict())
    sd.pop("transformer.ln_f.bias")
    sd["extra.weight"] = np.zeros(3)
    with pytest.raises(NpgptError, match="missing keys: transformer.ln_f.bias.*unexpected keys: extra.weight"):
        m.load_state_dict(sd)


def test_model_learns_one_batch():
    m = tiny(seed=0)
    x, y = ids(8, 4, 7), ids(9, 4, 7)
    first = None
    for step in range(300):
        m.zero_grad()
        _, loss = m(x, y)
        loss.backward()
        first = first if first is not None else float(loss.data)
        for p in m.parameters():
            p.data -= 0.3 * p.grad
    assert first > 2.0 and float(loss.data) < 0.1


def test_train_eval_modes_and_dropout():
    m = tiny(dropout=0.5)
    x = ids(0, 2, 7)
    m.eval()
    with no_grad():
        a, b = m(x)[0].data, m(x)[0].data
    np.testing.assert_array_equal(a, b)
    m.train()
    with no_grad():
        assert not np.array_equal(m(x)[0].data, a)
