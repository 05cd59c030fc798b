"""Data parallelism on real MPI ranks (`mpiexec -n 2` and `-n 3`, oversubscribed on 2 cores), and the
pieces that need no MPI: launch detection, shards, the count weighting, ZeRO-1 in a world of one,
NCCL plumbing against a recording fake (the real NCCL path needs a GPU; see the README).

The MPI tests skip when the `npgpt[mpi]` extra (mpi4py + an mpiexec) is not installed; `.ci/run`
installs it, so CI runs them.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from npgpt.distributed.comm import NCCLComm, SingleProcess, count_targets, launch_info, loss_weight, shard_bounds
from npgpt.distributed.zero import ZeroAdamW, make_optimizer, reduce_gradients
from npgpt.errors import NpgptError

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"


def mpiexec():
    """The mpiexec beside this Python (the mpi extra's MPICH wheel), else one on PATH; None if absent."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


MPIEXEC = mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="needs the mpi extra: pip install 'npgpt[mpi]'")


def mpi_env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = "1"     # one BLAS thread per rank
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_worker(case, n, tmp_path, timeout=240):
    out = tmp_path / f"{case}-{n}.json"
    proc = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(WORKER), case, str(out)],
                          capture_output=True, text=True, timeout=timeout, env=mpi_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


# ---- real MPI ranks -------------------------------------------------------------------------------
@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_collectives_on_real_ranks(n, tmp_path):
    r = run_worker("collectives", n, tmp_path)
    assert r["world_size"] == n and r["ranks"] == n
    assert r["max_err"] < 1e-5                    # sums of n float32 normals vs float64 sums
    assert r["sum"] == [n * (n - 1) / 2, -n * (n - 1) / 2] and r["max"] == [n - 1]
    assert r["object"] == {"from": 0}


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_reduced_gradients_equal_one_process_gradient_with_unequal_ignored_counts(n, tmp_path):
    r = run_worker("grads", n, tmp_path)
    assert len(set(r["counts"])) == n             # every rank has a different number of targets
    assert sum(r["counts"]) == r["n_global"]
    assert r["rel_err"] < 1e-6
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
    assert r["grads_differ_across_ranks"] == 0.0


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_k_steps_on_n_ranks_equal_one_process_and_zero1_equals_unsharded(n, tmp_path):
    r = run_worker("steps", n, tmp_path)
    assert r["steps"] == 4
    assert r["plain_vs_one"] < 1e-5               # weights after K steps, N x B vs 1 x N*B
    assert r["zero_vs_plain"] < 1e-6              # ZeRO-1 vs the all-reduce run
    assert r["zero_moments_vs_one"] < 1e-6        # the gathered moments are the full state
    assert r["plain_ranks_differ"] == 0.0 and r["zero_ranks_differ"] == 0.0
    assert r["zero_bytes"] <= r["full_bytes"] / n + 8 * n     # 1/N of the moments (+ rounding of shards)


