"""The study features: reference ops == fused ops, Module/Tensor repr, gradcheck_module's float64
guard, the autograd graph, `npgpt plot`, the attention grid and the logit lens."""

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from npgpt import Tensor
from npgpt.errors import NpgptError
from npgpt.gradcheck import gradcheck_module
from npgpt.model import GPT, GPTConfig
from npgpt.llama import Llama, LlamaConfig
from npgpt.reference import GPT_FUSED, LLAMA_FUSED, reference_ops

TINY = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ids(seed, B=2, T=7, V=13):
    return np.random.default_rng(seed).integers(0, V, (B, T))


# ---- reference ops ------------------------------------------------------------------------------
def _run(model, x, y):
    model.zero_grad()
    logits, loss = model(x, y)
    from npgpt.viz import graph
    ops = set(graph(loss).op_names())
    loss.backward()
    return logits.data.copy(), float(loss.data), {n: p.grad.copy() for n, p in model.named_parameters()}, ops


LLAMA_TINY = LlamaConfig(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, n_inner=24,
                         tie_word_embeddings=False)
FAMILIES = {"gpt": (GPT, TINY, GPT_FUSED), "llama": (Llama, LLAMA_TINY, LLAMA_FUSED)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_ops_model_matches_the_fused_model(family):
    """GPT's ops and the Llama family's (RMSNorm, RoPE, SwiGLU, grouped-query attention) dispatch alike:
    under the switch, or in a model built with ops="reference", the graph holds no fused op, and logits,
    loss and every gradient equal the fused model's (float64)."""
    cls, cfg, fused_names = FAMILIES[family]
    m = cls(cfg, seed=3).astype(np.float64)
    x, y = ids(0), ids(1)
    y[0, :2] = -1                                               # ignored targets take the same path
    fused = _run(m, x, y)
    assert set(fused_names) <= fused[3], f"the fused model's graph lacks fused ops: {fused[3]}"
    with reference_ops():
        ref = _run(m, x, y)
    again = _run(m, x, y)                                       # restored on exit
    assert set(fused_names) & ref[3] == set(), f"fused ops left in the reference graph: {ref[3]}"
    assert set(fused_names) <= again[3], "the fused ops were not restored"
    np.testing.assert_allclose(ref[0], fused[0], rtol=1e-10, atol=1e-12)
    assert abs(ref[1] - fused[1]) < 1e-10
    for name, g in fused[2].items():
        assert np.abs(g).max() > 0, name                         # every parameter is reached
        np.testing.assert_allclose(ref[2][name], g, rtol=1e-8, atol=1e-12, err_msg=name)
    # cls(cfg, ops="reference") runs the same reference graph without a `with` block
    r = cls(cfg, seed=3, ops="reference").astype(np.float64)
    built = _run(r, x, y)
    assert set(fused_names) & built[3] == set(), f"fused ops in the ops='reference' graph: {built[3]}"
    np.testing.assert_array_equal(built[0], ref[0])
    for name, g in ref[2].items():
        np.testing.assert_array_equal(built[2][name], g, err_msg=name)
    with pytest.raises(NpgptError, match="ops must be one of"):
        cls(cfg, ops="fast")
    with reference_ops(), pytest.raises(NpgptError, match="dropout"):
        cls(replace(cfg, dropout=0.1)).train()(x, y)


def test_reference_switch_covers_modules_imported_later_and_stays_in_its_thread():
    """The switch is a context variable read by the ops: a module that imported `linear` in any
    spelling is covered, and a thread started inside the block keeps the fused ops."""
    import threading

    from npgpt.ops import nn as F
    from npgpt.tensor import Tensor as T

    x = T(np.ones((2, 3), dtype=np.float32), requires_grad=True)
    w = T(np.ones((3, 4), dtype=np.float32), requires_grad=True)
    seen = {}

    def other_thread():
        seen["other"] = F.linear(x, w).grad_fn.name

    with reference_ops():
        seen["here"] = F.linear(x, w).grad_fn.name              # the reference: x @ w is a MatMul
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert seen == {"here": "MatMul", "other": "Linear"}, seen


def test_reference_ops_refuse_dropout_in_training():
    m = GPT(replace(TINY, dropout=0.1), seed=0).train()
    with reference_ops(), pytest.raises(NpgptError, match="dropout"):
        m(ids(0), ids(1))


# ---- repr ---------------------------------------------------------------------------------------
def test_module_repr_is_a_tree_with_shapes_and_counts():
    m = GPT(TINY, seed=0)
    text = repr(m)
    lines = text.splitlines()
    assert lines[0] == f"GPT  {m.num_params():,} params"
    assert "wte: Embedding  [weight (13, 16)]  208 params" in text
    per_block = sum(p.size for p in m.transformer.h[0].parameters())
    assert f"h.0..1: 2 x Block  {per_block:,} params each" in text
    assert "c_attn: Linear  [weight (16, 48), bias (48,)]  816 params" in text
    assert "object at 0x" not in text


def test_tensor_repr_shows_grad_fn():
    a = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    b = (a * a).sum()
    assert repr(a).endswith("requires_grad=True)")
    assert repr(b).endswith("grad_fn=<Sum>)") and b.grad_fn.name == "Sum"
    assert "grad_fn" not in repr(Tensor(np.ones(2)))


# ---- gradcheck_module ---------------------------------------------------------------------------
def test_gradcheck_module_passes_on_float64():
    m = GPT(TINY, seed=1).astype(np.float64)
    x, y = ids(2), ids(3)
    result = gradcheck_module(m, lambda mod: mod(x, y)[1], max_entries=6)
    assert result and result.ok and result.converted_from is None
    assert len(result) == len(m.named_parameters())
    assert "passed" in str(result)


def test_gradcheck_module_converts_float32_on_a_copy_and_can_refuse():
    m = GPT(TINY, seed=1)
    before = {n: p.data.copy() for n, p in m.named_parameters()}
    x, y = ids(2), ids(3)
    result = gradcheck_module(m, lambda mod: mod(x, y)[1], max_entries=4)
    assert result.ok and result.converted_from == "float32" and "float64 copy" in str(result)
    for n, p in m.named_parameters():                      # the model itself is untouched
        assert p.data.dtype == np.float32 and np.array_equal(p.data, before[n])
    with pytest.raises(NpgptError, match="float64"):
        gradcheck_module(m, lambda mod: mod(x, y)[1], convert=False)


def test_gradcheck_module_fails_on_a_broken_gradient():
    from npgpt.ops import nn as F
    m = GPT(TINY, seed=1).astype(np.float64)
    x, y = ids(2), ids(3)
    original = F.GELU.backward
    try:
        F.GELU.backward = lambda self, dout: 1.1 * original(self, dout)     # a 10% error in one op
        result = gradcheck_module(m, lambda mod: mod(x, y)[1], max_entries=4)
    finally:
        F.GELU.backward = original
    assert not result and "FAILED" in str(result)
    assert result["transformer.h.0.mlp.c_fc.weight"] > 1e-3


# ---- the autograd graph -------------------------------------------------------------------------
def test_graph_of_a_small_expression(tmp_path):
    from npgpt.viz import graph
    a = Tensor(np.array(2.0), requires_grad=True)
    b = Tensor(np.array(-3.0), requires_grad=True)
    loss = (a * b + a).tanh()
    g = graph(loss, names={id(a): "a", id(b): "b"})
    assert sorted(g.op_names()) == ["Add", "Mul", "Tanh"]
    assert len(g.nodes) == 3 + 3 + 2                     # 3 ops, 3 produced tensors, 2 leaves
    text = str(g)
    assert text.splitlines()[0].startswith(f"{float(loss.data):.4g}") and "a (scalar)" in text
    dot = g.to_dot()
    assert dot.startswith("digraph") and dot.count("->") == len(g.edges)
    try:
        import matplotlib  # noqa: F401
    except ImportError:                                  # the drawing is optional: a clear error without it
        with pytest.raises(NpgptError, match=r"npgpt\[plot\]"):
            g.save_png(tmp_path / "g.png")
    else:
        g.save_png(tmp_path / "g.png")
        assert (tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC
    loss.backward()
    with pytest.raises(NpgptError, match="freed"):
        graph(loss)


# ---- npgpt plot ---------------------------------------------------------------------------------
def _metrics(folder, grad_norm=True):
    folder.mkdir()
    lines = []
    for it in range(0, 101, 10):
        if it % 50 == 0:
            lines.append({"kind": "eval", "iter": it, "train_loss": 4.0 - it / 50, "val_loss": 4.1 - it / 50, "lr": 1e-3})
        if it:
            rec = {"kind": "train", "iter": it, "loss": 4.2 - it / 40, "lr": 1e-3 * it / 100, "tokens_per_s": 900.0 + it}
            if grad_norm:
                rec["grad_norm"] = 1.0 / it
            lines.append(rec)
    text = "\n".join(json.dumps(r) for r in lines) + "\n{\"kind\": \"tra"     # a half-written last line
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_plot_writes_a_png_for_several_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from npgpt.cli.main import cli
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b", grad_norm=False)
    out = tmp_path / "curves.png"
    r = CliRunner().invoke(cli, ["plot", str(a), str(b / "metrics.jsonl"), "--png", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    assert "skipped 1 unreadable line" in r.output


def test_plot_text_charts_and_errors(tmp_path, monkeypatch):
    from npgpt.cli.main import cli
    from npgpt.viz import read_metrics
    a = _metrics(tmp_path / "a")
    m = read_metrics(a)
    assert [it for it, _ in m["val_loss"]] == [0, 50, 100] and len(m["grad_norm"]) == 10
    np.testing.assert_allclose([v for _, v in m["val_loss"]], [4.1, 3.1, 2.1])
    r = CliRunner().invoke(cli, ["plot", str(a)])
    assert r.exit_code == 0, r.output
    for title in ("loss", "learning rate", "tokens / s", "gradient norm"):
        assert f"== {title}" in r.output
    assert "last 2.1 at step 100" in r.output                   # the val curve's final point
    # without matplotlib: the text charts still print, and the missing PNG is a clean error
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = CliRunner().invoke(cli, ["plot", str(a), "--png", str(tmp_path / "x.png")])
    assert r.exit_code == 1 and "== loss" in r.output and "Error: matplotlib is not installed" in r.output
    assert not (tmp_path / "x.png").exists() and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["plot", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "Error:" in r.output and "metrics.jsonl" in r.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("not json\n[1, 2]\n")
    r = CliRunner().invoke(cli, ["plot", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "no training records" in r.output


# ---- inspect: logit lens and the attention grid -------------------------------------------------
def test_logit_lens_last_layer_is_the_models_prediction():
    from npgpt.interpret import logit_lens
    m = GPT(TINY, seed=4).eval()
    x = ids(5, B=1)[0]
    probs = logit_lens(m, x)
    assert probs.shape == (TINY.n_layer + 1, len(x), TINY.vocab_size)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-9)
    logits = m(x[None])[0].data[0].astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs[-1], p, rtol=1e-6, atol=1e-9)
    assert (probs[-1].argmax(-1) == logits.argmax(-1)).all()
    assert not np.allclose(probs[0], probs[-1])              # earlier layers predict something else


def _model_dir(tmp_path):
    from npgpt.tokenizer import CharTokenizer
    d = tmp_path / "m"
    GPT(TINY, seed=0).save_pretrained(d)
    CharTokenizer.train("abcd efgh ij").save(d)       # 11 characters + <|endoftext|> = 12 <= 13 tokens
    return d


def test_inspect_logit_lens_and_grid_png(tmp_path):
    pytest.importorskip("matplotlib")
    from npgpt.cli.main import cli
    d = _model_dir(tmp_path)
    r = CliRunner().invoke(cli, ["inspect", "--checkpoint", str(d), "--prompt", "abc d", "--logit-lens",
                                 "--png", str(tmp_path / "lens.png")])
    assert r.exit_code == 0, r.output
    assert "logit lens" in r.output and "emb |" in r.output and f"{TINY.n_layer - 1} |" in r.output
    assert (tmp_path / "lens.png").read_bytes()[:8] == PNG_MAGIC
    for scale in ("linear", "log", "row"):
        out = tmp_path / f"att-{scale}.png"
        r = CliRunner().invoke(cli, ["inspect", "--checkpoint", str(d), "--prompt", "abc d", "--scale", scale,
                                     "--png", str(out)])
        assert r.exit_code == 0, r.output
        assert out.read_bytes()[:8] == PNG_MAGIC


def test_attention_scales():
    from npgpt.interpret import scaled_maps
    att = np.array([[1.0, 0.0], [0.9, 0.1]])
    assert np.array_equal(scaled_maps(att, "linear")[0], att)
    np.testing.assert_allclose(scaled_maps(att, "log")[0], [[0.0, -3.0], [np.log10(0.9), -1.0]])
    np.testing.assert_allclose(scaled_maps(att, "row")[0], [[1.0, 0.0], [1.0, 0.1 / 0.9]])
    with pytest.raises(NpgptError, match="scale"):
        scaled_maps(att, "cubic")


# ---- --show-probs: the model's and the sampling probability, beside the text ---------------------
def test_steps_carry_the_sampling_probability():
    from npgpt.generate import generate_stream
    from npgpt.sampling import sampling_probs
    m = GPT(TINY, seed=6).eval()
    prompt = [1, 2, 3]
    first = next(generate_stream(m, prompt, 1, temperature=0.7, top_k=3, seed=0))[0]
    logits = m(np.array([prompt]))[0].data[:, -1].astype(np.float64)
    p = sampling_probs(logits, temperature=0.7, top_k=3)[0]
    e = np.exp(logits[0] - logits[0].max())
    assert abs(first.sampled - p[first.token]) < 1e-9 and abs(first.prob - e[first.token] / e.sum()) < 1e-6
    assert first.sampled > first.prob           # temperature < 1 and top-k sharpen the drawn token's share


def test_show_probs_prints_both_probabilities_beside_the_text(tmp_path):
    from npgpt.cli.main import cli
    d = _model_dir(tmp_path)
    r = CliRunner().invoke(cli, ["sample", "--checkpoint", str(d), "--prompt", "ab", "--max-new-tokens", "3",
                                 "--show-probs", "--temperature", "0"])
    assert r.exit_code == 0, r.output
    rows = [x for x in r.output.splitlines() if x.startswith("[0]")]
    assert len(rows) == 3 and rows[0].split(" + ")[0].strip().endswith("'ab'")
    for row in rows:
        assert "sampled 1.000" in row                           # greedy: the drawn token had all the mass
        model_p = float(row.split("model ")[1].split()[0])
        assert 0 < model_p < 1
