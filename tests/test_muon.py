"""Muon: the Newton-Schulz band, update shapes, a float64 reference loop, groups, checkpoints, training."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt import GPT, GPTConfig
from npgpt.errors import NpgptError
from npgpt.optim import (NS_BAND_FLOOR, NS_BAND_HI, NS_BAND_LO, NS_COEFFS, AdamW, Muon, muon_groups, muon_update,
                         newton_schulz)


def _svals(a):
    return np.linalg.svd(a, compute_uv=False)


# ---- Newton-Schulz -----------------------------------------------------------------------------------
def test_quintic_maps_every_value_above_the_floor_into_the_band():
    """The scalar map p(s) = a s + b s^3 + c s^5, iterated 5 times, on a fine grid of s in [floor, 1]."""
    a, b, c = NS_COEFFS
    s = np.logspace(np.log10(NS_BAND_FLOOR), 0, 200_001)
    y = s.copy()
    for _ in range(5):
        y = a * y + b * y ** 3 + c * y ** 5
    assert NS_BAND_LO <= y.min() and y.max() <= NS_BAND_HI
    below = np.logspace(-8, np.log10(NS_BAND_FLOOR), 1001)
    z = below.copy()
    for _ in range(5):
        z = a * z + b * z ** 3 + c * z ** 5
    assert (z > below).all() and z.max() <= NS_BAND_HI          # tiny values grow, never past the band


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 128), (128, 32), (20, 60)])
def test_newton_schulz_band_on_random_rectangular_matrices(shape):
    """Gaussian matrices with aspect >= 3 are well conditioned: every singular value lands in the band."""
    G = np.random.default_rng(sum(shape)).standard_normal(shape)
    X = newton_schulz(G, 5)
    assert X.shape == G.shape and X.dtype == np.float64
    s = _svals(X)
    assert NS_BAND_LO <= s.min() and s.max() <= NS_BAND_HI


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       log_scale=st.floats(-6, 6))
def test_newton_schulz_keeps_singular_vectors_and_maps_values_into_the_band(m, n, seed, log_scale):
    """Any matrix (float64, any scale): X = U p^5(S / ||G||_F) V^T -- the singular vectors of G stay, each
    value s with s / ||G||_F >= the floor lands in the band, and none exceeds the band's top."""
    r = np.random.default_rng(seed)
    # a spread of singular values, some below the floor
    U, _ = np.linalg.qr(r.standard_normal((m, m)))
    V, _ = np.linalg.qr(r.standard_normal((n, n)))
    k = min(m, n)
    S = np.exp(r.uniform(np.log(1e-4), 0, k)) * 10.0 ** log_scale
    G = (U[:, :k] * S) @ V[:, :k].T
    X = newton_schulz(G, 5)
    assert X.shape == (m, n)
    D = U[:, :k].T @ X @ V[:, :k]                                  # diagonal when the vectors are kept
    off = D - np.diag(np.diag(D))
    assert np.abs(off).max() < 1e-9
    s_in, s_out = S / np.linalg.norm(G), np.diag(D)
    assert (s_out <= NS_BAND_HI + 1e-12).all() and (s_out > 0).all()
    ok = s_in >= NS_BAND_FLOOR * (1 + 1e-6)
    assert ((NS_BAND_LO <= s_out[ok]) & (s_out[ok] <= NS_BAND_HI)).all()


def test_newton_schulz_float32_stays_float32_and_close_to_float64():
    G = np.random.default_rng(0).standard_normal((32, 96))
    x32 = newton_schulz(G.astype(np.float32), 5)
    assert x32.dtype == np.float32
    np.testing.assert_allclose(x32, newton_schulz(G, 5), atol=2e-5)


