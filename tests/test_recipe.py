"""The modern recipe's switches in GPT: ops, gradients, cached inference, folders, export refusal, presets."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from npgpt import GPT, GPTConfig, Tensor, gradcheck
from npgpt.errors import NpgptError
from npgpt.gradcheck import gradcheck_module
from npgpt.model import MODERN, RECIPE_DEFAULTS
from npgpt.ops.nn import relu2, relu2_reference, softcap, softcap_reference

from helpers import TINY, corpus

SWITCHES = [dict(pos="rope"), dict(qk_norm=True), dict(mlp_act="relu2"), dict(zero_init_proj=True),
            dict(untie_head=True), dict(logit_softcap=3.0), MODERN]
IDS = [next(iter(s)) if len(s) == 1 else "all" for s in SWITCHES]


def tiny(**switches):
    return GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, **switches)


def perturbed(cfg, seed=0):
    """A float64 model whose weights are all non-zero (zero_init_proj would hide gradients)."""
    m = GPT(cfg, seed=seed).astype(np.float64)
    r = np.random.default_rng(seed + 1)
    for _, p in m.named_parameters():
        p.data += 0.3 * r.standard_normal(p.data.shape)
    return m


# ---- the two new ops -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_relu2_and_softcap_forward_and_gradients(shape):
    r = np.random.default_rng(sum(shape))
    x = r.uniform(-3, 3, shape)
    x = np.where(np.abs(x) < 0.05, 0.1, x)                     # away from the kink of max(x, 0)
    np.testing.assert_allclose(relu2(Tensor(x)).data, np.maximum(x, 0) ** 2, rtol=1e-14)
    np.testing.assert_allclose(relu2(Tensor(x)).data, relu2_reference(Tensor(x)).data, rtol=1e-14)
    np.testing.assert_allclose(softcap(Tensor(x), 2.0).data, 2.0 * np.tanh(x / 2.0), rtol=1e-14)
    np.testing.assert_allclose(softcap(Tensor(x), 2.0).data, softcap_reference(Tensor(x), 2.0).data, rtol=1e-14)
    assert gradcheck(relu2, x).ok
    assert gradcheck(lambda t: softcap(t, 2.0), x).ok
    assert relu2(Tensor(x.astype(np.float32))).dtype == np.float32
    assert softcap(Tensor(x.astype(np.float32)), 2.0).dtype == np.float32
    with pytest.raises(ValueError, match="cap must be positive"):
        softcap(Tensor(x), 0.0)


# ---- the model with each switch ----------------------------------------------------------------------
@pytest.mark.parametrize("switches", SWITCHES, ids=IDS)
def test_gradients_of_every_parameter_with_each_switch(switches):
    m = perturbed(tiny(**switches))
    r = np.random.default_rng(3)
    x, y = r.integers(0, 13, (2, 6)), r.integers(0, 13, (2, 6))
    result = gradcheck_module(m, lambda mod: mod(x, y)[1], max_entries=6)
    assert result.ok, str(result)
    names = {n for n, _ in m.named_parameters()}
    assert ("transformer.wpe.weight" in names) == (switches.get("pos", "learned") == "learned")
    assert ("lm_head.weight" in names) == bool(switches.get("untie_head"))
    assert ("transformer.h.0.attn.q_norm.weight" in names) == bool(switches.get("qk_norm"))
    assert m.num_params() == sum(p.data.size for _, p in m.named_parameters())
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == m.config.param_shapes()


def test_switches_change_the_forward_as_documented():
    r = np.random.default_rng(0)
    x = r.integers(0, 13, (2, 8))
    base = perturbed(tiny())
    capped = perturbed(tiny(logit_softcap=0.5))
    assert np.abs(capped(x)[0].data).max() <= 0.5                  # soft-capped
    assert np.abs(base(x)[0].data).max() > 0.5
    z = GPT(tiny(zero_init_proj=True, untie_head=True), seed=0)
    for name, p in z.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert not p.data.any(), name
    np.testing.assert_allclose(z(x)[0].data, 0.0)                 # a zero head: uniform predictions
    # rope: no position table, and the output depends on the order of the tokens
    rope = perturbed(tiny(pos="rope"))
    a = rope(x)[0].data
    b = rope(x[:, ::-1].copy())[0].data[:, ::-1]
    assert not np.allclose(a, b)


@pytest.mark.parametrize("switches", SWITCHES, ids=IDS)
def test_cached_decoding_equals_the_full_forward(switches):
    m = perturbed(tiny(**switches)).astype(np.float32)
    x = np.random.default_rng(1).integers(0, 13, (2, 8))
    full = m(x)[0].data
    cache = m.new_cache(2)
    out = [m.forward_cached(x[:, :5], cache)]
    for t in range(5, 8):
        out.append(m.forward_cached(x[:, t:t + 1], cache))
    np.testing.assert_allclose(np.concatenate(out, axis=1), full, rtol=1e-4, atol=1e-5)


def test_left_padded_batch_with_rope_matches_unpadded_rows():
    m = perturbed(tiny(pos="rope", qk_norm=True)).astype(np.float32)
    short = np.array([[3, 4, 5]])
    alone = m(short)[0].data[0, -1]
    cache = m.new_cache(2)
    cache.reset(pad=[2, 0])
    batch = np.array([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    padded = m.forward_cached(batch, cache)[0, -1]
    np.testing.assert_allclose(padded, alone, rtol=1e-4, atol=1e-5)


# ---- folders and export --------------------------------------------------------------------------------
@pytest.mark.parametrize("switches,model_type", [(MODERN, "npgpt_gpt"), (dict(untie_head=True), "gpt2"),
                                                 (dict(zero_init_proj=True), "gpt2"), (dict(qk_norm=True), "npgpt_gpt")])
def test_save_and_load_round_trip(tmp_path, switches, model_type):
    m = perturbed(tiny(**switches)).astype(np.float32)
    m.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == model_type
    assert hf["tie_word_embeddings"] == (not switches.get("untie_head", False))
    back = GPT.from_pretrained(tmp_path)
    assert back.config == m.config
    x = np.random.default_rng(0).integers(0, 13, (1, 8))
    np.testing.assert_array_equal(back(x)[0].data, m(x)[0].data)


def test_damaged_recipe_in_config_json_is_refused(tmp_path):
    GPT(tiny(**MODERN)).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["model_type"] = "gpt2"                                   # claims GPT-2 but needs npgpt
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(NpgptError, match="does not match the recipe switches"):
        GPT.from_pretrained(tmp_path)
    hf["model_type"] = "npgpt_gpt"
    hf["npgpt"]["recipe"]["warp_drive"] = True
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(NpgptError, match="unknown switch 'warp_drive'"):
        GPT.from_pretrained(tmp_path)


def test_export_refuses_switches_gpt2_cannot_represent():
    with pytest.raises(NpgptError, match="cannot export to GGUF: .*pos=rope"):
        tiny(**MODERN).check_exportable("GGUF")
    with pytest.raises(NpgptError, match="cannot export to transformers: .*qk_norm=True"):
        tiny(qk_norm=True).check_exportable("transformers")
    tiny(untie_head=True, zero_init_proj=True).check_exportable("transformers")   # GPT-2 can hold these
    tiny().check_exportable("GGUF")
    assert set(RECIPE_DEFAULTS) == set(MODERN)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from npgpt.data import prepare
    d = tmp_path_factory.mktemp("data")
    (d / "corpus.txt").write_text(corpus())
    prepare([str(d / "corpus.txt")], str(d / "prep"), tokenizer="char")
    return d / "prep"


def test_cli_modern_preset_trains_with_muon_samples_and_refuses_export(data_dir, tmp_path):
    from npgpt.cli.main import cli
    run = CliRunner()
    out = tmp_path / "run"
    r = run.invoke(cli, ["train", "--preset", "modern-shakespeare", "--data", str(data_dir), "--out", str(out),
                         "--max-iters", "4", "--eval-interval", "2", *TINY])
    assert r.exit_code == 0, r.output
    assert "Muon:" in r.output
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert state["config"]["optimizer"] == "muon" and state["config"]["preset"] == "modern-shakespeare"
    hf = json.loads((out / "ckpt" / "config.json").read_text())
    assert hf["model_type"] == "npgpt_gpt" and hf["npgpt"]["recipe"]["pos"] == "rope"
    r = run.invoke(cli, ["sample", "--checkpoint", str(out), "--max-new-tokens", "5", "--prompt", "the"])
    assert r.exit_code == 0, r.output
    for args, what in [(["--gguf", str(tmp_path / "m.gguf")], "GGUF"), (["--hf", str(tmp_path / "hf")], "transformers")]:
        r = run.invoke(cli, ["export", "--checkpoint", str(out), *args])
        assert r.exit_code != 0 and f"cannot export to {what}" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "m.gguf").exists()
    # a single switch from the command line, on the baby preset
    r = run.invoke(cli, ["train", "--data", str(data_dir), "--out", str(tmp_path / "one"), "--max-iters", "2",
                         "--eval-interval", "2", *TINY, "--set", "mlp_act=relu2", "--set", "pos=rope"])
    assert r.exit_code == 0, r.output
    hf = json.loads((tmp_path / "one" / "ckpt" / "config.json").read_text())
    assert hf["npgpt"]["recipe"] == {"pos": "rope", "mlp_act": "relu2"}
    r = run.invoke(cli, ["train", "--data", str(data_dir), "--out", str(tmp_path / "bad"), "--set", "pos=alibi"])
    assert r.exit_code != 0 and "pos must be learned or rope" in r.output
    # a plain GPT-2 run exports to a transformers folder; --gguf and --hf together are refused
    r = run.invoke(cli, ["train", "--data", str(data_dir), "--out", str(tmp_path / "plain"), "--max-iters", "1",
                         "--eval-interval", "1", *TINY])
    assert r.exit_code == 0, r.output
    r = run.invoke(cli, ["export", "--checkpoint", str(tmp_path / "plain"), "--hf", str(tmp_path / "hf-plain")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "hf-plain" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert GPT.from_pretrained(tmp_path / "hf-plain").config.switches() == {}
    r = run.invoke(cli, ["export", "--checkpoint", str(tmp_path / "plain"), "--hf", str(tmp_path / "h2"),
                         "--gguf", str(tmp_path / "x.gguf")])
    assert r.exit_code != 0 and "exactly one of --gguf" in r.output
