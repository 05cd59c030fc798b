"""The Llama family (npgpt.llama): shapes, counts, causality, the GQA KV cache against the full forward,
whole-model gradients, presets, and Hugging Face folders both ways (single and sharded safetensors,
fp32/fp16/bf16, Qwen2's biases, tied and untied heads) checked against an independent NumPy forward
written from Hugging Face's modeling_llama.py; hostile folders get one-line errors."""

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from npgpt import no_grad
from npgpt.errors import NpgptError
from npgpt.gradcheck import gradcheck_module
from npgpt.llama import Llama, LlamaConfig, build_model, preset_config
from npgpt.loading import from_pretrained
from npgpt.model import GPT, GPTConfig


def tiny(seed=0, **kw):
    cfg = dict(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, n_inner=24)
    return Llama(LlamaConfig(**{**cfg, **kw}), seed=seed)


def ids(seed, B, T, V=23):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def randomize(model, seed=0):
    """Norm scales and biases away from 1 / 0, so a wrong layout or a missed bias shows."""
    r = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        p.data[...] = r.normal(1.0 if name.endswith("norm.weight") else 0.0, 0.3, p.shape).astype(p.dtype)
    return model


# ---- an independent forward from Hugging Face's modeling_llama.py, on the file's (out, in) weights --
def hf_reference_logits(sd, hf, idx):
    C, nh = hf["hidden_size"], hf["num_attention_heads"]
    nkv = hf.get("num_key_value_heads") or nh
    hs = hf.get("head_dim") or C // nh
    eps, theta = hf["rms_norm_eps"], hf.get("rope_theta", 10000.0)
    T = idx.shape[1]

    def norm(x, w):
        return w * (x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps))

    def lin(x, name, bias=False):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if bias and name + ".bias" in sd else y

    inv = 1.0 / theta ** (np.arange(0, hs, 2) / hs)
    sc = hf.get("rope_scaling")
    if sc and sc.get("rope_type", sc.get("type")) == "linear":
        inv = inv / sc["factor"]
    emb = np.concatenate([np.arange(T)[:, None] * inv] * 2, -1)                   # (T, hs)
    cos, sin = np.cos(emb), np.sin(emb)

    def rot(x):                                                                   # (B, h, T, hs)
        return x * cos + np.concatenate([-x[..., hs // 2:], x[..., :hs // 2]], -1) * sin

    x = sd["model.embed_tokens.weight"][idx].astype(np.float64)
    B = x.shape[0]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj", True).reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
        k = lin(h, p + "self_attn.k_proj", True).reshape(B, T, nkv, hs).transpose(0, 2, 1, 3)
        v = lin(h, p + "self_attn.v_proj", True).reshape(B, T, nkv, hs).transpose(0, 2, 1, 3)
        q, k = rot(q), rot(k)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)   # repeat_kv
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs) + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        y = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, nh * hs)
        x = x + lin(y, p + "self_attn.o_proj")
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        g = lin(h, p + "mlp.gate_proj")
        x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = sd["model.embed_tokens.weight"] if hf.get("tie_word_embeddings") else sd["lm_head.weight"]
    return norm(x, sd["model.norm.weight"]) @ head.T


# ---- the model ---------------------------------------------------------------------------------
def test_parameter_count_names_and_shapes():
    for kw in ({}, {"tie_word_embeddings": True}, {"qkv_bias": True, "model_type": "qwen2"},
               {"n_kv_head": 1}, {"head_dim": 6}):
        m = tiny(**kw)
        assert m.num_params() == sum(p.size for p in m.parameters())
        assert {n: p.shape for n, p in m.named_parameters()} == m.config.param_shapes()
    names = [n for n, _ in tiny(qkv_bias=True, model_type="qwen2").named_parameters()]
    assert names[:3] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                         "model.layers.0.self_attn.q_proj.bias"]
    assert "model.layers.1.mlp.down_proj.weight" in names and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert not any(n.endswith("o_proj.bias") for n in names)
    assert "lm_head.weight" not in dict(tiny(tie_word_embeddings=True).named_parameters())


