"""LoRA: gradients, step-0 identity, merging, frozen base, PEFT folders both ways, int8 bases."""

import json

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, Tensor
from npgpt.errors import NpgptError
from npgpt.gradcheck import gradcheck
from npgpt.layers import LoRALinear, QuantizedLinear
from npgpt.lora import (LoRAConfig, adapter_tensors, apply_lora, load_adapter, lora_layers, merge_lora, read_adapter,
                        save_adapter, trainable_parameters)
from npgpt.nn import Linear
from npgpt.optim import AdamW
from npgpt.quant import quantize_model

CFG = GPTConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=16)


def _ids(seed=0, B=3, T=12):
    r = np.random.default_rng(seed)
    return r.integers(0, CFG.vocab_size, (B, T)), r.integers(0, CFG.vocab_size, (B, T))


def _randomise_b(model, seed=1, scale=0.1):
    """Give every lora_B non-zero values (a trained adapter), so the update is not trivially 0."""
    r = np.random.default_rng(seed)
    for _, lin in lora_layers(model):
        lin.lora_B.data[...] = r.normal(0, scale, lin.lora_B.shape).astype(lin.lora_B.dtype)


def test_lora_linear_gradcheck():
    r = np.random.default_rng(0)
    base = Linear(5, 7, rng=r)
    base.astype(np.float64)
    lin = LoRALinear(base, r=3, scaling=2.0 / 3, rng=r)
    W = base.weight.data.copy()

    def fn(x, A, B, w):
        lin.lora_A, lin.lora_B, lin.base.weight = A, B, w
        return lin(x)

    x = r.standard_normal((2, 4, 5))
    A, B = r.standard_normal((5, 3)), r.standard_normal((3, 7))
    res = gradcheck(fn, x, A, B, W, wrt=[0, 1, 2])
    assert res.ok, str(res)


def test_quantised_base_gradcheck_flows_to_input_and_adapters():
    r = np.random.default_rng(1)
    q = QuantizedLinear.from_linear(Linear(8, 6, rng=r), bits=8)
    lin = LoRALinear(q, r=2, scaling=1.0, rng=r)

    def fn(x, A, B):
        lin.lora_A, lin.lora_B = A, B
        return lin(x)
    x, A, B = r.standard_normal((3, 8)), r.standard_normal((8, 2)), r.standard_normal((2, 6))
    # the quantised base computes in float32: a looser tolerance than float64 layers get
    res = gradcheck(fn, x, A, B, eps=1e-3, tol=2e-3)
    assert res.ok, str(res)


def test_step0_logits_equal_base_exactly_and_a_is_kaiming_uniform():
    idx, _ = _ids()
    model = GPT(CFG, seed=3)
    base_logits = model(idx)[0].data.copy()
    names = apply_lora(model, LoRAConfig(r=4, alpha=8))
    assert len(names) == 4 * CFG.n_layer
    np.testing.assert_array_equal(model(idx)[0].data, base_logits)
    for _, lin in lora_layers(model):
        bound = 1 / np.sqrt(lin.n_in)
        assert np.abs(lin.lora_A.data).max() <= bound and np.abs(lin.lora_A.data).max() > 0.5 * bound
        assert not lin.lora_B.data.any()


def test_targets_follow_peft_suffix_rule():
    model = GPT(CFG)
    names = apply_lora(model, LoRAConfig(r=2, targets=("c_attn", "mlp.c_proj")))
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
                     "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    model = GPT(CFG)
    assert apply_lora(model, LoRAConfig(r=2, targets=r"transformer\.h\.1\.attn\.c_.*")) == [
        "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]
    with pytest.raises(NpgptError, match="matches no layer"):
        apply_lora(GPT(CFG), LoRAConfig(r=2, targets=("q_proj",)))


def test_merged_equals_unmerged():
    idx, _ = _ids(1)
    model = GPT(CFG, seed=4)
    apply_lora(model, LoRAConfig(r=4, alpha=16))
    _randomise_b(model)
    unmerged = model(idx)[0].data.copy()
    base_w = model.transformer.h[0].attn.c_attn.base.weight.data.copy()
    assert np.abs(unmerged - GPT(CFG, seed=4)(idx)[0].data).max() > 1e-3    # the adapter does something
    merge_lora(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Linear)
    assert not np.array_equal(model.transformer.h[0].attn.c_attn.weight.data, base_w)
    np.testing.assert_allclose(model(idx)[0].data, unmerged, atol=1e-6, rtol=0)


def test_only_adapter_tensors_change_during_training():
    idx, tgt = _ids(2)
    model = GPT(CFG, seed=5)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1))
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    trainable = trainable_parameters(model)
    assert all(".lora_" in n for n, _ in trainable) and len(trainable) == 2 * 4 * CFG.n_layer
    opt = AdamW(trainable, lr=1e-2, weight_decay=0.1)
    assert opt.flat.size == sum(p.size for _, p in trainable)       # no optimizer state for the base
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(idx, tgt)[1].backward()
        opt.step(1e-2)
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert not np.array_equal(p.data, before[n]), n
        else:
            np.testing.assert_array_equal(p.data, before[n], err_msg=n)
            assert p.grad is None, n


