"""Quantisation, pruning and trimming: the maths, the folders they write, and the CLI commands."""

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt.compress import (count_params, format_report, magnitude_masks, mlp_importance, prune_checkpoint,
                            prune_model, quantize_checkpoint, trim_checkpoint, trim_model)
from npgpt.errors import NpgptError
from npgpt.model import GPT, GPTConfig
from npgpt.nn import Linear
from npgpt.layers import (QuantizedLinear, decode_weight, dequantize, encode_weight, pack_int4, quantize,
                          unpack_int4)
from npgpt.loading import from_pretrained as load_model
from npgpt.loading import load_quantized
from npgpt.quant import quantize_model, save_quantized
from npgpt.tensor import Tensor, no_grad
from npgpt.training.plugins import apply_prune_masks, load_prune_masks, save_prune_masks

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
TEXT = "abcd efghi"          # 10 distinct characters (space included) + <|endoftext|> = 11 tokens


def tiny(seed=0, **kw):
    m = GPT(replace(TINY, **kw), seed=seed)
    # GPT-2 init leaves biases at zero; give them values so every parameter is exercised.
    r = np.random.default_rng(seed + 1)
    for name, p in m.named_parameters():
        if name.endswith(".bias"):
            p.data[...] = r.normal(0, 0.02, p.shape)
    return m.eval()


def logits_of(model, idx):
    with no_grad():
        return model(idx)[0].numpy()


def random_ids(seed=0, B=2, T=8):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, size=(B, T))


@pytest.fixture
def model_dir(tmp_path):
    """A saved tiny model with a char tokenizer: what `npgpt train` leaves in RUN/ckpt."""
    from npgpt.tokenizer import CharTokenizer
    tok = CharTokenizer.train(TEXT)
    assert tok.vocab_size == TINY.vocab_size
    d = tmp_path / "src"
    tiny().save_pretrained(d)
    tok.save(d)
    return d


# ---- quantisation maths ------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(n_in=st.integers(1, 40), n_out=st.integers(1, 12), seed=st.integers(0, 2**16),
       scale=st.floats(1e-3, 1e3))
def test_int8_error_within_one_percent_of_channel_max(n_in, n_out, seed, scale):
    w = (np.random.default_rng(seed).standard_normal((n_in, n_out)) * scale).astype(np.float32)
    q, s = quantize(w, bits=8)
    assert q.dtype == np.int8 and s.shape == (1, n_out) and s.dtype == np.float32
    err = np.abs(dequantize(q, s) - w).max(axis=0)
    chan_max = np.abs(w).max(axis=0)
    assert np.all(err <= 0.01 * chan_max)
    assert np.all(err <= chan_max / (2 * 127) * (1 + 1e-5))    # the bound the scheme promises