def test_config_json_old_and_new_rope_fields_agree():
    """transformers < 5 writes rope_theta + rope_scaling; transformers 5 one rope_parameters object."""
    base = tiny().config.to_hf()
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
    old = LlamaConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {**{k: v for k, v in sc.items() if k != "rope_type"},
                                                                          "type": "llama3"}})
    new = LlamaConfig.from_hf({k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")}
                              | {"rope_parameters": {**sc, "rope_theta": 5e5}})
    assert old == new and new.rope_theta == 5e5 and new.rope_scaling == sc
    plain = LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}})
    assert plain.rope_scaling is None and plain.rope_theta == 100.0
    with pytest.raises(NpgptError, match="rope_parameters"):
        LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})


def test_bad_configs():
    for kw, msg in (({"n_kv_head": 3}, "multiple of n_kv_head"), ({"n_embd": 18}, "divisible"),
                    ({"head_dim": 5}, "even"), ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
                    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "finite"),
                    ({"model_type": "mistral"}, "model_type")):
        with pytest.raises(NpgptError, match=msg):
            tiny(**kw)


def test_presets_and_arch_switch_build_the_same_model():
    assert preset_config("baby", "llama") == preset_config("llama-baby")
    c = preset_config("llama-shakespeare-char")
    g = GPTConfig.preset("shakespeare-char")
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.dropout) == (g.n_layer, g.n_head, g.n_embd, g.block_size,
                                                                        g.dropout)
    assert c.n_kv_head == 3 and c.n_inner == 1024
    a, b = build_model(preset_config("baby", "llama", vocab_size=30), seed=3), build_model(
        preset_config("llama-baby", vocab_size=30), seed=3)
    assert isinstance(a, Llama) and all(np.array_equal(p.data, q.data) for p, q in zip(a.parameters(), b.parameters()))
    assert isinstance(build_model(preset_config("baby")), GPT)
    with pytest.raises(NpgptError, match="unknown arch"):
        preset_config("baby", "mamba")
    with pytest.raises(NpgptError, match="unknown preset"):
        preset_config("llama-gpt3")


def test_forward_shapes_loss_and_causality():
    m = tiny()
    x = ids(0, 2, 7)
    logits, loss = m(x, ids(1, 2, 7))
    assert logits.shape == (2, 7, 23) and loss.data.shape == () and 2.5 < float(loss.data) < 3.7
    assert m(x)[1] is None
    x2 = x.copy()
    x2[:, 5] = (x2[:, 5] + 1) % 23
    l2, _ = m(x2)
    np.testing.assert_array_equal(l2.data[:, :5], logits.data[:, :5])
    assert not np.allclose(l2.data[:, 5:], logits.data[:, 5:])
    with pytest.raises(NpgptError, match="out of range"):
        m(np.array([[0, 23]]))


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1, "qkv_bias": True, "model_type": "qwen2"},
                                {"tie_word_embeddings": True, "head_dim": 6,
                                 "rope_scaling": {"rope_type": "linear", "factor": 2.0}}])
def test_whole_model_gradients_match_finite_differences(kw):
    m = randomize(tiny(**{"n_layer": 1, "vocab_size": 11, "n_embd": 8, "n_inner": 12, "n_head": 2, **kw}))
    x, y = ids(2, 2, 5, 11), ids(3, 2, 5, 11)
    r = gradcheck_module(m, lambda mod: mod(x, y)[1], max_entries=6)
    assert r.ok, str(r)


def test_kv_cache_holds_only_kv_heads_and_matches_full_forward():
    m = randomize(tiny(n_kv_head=1)).eval()
    x = ids(4, 3, 12)
    full = m(x)[0].data
    cache = m.new_cache(3)
    assert cache.k.shape == (2, 3, 1, 16, 4)                      # (n_layer, B, nkv, block_size, hs)
    parts = [m.forward_cached(x[:, :5], cache)] + [m.forward_cached(x[:, t:t + 1], cache) for t in range(5, 12)]
    np.testing.assert_allclose(np.concatenate(parts, 1), full, rtol=1e-4, atol=1e-5)
    _, maps = m.forward_cached(x[:, :3], m.new_cache(3), return_attention=True)
    assert len(maps) == 2 and maps[0].shape == (3, 4, 3, 3)       # per query head


