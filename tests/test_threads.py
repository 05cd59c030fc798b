"""The thread count chosen for a busy CPU (npgpt.perf.shared_cpu_threads): how it is chosen, that
the trainer applies it, and that the automatic choice changes no number: a short training run is
bit-identical whether auto picks 1 or 2 threads."""

import os

import pytest

from npgpt import perf
from npgpt.errors import NpgptError
from npgpt.ops import parallel
from npgpt.perf import blas_controller, choose_threads

from test_train import data_dir  # noqa: F401  (the prepared char corpus, shared with test_train)


def blas_threads():
    return [lib["num_threads"] for lib in blas_controller().info() if lib["user_api"] == "blas"]


def test_choose_threads(monkeypatch):
    assert choose_threads("auto", cpus=2, load=0.05)[:2] == (2, False)   # a quiet machine keeps every core
    assert choose_threads("auto", cpus=2, load=1.0)[:2] == (1, False)    # one competitor: one core is free
    assert choose_threads("auto", cpus=2, load=14.0)[0] == 1             # never fewer than one
    assert choose_threads("auto", cpus=8, load=2.6)[0] == 5
    assert choose_threads(3)[:2] == (3, True)                            # asked for: BLAS too
    assert choose_threads("off")[0] is None
    monkeypatch.setenv("NPGPT_BLAS_THREADS", "2")
    assert choose_threads()[:2] == (2, True)
    for bad in ("0", "many", "-1"):
        with pytest.raises(NpgptError, match="NPGPT_BLAS_THREADS"):
            choose_threads(bad)


def _train(data_dir, out, spy):  # noqa: F811
    from npgpt.train import TrainConfig, train
    cfg = TrainConfig(data=str(data_dir), out=str(out), n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4,
                      max_iters=2, eval_interval=1, eval_iters=1, log_interval=1, quiet=True)
    r = train(cfg, plugins=[spy])
    return [(h["train_loss"], h["val_loss"]) for h in r.history], r.last_train_loss


def test_auto_threads_change_no_number(data_dir, tmp_path, monkeypatch):  # noqa: F811
    # small blocks, so the row-parallel passes split and thread at this size too
    monkeypatch.setattr(parallel, "BLOCK_ELEMS", 1 << 9)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMS", 1 << 10)
    monkeypatch.setenv("NPGPT_THREADS", "2")
    monkeypatch.setenv("NPGPT_BLAS_THREADS", "auto")
    monkeypatch.setattr(perf, "usable_cpus", lambda: 2)
    before = blas_threads()
    seen, runs = [], []

    def spy(model, src, cfg, hooks):        # runs inside the trainer: what it set
        seen.append((blas_threads(), parallel.num_threads()))

    for load in (0.0, 1.2):                 # quiet: 2 row threads; one core busy: 1
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        runs.append(_train(data_dir, tmp_path / f"run{len(runs)}", spy))
    assert [s[1] for s in seen] == [2, 1] and all(s[0] == before for s in seen)      # BLAS left alone
    assert runs[0] == runs[1]                                                        # bit for bit
    assert len(runs[0][0]) == 3 and runs[0][0][0] != runs[0][0][-1]                 # it trained
    assert blas_threads() == before


def test_asked_threads_reach_blas_and_are_restored(data_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("NPGPT_BLAS_THREADS", "1")
    before = blas_threads()
    seen = []
    _train(data_dir, tmp_path / "one", lambda *a: seen.append((blas_threads(), parallel.num_threads())))
    assert seen and all(t == 1 for t in seen[0][0]) and seen[0][1] == 1
    assert blas_threads() == before