@settings(max_examples=25, deadline=None)
@given(groups=st.integers(1, 4), g=st.integers(1, 6), n_out=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_int4_grouped_round_trip_and_error_bound(groups, g, n_out, seed):
    n_in = groups * g
    w = np.random.default_rng(seed).standard_normal((n_in, n_out)).astype(np.float32)
    stored, s = encode_weight(w, bits=4, group_size=g)
    assert stored.dtype == np.uint8 and stored.shape == ((n_in + 1) // 2, n_out) and s.shape == (groups, n_out)
    back = decode_weight(stored, s, n_in, bits=4)
    group_max = np.abs(w.reshape(groups, g, n_out)).max(axis=1)          # (groups, out)
    err = np.abs(back - w).reshape(groups, g, n_out).max(axis=1)
    assert np.all(err <= group_max / (2 * 7) * (1 + 1e-5))


def test_pack_int4_round_trip_odd_rows():
    q = np.random.default_rng(0).integers(-7, 8, size=(5, 3)).astype(np.int8)
    assert np.array_equal(unpack_int4(pack_int4(q), 5), q)


def test_zero_channel_stays_zero_and_finite():
    w = np.zeros((4, 2), dtype=np.float32)
    w[:, 1] = [1, -2, 3, 0.5]
    q, s = quantize(w)
    assert np.all(np.isfinite(s)) and np.array_equal(dequantize(q, s)[:, 0], np.zeros(4))


def test_bad_schemes_are_clear_errors():
    w = np.ones((6, 2), dtype=np.float32)
    with pytest.raises(NpgptError, match="--bits must be 8 or 4"):
        quantize(w, bits=3)
    with pytest.raises(NpgptError, match="does not divide"):
        quantize(w, bits=8, group_size=4)
    with pytest.raises(NpgptError, match="--group-size must be positive"):
        quantize(w, bits=8, group_size=0)


# ---- quantised models --------------------------------------------------------------------------
def test_quantized_linear_matches_linear_with_dequantized_weight():
    from npgpt.nn import Linear
    lin = Linear(16, 12, rng=np.random.default_rng(0))
    lin.bias.data[...] = 0.1
    ql = QuantizedLinear.from_linear(lin, bits=8)
    x = Tensor(np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32), requires_grad=True)
    y = ql(x)
    ref = x.data @ ql.dequantized() + 0.1
    np.testing.assert_allclose(y.data, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y.data, lin(x).data, atol=0.01)      # and close to the float layer
    y.sum().backward()                                               # gradient still reaches the input
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("bits,group_size,tol", [(8, None, 0.01), (8, 4, 0.01), (4, None, 0.2), (4, 8, 0.15)])
def test_quantized_model_logits_close_to_original(bits, group_size, tol):
    idx = random_ids()
    ref = logits_of(tiny(), idx)
    q = logits_of(quantize_model(tiny(), bits, group_size, embedding=True), idx)
    assert np.abs(q - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("bits,group_size,embedding", [(8, None, False), (4, 4, True), (4, None, False)])
def test_quantized_folder_round_trip(tmp_path, bits, group_size, embedding):
    m = tiny()
    save_quantized(m, tmp_path, bits, group_size, embedding)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["npgpt"]["quantization"] == {"bits": bits, "group_size": group_size, "embedding": embedding}
    loaded = load_quantized(tmp_path)
    assert all(isinstance(lin, QuantizedLinear) for b in loaded.transformer.h
               for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))
    assert not loaded.training
    idx = random_ids(1)
    expected = logits_of(quantize_model(tiny(), bits, group_size, embedding), idx)
    np.testing.assert_allclose(logits_of(loaded, idx), expected, rtol=1e-5, atol=1e-6)
    # KV-cached inference goes through the quantised layers too
    cached = loaded.forward_cached(idx, loaded.new_cache(2))
    np.testing.assert_allclose(cached, expected, rtol=1e-4, atol=1e-5)


def test_quantized_file_is_smaller_and_integer(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path / "f")
    save_quantized(m, tmp_path / "q8", 8)
    save_quantized(m, tmp_path / "q4", 4, embedding=True)
    from safetensors.numpy import load_file
    raw = load_file(str(tmp_path / "q8" / "model.safetensors"))
    assert raw["transformer.h.0.mlp.c_fc.qweight"].dtype == np.int8
    assert raw["transformer.h.0.mlp.c_fc.scales"].dtype == np.float32
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("f", "q8", "q4")]
    assert sizes[0] > sizes[1] > sizes[2]


def test_load_model_reads_quantized_folder(tmp_path):
    """The one loader (npgpt.from_pretrained) reads quantised and float folders; model.py refuses to guess."""
    save_quantized(tiny(), tmp_path / "q", 8)
    m = load_model(tmp_path / "q")
    assert isinstance(m.transformer.h[1].mlp.c_proj, QuantizedLinear)
    tiny().save_pretrained(tmp_path / "f")
    assert isinstance(load_model(tmp_path / "f").transformer.h[1].mlp.c_proj, Linear)
    with pytest.raises(NpgptError, match="quantised model"):
        GPT.from_pretrained(tmp_path / "q")


def test_load_quantized_rejects_mismatched_files(tmp_path):
    save_quantized(tiny(), tmp_path, 8)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_inner"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NpgptError, match="does not match its config.json"):
        load_quantized(tmp_path)


# ---- pruning -----------------------------------------------------------------------------------
def _linear_zero_fraction(model):
    ws = [lin.weight.data for b in model.transformer.h
          for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.size for w in ws)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_global_pruning_hits_sparsity(sparsity):
    m = tiny()
    masks = prune_model(m, sparsity, "global")
    n = sum(mk.size for mk in masks.values())
    assert abs(_linear_zero_fraction(m) - sparsity) <= 1 / n
    # one threshold: every pruned magnitude <= every kept magnitude
    ref = tiny()
    mags = {n_: np.abs(p.data) for n_, p in ref.named_parameters()}
    pruned = np.concatenate([mags[k][~mk] for k, mk in masks.items()])
    kept = np.concatenate([mags[k][mk] for k, mk in masks.items()])
    if pruned.size:
        assert pruned.max() <= kept.min()