def test_kv_cache_left_padding_matches_unpadded():
    m = randomize(tiny()).eval()
    a, b = ids(5, 1, 6)[0], ids(6, 1, 3)[0]
    batch = np.stack([a, np.concatenate([[0, 0, 0], b])])
    cache = m.new_cache(2)
    cache.reset(pad=[0, 3])
    got = m.forward_cached(batch, cache)
    nxt = m.forward_cached(np.array([[1], [2]]), cache)
    with no_grad():
        alone = m(np.concatenate([b, [2]])[None])[0].data
    np.testing.assert_allclose(got[1, 3:], alone[0, :3], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(nxt[1, 0], alone[0, 3], rtol=1e-4, atol=1e-5)


def test_model_learns_one_batch_and_trains_with_dropout():
    from npgpt.optim import AdamW
    m = tiny(dropout=0.1)
    opt = AdamW(m.named_parameters(), lr=3e-3, weight_decay=0.0)
    x, y = ids(7, 2, 12), ids(8, 2, 12)
    first = None
    for _ in range(60):
        m.zero_grad()
        _, loss = m(x, y)
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.data)
    m.eval()
    assert float(m(x, y)[1].data) < 0.5 * first


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("gpt", False), ("gpt", True)])
def test_resize_token_embeddings_is_one_helper_for_both_families(family, tied):
    """CausalLM.resize_token_embeddings: the embedding (and an untied head) grow by mean rows; the old
    rows and the old tokens' logits are unchanged; shrinking is refused."""
    if family == "llama":
        m = tiny(tie_word_embeddings=tied)
    else:
        m = GPT(GPTConfig(vocab_size=23, block_size=16, n_layer=1, n_head=2, n_embd=16, untie_head=not tied), seed=0)
    assert type(m).resize_token_embeddings is GPT.resize_token_embeddings   # the one shared helper
    x = ids(0, 1, 3)
    before, emb = m(x)[0].data, m.input_embedding.data.copy()
    m.resize_token_embeddings(30)
    assert m.config.vocab_size == 30 and m.input_embedding.shape == (30, 16)
    np.testing.assert_array_equal(m.input_embedding.data[:23], emb)
    np.testing.assert_allclose(m.input_embedding.data[23:], np.broadcast_to(emb.mean(0), (7, 16)), rtol=1e-6)
    if not tied:
        assert m.lm_head.weight.shape == (30, 16) and m.lm_head.weight.grad is None
    after = m(x)[0].data
    assert after.shape == (1, 3, 30)
    np.testing.assert_allclose(after[..., :23], before, rtol=1e-5, atol=1e-6)
    with pytest.raises(NpgptError, match="cannot shrink"):
        m.resize_token_embeddings(20)


# ---- Hugging Face folders ----------------------------------------------------------------------
CASES = {
    "llama": {},
    "llama-tied-mqa": {"tie_word_embeddings": True, "n_kv_head": 1},
    "llama-headdim": {"head_dim": 6, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "qwen2": {"qkv_bias": True, "model_type": "qwen2"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_pretrained_is_a_hugging_face_folder(tmp_path, case):
    m = randomize(tiny(**CASES[case]), seed=1).eval()
    m.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["Qwen2ForCausalLM" if case == "qwen2" else "LlamaForCausalLM"]
    from safetensors.numpy import load_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (m.config.n_kv_head * m.config.head_size, 16)
    x = ids(9, 2, 9)
    want = hf_reference_logits({k: v.astype(np.float64) for k, v in sd.items()}, hf, x)
    np.testing.assert_allclose(m(x)[0].data, want, rtol=1e-4, atol=1e-4)
    back = from_pretrained(tmp_path)
    assert isinstance(back, Llama) and back.config == m.config and not back.training
    np.testing.assert_array_equal(back(x)[0].data, m(x)[0].data)


def _write_hf(folder, sd, hf, shards=1, dtype=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf))
    if dtype is not None:
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(sd)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_loads_sharded_and_half_precision_folders(tmp_path):
    m = randomize(tiny(qkv_bias=True, model_type="qwen2"), seed=2).eval()
    sd, hf = m.hf_state_dict(), m.config.to_hf()
    hf["rotary_emb_extra"] = "ignored"                    # unknown keys are ignored, as transformers does
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)   # old transformers' buffer
    x = ids(10, 1, 8)
    ref = m(x)[0].data
    _write_hf(tmp_path / "sharded", sd, hf, shards=3)
    np.testing.assert_array_equal(from_pretrained(tmp_path / "sharded")(x)[0].data, ref)
    _write_hf(tmp_path / "fp16", sd, hf, dtype=np.float16)
    got = from_pretrained(tmp_path / "fp16")(x)[0].data
    np.testing.assert_allclose(got, ref, atol=0.05)
    assert got.dtype == np.float32


def test_loads_bfloat16(tmp_path):
    """bf16 bytes written by hand (the top half of each float32), as transformers saves them."""
    m = randomize(tiny(), seed=3).eval()
    sd = m.hf_state_dict()
    header, blobs, off = {}, [], 0
    for k, v in sd.items():
        raw = (v.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_hf()))
    x = ids(11, 1, 8)
    np.testing.assert_allclose(from_pretrained(tmp_path)(x)[0].data, m(x)[0].data, atol=0.1)


