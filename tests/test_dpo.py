"""DPO: the loss and its gradient against the paper's formula in float64, gradchecks of the ops, the
preference file as hostile input, and `npgpt finetune --dpo` end to end (full, LoRA, resume, replicas)."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from npgpt import Tensor
from npgpt.cli.main import cli
from npgpt.dpo import PreferenceData, read_pairs, render_pair
from npgpt.errors import NpgptError
from npgpt.gradcheck import gradcheck
from npgpt.ops.preference import (dpo_loss, dpo_loss_reference, preference_stats, token_logprobs,
                                  token_logprobs_reference)
from npgpt.sft import CHAT_TOKENS
from npgpt.tokenizer import CharTokenizer

from serve_helpers import model_folder


# ---- the loss against the paper's formula ---------------------------------------------------------------
def paper_dpo(pc, pr, rc, rr, beta, eps=0.0, kind="sigmoid"):
    """Rafailov et al. eq. 7 (with cDPO's smoothing) and IPO, by hand in float64: (loss, dL/dpc, dL/dpr)."""
    d = (pc - rc) - (pr - rr)
    B = len(d)
    if kind == "ipo":
        loss = np.mean((d - 1 / (2 * beta)) ** 2)
        g = 2 * (d - 1 / (2 * beta)) / B
    else:
        sig = lambda v: 1 / (1 + np.exp(-v))                     # noqa: E731
        h = beta * d
        loss = np.mean(-(1 - eps) * np.log(sig(h)) - eps * np.log(sig(-h)))
        g = beta * (-(1 - eps) * (1 - sig(h)) + eps * sig(h)) / B
    return loss, g, -g


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.25), ("ipo", 0.0)])
def test_loss_and_gradient_match_the_papers_formula(kind, eps):
    r = np.random.default_rng(3)
    pc, pr, rc, rr = (r.normal(-20, 5, size=6) for _ in range(4))
    beta = 0.3
    a, b = Tensor(pc, requires_grad=True), Tensor(pr, requires_grad=True)
    loss = dpo_loss(a, b, rc, rr, beta=beta, label_smoothing=eps, loss=kind)
    loss.backward()
    want, gc, gr = paper_dpo(pc, pr, rc, rr, beta, eps, kind)
    assert float(loss.data) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(a.grad, gc, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(b.grad, gr, rtol=1e-10, atol=1e-15)
    ref = dpo_loss_reference(Tensor(pc), Tensor(pr), rc, rr, beta, eps, kind)
    assert float(ref.data) == pytest.approx(want, rel=1e-12)


def test_loss_is_log2_at_the_reference_and_stable_far_from_it():
    z = np.zeros(3)
    assert float(dpo_loss(Tensor(z), Tensor(z), z, z).data) == pytest.approx(np.log(2), rel=1e-12)
    big = np.array([1e4, -1e4])              # h = +-1000: log sigmoid must not overflow
    loss = dpo_loss(Tensor(big, requires_grad=True), Tensor(np.zeros(2)), np.zeros(2), np.zeros(2), beta=0.1)
    assert np.isfinite(float(loss.data)) and float(loss.data) == pytest.approx(500.0, rel=1e-9)


def test_stats_are_the_implicit_rewards():
    s = preference_stats(np.array([-1.0, -5.0]), np.array([-3.0, -2.0]), np.array([-2.0, -2.0]),
                         np.array([-2.0, -2.0]), beta=0.5)
    assert s == {"reward_chosen": pytest.approx(-0.5), "reward_rejected": pytest.approx(-0.25),
                 "margin": pytest.approx(-0.25), "accuracy": 0.5}


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), beta=st.floats(0.05, 2.0), eps=st.sampled_from([0.0, 0.1, 0.4]),
       kind=st.sampled_from(["sigmoid", "ipo"]))
def test_gradcheck_dpo_loss(seed, beta, eps, kind):
    r = np.random.default_rng(seed)
    pc, pr, rc, rr = (r.normal(-5, 2, size=4) for _ in range(4))
    res = gradcheck(lambda a, b: dpo_loss(a, b, rc, rr, beta, eps, kind).reshape(1), pc, pr, seed=seed)
    assert res.ok, str(res)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), T=st.integers(1, 4), V=st.integers(2, 6))
