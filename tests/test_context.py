"""No hidden process-wide state: grad mode, precision, the profiler, the reference switch and the
row-block switch are context variables. A block that sets one in a thread is not seen by another
thread running at the same time, and threads npgpt starts (row blocks, replicas) run in a copy of
their starter's context."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from npgpt import precision as P
from npgpt.model import GPT, GPTConfig
from npgpt.ops import nn as F
from npgpt.ops import parallel
from npgpt.reference import reference_ops
from npgpt.replicas import ThreadReplicas
from npgpt.tensor import Tensor, is_grad_enabled, no_grad, profiling


def run_together(*targets):
    """Run each target on its own thread at the same time; wait for all of them."""
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def _modes():
    """What this thread sees now: grad mode, precision, and which op `linear` dispatches to."""
    x = Tensor(np.ones((2, 3), dtype=np.float32), requires_grad=True)
    w = Tensor(np.ones((3, 4), dtype=np.float32), requires_grad=True)
    y = F.linear(x, w)
    return {"grad": is_grad_enabled(), "graph": y.grad_fn is not None, "precision": P.current().name,
            "op": y.grad_fn.name if y.grad_fn is not None else None}


PLAIN = {"grad": True, "graph": True, "precision": "fp32", "op": "Linear"}


def test_modes_set_in_one_thread_are_not_seen_by_another_running_at_the_same_time():
    inside, entered, checked = {}, threading.Event(), threading.Event()
    calls = []
    rec = SimpleNamespace(clock=lambda: 0.0, record=lambda fn, phase, seconds: calls.append((fn.name, phase)))
    seen = {}

    def setter():
        with no_grad(), P.use_precision("fp16"), profiling(rec):
            entered.set()
            inside["setter"] = _modes()
            checked.wait(30)                      # hold the block open while the other thread looks
        inside["after"] = _modes()

    def watcher():
        entered.wait(30)
        seen["watcher"] = _modes()
        checked.set()

    run_together(setter, watcher)
    assert inside["setter"] == {"grad": False, "graph": False, "precision": "fp16", "op": None}
    assert seen["watcher"] == PLAIN                # neither no_grad, fp16 nor the profiler leaked
    assert inside["after"] == PLAIN                # and the setter's own thread is restored
    assert calls == [("Linear", "forward")]        # only the setter's op was profiled


def test_reference_switch_and_no_grad_in_two_threads_at_once():
    barrier = threading.Barrier(2, timeout=30)
    got = {}

    def reference_thread():
        with reference_ops():
            barrier.wait()
            got["reference"] = _modes()
            barrier.wait()

    def no_grad_thread():
        with no_grad():
            barrier.wait()
            got["no_grad"] = _modes()
            barrier.wait()

    run_together(reference_thread, no_grad_thread)
    assert got["reference"] == {**PLAIN, "op": "MatMul"}       # reference, with a graph
    assert got["no_grad"] == {**PLAIN, "graph": False, "grad": False, "op": None}   # fused, no graph


def test_no_grad_nests_and_decorates():
    with no_grad():
        with no_grad():
            assert not is_grad_enabled()
        assert not is_grad_enabled()
    assert is_grad_enabled()

    @no_grad()
    def f():
        return is_grad_enabled()

    assert f() is False and is_grad_enabled()
    with pytest.raises(ValueError):
        with no_grad():
            raise ValueError("boom")
    assert is_grad_enabled()                       # restored on an exception too


def test_row_block_threads_see_the_callers_context(monkeypatch):
    monkeypatch.setenv("NPGPT_THREADS", "2")
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMS", 1)
    seen = []

    def kernel(rows):
        seen.append((threading.current_thread().name, P.current().name, is_grad_enabled()))

    with P.use_precision("tf32"), no_grad():
        parallel.for_row_blocks(64, parallel.BLOCK_ELEMS, kernel)
    names = {name for name, _, _ in seen}
    assert any(n.startswith("npgpt-rows") for n in names), names     # a pool thread ran a block
    assert {(p, g) for _, p, g in seen} == {("tf32", False)}


def test_replica_threads_run_in_a_copy_of_the_trainers_context():
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg, seed=0)
    seen = []

    def loss(m, x, y):
        seen.append((threading.current_thread().name, P.current().name))
        return m(x, y)[1]

    reps = ThreadReplicas(model, n=2, base_loss=loss)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 11, (4, 8)), rng.integers(0, 11, (4, 8))
    try:
        with P.use_precision("tf32"):
            reps.forward_backward(x, y)
    finally:
        reps.close()
    assert any(name.startswith("npgpt-replica") for name, _ in seen), seen
    assert {p for _, p in seen} == {"tf32"}
    assert P.current().name == "fp32"


def test_serve_engine_thread_and_no_grad_reference_ops_in_another_thread_at_the_same_time(tmp_path):
    """The engine runs in a copy of the context it was started in (here: tf32) and sees neither
    the no_grad, the reference switch nor the fp16 of a thread that holds them while it serves;
    that thread keeps its own modes, and the served text is the same as with nobody else around."""
    from serve_helpers import model_folder

    from npgpt.loading import load_run
    from npgpt.ops.nn import REFERENCE_OPS
    from npgpt.serve.http import App

    model, tok = load_run(model_folder(tmp_path / "m", chat=False))[:2]
    seen = []
    real = model.forward_cached

    def recording(*args, **kwargs):
        seen.append((threading.current_thread().name, is_grad_enabled(), REFERENCE_OPS.get(), P.current().name))
        return real(*args, **kwargs)

    model.forward_cached = recording

    def serve_one(app):
        req = app.completion_request({"prompt": "the", "max_tokens": 12, "temperature": 0})
        app.engine.submit(req)
        text = ""
        while True:
            event = req.events.get(timeout=120)
            if event[0] == "error":
                raise event[1]
            if event[0] == "delta":
                text += event[2]
            if event[0] == "finish":
                return text

    app = App(model, tok, "m")
    with P.use_precision("tf32"):
        app.engine.start()                       # the engine keeps the context it was started in
    assert P.current().name == "fp32"
    inside, served, other = threading.Event(), threading.Event(), {}

    def other_thread():
        with no_grad(), reference_ops(), P.use_precision("fp16"):
            inside.set()
            served.wait(120)                     # hold the modes while the engine serves
            other["modes"] = _modes()

    try:
        alone = serve_one(app)
        t = threading.Thread(target=other_thread)
        t.start()
        assert inside.wait(30)
        seen.clear()
        during = serve_one(app)
        served.set()
        t.join(60)
    finally:
        served.set()
        app.engine.stop(grace=1)
    assert during == alone and len(during) > 0
    assert {(g, r, p) for name, g, r, p in seen if name == "npgpt-engine"} == {(True, False, "tf32")}, seen
    assert other["modes"] == {"grad": False, "graph": False, "precision": "fp16", "op": None}


def test_trust_pattern_is_an_argument_from_the_cli_to_the_loader(tmp_path):
    """`npgpt --trust-pattern` is a setting of the command's job, handed to the loader as
    `trust_pattern=True` (load_run, the tokenizer loaders): no context variable, no environment
    variable, nothing left behind for the next caller."""
    import os

    from click.testing import CliRunner

    import npgpt.tokenizer.bpe as bpe
    from npgpt.cli.main import cli
    from npgpt.errors import NpgptError
    from npgpt.evaluate import info
    from npgpt.loading import load_run, load_run_tokenizer
    from npgpt.tokenizer import BPETokenizer

    from helpers import corpus

    custom = r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+"
    tok = BPETokenizer.train(corpus(400), 280, pattern=custom)
    folder = tmp_path / "m"
    GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0).save_pretrained(folder)
    tok.save(folder)
    (tmp_path / "text.txt").write_text(corpus(60, seed=1))
    assert not any("TRUST" in name for name in dir(bpe))          # the old context variable is gone

    for load in (load_run, load_run_tokenizer):
        with pytest.raises(NpgptError, match="trust-pattern"):
            load(folder)
    assert load_run(folder, trust_pattern=True).tokenizer.pattern == custom
    assert load_run_tokenizer(folder, trust_pattern=True).fingerprint() == tok.fingerprint()
    assert info(folder, trust_pattern=True)["tokenizer"]["vocab_size"] == tok.vocab_size
    assert "trust-pattern" in info(folder)["tokenizer"]["error"]

    runner = CliRunner()
    commands = [["sample", "--checkpoint", str(folder), "--max-new-tokens", "2", "--seed", "0"],
                ["eval", "--checkpoint", str(folder), "--input", str(tmp_path / "text.txt"), "--json"]]
    data = str(tmp_path / "d")
    commands.append(["prepare", "--input", str(tmp_path / "text.txt"), "--out", data, "--tokenizer-from", str(folder)])
    commands.append(["finetune", "--init-from", str(folder), "--data", data, "--out", str(tmp_path / "ft"), "--quiet",
                     "--set", "max_iters=1", "--set", "eval_iters=1", "--set", "batch_size=2", "--set", "block_size=8"])
    for args in commands:
        r = runner.invoke(cli, args)
        assert r.exit_code == 1 and "--trust-pattern" in r.output and "Traceback" not in r.output, r.output
        r = runner.invoke(cli, ["--trust-pattern", *args])
        assert r.exit_code == 0, r.output
    with pytest.raises(NpgptError, match="trust-pattern"):     # nothing of the command's opt-in is left
        load_run(folder)
    assert not any("TRUST" in k for k in os.environ)