def test_tied_folder_with_a_stored_head_loads(tmp_path):
    m = randomize(tiny(tie_word_embeddings=True), seed=4).eval()
    sd = m.hf_state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()
    _write_hf(tmp_path, sd, m.config.to_hf())
    x = ids(1, 1, 5)
    np.testing.assert_array_equal(from_pretrained(tmp_path)(x)[0].data, m(x)[0].data)


def test_hostile_folders_fail_with_one_line(tmp_path):
    m = tiny()
    sd, hf = m.hf_state_dict(), m.config.to_hf()

    def case(name, sd=sd, hf=hf, shards=1):
        _write_hf(tmp_path / name, sd, hf, shards=shards)
        with pytest.raises(NpgptError) as e:
            from_pretrained(tmp_path / name)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "MistralForCausalLM" in case("arch", hf={**hf, "architectures": ["MistralForCausalLM"]})
    assert "num_hidden_layers" in case("layers", hf={**hf, "num_hidden_layers": 5})
    assert "expected" in case("kvheads", hf={**hf, "num_key_value_heads": 4})
    assert "multiple" in case("kv3", hf={**hf, "num_key_value_heads": 3})
    assert "missing" in case("nohead", sd={k: v for k, v in sd.items() if k != "lm_head.weight"})
    assert "yarn" in case("yarn", hf={**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert "hidden_act" in case("gelu", hf={**hf, "hidden_act": "gelu"})
    assert "vocab_size" in case("vocab", hf={**hf, "vocab_size": -1})
    assert "sliding" in case("sliding", hf={**hf, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                            "use_sliding_window": True})
    assert "dtype" in case("int", sd={**sd, "model.norm.weight": np.ones(16, np.int32)})
    bad = {**sd, "model.norm.weight": np.full(16, np.nan, np.float32)}
    assert "NaN" in case("nan", sd=bad)
    # a shard index that names a file outside the folder, or disagrees with its shards
    _write_hf(tmp_path / "idx", sd, hf, shards=2)
    index = json.loads((tmp_path / "idx" / "model.safetensors.index.json").read_text())
    good = (tmp_path / "idx" / "model.safetensors.index.json").read_text()
    index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    (tmp_path / "idx" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(NpgptError, match="outside"):
        from_pretrained(tmp_path / "idx")
    index = json.loads(good)
    shard_names = sorted(set(index["weight_map"].values()))
    home = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = [s for s in shard_names if s != home][0]
    (tmp_path / "idx" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(NpgptError, match="disagrees|damaged"):
        from_pretrained(tmp_path / "idx")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(hf))
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(NpgptError, match="pickles"):
        from_pretrained(tmp_path / "empty")


@settings(max_examples=15)
@given(st.dictionaries(st.sampled_from(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "head_dim",
                                        "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                                        "tie_word_embeddings"]),
                       st.one_of(st.integers(-3, 1 << 40), st.floats(allow_nan=True), st.none(), st.booleans(),
                                 st.text(max_size=5), st.dictionaries(st.text(max_size=8), st.integers(0, 9), max_size=3)),
                       max_size=4))
def test_fuzzed_configs_fail_cleanly_before_allocating(tmp_path_factory, changes):
    m = tiny(seed=1)
    folder = tmp_path_factory.mktemp("fz")
    _write_hf(folder, m.hf_state_dict(), {**m.config.to_hf(), **changes})
    try:
        loaded = from_pretrained(folder)
    except NpgptError as e:
        assert "\n" not in str(e)
    else:                                # only changes that leave the model what it was may load
        assert loaded.num_params() == m.num_params()


def test_gpt_folders_still_load_through_the_same_entry(tmp_path):
    g = GPT(replace(GPTConfig.preset("baby"), n_layer=1, vocab_size=20))
    g.save_pretrained(tmp_path)
    assert isinstance(from_pretrained(tmp_path), GPT)
