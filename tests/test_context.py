"""No hidden process-wide state: grad mode, precision, the profiler, the reference switch and the
row-block switch are context variables. A block that sets one in a thread is not seen by another
thread running at the same time, and threads npgpt starts (row blocks, replicas) run in a copy of
their starter's context."""

import threading

import numpy as np
import pytest

from npgpt import precision as P
from npgpt.model import GPT, GPTConfig
from npgpt.ops import nn as F
from npgpt.ops import parallel
from npgpt.reference import reference_ops
from npgpt.replicas import ThreadReplicas
from npgpt.tensor import Tensor, is_grad_enabled, no_grad, profiling


class Recorder:
    def __init__(self):
        self.calls = []

    def clock(self):
        return 0.0

    def record(self, fn, phase, seconds):
        self.calls.append((fn.name, phase))


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
    rec = Recorder()
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

    threads = [threading.Thread(target=setter), threading.Thread(target=watcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert inside["setter"] == {"grad": False, "graph": False, "precision": "fp16", "op": None}
    assert seen["watcher"] == PLAIN                # neither no_grad, fp16 nor the profiler leaked
    assert inside["after"] == PLAIN                # and the setter's own thread is restored
    assert rec.calls == [("Linear", "forward")]    # only the setter's op was profiled


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

    threads = [threading.Thread(target=reference_thread), threading.Thread(target=no_grad_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
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