@pytest.mark.parametrize("shape", [(8, 24), (24, 8), (8, 8)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_update_shapes_and_in_place(shape, nesterov):
    r = np.random.default_rng(0)
    p = r.standard_normal(shape).astype(np.float32)
    g = r.standard_normal(shape).astype(np.float32)
    buf = np.zeros(shape, np.float32)
    p0, ptr, bptr = p.copy(), p.ctypes.data, buf.ctypes.data
    muon_update(p, g, buf, lr=0.1, momentum=0.9, nesterov=nesterov, ns_steps=5)
    assert p.ctypes.data == ptr and buf.ctypes.data == bptr and p.dtype == buf.dtype == np.float32
    np.testing.assert_allclose(buf, 0.1 * g, rtol=1e-6)
    step = (p0 - p) / 0.1 / np.sqrt(max(1.0, shape[1] / shape[0]))  # the orthogonalised update
    s = _svals(step.astype(np.float64))
    assert s.max() <= NS_BAND_HI + 1e-3


# ---- the optimizer against a float64 reference loop --------------------------------------------------
SHAPES = {  # a miniature GPT's names: 2 hidden matrices (Muon), an embedding, a norm and a bias (AdamW)
    "transformer.wte.weight": (11, 4),
    "transformer.h.0.ln_1.weight": (4,),
    "transformer.h.0.attn.c_attn.weight": (4, 12),
    "transformer.h.0.attn.c_attn.bias": (12,),
    "transformer.h.0.mlp.c_proj.weight": (16, 4),
    "transformer.ln_f.weight": (4,),
}
MUON_NAMES = {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.weight"}


def make_params(dtype, seed=0):
    r = np.random.default_rng(seed)
    return [(n, SimpleNamespace(data=r.standard_normal(s).astype(dtype), grad=None)) for n, s in SHAPES.items()]


def reference(params, grads_per_step, lrs, lr0, muon_lr, mom, nesterov, ns_steps, betas, eps, wd, muon_wd):
    """Muon + AdamW per parameter in float64, written from Keller Jordan's description (no flat buffers)."""
    a, b, c = NS_COEFFS
    b1, b2 = betas
    p = {n: v.astype(np.float64) for n, v in params.items()}
    state = {n: [np.zeros_like(v), np.zeros_like(v)] for n, v in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for n in p:
            g = grads[n].astype(np.float64)
            if n in MUON_NAMES:
                buf = state[n][0]
                buf[...] = mom * buf + (1 - mom) * g
                u = (1 - mom) * g + mom * buf if nesterov else buf.copy()
                X = u / (np.sqrt((u * u).sum()) + 1e-7)
                tr = X.shape[0] > X.shape[1]
                X = X.T if tr else X
                for _ in range(ns_steps):
                    A = X @ X.T
                    X = a * X + (b * A + c * A @ A) @ X
                X = X.T if tr else X
                mlr = muon_lr * lr / lr0
                p[n] = p[n] * (1 - mlr * muon_wd) - mlr * max(1, p[n].shape[1] / p[n].shape[0]) ** 0.5 * X
            else:
                m, v = state[n]
                if p[n].ndim >= 2:
                    p[n] = p[n] - lr * wd * p[n]
                m[...] = b1 * m + (1 - b1) * g
                v[...] = b2 * v + (1 - b2) * g * g
                p[n] = p[n] - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("nesterov,muon_wd", [(True, 0.0), (False, 0.1)])
def test_muon_matches_float64_reference_loop(dtype, tol, nesterov, muon_wd):
    named = make_params(dtype)
    start = {n: p.data.copy() for n, p in named}
    kw = dict(lr=1e-2, muon_lr=0.05, muon_momentum=0.9, nesterov=nesterov, ns_steps=5, betas=(0.9, 0.95),
              eps=1e-8, weight_decay=0.1, muon_weight_decay=muon_wd)
    opt = Muon(named, **kw)
    r = np.random.default_rng(1)
    grads_per_step, lrs = [], []
    for step in range(6):
        opt.zero_grad()
        grads = {n: r.standard_normal(SHAPES[n]).astype(dtype) for n in SHAPES}
        for n, p in named:
            p.grad += grads[n]                       # the autograd engine accumulates in place
        lr = 1e-2 * (step + 1) / 6                   # a changing lr: Muon's follows the same schedule
        opt.step(lr)
        grads_per_step.append(grads)
        lrs.append(lr)
    ref = reference(start, grads_per_step, lrs, 1e-2, 0.05, 0.9, nesterov, 5, (0.9, 0.95), 1e-8, 0.1, muon_wd)
    for n, p in named:
        np.testing.assert_allclose(p.data, ref[n], rtol=tol, atol=tol, err_msg=n)
    assert opt.t == 6


def test_groups_on_a_gpt_and_describe():
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=8))
    muon, adamw = muon_groups(model.named_parameters())
    names = [n for n, _ in muon]
    assert len(names) == 8 and all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in names)
    assert {n for n, _ in adamw} >= {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                                     "transformer.h.0.attn.c_attn.bias"}
    opt = Muon(model.named_parameters())
    assert opt.n_muon == sum(p.data.size for _, p in muon)
    assert "Muon: 8 hidden matrices" in opt.describe() and "AdamW:" in opt.describe()
    # the parameters are views of one flat buffer, Muon's matrices first
    assert opt.slots[0].name == names[0] and opt.slots[0].start == 0
    assert np.shares_memory(opt.flat, model.transformer.h[0].attn.c_attn.weight.data)
    assert opt.momentum.size == opt.n_muon and opt.exp_avg.size == opt.flat.size - opt.n_muon


def test_state_dict_round_trip_continues_bit_identically():
    def run(steps, restart_at=None):
        named = make_params(np.float32)
        opt = Muon(named, lr=1e-2, muon_lr=0.05)
        r = np.random.default_rng(2)
        for i in range(steps):
            if i == restart_at:
                tensors, meta = opt.state_dict()
                tensors, meta = {k: v.copy() for k, v in tensors.items()}, json.loads(json.dumps(meta))
                named = [(n, SimpleNamespace(data=p.data.copy(), grad=None)) for n, p in named]
                opt = Muon(named, lr=1e-2, muon_lr=0.05)
                opt.load_state_dict(tensors, meta)
            opt.zero_grad()
            for n, p in named:
                p.grad += r.standard_normal(SHAPES[n]).astype(np.float32)
            opt.step(1e-2)
        return opt.flat.copy(), opt.state_dict()[0]

    straight, s1 = run(6)
    resumed, s2 = run(6, restart_at=3)
    np.testing.assert_array_equal(straight, resumed)
    assert s1.keys() == s2.keys() and {k.split(".")[0] for k in s1} == {"momentum", "exp_avg", "exp_avg_sq"}
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k])


