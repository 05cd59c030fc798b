"""Communicators: the collectives data parallelism needs (one process, MPI, NCCL), who this process is
in a launched job, and the count-weighted loss every data-parallel path shares.

A `Communicator` is the only thing the training code talks to. Every buffer is a 1-D contiguous
float32 array (NumPy, or CuPy for NCCL), reduced in place, so the flat gradient buffer of
`npgpt.optim.AdamW` goes to the wire without a copy:

    SingleProcess   world of one: every collective is a no-op (plain `npgpt train`)
    MPIComm         mpi4py over any MPI (the `npgpt[mpi]` extra brings MPICH wheels); host or CuPy
                    arrays (CuPy through host copies unless the MPI is CUDA-aware)
    NCCLComm        cupy.cuda.nccl on GPU arrays; the NCCL unique id travels over MPI

`launch_info()` reads rank / world size / local rank from the launcher's environment (MPICH's
Hydra, Open MPI, Slurm) without importing mpi4py, so a one-process run never imports it.

The count-weighted loss (`count_targets`, `loss_weight`): rank r backpropagates its token-mean loss
times n_r / N (its non-ignored targets over the global batch's), so the summed gradient is that of
the mean over all targets of the global batch (see npgpt.distributed.data_parallel).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from npgpt.backend import cupy_module, get_xp, parse_device, require_gpu
from npgpt.distributed.watchdog import Watchdog
from npgpt.errors import NpgptError

MPI_HINT = "install the MPI extra: pip install 'npgpt[mpi]' (mpi4py and MPICH from PyPI wheels)"

# ---- who am I: the launcher's environment ------------------------------------------------------------
# (rank, world size, local rank) variables of the launchers we know, in the order we trust them.
_LAUNCH_ENV = [
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),                                         # MPICH Hydra
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),      # Open MPI
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),                                   # srun
]


def launch_info(environ=None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) when not launched.

    Reads only environment variables: deciding whether to use MPI must not import mpi4py.
    """
    env = os.environ if environ is None else environ
    for rank_key, size_key, local_key in _LAUNCH_ENV:
        if rank_key in env and size_key in env:
            try:
                rank, size = int(env[rank_key]), int(env[size_key])
                local = int(env.get(local_key, rank))
            except ValueError:
                continue
            if size >= 1 and 0 <= rank < size:
                return rank, size, max(local, 0)
    return 0, 1, 0


def is_launched(environ=None) -> bool:
    """True when a launcher started more than one process (so MPI is needed)."""
    return launch_info(environ)[1] > 1