def test_gradcheck_token_logprobs_and_reference(seed, B, T, V):
    r = np.random.default_rng(seed)
    z = r.standard_normal((B, T, V))
    t = r.integers(0, V, size=(B, T))
    t[r.random((B, T)) < 0.3] = -1
    res = gradcheck(lambda x: token_logprobs(x, t), z, seed=seed)
    assert res.ok, str(res)
    np.testing.assert_allclose(token_logprobs(Tensor(z), t).data, token_logprobs_reference(Tensor(z), t).data,
                               rtol=1e-12, atol=1e-12)
    assert (token_logprobs(Tensor(z), t).data[t == -1] == 0).all()


# ---- the preference file -------------------------------------------------------------------------------
@pytest.fixture
def tok():
    return CharTokenizer.train("abcdefghijklmnopqrstuvwxyz =?.")


def test_string_pairs_count_only_the_response(tok):
    (c, cm), (r, rm) = render_pair(tok, {"prompt": "ab", "chosen": "cd", "rejected": "e"})
    assert c == tok.encode("abcd") + [tok.eot_id] and cm == [False, False, True, True, True]
    assert r == tok.encode("abe") + [tok.eot_id] and rm == [False, False, True, True]
    data = PreferenceData.build(tok, [{"prompt": "ab", "chosen": "cd", "rejected": "e"}], 6, val_fraction=0)
    x, y = data.get_batch("train", 2, 6, np.random.default_rng(0))
    assert x.shape == (2, 4, 6) and list(y) == [0, 0]
    assert list(x[0, 1, :4]) == [-1] + tok.encode("cd") + [tok.eot_id]     # targets: c, d, end; not b
    assert list(x[0, 3, :3]) == [-1] + tok.encode("e") + [tok.eot_id]


def test_chat_pairs_use_the_template_and_skip_the_prompt(tok):
    rec = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                      {"role": "user", "content": "ok?"}],
           "chosen": [{"role": "assistant", "content": "yes"}], "rejected": "no"}
    (c, cm), (r, rm) = render_pair(tok, read_pairs_from([rec])[0])
    sp = {t: tok.special_tokens[t] for t in CHAT_TOKENS}
    assert [i for i, m in zip(c, cm) if m] == tok.encode("yes") + [sp["<|end|>"]]   # not the earlier "yo"
    assert [i for i, m in zip(r, rm) if m] == tok.encode("no") + [sp["<|end|>"]]


def read_pairs_from(recs, tmp=[None]):
    import tempfile
    from pathlib import Path
    p = Path(tempfile.mkdtemp()) / "p.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in recs) + "\n")
    return read_pairs(p)


@pytest.mark.parametrize("line,pattern", [
    ('[1, 2]', r"line 2: expected a JSON object"),
    ('{"prompt": "a", "chosen": "b"}', r"line 2: missing 'rejected'"),
    ('{"prompt": 5, "chosen": "b", "rejected": "c"}', r"line 2: 'prompt' must be a string or a list"),
    ('{"prompt": "a", "chosen": null, "rejected": "c"}', r"line 2: 'chosen' must be a string or a list of messages, got NoneType"),
    ('{"prompt": [], "chosen": "b", "rejected": "c"}', r"line 2: 'prompt' must be a non-empty list"),
    ('{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}], '
     '"rejected": "c"}', r"line 2: 'chosen' message 0 has role 'user'; use assistant"),
    ('{"prompt": [{"role": "wizard", "content": "a"}], "chosen": "b", "rejected": "c"}', r"role 'wizard'"),
    ('{"prompt": [{"role": "user", "content": 3}], "chosen": "b", "rejected": "c"}', r"content' must be a string"),
    ('{"prompt": "' + "x" * 65 + '", "chosen": "b", "rejected": "c"}', r"line 2: 'prompt' is 65 characters, more than 64"),
    ('{"prompt": "a", "chosen": "b", ', r"line 2"),
])
def test_hostile_lines_get_one_line_errors_naming_the_line(tmp_path, monkeypatch, line, pattern):
    monkeypatch.setattr("npgpt.dpo.MAX_TEXT_CHARS", 64)          # the 1M-character bound, scaled down
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + line + "\n")
    with pytest.raises(NpgptError, match=pattern) as e:
        read_pairs(p)
    assert "\n" not in str(e.value)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["prompt", "chosen", "rejected", "role", "content", "x"]), inner, max_size=4),
                    max_leaves=12)