def test_load_state_dict_rejects_mismatched_state():
    opt = Muon(make_params(np.float32))
    tensors, meta = opt.state_dict()
    adam_tensors, adam_meta = AdamW(make_params(np.float32)).state_dict()
    with pytest.raises(NpgptError, match="optimizer is AdamW, not Muon"):
        opt.load_state_dict(adam_tensors, adam_meta)
    with pytest.raises(NpgptError, match="lacks"):
        opt.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("momentum.")}, meta)
    bad = dict(tensors)
    bad["momentum.transformer.h.0.attn.c_attn.weight"] = np.zeros((12, 4), np.float32)
    with pytest.raises(NpgptError, match="shape"):
        opt.load_state_dict(bad, meta)
    with pytest.raises(NpgptError, match="ns_steps"):
        Muon(make_params(np.float32), ns_steps=0)
    with pytest.raises(NpgptError, match="muon_momentum"):
        Muon(make_params(np.float32), muon_momentum=1.0)


def test_gradient_accumulation_and_clipping_equal_one_big_batch():
    """k micro-batches of B/k give the same Muon update as one batch of B, with an active clip."""
    from npgpt.train import train_step
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=8)
    r = np.random.default_rng(0)
    x, y = r.integers(0, 13, (8, 8)), r.integers(0, 13, (8, 8))
    results = []
    for k in (1, 2, 4):
        model = GPT(cfg, seed=3).astype(np.float64)
        opt = Muon(model.named_parameters(), lr=1e-2, muon_lr=0.02)
        for _ in range(2):                           # two steps: the momentum carries over
            train_step(model, opt, [(x[i::k], y[i::k]) for i in range(k)], k, grad_clip=0.05, lr=1e-2)
        results.append(opt.flat.copy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-9, atol=1e-11)


