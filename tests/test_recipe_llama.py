"""The modern recipe's switches in the Llama family: gradients, cached inference, folders, export refusal,
presets, Muon's groups (the GPT side is tests/test_recipe.py)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from npgpt.errors import NpgptError
from npgpt.gradcheck import gradcheck_module
from npgpt.llama import Llama, LlamaConfig, preset_config
from npgpt.ops.nn import reference_ops, relu2, relu2_reference, softcap, softcap_reference
from npgpt.optim import NS_BAND_HI, NS_BAND_LO, Muon, muon_groups
from npgpt.tensor import Tensor

from helpers import TINY, corpus

SWITCHES = [dict(qk_norm=True), dict(mlp_act="relu2"), dict(zero_init_proj=True), dict(tie_word_embeddings=False),
            dict(logit_softcap=3.0),
            dict(qk_norm=True, mlp_act="relu2", zero_init_proj=True, tie_word_embeddings=False, logit_softcap=3.0)]
IDS = ["qk_norm", "relu2", "zero_init_proj", "untied", "softcap", "all"]


def tiny(**switches):
    cfg = dict(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=8, n_inner=12,
               tie_word_embeddings=True)
    return LlamaConfig(**{**cfg, **switches})


def perturbed(cfg, seed=0):
    """A float64 model whose weights are all non-zero (zero_init_proj would hide gradients)."""
    m = Llama(cfg, seed=seed).astype(np.float64)
    r = np.random.default_rng(seed + 1)
    for _, p in m.named_parameters():
        p.data += 0.3 * r.standard_normal(p.data.shape)
    return m


@pytest.mark.parametrize("switches", SWITCHES, ids=IDS)
def test_gradients_of_every_parameter_with_each_switch(switches):
    m = perturbed(tiny(**switches))
    r = np.random.default_rng(3)
    x, y = r.integers(0, 13, (2, 6)), r.integers(0, 13, (2, 6))
    result = gradcheck_module(m, lambda mod: mod(x, y)[1], max_entries=6)
    assert result.ok, str(result)
    names = {n for n, _ in m.named_parameters()}
    assert ("model.layers.0.mlp.gate_proj.weight" in names) == (switches.get("mlp_act") != "relu2")
    assert ("model.layers.1.self_attn.q_norm.weight" in names) == bool(switches.get("qk_norm"))
    assert ("lm_head.weight" in names) == (not switches.get("tie_word_embeddings", True))
    assert m.num_params() == sum(p.data.size for _, p in m.named_parameters())
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == m.config.param_shapes()


def test_switches_change_the_forward_as_documented():
    x = np.random.default_rng(0).integers(0, 13, (2, 8))
    assert np.abs(perturbed(tiny(logit_softcap=0.5))(x)[0].data).max() <= 0.5
    assert np.abs(perturbed(tiny())(x)[0].data).max() > 0.5
    z = Llama(tiny(zero_init_proj=True, tie_word_embeddings=False), seed=0)
    for name, p in z.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")) or name == "lm_head.weight":
            assert not p.data.any(), name
    np.testing.assert_allclose(z(x)[0].data, 0.0)                 # a zero head: uniform predictions
    # qk_norm: scaling q_proj's weights leaves the output unchanged (the norm removes the scale)
    m = perturbed(tiny(qk_norm=True, rms_norm_eps=1e-12))      # eps would bend the scale-invariance
    before = m(x)[0].data
    for layer in m.model.layers:
        layer.self_attn.q_proj.weight.data *= 7.0
    np.testing.assert_allclose(m(x)[0].data, before, rtol=1e-6, atol=1e-9)
    # relu2: the MLP is down_proj(relu(up_proj(h))^2)
    mlp = perturbed(tiny(mlp_act="relu2")).model.layers[0].mlp
    h = np.random.default_rng(2).standard_normal((1, 3, 8))
    want = np.maximum(h @ mlp.up_proj.weight.data, 0) ** 2 @ mlp.down_proj.weight.data
    np.testing.assert_allclose(mlp(Tensor(h)).data, want, rtol=1e-12)


@pytest.mark.parametrize("switches", SWITCHES, ids=IDS)
def test_cached_decoding_and_reference_ops_equal_the_full_forward(switches):
    m = perturbed(tiny(**switches)).astype(np.float32)
    x = np.random.default_rng(1).integers(0, 13, (2, 8))
    full = m(x)[0].data
    cache = m.new_cache(2)
    out = [m.forward_cached(x[:, :5], cache)]
    for t in range(5, 8):
        out.append(m.forward_cached(x[:, t:t + 1], cache))
    np.testing.assert_allclose(np.concatenate(out, axis=1), full, rtol=1e-4, atol=1e-5)
    with reference_ops():                          # relu2 and softcap have composed twins, dispatched here
        np.testing.assert_allclose(m(x)[0].data, full, rtol=1e-4, atol=1e-5)


def test_relu2_and_softcap_dispatch_to_their_references():
    x = Tensor(np.linspace(-2, 2, 9), requires_grad=True)
    fused = (relu2(x).grad_fn.name, softcap(x, 2.0).grad_fn.name)
    with reference_ops():
        ref = (relu2(x).grad_fn.name, softcap(x, 2.0).grad_fn.name)
        np.testing.assert_allclose(relu2(x).data, relu2_reference(x).data)
        np.testing.assert_allclose(softcap(x, 2.0).data, softcap_reference(x, 2.0).data)
    assert fused == ("ReLU2", "SoftCap") and ref[0] != "ReLU2" and ref[1] != "SoftCap", (fused, ref)


# ---- folders and export --------------------------------------------------------------------------------
@pytest.mark.parametrize("switches,model_type", [
    (SWITCHES[-1], "npgpt_llama"), (dict(zero_init_proj=True), "llama"), (dict(tie_word_embeddings=False), "llama"),
    (dict(mlp_act="relu2"), "npgpt_llama"), (dict(qk_norm=True, qkv_bias=True, model_type="qwen2"), "npgpt_qwen2")])
def test_save_and_load_round_trip(tmp_path, switches, model_type):
    from npgpt import from_pretrained
    m = perturbed(tiny(**switches)).astype(np.float32)
    m.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == model_type
    assert hf["architectures"][0].startswith("Npgpt") == model_type.startswith("npgpt_")
    back = from_pretrained(tmp_path)                                # the one loader dispatches npgpt_llama
    assert isinstance(back, Llama) and back.config == m.config
    x = np.random.default_rng(0).integers(0, 13, (1, 8))
    np.testing.assert_array_equal(back(x)[0].data, m(x)[0].data)


def test_damaged_recipe_in_config_json_is_refused(tmp_path):
    Llama(tiny(qk_norm=True, mlp_act="relu2")).save_pretrained(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())

    def refused(hf, match):
        (tmp_path / "config.json").write_text(json.dumps(hf))
        with pytest.raises(NpgptError, match=match):
            Llama.from_pretrained(tmp_path)

    refused({**good, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "does not match the recipe")
    refused({**good, "npgpt": {"recipe": {"warp_drive": True}}}, "unknown switch 'warp_drive'")
    refused({**good, "hidden_act": "silu"}, "hidden_act 'silu' is not supported")
    refused({**good, "npgpt": {"recipe": {"qk_norm": "yes", "mlp_act": "relu2"}}}, "qk_norm")
    refused({**good, "npgpt": {"recipe": {"zero_init_proj": True}}, "hidden_act": "silu"}, "does not match")


def test_export_refuses_switches_llama_cannot_represent(tmp_path):
    from npgpt.gguf_models import export_gguf
    from npgpt.tokenizer import CharTokenizer
    with pytest.raises(NpgptError, match=r"cannot export to GGUF: .*qk_norm=True.*Llama cannot represent"):
        tiny(qk_norm=True).check_exportable("GGUF")
    with pytest.raises(NpgptError, match="cannot export to transformers: .*mlp_act=relu2"):
        tiny(mlp_act="relu2").check_exportable("transformers")
    with pytest.raises(NpgptError, match="Qwen2 cannot represent"):
        tiny(logit_softcap=5.0, qkv_bias=True, model_type="qwen2").check_exportable("GGUF")
    tiny(zero_init_proj=True, tie_word_embeddings=False).check_exportable("GGUF")   # a plain Llama holds these
    tok = CharTokenizer.train("abcdefghijklm")
    with pytest.raises(NpgptError, match="cannot export to GGUF"):
        export_gguf(Llama(tiny(logit_softcap=5.0)), tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# ---- presets and the trainer --------------------------------------------------------------------------
def test_presets_map_the_gpt_switches_onto_llama():
    from npgpt.training.config import preset_defaults
    c = preset_config("modern-baby", "llama")
    assert c == preset_config("llama-modern-baby")
    assert c.switches() == {"qk_norm": True, "mlp_act": "relu2", "zero_init_proj": True, "logit_softcap": 15.0}
    assert not c.tie_word_embeddings and c.n_inner == 4 * c.n_embd    # relu2 keeps GPT-2's 4 n_embd width
    assert preset_defaults("llama-modern-baby") == preset_defaults("modern-baby") != {}
    assert preset_config("baby", "llama", qk_norm=True).switches() == {"qk_norm": True}
    assert preset_config("modern-baby", "llama", mlp_act="swiglu").mlp_act == "swiglu"
    assert preset_config("baby", "llama", pos="rope").switches() == {}           # rotary is Llama's own
    assert preset_config("baby", "llama", untie_head=True).tie_word_embeddings is False
    for arch, over, match in [("llama", dict(pos="learned"), "rotary positions only"),
                              ("llama", dict(mlp_act="gelu"), "mlp_act=gelu is a GPT option"),
                              ("gpt", dict(mlp_act="swiglu"), "llama family's MLP")]:
        with pytest.raises(NpgptError, match=match):
            preset_config("baby", arch, **over)


def test_muon_groups_a_llama_by_shape_and_name_and_trains():
    # zero_init_proj off: with every projection and the head at zero only lm_head has a first-step gradient
    m = Llama(preset_config("llama-modern-baby", vocab_size=13, n_layer=2, n_embd=16, n_head=2, block_size=8,
                            zero_init_proj=False))
    muon, adamw = muon_groups(m.named_parameters())
    assert {n.rsplit(".", 2)[-2] for n, _ in muon} == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert {n for n, _ in adamw if n.endswith(("embed_tokens.weight", "lm_head.weight"))} == \
        {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(p.data.ndim == 1 for n, p in adamw if "norm" in n)
    opt = Muon(m.named_parameters(), lr=3e-3, muon_lr=0.02)
    r = np.random.default_rng(0)
    x, y = r.integers(0, 13, (4, 8)), r.integers(0, 13, (4, 8))
    q = m.model.layers[0].self_attn.q_proj.weight
    losses, q0, emb0 = [], q.data.copy(), m.input_embedding.data.copy()
    for _ in range(8):                                 # one batch, a few steps: the loss must fall
        opt.zero_grad()
        loss = m(x, y)[1]
        loss.backward()
        opt.step()
        losses.append(float(loss.data))
        if len(losses) == 1:                          # Muon's first step on q_proj: lr times an orthogonalised matrix
            s = np.linalg.svd((q0 - q.data).astype(np.float64) / 0.02, compute_uv=False)
            assert NS_BAND_LO * 0.9 < s[0] < NS_BAND_HI * 1.1 and s[len(s) // 2] > 0.3, s
    assert not np.array_equal(m.input_embedding.data, emb0)       # AdamW moved the embedding
    assert all(b > a for a, b in zip(losses[1:], losses)) and losses[-1] < losses[0] - 0.2, losses


def test_trim_keeps_a_relu2_llama_exact():
    from npgpt.compress import trim_model
    m = perturbed(tiny(mlp_act="relu2")).astype(np.float32)
    x = np.random.default_rng(0).integers(0, 13, (1, 8))
    np.testing.assert_allclose(trim_model(m, 1.0)(x)[0].data, m(x)[0].data, rtol=1e-6)
    assert trim_model(m, 0.5).config.n_inner == 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from npgpt.data import prepare
    d = tmp_path_factory.mktemp("data")
    (d / "corpus.txt").write_text(corpus())
    prepare([str(d / "corpus.txt")], str(d / "prep"), tokenizer="char")
    return d / "prep"


def test_cli_llama_modern_preset_trains_with_muon_samples_and_refuses_export(data_dir, tmp_path):
    from npgpt.cli.main import cli
    run = CliRunner()
    out = tmp_path / "run"
    r = run.invoke(cli, ["train", "--preset", "llama-modern-baby", "--data", str(data_dir), "--out", str(out),
                         "--max-iters", "3", "--eval-interval", "3", *TINY])
    assert r.exit_code == 0, r.output
    assert "Muon:" in r.output
    hf = json.loads((out / "ckpt" / "config.json").read_text())
    assert hf["model_type"] == "npgpt_llama" and hf["npgpt"]["recipe"]["mlp_act"] == "relu2"
    r = run.invoke(cli, ["sample", "--checkpoint", str(out), "--max-new-tokens", "4", "--prompt", "the"])
    assert r.exit_code == 0, r.output
    for args, what in [(["--gguf", str(tmp_path / "m.gguf")], "GGUF"),
                       (["--hf", str(tmp_path / "hf")], "transformers")]:
        r = run.invoke(cli, ["export", "--checkpoint", str(out), *args])
        assert r.exit_code != 0 and f"cannot export to {what}" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "m.gguf").exists()
    # LoRA's default targets are the linear layers the model has (a relu2 Llama has no gate_proj)
    r = run.invoke(cli, ["train", "--init-from", str(out), "--data", str(data_dir), "--out", str(tmp_path / "lora"),
                         "--max-iters", "1", "--eval-interval", "1", "--set", "lora_rank=2", "--batch-size", "2",
                         "--set", "eval_iters=1"])
    assert r.exit_code == 0, r.output
    peft = json.loads((tmp_path / "lora" / "ckpt" / "adapter_config.json").read_text())
    assert sorted(peft["target_modules"]) == ["down_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    r = run.invoke(cli, ["train", "--data", str(data_dir), "--out", str(tmp_path / "one"), "--set", "arch=llama",
                         "--max-iters", "1", "--eval-interval", "1", *TINY, "--set", "qk_norm=true"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "one" / "ckpt" / "config.json").read_text())["npgpt"]["recipe"] == {"qk_norm": True}
    r = run.invoke(cli, ["train", "--data", str(data_dir), "--out", str(tmp_path / "bad"), "--set", "arch=llama",
                         "--set", "pos=learned"])
    assert r.exit_code != 0 and "rotary positions only" in r.output and "Traceback" not in r.output