@settings(max_examples=25, deadline=None)
@given(recs=st.lists(JSON, min_size=1, max_size=3))
def test_fuzzed_records_are_read_or_refused_with_a_clear_error(tmp_path_factory, recs):
    p = tmp_path_factory.mktemp("fuzz") / "p.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz =?.")
    try:
        pairs = read_pairs(p)
    except NpgptError as e:
        assert "\n" not in str(e) and re.search(r"line \d+|holds no records", str(e)), str(e)
        return
    for rec in pairs:                                 # what passes the reader renders (unknown chars aside)
        try:
            render_pair(tok, rec)
        except NpgptError:
            pass


def test_empty_missing_and_binary_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(NpgptError, match="holds no records"):
        read_pairs(tmp_path / "e.jsonl")
    with pytest.raises(NpgptError, match="does not exist"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(NpgptError, match="not UTF-8"):
        read_pairs(tmp_path / "b.jsonl")


# ---- end to end ----------------------------------------------------------------------------------------
def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def clean_error(r, pattern):
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.output


WORDS = "quick lazy bright jolly brown seven zebras wizards nymphs hex vexing dog".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    model_folder(d / "base", chat=False, block=48, n_embd=16, n_layer=1, scale=1.0)
    recs = [{"prompt": f"the {w} ", "chosen": "fox jumps", "rejected": "dog waltz"} for w in WORDS]
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return d


DPO = ["--eval-interval", 6, "--set", "eval_iters=2", "--batch-size", 4, "--lr", 1e-2, "--set", "log_interval=6"]


def _evals(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]


def test_dpo_learns_the_preference_and_resume_is_exact(base, tmp_path):
    r = run("finetune", "--init-from", base / "base", "--dpo", base / "prefs.jsonl", "--out", tmp_path / "a",
            "--max-iters", 12, *DPO)
    assert r.exit_code == 0, r.output
    ev = _evals(tmp_path / "a")
    # at step 0 the policy is the reference: loss log 2, every held-out margin exactly 0
    assert ev[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert ev[0]["val_reward_margin"] == 0 and ev[0]["val_pref_accuracy"] == 0 and ev[0]["val_logp_accuracy"] == 0
    assert ev[-1]["val_loss"] < 0.5 and ev[-1]["val_pref_accuracy"] == 1.0 and ev[-1]["val_reward_margin"] > 0.5
    assert "val pref accuracy 1.0000" in r.output
    # stop at 6 (same schedule), resume to 12: the same weights, from the cached reference
    mine = tmp_path / "prefs.jsonl"
    mine.write_text((base / "prefs.jsonl").read_text())
    r = run("finetune", "--init-from", base / "base", "--dpo", mine, "--out", tmp_path / "b",
            "--max-iters", 6, "--set", "lr_decay_iters=12", *DPO)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "ckpt" / "dpo_reference.safetensors").is_file()
    r = run("finetune", "--resume", "--out", tmp_path / "b", "--max-iters", 12)
    assert r.exit_code == 0, r.output
    a, b = (load_file(str(tmp_path / x / "ckpt" / "model.safetensors")) for x in ("a", "b"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # the preference file changed under a full run: its cached reference no longer applies
    mine.write_text(mine.read_text().replace("dog waltz", "dog walks"))
    r = run("finetune", "--resume", "--out", tmp_path / "b", "--max-iters", 14)
    assert r.exit_code != 0 and "was computed for other preference pairs" in r.output, r.output
    mine.write_text((base / "prefs.jsonl").read_text())
    (tmp_path / "b" / "ckpt" / "dpo_reference.safetensors").unlink()
    clean_error(run("finetune", "--resume", "--out", tmp_path / "b", "--max-iters", 14), "dpo_reference.safetensors is missing")


def test_dpo_with_lora_on_an_int8_base_replicas_and_accumulation(base, tmp_path):
    r = run("quantize", "--checkpoint", base / "base", "--out", tmp_path / "int8", "--sample-tokens", 0)
    assert r.exit_code == 0, r.output
    r = run("finetune", "--init-from", tmp_path / "int8", "--dpo", base / "prefs.jsonl", "--out", tmp_path / "l",
            "--max-iters", 6, "--lora-rank", 2, "--set", "replicas=2", "--set", "gradient_accumulation_steps=2",
            "--dpo-loss", "ipo", "--dpo-beta", 0.5, *DPO)
    assert r.exit_code == 0, r.output
    assert "adapters disabled" in r.output and "8-bit" in r.output
    ev = _evals(tmp_path / "l")
    assert ev[-1]["val_loss"] < ev[0]["val_loss"] and ev[0]["val_loss"] == pytest.approx(1.0, abs=1e-5)  # IPO at d=0: (1/(2*0.5))^2
    assert (tmp_path / "l" / "ckpt" / "adapter_model.safetensors").is_file()


def test_dpo_bad_inputs(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
    clean_error(run("finetune", "--init-from", base / "base", "--dpo", bad, "--out", tmp_path / "x"),
                r"bad.jsonl line 2: missing 'chosen', 'rejected'")
    clean_error(run("finetune", "--init-from", base / "base", "--dpo", base / "prefs.jsonl", "--out", tmp_path / "x",
                    "--label-smoothing", 0.7), r"label smoothing must be in \[0, 0.5\)")
    clean_error(run("finetune", "--init-from", base / "base", "--dpo", base / "prefs.jsonl", "--out", tmp_path / "x",
                    "--dpo-beta", 0), "beta must be positive")
    r = run("finetune", "--init-from", base / "base", "--dpo", base / "prefs.jsonl", "--sft", bad, "--out", tmp_path / "x")
    assert r.exit_code != 0 and "different fine-tunes" in r.output
    assert not (tmp_path / "x" / "ckpt").exists()


def test_dpo_on_two_mpi_ranks(base, tmp_path):
    """mpiexec -n 2: each rank takes its own pairs, the gradient is reduced over them (one per pair, y
    counts them), rank 0 alone writes; the held-out metrics are the same numbers every rank computes."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("mpi4py")
    bindir = Path(sys.executable).parent
    mpiexec = str(bindir / "mpiexec") if (bindir / "mpiexec").exists() else shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("needs the mpi extra: pip install 'npgpt[mpi]'")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    args = ["finetune", "--init-from", base / "base", "--dpo", base / "prefs.jsonl", "--out", tmp_path / "dp",
            "--max-iters", 4, "--lora-rank", 2, "--eval-interval", 4, "--set", "eval_iters=1", "--batch-size", 2,
            "--lr", 1e-2]
    r = subprocess.run([mpiexec, "-n", "2", str(bindir / "npgpt")] + [str(a) for a in args], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("done: 4 iterations") == 1                  # rank 0 alone speaks
    ev = _evals(tmp_path / "dp")
    assert ev[-1]["val_loss"] < ev[0]["val_loss"] and ev[-1]["val_reward_margin"] > 0


def test_adapters_disabled_is_the_base_model_exactly():
    from npgpt import GPT, GPTConfig
    from npgpt.layers import adapters_disabled
    from npgpt.lora import LoRAConfig, apply_lora, lora_layers
    m = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=1)
    x = np.arange(8).reshape(1, 8) % 11
    base = m(x)[0].data.copy()
    apply_lora(m, LoRAConfig(r=2, alpha=4, targets=("c_attn", "c_fc")))
    for _, layer in lora_layers(m):
        layer.lora_B.data[...] = np.random.default_rng(0).standard_normal(layer.lora_B.shape)
    adapted = m(x)[0].data
    with adapters_disabled():
        off = m(x)[0].data
    assert np.abs(adapted - base).max() > 1e-3 and np.array_equal(off, base)
    assert np.array_equal(m(x)[0].data, adapted)                   # the setting ends with the block


def test_chat_pairs_with_a_models_own_template():
    from chat_templates import CHATML
    from helpers import hf_chat_tokenizer
    tok = hf_chat_tokenizer(CHATML)
    rec = {"prompt": [{"role": "user", "content": "the quick fox"}],
           "chosen": [{"role": "assistant", "content": "jumps over"}], "rejected": "a lazy dog"}
    (c, cm), (r, rm) = render_pair(tok, rec)
    assert tok.decode([i for i, m in zip(c, cm) if m]).startswith("jumps over")
    assert tok.decode([i for i, m in zip(r, rm) if m]).startswith("a lazy dog")
    assert tok.special_tokens["<|im_end|>"] in [i for i, m in zip(c, cm) if m]      # learns to end its turn
    start = tok.apply_chat_template(rec["prompt"], add_generation_prompt=True)
    assert c[:len(start)] == start and not any(cm[:len(start)])


def test_train_refuses_a_dpo_or_rl_config_without_its_batches(tmp_path):
    from npgpt.train import train
    from npgpt.training.config import TrainConfig
    for key, value in (("dpo", "p.jsonl"), ("rl", "arithmetic")):
        with pytest.raises(NpgptError, match=f"a --{key} run needs its batches and loss: use `npgpt finetune --{key}`"):
            train(TrainConfig(out=str(tmp_path / key), **{key: value}))