# ---- the trainer ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from npgpt.data import prepare

    from helpers import corpus
    d = tmp_path_factory.mktemp("data")
    (d / "corpus.txt").write_text(corpus())
    prepare([str(d / "corpus.txt")], str(d / "prep"), tokenizer="char")
    return d / "prep"


def tiny_cfg(data_dir, out, **kw):
    from npgpt.train import TrainConfig
    base = dict(data=str(data_dir), out=str(out), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                max_iters=6, eval_interval=3, eval_iters=2, log_interval=2, warmup_iters=2, quiet=True,
                optimizer="muon")
    base.update(kw)
    return TrainConfig(**base)


def _ckpt(run):
    from safetensors.numpy import load_file

    from npgpt.checkpoint import find_checkpoint
    ck = find_checkpoint(run)
    return load_file(str(ck / "model.safetensors")), load_file(str(ck / "optimizer.safetensors"))


def test_muon_training_lowers_loss_and_resumes_bit_exactly(data_dir, tmp_path):
    from npgpt.train import config_for_resume, train
    kw = dict(lr_decay_iters=12, learning_rate=1e-2, gradient_accumulation_steps=2, eval_interval=6)
    straight = train(tiny_cfg(data_dir, tmp_path / "a", max_iters=12, **kw))
    assert straight.history[-1]["val_loss"] < straight.history[0]["val_loss"] - 0.2
    train(tiny_cfg(data_dir, tmp_path / "b", max_iters=6, **kw))
    resumed = train(config_for_resume(tmp_path / "b", {"max_iters": 12, "quiet": True}))
    assert straight.history[-1]["val_loss"] == resumed.history[-1]["val_loss"]
    (wa, oa), (wb, ob) = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b")
    assert wa.keys() == wb.keys() and oa.keys() == ob.keys()
    assert any(k.startswith("momentum.") for k in oa)
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k])
    state = json.loads((tmp_path / "a" / "ckpt" / "state.json").read_text())
    assert state["optimizer"]["type"] == "Muon" and state["config"]["optimizer"] == "muon"


def test_resume_refuses_another_optimizer(data_dir, tmp_path):
    from npgpt.train import config_for_resume, train
    train(tiny_cfg(data_dir, tmp_path / "r", max_iters=3, optimizer="adamw"))
    with pytest.raises(NpgptError, match="cannot change optimizer"):
        config_for_resume(tmp_path / "r", {"max_iters": 6, "optimizer": "muon"})


def test_cli_set_optimizer_muon_and_bad_values(data_dir, tmp_path):
    from click.testing import CliRunner

    from npgpt.cli.main import cli

    from helpers import TINY
    r = CliRunner().invoke(cli, ["train", "--data", str(data_dir), "--out", str(tmp_path / "c"), "--max-iters", "4",
                                 "--eval-interval", "2", *TINY, "--set", "optimizer=muon", "--set", "muon_lr=0.03",
                                 "--set", "ns_steps=4", "--set", "nesterov=false"])
    assert r.exit_code == 0, r.output
    assert "Muon: 4 hidden matrices" in r.output and "4 Newton-Schulz steps" in r.output
    meta = json.loads((tmp_path / "c" / "ckpt" / "state.json").read_text())["optimizer"]
    assert meta["muon_lr"] == 0.03 and meta["ns_steps"] == 4 and meta["nesterov"] is False
    for bad, msg in [("optimizer=sgd", "optimizer must be one of adamw, muon"), ("ns_steps=0", "ns_steps"),
                     ("muon_momentum=1", "muon_momentum")]:
        r = CliRunner().invoke(cli, ["train", "--data", str(data_dir), "--out", str(tmp_path / "d"), "--set", bad])
        assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output, r.output