@needs_mpi
@pytest.mark.parametrize("how", ["kill", "leave"])
def test_a_vanished_rank_ends_the_job_in_bounded_time(how, tmp_path):
    """SIGKILL: the launcher ends the job. A rank that leaves without joining a collective: the
    others' watchdog (NPGPT_DIST_TIMEOUT=3 here) ends it. Either way: non-zero status, no hang."""
    env = {**mpi_env(), "NPGPT_DIST_TIMEOUT": "3"}
    t0 = time.monotonic()
    proc = subprocess.run([MPIEXEC, "-n", "3", sys.executable, str(WORKER), how, str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "x.json").exists()
    if how == "leave":
        assert "waited more than 3 s in a collective (all-reduce)" in proc.stderr


# ---- no MPI needed ----------------------------------------------------------------------------------
def test_launch_info_reads_the_launchers_environment():
    assert launch_info({}) == (0, 1, 0)
    assert launch_info({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}) == (2, 4, 0)
    assert launch_info({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                        "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == (1, 2, 1)
    assert launch_info({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3"}) == (3, 8, 3)
    assert launch_info({"PMI_RANK": "x", "PMI_SIZE": "2"}) == (0, 1, 0)          # garbage: not launched
    assert launch_info({"PMI_RANK": "5", "PMI_SIZE": "2"}) == (0, 1, 0)


@pytest.mark.parametrize("n,world", [(10, 3), (2, 3), (0, 2), (809856, 2), (7, 1)])
def test_shards_cover_the_buffer_once(n, world):
    bounds = shard_bounds(n, world)
    assert len(bounds) == world and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(hi - lo <= -(-n // world) for lo, hi in bounds)


def test_count_weighting():
    y = np.array([[1, -1, 2], [-1, -1, 0]])
    assert count_targets(y) == 3
    assert loss_weight(3, 12) == 0.25 and loss_weight(0, 0) == 0.0


def test_zero1_in_a_world_of_one_matches_adamw():
    from npgpt.model import GPT, GPTConfig
    from npgpt.optim import AdamW
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    x = np.random.default_rng(0).integers(0, 11, (3, 8))
    flats = []
    for zero in (True, False):
        model = GPT(cfg, seed=1)
        opt = make_optimizer(model.named_parameters(), SingleProcess(), zero_stage=int(zero), lr=1e-2)
        assert isinstance(opt, ZeroAdamW) == zero
        for _ in range(3):
            opt.zero_grad()
            model(x, x)[1].backward()
            reduce_gradients(SingleProcess(), opt)
            opt.clip_grad_norm(0.1)
            opt.step()
        flats.append(opt.flat.copy())
        tensors, meta = opt.state_dict()
        fresh = make_optimizer(GPT(cfg, seed=1).named_parameters(), SingleProcess(), zero_stage=int(zero))
        fresh.load_state_dict(tensors, meta)
        again, _ = fresh.state_dict()
        assert fresh.t == 3 and all(np.array_equal(again[k], tensors[k]) for k in tensors)
    assert np.array_equal(flats[0], flats[1])
    with pytest.raises(NpgptError, match="zero_stage"):
        make_optimizer(GPT(cfg, seed=1).named_parameters(), SingleProcess(), zero_stage=2)


class DevArray(np.ndarray):
    """A host array that shows CuPy's `.data.ptr` (its real address), so the fake NCCL can work on it."""

    @property
    def data(self):
        class Memory:
            ptr = self.__array_interface__["data"][0]
        return Memory()


def at(ptr, count, dtype=np.float32):
    """The `count` values of `dtype` at address `ptr`, as a writable NumPy view."""
    import ctypes
    size = np.dtype(dtype).itemsize * count
    return np.frombuffer((ctypes.c_char * size).from_address(ptr), dtype=dtype)


class FakeNCCL:
    """cupy.cuda.nccl for a world of one, on host memory: records each call and does what NCCL
    does with one rank (all-reduce / reduce-scatter / all-gather of one rank copy send to recv)."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_FLOAT16, NCCL_SUM = 7, 8, 6, 0

    def __init__(self):
        self.calls = []
        fake = self

        class NcclCommunicator:
            def __init__(self, ndev, uid, rank):
                fake.calls.append(("init", ndev, uid, rank))

            def allReduce(self, send, recv, count, dtype, op, stream):
                fake.calls.append(("allReduce", send == recv, count, dtype, op))
                at(recv, count)[:] = at(send, count)

            def reduceScatter(self, send, recv, count, dtype, op, stream):
                fake.calls.append(("reduceScatter", count, dtype, op))
                at(recv, count)[:] = at(send, count)

            def allGather(self, send, recv, count, dtype, stream):
                fake.calls.append(("allGather", count, dtype))
                at(recv, count)[:] = at(send, count)

            def bcast(self, buf, count, dtype, root, stream):
                fake.calls.append(("bcast", count, dtype, root))

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        return (1, 2, 3)


class FakeCupy:
    """Just enough of CuPy for NCCLComm: zeros (as DevArray) and the current stream."""

    class cuda:
        class _Stream:
            ptr = 0

            def synchronize(self):
                pass

        @staticmethod
        def get_current_stream():
            return FakeCupy.cuda._Stream()

    @staticmethod
    def zeros(n, dtype):
        return np.zeros(n, dtype).view(DevArray)


def test_nccl_comm_plumbing_against_a_fake():
    """Which NCCL calls, with which counts, dtypes and padding, for one rank. NCCL's own arithmetic
    across GPUs is not exercised here (unverified without a GPU; see the README)."""
    nccl = FakeNCCL()
    comm = NCCLComm(SingleProcess(), nccl=nccl, cupy=FakeCupy())
    assert nccl.calls[0] == ("init", 1, (1, 2, 3), 0)
    values = np.arange(5, dtype=np.float32) - 2
    buf = values.copy().view(DevArray)
    comm.allreduce_sum(buf)
    assert nccl.calls[-1] == ("allReduce", True, 5, FakeNCCL.NCCL_FLOAT32, FakeNCCL.NCCL_SUM)
    comm.reduce_scatter_sum(buf)
    assert nccl.calls[-1] == ("reduceScatter", 5, FakeNCCL.NCCL_FLOAT32, FakeNCCL.NCCL_SUM)
    comm.allgather(buf)
    assert nccl.calls[-1] == ("allGather", 5, FakeNCCL.NCCL_FLOAT32)
    comm.broadcast(buf)
    assert nccl.calls[-1] == ("bcast", 5, FakeNCCL.NCCL_FLOAT32, 0)
    assert np.array_equal(np.asarray(buf), values)
    with pytest.raises(ValueError, match="1-D contiguous"):
        comm.allreduce_sum(np.zeros((2, 2), np.float32).view(DevArray))


class FakeNCCLWorld:
    """cupy.cuda.nccl for N ranks played by N threads of this process, on host memory: each
    collective deposits every rank's input, meets at a barrier, and computes what NCCL defines.
    It checks NCCLComm's own part (pointers, counts, the padding of uneven shards), not NCCL."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_FLOAT16, NCCL_SUM = 7, 8, 6, 0
    DTYPES = {7: np.float32, 8: np.float64}

    def __init__(self, n):
        import threading
        self.n, self.barrier, self.slots, self.calls = n, threading.Barrier(n, timeout=30), [None] * n, []
        world = self

        class NcclCommunicator:
            def __init__(self, ndev, uid, rank):
                assert ndev == world.n and uid == (4, 5, 6)
                self.rank = rank

            def _meet(self, value):
                world.slots[self.rank] = value
                world.barrier.wait()
                got = list(world.slots)
                world.barrier.wait()
                return got

            def allReduce(self, send, recv, count, dtype, op, stream):
                t = world.DTYPES[dtype]
                at(recv, count, t)[:] = sum(self._meet(at(send, count, t).copy()))

            def reduceScatter(self, send, recv, count, dtype, op, stream):
                t = world.DTYPES[dtype]
                parts = self._meet(at(send, count * world.n, t).copy())
                at(recv, count, t)[:] = sum(p[self.rank * count:(self.rank + 1) * count] for p in parts)

            def allGather(self, send, recv, count, dtype, stream):
                t = world.DTYPES[dtype]
                at(recv, count * world.n, t)[:] = np.concatenate(self._meet(at(send, count, t).copy()))

            def bcast(self, buf, count, dtype, root, stream):
                t = world.DTYPES[dtype]
                at(buf, count, t)[:] = self._meet(at(buf, count, t).copy())[root]

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        return (4, 5, 6)


class ThreadRank(SingleProcess):
    """The host communicator NCCLComm rides on, for one thread-rank (only broadcast_object is used)."""

    def __init__(self, world, rank):
        self.world, self.rank, self.world_size, self.local_rank = world, rank, world.n, rank

    def broadcast_object(self, obj, root=0):
        self.world.slots[self.rank] = obj
        self.world.barrier.wait()
        got = self.world.slots[root]
        self.world.barrier.wait()
        return got


@pytest.mark.parametrize("n", [2, 3])
def test_nccl_comm_shards_and_padding_on_thread_ranks(n):
    """reduce-scatter / all-gather of sizes that do not divide by N (padded shards), all-reduce and
    broadcast, on N thread-ranks through NCCLComm and a fake NCCL; results against NumPy sums."""
    import threading
    world = FakeNCCLWorld(n)
    sizes = (1, 5, 7, 1000)
    data = {s: [np.random.default_rng([s, r]).standard_normal(s).astype(np.float32) for r in range(n)] for s in sizes}
    errors = [[] for _ in range(n)]

    def rank_main(r):
        try:
            comm = NCCLComm(ThreadRank(world, r), nccl=world, cupy=FakeCupy())
            for s in sizes:
                total = sum(d.astype(np.float64) for d in data[s])
                lo, hi = shard_bounds(s, n)[r]
                buf = data[s][r].copy().view(DevArray)
                comm.allreduce_sum(buf)
                errors[r].append(float(np.abs(np.asarray(buf) - total).max()))
                buf = data[s][r].copy().view(DevArray)
                comm.reduce_scatter_sum(buf)
                errors[r].append(float(np.abs(np.asarray(buf)[lo:hi] - total[lo:hi]).max(initial=0.0)))
                buf = np.full(s, np.nan, np.float32).view(DevArray)
                buf[lo:hi] = data[s][0][lo:hi]
                comm.allgather(buf)
                errors[r].append(float(np.abs(np.asarray(buf) - data[s][0]).max()))
                buf = data[s][r].copy().view(DevArray)
                comm.broadcast(buf, root=n - 1)
                errors[r].append(float(np.abs(np.asarray(buf) - data[s][n - 1]).max()))
        except Exception as e:              # reported below; a thread's exception would be lost
            errors[r].append(repr(e))
            world.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in range(n):
        assert len(errors[r]) == 4 * len(sizes), errors[r]
        assert max(errors[r]) < 1e-5, errors[r]


def test_data_parallel_plug_composes_with_earlier_hooks():
    """The loss an earlier plugin set passes through unchanged (only counted), and an earlier
    reduce_grads (thread replicas summing in-process) runs before the ranks' reduction."""
    from npgpt.distributed.data_parallel import DataParallel
    from npgpt.model import GPT, GPTConfig
    from npgpt.optim import AdamW
    from npgpt.train import Hooks
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=1)
    opt = AdamW(model.named_parameters())
    calls, seen = [], {}

    def loss_fn(model, x, y):
        seen["loss"] = model(x, y)[1]
        return seen["loss"]

    hooks = Hooks(loss_fn=loss_fn, reduce_grads=lambda g, n: calls.append(("earlier", g is opt.grad)))
    dp = DataParallel(SingleProcess())
    dp.install(hooks, opt)
    x = np.arange(16).reshape(2, 8) % 11
    y = x.copy()
    y[0, :5] = -1
    loss = hooks.loss_fn(model, x, y)
    assert loss is seen["loss"]
    loss.backward()
    before = opt.grad.copy()
    hooks.reduce_grads(opt.grad, y.size)
    assert calls == [("earlier", True)]
    assert dp.global_loss == pytest.approx(float(loss.data))
    assert np.array_equal(opt.grad, before)              # one rank: its weight n_r / N is 1