def test_layer_pruning_hits_sparsity_in_every_weight():
    m = tiny()
    masks = prune_model(m, 0.4, "layer")
    for name, mk in masks.items():
        assert abs((1 - mk.mean()) - 0.4) <= 1 / mk.size, name
    assert set(masks) == {f"transformer.h.{i}.{p}.weight" for i in range(2)
                          for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def test_masks_survive_optimizer_steps(tmp_path):
    from npgpt.optim import AdamW
    m = tiny().train()
    masks = prune_model(m, 0.6)
    save_prune_masks(tmp_path, masks)
    masks = load_prune_masks(tmp_path)
    assert all(mk.dtype == bool for mk in masks.values())
    opt = AdamW(m.named_parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(4):
        opt.zero_grad()
        _, loss = m(random_ids(step), random_ids(step + 10))
        loss.backward()
        opt.step()
        apply_prune_masks(m, masks)
        params = dict(m.named_parameters())
        for name, mk in masks.items():
            assert np.all(params[name].data[~mk] == 0) and np.all(params[name].grad[~mk] == 0)
    params = dict(m.named_parameters())
    assert any(np.any(params[k].data[mk] != tiny().state_dict()[k][mk]) for k, mk in masks.items())  # it trained


def test_load_prune_masks_without_file_is_empty(tmp_path):
    assert load_prune_masks(tmp_path) == {}


def test_prune_mask_for_other_model_is_an_error():
    masks = magnitude_masks(tiny(), 0.5)
    with pytest.raises(NpgptError, match="belongs to another model"):
        apply_prune_masks(tiny(n_embd=8), masks)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(bad):
    with pytest.raises(NpgptError, match=r"--sparsity must be in \[0, 1\)"):
        magnitude_masks(tiny(), bad)


# ---- trimming ----------------------------------------------------------------------------------
def test_trim_keep_all_reproduces_logits_exactly():
    idx = random_ids(3)
    m = tiny()
    t = trim_model(m, 1.0)
    assert t.config == m.config
    assert np.array_equal(logits_of(t, idx), logits_of(m, idx))


def test_trim_keeps_the_most_important_units():
    m = tiny()
    imp = mlp_importance(m.transformer.h[0])
    t = trim_model(m, 0.25)
    assert t.config.n_inner == 16 and t.config.hidden == 16
    kept = np.sort(np.argsort(-imp)[:16])
    np.testing.assert_array_equal(t.transformer.h[0].mlp.c_fc.weight.data, m.transformer.h[0].mlp.c_fc.weight.data[:, kept])
    np.testing.assert_array_equal(t.transformer.h[0].mlp.c_proj.weight.data, m.transformer.h[0].mlp.c_proj.weight.data[kept])


def test_trim_drop_layers_renumbers():
    m = tiny(n_layer=3)
    t = trim_model(m, 1.0, drop_layers=[1])
    assert t.config.n_layer == 2
    np.testing.assert_array_equal(t.transformer.h[1].attn.c_attn.weight.data, m.transformer.h[2].attn.c_attn.weight.data)
    # dropping a block equals running the model without it
    idx = random_ids(4)
    ref = tiny(n_layer=3)
    ref.transformer.h.pop(1)
    assert np.array_equal(logits_of(t, idx), logits_of(ref, idx))


@pytest.mark.parametrize("kw,msg", [({"mlp_keep": 0.001}, "keeps zero"), ({"mlp_keep": 0.0}, "must be in"),
                                    ({"mlp_keep": 1.2}, "must be in"), ({"drop_layers": [2]}, "out of range"),
                                    ({"drop_layers": [-1]}, "out of range"),
                                    ({"drop_layers": [0, 1]}, "keep at least one")])
def test_trim_bad_options(kw, msg):
    with pytest.raises(NpgptError, match=msg):
        trim_model(tiny(), **kw)


# ---- checkpoint commands (library level) ----------------------------------------------------------
def test_trim_checkpoint_folder_loads_with_smaller_n_inner(model_dir, tmp_path):
    out = tmp_path / "trimmed"
    r = trim_checkpoint(model_dir, out, mlp_keep=0.5, drop_layers=[0], sample_tokens=4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_inner"] == 32 and cfg["n_layer"] == 1
    from npgpt.loading import load_run
    m, tok = load_run(out)[:2]
    assert m.config.hidden == 32 and tok.vocab_size == TINY.vocab_size
    assert r["after"]["params"] < r["before"]["params"] and r["after"]["size_bytes"] < r["before"]["size_bytes"]
    assert not (out / "optimizer.safetensors").exists() and (out / "tokenizer_npgpt.json").exists()


def test_prune_checkpoint_writes_masks_and_counts(model_dir, tmp_path):
    r = prune_checkpoint(model_dir, tmp_path / "p", 0.5, "layer", sample_tokens=0)
    masks = load_prune_masks(tmp_path / "p")
    assert len(masks) == 8
    m = GPT.from_pretrained(tmp_path / "p")
    total, nonzero = count_params(m)
    assert nonzero == r["after"]["nonzero_params"] < r["before"]["nonzero_params"]
    assert r["after"]["tokens_per_s"] is None
    assert any("val loss skipped" in n for n in r["notes"])


def test_quantize_checkpoint_report(model_dir, tmp_path):
    r = quantize_checkpoint(model_dir, tmp_path / "q", bits=4, group_size=8, sample_tokens=4)
    assert r["after"]["size_bytes"] < r["before"]["size_bytes"]
    assert r["after"]["params"] == r["before"]["params"]
    text = format_report(r["before"], r["after"], r["notes"])
    assert "model size on disk" in text and "sampling tokens/s" in text


def test_val_loss_measured_when_tokens_given(model_dir):
    from npgpt.compress import measure
    row = measure(tiny(), model_dir, tokens=np.arange(20) % TINY.vocab_size, sample_tokens=0)
    assert row["val_loss"] > 0 and row["perplexity"] == pytest.approx(np.exp(row["val_loss"]))


# ---- the CLI -----------------------------------------------------------------------------------
def _cli(args):
    from npgpt.cli.main import cli
    return CliRunner().invoke(cli, args)


def test_cli_quantize_prune_trim(model_dir, tmp_path):
    for args in (["quantize", "--bits", "8"], ["prune", "--sparsity", "0.5", "--scope", "layer"],
                 ["trim", "--mlp-keep", "0.5"]):
        out = tmp_path / args[0]
        r = _cli(args + ["--checkpoint", str(model_dir), "--out", str(out), "--sample-tokens", "4"])
        assert r.exit_code == 0, r.output
        assert "model size on disk" in r.output and "non-zero parameters" in r.output
        assert "val loss skipped" in r.output
        r = _cli(["sample", "--checkpoint", str(out), "--max-new-tokens", "3", "--prompt", "ab",
                  "--temperature", "0"]) if args[0] != "quantize" else r
        assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args,msg", [
    (["prune", "--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["prune", "--sparsity", "-0.5"], "--sparsity must be in [0, 1)"),
    (["quantize", "--bits", "3"], "--bits must be 8 or 4"),
    (["quantize", "--group-size", "5"], "does not divide"),
    (["trim", "--drop-layers", "7"], "out of range"),
    (["trim", "--drop-layers", "x"], "comma-separated"),
    (["trim", "--mlp-keep", "0.001"], "keeps zero"),
    (["trim"], "nothing to trim"),
])
def test_cli_bad_inputs(model_dir, tmp_path, args, msg):
    r = _cli(args + ["--checkpoint", str(model_dir), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Error:" in r.output and msg in r.output, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)


def test_cli_missing_checkpoint_and_busy_out(model_dir, tmp_path):
    r = _cli(["prune", "--sparsity", "0.5", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Error:" in r.output and "does not exist" in r.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    r = _cli(["prune", "--sparsity", "0.5", "--checkpoint", str(model_dir), "--out", str(busy)])
    assert r.exit_code == 1 and "not empty" in r.output and (busy / "x").exists()
    r = _cli(["prune", "--sparsity", "0.5", "--checkpoint", str(model_dir), "--out", str(model_dir)])
    assert r.exit_code == 1 and "source checkpoint" in r.output