# ---- data parallel on real MPI ranks ---------------------------------------------------------------------
def _mpi():
    from test_distributed import MPIEXEC, WORKER, mpi_env
    if MPIEXEC is None:
        pytest.skip("needs the npgpt[mpi] extra (mpi4py + mpiexec)")
    return MPIEXEC, WORKER, mpi_env()


def test_muon_on_two_mpi_ranks_equals_one_process(data_dir, tmp_path):
    import subprocess
    import sys
    mpiexec, worker, env = _mpi()
    out = tmp_path / "r.json"
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(worker), "muon_equiv", str(out), str(data_dir),
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["iters"] == 6 and r["ranks_differ"] == 0.0
    assert r["one_vs_ranks"] < 1e-5 and r["moved"] > 0
    # ZeRO-1 by whole matrices: the same weights as plain Muon, bit for bit, on every rank
    assert r["zero_ranks_differ"] == 0.0 and r["zero_vs_plain"] == 0.0


@pytest.mark.parametrize("zero", ["0", "1"])
def test_mpiexec_train_muon_and_resume_bit_exactly(data_dir, tmp_path, zero):
    """`mpiexec -n 2 npgpt train --set optimizer=muon`, stopped at 4 and resumed to 8 == straight to 8
    (with zero_stage=1 too: the checkpoint gathers the whole-matrix shards into Muon's format)."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import TINY
    mpiexec, _, env = _mpi()
    npgpt = str(Path(sys.executable).parent / "npgpt")
    common = ["--data", str(data_dir), "--eval-interval", "4", *TINY, "--set", "optimizer=muon",
              "--set", "lr_decay_iters=8", "--set", f"zero_stage={zero}"]

    def run(*args):
        p = subprocess.run([mpiexec, "-n", "2", npgpt, "train", *args], capture_output=True, text=True,
                           timeout=300, env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    log = run("--out", str(tmp_path / "a"), "--max-iters", "8", *common)
    assert "Muon:" in log and (("ZeRO-1 over 2 ranks by whole matrices" in log) == (zero == "1"))
    run("--out", str(tmp_path / "b"), "--max-iters", "4", *common)
    run("--out", str(tmp_path / "b"), "--max-iters", "8", "--resume")
    (wa, oa), (wb, ob) = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b")
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k])


def test_whole_tensor_assignment_and_zero_muon_on_one_rank_equals_muon():
    from npgpt.distributed.comm import SingleProcess
    from npgpt.distributed.zero import ZeroMuon, assign_whole_tensors
    assert assign_whole_tensors([10, 40, 30, 20], 2) == [0, 0, 1, 1]          # 40+10 vs 30+20
    assert assign_whole_tensors([5, 5, 5], 3) == [0, 1, 2]
    assert assign_whole_tensors([7], 4) == [0]
    results = []
    for cls in ("plain", "zero"):
        named = make_params(np.float32)
        opt = Muon(named, lr=1e-2) if cls == "plain" else ZeroMuon(named, SingleProcess(), lr=1e-2)
        r = np.random.default_rng(5)
        for _ in range(3):
            opt.zero_grad()
            for n, p in named:
                p.grad += r.standard_normal(SHAPES[n]).astype(np.float32)
            opt.step(1e-2)
        results.append((opt.flat.copy(), opt.state_dict()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    (ta, ma), (tb, mb) = results[0][1], results[1][1]
    assert ma == mb and ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])