def test_save_load_round_trip_and_peft_layout(tmp_path):
    idx, _ = _ids(3)
    model = GPT(CFG, seed=6)
    apply_lora(model, LoRAConfig(r=4, alpha=12, dropout=0.05, targets=("c_attn", "c_fc")))
    _randomise_b(model)
    want = model(idx)[0].data.copy()
    save_adapter(model, tmp_path / "ad", base_model="some/base")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is True and cfg["r"] == 4
    assert cfg["lora_alpha"] == 12 and cfg["target_modules"] == ["c_attn", "c_fc"]
    from safetensors.numpy import load_file
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    a = saved["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = saved["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert a.shape == (4, CFG.n_embd) and b.shape == (3 * CFG.n_embd, 4)     # PEFT: (r, in), (out, r)
    assert len(saved) == 2 * 2 * CFG.n_layer
    fresh = GPT(CFG, seed=6)
    load_adapter(fresh, tmp_path / "ad")
    np.testing.assert_array_equal(fresh(idx)[0].data, want)
    assert adapter_tensors(fresh).keys() == saved.keys()


def test_peft_folder_from_known_arrays_loads_with_the_right_mapping(tmp_path):
    """A folder as PEFT writes it (not by npgpt): A_peft (r, in), B_peft (out, r), delta = (B A)^T."""
    from safetensors.numpy import save_file
    r = np.random.default_rng(7)
    C, R = CFG.n_embd, 2
    A_peft = r.standard_normal((R, C)).astype(np.float32)
    B_peft = r.standard_normal((4 * C, R)).astype(np.float32)
    (tmp_path / "peft").mkdir()
    save_file({"base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight": A_peft,
               "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight": B_peft},
              str(tmp_path / "peft" / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 6, "lora_dropout": 0.0,
        "target_modules": ["c_fc"], "fan_in_fan_out": True, "bias": "none", "layers_to_transform": [1],
        "base_model_name_or_path": "gpt2", "some_future_key": 1}))
    model = GPT(CFG, seed=8)
    w = model.transformer.h[1].mlp.c_fc.weight.data.copy()              # (in, out)
    load_adapter(model, tmp_path / "peft")
    assert [n for n, _ in lora_layers(model)] == ["transformer.h.1.mlp.c_fc"]
    lin = model.transformer.h[1].mlp.c_fc
    np.testing.assert_array_equal(lin.lora_A.data, A_peft.T)
    assert lin.scaling == 3.0
    expected = w + 3.0 * (B_peft @ A_peft).T                            # PEFT's merged Conv1D weight
    merge_lora(model)
    np.testing.assert_allclose(model.transformer.h[1].mlp.c_fc.weight.data, expected, rtol=1e-6, atol=1e-6)