# ---- shards ---------------------------------------------------------------------------------------------
def shard_bounds(n: int, world_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] of each rank's contiguous shard of n values: ceil(n / N) each, the last ones
    shorter (possibly empty). Every collective that moves shards uses these bounds."""
    chunk = -(-n // world_size)
    return [(min(r * chunk, n), min((r + 1) * chunk, n)) for r in range(world_size)]


# ---- communicators --------------------------------------------------------------------------------------
class Communicator:
    """The collectives data parallelism needs, on 1-D contiguous float32 arrays, in place.

    rank, world_size, local_rank    this process, the number of processes, its index on its machine
    allreduce_sum(buf)              buf <- sum over ranks of buf
    reduce_scatter_sum(buf)         buf[lo:hi] <- sum over ranks of buf[lo:hi], for this rank's
                                    shard (lo, hi) = shard_bounds(buf.size, world_size)[rank];
                                    the rest of buf is left unspecified
    allgather(buf)                  every rank's shard of buf -> all of buf, on every rank
    broadcast(buf, root=0)          buf <- root's buf
    allreduce_scalars(values, op)   a few Python floats -> their "sum" / "max" over ranks (a list)
    broadcast_object(obj, root=0)   a small JSON-able object from root (ids, step counts), as JSON
    barrier()

    The base class is the world of one process: every collective leaves its buffer as it is.
    Subclasses (MPI, NCCL; the in-process thread replicas of npgpt's CPU speed work) override them.
    A collective waits for all ranks; `watchdog` turns a wait longer than its timeout into the end
    of the job (a dead peer must not leave the others hanging forever).
    """

    rank, world_size, local_rank = 0, 1, 0
    backend = "single"

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's (start, stop) in a buffer of n values."""
        return shard_bounds(n, self.world_size)[self.rank]

    def allreduce_sum(self, buf):
        return buf

    def reduce_scatter_sum(self, buf):
        return buf

    def allgather(self, buf):
        return buf

    def broadcast(self, buf, root=0):
        return buf

    def allreduce_scalars(self, values, op="sum"):
        return [float(v) for v in values]

    def broadcast_object(self, obj, root=0):
        return obj

    def barrier(self):
        pass

    def everyone_failed(self, wait_s=5.0) -> bool:
        """Called by a rank that hit an error: did every rank hit one (see MPIComm)? Alone: yes."""
        return True

    def abort(self, code=1):
        """End this process now, without MPI_Finalize: the launcher sees a rank vanish and ends the
        whole job (call it after printing what went wrong)."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class SingleProcess(Communicator):
    """One process: rank 0 of 1. What a plain `npgpt train` gets."""


def _check_buf(buf):
    if buf.ndim != 1 or not buf.flags.c_contiguous:
        raise ValueError("collectives take 1-D contiguous arrays")
    return buf


class MPIComm(Communicator):
    """Collectives over MPI through mpi4py (imported here, lazily: only launched jobs pay for it)."""

    backend = "mpi"

    def __init__(self, comm=None, timeout_s=None):
        try:
            from mpi4py import MPI   # lazily: only a launched job imports mpi4py
        except ImportError:
            raise NpgptError(f"this job was started by an MPI launcher but mpi4py is missing: {MPI_HINT}") from None
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        # The local rank is the rank among the processes that share this machine's memory.
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        node.Free()
        self._errors = self.comm.Dup()         # a side channel for "did everyone fail?" (see everyone_failed)
        self._scratch = {}
        self.watchdog = Watchdog(timeout_s)

    # Host buffers go to MPI as they are; CuPy buffers through a host copy (portable, not fast).
    def _host(self, buf):
        return buf if isinstance(buf, np.ndarray) else None

    def allreduce_sum(self, buf):
        _check_buf(buf)
        with self.watchdog.waiting("all-reduce"):
            if self._host(buf) is not None:
                self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
            else:
                h = buf.get()
                self.comm.Allreduce(self.MPI.IN_PLACE, h, op=self.MPI.SUM)
                buf.set(h)
        return buf

    def reduce_scatter_sum(self, buf):
        _check_buf(buf)
        bounds = shard_bounds(buf.size, self.world_size)
        counts = [hi - lo for lo, hi in bounds]
        lo, hi = bounds[self.rank]
        host = buf if self._host(buf) is not None else buf.get()
        recv = self._scratch.get((host.dtype, counts[0]))
        if recv is None:
            recv = self._scratch[(host.dtype, counts[0])] = np.empty(counts[0], dtype=host.dtype)
        with self.watchdog.waiting("reduce-scatter"):
            self.comm.Reduce_scatter(host, recv[:hi - lo], recvcounts=counts, op=self.MPI.SUM)
        if host is buf:
            buf[lo:hi] = recv[:hi - lo]
        else:
            buf[lo:hi] = get_xp(buf).asarray(recv[:hi - lo])
        return buf

    def allgather(self, buf):
        # Equal chunks through padded scratch buffers: MPICH's Allgatherv of uneven counts (in place
        # or not) took ~70 ms instead of ~0.4 ms for baby's 3.2 MB in about half of the runs here.
        _check_buf(buf)
        n, N = buf.size, self.world_size
        chunk = -(-n // N)
        lo, hi = shard_bounds(n, N)[self.rank]
        host = buf if self._host(buf) is not None else buf.get()
        key = ("gather", host.dtype, chunk)
        if key not in self._scratch:
            self._scratch[key] = (np.empty(chunk, host.dtype), np.empty(chunk * N, host.dtype))
        part, full = self._scratch[key]
        part[:hi - lo] = host[lo:hi]
        with self.watchdog.waiting("all-gather"):
            self.comm.Allgather(part, full)
        host[...] = full[:n]
        if host is not buf:
            buf.set(host)
        return buf

    def broadcast(self, buf, root=0):
        _check_buf(buf)
        host = buf if self._host(buf) is not None else buf.get()
        with self.watchdog.waiting("broadcast"):
            self.comm.Bcast(host, root=root)
        if host is not buf:
            buf.set(host)
        return buf

    def allreduce_scalars(self, values, op="sum"):
        a = np.asarray(values, dtype=np.float64).reshape(-1).copy()
        with self.watchdog.waiting("all-reduce"):
            self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.MAX if op == "max" else self.MPI.SUM)
        return [float(v) for v in a]

    def broadcast_object(self, obj, root=0):
        """As JSON text in a byte buffer (mpi4py's lowercase bcast serialises arbitrary Python objects; npgpt sends only JSON)."""
        data = json.dumps(obj).encode("utf-8") if self.rank == root else b""
        size = np.array([len(data)], dtype=np.int64)
        with self.watchdog.waiting("broadcast"):
            self.comm.Bcast(size, root=root)
            buf = np.frombuffer(data, np.uint8).copy() if self.rank == root else np.empty(int(size[0]), np.uint8)
            self.comm.Bcast(buf, root=root)
        return json.loads(buf.tobytes().decode("utf-8"))

    def barrier(self):
        with self.watchdog.waiting("barrier"):
            self.comm.Barrier()

    def everyone_failed(self, wait_s=5.0) -> bool:
        """Called by a rank that hit an error: True if every rank reaches this point within wait_s.

        A rank that fails alone must end the job (its peers wait in a collective it will never join);
        ranks that fail together (the same bad input everywhere) should exit quietly with one message.
        The question travels on a duplicate communicator, so it never mixes with a pending collective.
        """
        req = self._errors.Ibarrier()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if req.Test():
                return True
            time.sleep(0.01)
        return False


class NCCLComm(Communicator):
    """Collectives over NCCL (cupy.cuda.nccl) on CuPy arrays; MPI carries the unique id and objects.

    One rank per GPU: rank r uses GPU `local_rank` (the caller selects it before building this).
    reduce-scatter / all-gather need equal chunks in NCCL, so shards are padded to ceil(n / N)
    in a scratch buffer (only the last shard, at most N - 1 values, is padding).
    """

    backend = "nccl"

    def __init__(self, mpi: MPIComm | Communicator, nccl=None, cupy=None):
        if cupy is None:
            cupy = cupy_module()                           # a clear NpgptError when CuPy is not usable
        if nccl is None:
            try:
                from cupy.cuda import nccl   # CuPy's NCCL binding, only for GPU jobs
            except Exception as e:
                raise NpgptError(f"NCCL is not available in this CuPy ({e}); use MPI (it is slower on GPUs)") from None
            if not getattr(nccl, "available", True):
                raise NpgptError("this CuPy was built without NCCL; use MPI (it is slower on GPUs)")
        self.cp, self.nccl, self.mpi = cupy, nccl, mpi
        self.rank, self.world_size, self.local_rank = mpi.rank, mpi.world_size, mpi.local_rank
        uid = list(nccl.get_unique_id()) if mpi.rank == 0 else None
        uid = tuple(mpi.broadcast_object(uid, root=0))      # the id (128 small ints) travels over MPI
        self.comm = nccl.NcclCommunicator(self.world_size, uid, self.rank)
        self.watchdog = getattr(mpi, "watchdog", Watchdog(None))
        self._pad = {}

    def _dtype(self, buf):
        kinds = {np.dtype(np.float32): self.nccl.NCCL_FLOAT32, np.dtype(np.float64): self.nccl.NCCL_FLOAT64,
                 np.dtype(np.float16): self.nccl.NCCL_FLOAT16}
        return kinds[np.dtype(buf.dtype)]

    def _stream(self):
        return self.cp.cuda.get_current_stream().ptr

    def _sync(self):
        with self.watchdog.waiting("NCCL"):
            self.cp.cuda.get_current_stream().synchronize()

    def allreduce_sum(self, buf):
        _check_buf(buf)
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf), self.nccl.NCCL_SUM,
                            self._stream())
        return buf

    def _padded(self, buf):
        chunk = -(-buf.size // self.world_size)
        key = (np.dtype(buf.dtype), chunk)
        if key not in self._pad:
            self._pad[key] = (self.cp.zeros(chunk * self.world_size, dtype=buf.dtype),
                              self.cp.zeros(chunk, dtype=buf.dtype))
        return chunk, *self._pad[key]

    def reduce_scatter_sum(self, buf):
        _check_buf(buf)
        chunk, full, part = self._padded(buf)
        full[:buf.size] = buf
        self.comm.reduceScatter(full.data.ptr, part.data.ptr, chunk, self._dtype(buf), self.nccl.NCCL_SUM,
                                self._stream())
        lo, hi = self.shard(buf.size)
        buf[lo:hi] = part[:hi - lo]
        return buf

    def allgather(self, buf):
        _check_buf(buf)
        chunk, full, part = self._padded(buf)
        lo, hi = self.shard(buf.size)
        part[:hi - lo] = buf[lo:hi]
        self.comm.allGather(part.data.ptr, full.data.ptr, chunk, self._dtype(buf), self._stream())
        buf[...] = full[:buf.size]
        return buf

    def broadcast(self, buf, root=0):
        _check_buf(buf)
        self.comm.bcast(buf.data.ptr, buf.size, self._dtype(buf), root, self._stream())
        return buf

    def allreduce_scalars(self, values, op="sum"):
        return self.mpi.allreduce_scalars(values, op)      # a few floats: the host path is fine

    def broadcast_object(self, obj, root=0):
        return self.mpi.broadcast_object(obj, root)

    def barrier(self):
        self._sync()
        self.mpi.barrier()

    def everyone_failed(self, wait_s=5.0):
        return self.mpi.everyone_failed(wait_s)

    def abort(self, code=1):
        self.mpi.abort(code)


def get_communicator(device="cpu", environ=None, timeout_s=None) -> Communicator:
    """The communicator for this process: SingleProcess unless a launcher started several ranks;
    then MPI, and NCCL on top of it for GPU devices (each rank on GPU local_rank)."""
    if not is_launched(environ):
        return SingleProcess()
    return for_device(MPIComm(timeout_s=timeout_s), device)[0]


def for_device(comm: Communicator, device: str, force_nccl=False) -> tuple[Communicator, str]:
    """(communicator, device) for one rank of a job on `device`.

    On the CPU: `comm` and the device as they are. On GPUs with several ranks: each rank takes GPU
    `local_rank` (`--device gpu` means "this rank's GPU") and the collectives run over NCCL, its id
    broadcast over `comm`. force_nccl builds
    the NCCL communicator for a world of one too (the hardware check of the NCCL path on one GPU).
    """
    dev = parse_device(device)
    if not dev.is_gpu or (comm.world_size == 1 and not force_nccl) or isinstance(comm, NCCLComm):
        return comm, device
    index = comm.local_rank if comm.world_size > 1 else dev.index
    dev = type(dev)("cuda", index)
    cp = require_gpu(dev)
    cp.cuda.Device(index).use()                   # NCCL binds the communicator to the current GPU
    return NCCLComm(comm), str(dev)


# ---- the count-weighted loss and the gradient reduction ------------------------------------------------
def count_targets(y, ignore_index=-1) -> int:
    """Number of targets that count (not `ignore_index`) in a batch of target ids."""
    xp = get_xp(y)
    return int(xp.count_nonzero(y != ignore_index))


def global_count(comm: Communicator, local_count) -> float:
    """Sum of a per-rank count over all ranks (the denominator of the global token mean)."""
    return comm.allreduce_scalars([local_count])[0]


def loss_weight(local_tokens, global_tokens) -> float:
    """The factor that turns a rank's token-mean loss into its share of the global token mean:

        global loss = sum_r n_r * loss_r / sum_r n_r,   so rank r backpropagates loss_r * n_r / N.

    A rank (or a whole step) with no target that counts contributes 0, never NaN."""
    return float(local_tokens) / float(global_tokens) if global_tokens > 0 else 0.0


def local_rank0_first(comm: Communicator, fn):
    """fn() on local rank 0 of each machine first, then on the other ranks (a cache that the first
    call fills, e.g. the built-in corpus, is then only read). A failure on local rank 0 is raised
    after the others have tried too, so an error everywhere stays one message."""
    if comm.world_size == 1:
        return fn()
    result, error = None, None
    if comm.local_rank == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    comm.barrier()
    if comm.local_rank != 0:
        return fn()
    if error is not None:
        raise error
    return result