def test_bad_adapter_folders_are_one_line_errors(tmp_path):
    from safetensors.numpy import save_file
    d = tmp_path / "bad"
    d.mkdir()
    with pytest.raises(NpgptError, match="adapter_config.json is missing"):
        read_adapter(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True}))
    with pytest.raises(NpgptError, match="DoRA"):
        read_adapter(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": np.zeros((2, 16), np.float32)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(NpgptError, match="not its partner"):
        read_adapter(d)
    save_file({"base_model.model.transformer.wte.lora_embedding_A": np.zeros((2, 16), np.float32)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(NpgptError, match="not LoRA weights"):
        read_adapter(d)
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(NpgptError, match="corrupt"):
        read_adapter(d)
    # trained on another base: wrong width
    other = GPT(GPTConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=8))
    apply_lora(other, LoRAConfig(r=2))
    save_adapter(other, tmp_path / "other")
    with pytest.raises(NpgptError, match="another base"):
        load_adapter(GPT(CFG), tmp_path / "other")


def test_int8_base_stays_int8_and_lora_loss_falls():
    idx, tgt = _ids(4, B=4)
    model = GPT(CFG, seed=9)
    model.transformer.wte.weight.data *= 25      # logits big enough that a small adapter can move them
    quantize_model(model, bits=8)
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    lin = model.transformer.h[0].attn.c_attn
    assert isinstance(lin.base, QuantizedLinear) and lin.base.qweight.dtype == np.int8
    q_before = lin.base.qweight.copy()
    trainable = trainable_parameters(model)
    opt = AdamW(trainable, lr=3e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = model(idx, tgt)[1]
        loss.backward()
        opt.step(3e-2)
        losses.append(float(loss.data))
    assert losses[-1] < 0.5 * losses[0], losses          # one fixed batch: the adapters memorise it
    assert lin.base.qweight.dtype == np.int8            # the base stays int8 and unchanged
    np.testing.assert_array_equal(lin.base.qweight, q_before)


def test_int4_base_merges_to_float():
    idx, _ = _ids(5)
    model = quantize_model(GPT(CFG, seed=10), bits=4, group_size=8)
    apply_lora(model, LoRAConfig(r=2))
    _randomise_b(model)
    unmerged = model(idx)[0].data.copy()
    merge_lora(model)
    np.testing.assert_allclose(model(idx)[0].data, unmerged, atol=1e-5, rtol=0)


def test_config_validation():
    for bad in (dict(r=0), dict(r=2, alpha=0), dict(r=2, dropout=1.0), dict(r=2, targets=())):
        with pytest.raises(NpgptError):
            LoRAConfig(**bad)
    assert LoRAConfig.from_targets_option(4).alpha == 8
    assert LoRAConfig(r=4, alpha=8, use_rslora=True).scaling_for("x") == 4.0
    cfg = LoRAConfig(r=4, alpha=8, rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"c_fc": 1})
    assert cfg.rank_for("transformer.h.1.attn.c_attn") == 2 and cfg.rank_for("transformer.h.11.attn.c_attn") == 4
    assert cfg.scaling_for("transformer.h.0.mlp.c_fc") == 0.25


def test_bf16_adapter_as_peft_saves_it_loads_widened(tmp_path):
    """PEFT adapters trained in bfloat16 are stored as BF16, which NumPy cannot hold: read them anyway."""
    import struct
    r = np.random.default_rng(11)
    C, R = CFG.n_embd, 2
    a32 = r.standard_normal((R, C)).astype(np.float32)
    b32 = r.standard_normal((3 * C, R)).astype(np.float32)
    bf = {k: (v.view(np.uint32) >> 16).astype("<u2") for k, v in
          {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": a32,
           "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": b32}.items()}
    header, blobs, off = {"__metadata__": {"format": "pt"}}, b"", 0
    for k, v in bf.items():
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + v.nbytes]}
        blobs += v.tobytes()
        off += v.nbytes
    h = json.dumps(header).encode()
    d = tmp_path / "bf16"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + blobs)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": R,
                                                      "target_modules": ["c_attn"]}))
    _, weights, _ = read_adapter(d)
    a, b = weights["transformer.h.0.attn.c_attn"]
    trunc = lambda x: ((x.view(np.uint32) >> 16) << 16).view(np.float32)      # what bf16 keeps
    np.testing.assert_array_equal(a, trunc(a32).T)
    np.testing.assert_array_equal(b, trunc(b32).T)
    assert np.abs(a - a32.T).max() < 0.01 * np.abs(a32).max()
    # a header that points outside the file is an error, not a crash
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + blobs[:-4])
    with pytest.raises(NpgptError, match="does not fit the file|corrupt"):
        read_adapter(d)
