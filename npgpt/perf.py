"""Speed yardsticks and settings shared by `npgpt train` (MFU in the progress line) and `npgpt bench`:
the measured GEMM peak, and the glibc allocator tuning both call when they start.

MFU (model FLOPs utilisation) = achieved FLOP/s / peak FLOP/s. The peak is not a datasheet
number: it is measured in-process as the best GEMM rate this backend reaches on this machine, in
the run's matmul precision (fp32, tf32 or fp16 through `npgpt.precision`, so a tf32 or fp16 run
is not divided by the slower fp32 peak and shown above 100%), so an MFU near 100% means "as fast
as the GEMMs can go here". The size is large enough that one call is not launch-bound: 1024 on
the CPU (about 7 ms on 2 cores), 4096 on a GPU (137 GFLOP, a few ms even on tensor cores).

On a shared CPU, threads wait for partners the scheduler took away, and a run slows several-fold.
`shared_cpu_threads` (entered by `npgpt.train.train`) picks a thread count once, at the start,
from the CPUs this process may use and the load average: as many threads as cores are free, at
least one. An automatic choice may not change any number, and that decides what it may touch:

- the row blocks of `npgpt.ops.parallel` are cut by size, never by thread count, so their thread
  count changes nothing: auto limits them (tested: a short training run is bit-identical at 1 and
  2 row threads);
- OpenBLAS's float32 GEMM is not bit-identical across thread counts (measured with 0.3.31's
  Haswell kernels: 1 against 2 threads differ from 96x96x96 up; even one thread on half the rows
  differs from the whole call), so auto leaves BLAS threads alone. NPGPT_BLAS_THREADS=N sets BLAS
  and row threads to N when you ask (results then differ in the last bits from another N).

`NPGPT_BLAS_THREADS` = auto (default) | N | off; under auto an OPENBLAS_NUM_THREADS /
OMP_NUM_THREADS / MKL_NUM_THREADS you set is left as it is and only the row threads follow it.

A peak measured while another process holds the cores comes out low, and the MFU of the run
that follows high (the first version measured for 0.2 s and printed 107% on a busy CPU); the
measurement keeps the best of about half a second of calls for that reason. `npgpt bench`
reports the careful number; the training log's MFU is a guide.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
from threadpoolctl import ThreadpoolController

from npgpt.backend import synchronize
from npgpt.errors import NpgptError
from npgpt.ops import parallel
from npgpt.precision import Precision

_controller = None


def blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries (built on first use, once: it scans the
    libraries loaded into the process)."""
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller


def usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def choose_threads(setting=None, cpus=None, load=None):
    """(threads, blas, why): the thread count for the row blocks (None: leave them alone), whether
    BLAS gets it too, and a phrase for the log.

    setting: "auto" (as many as cores are free: the usable CPUs minus the 1-minute load average,
    rounded, at least 1; row blocks only, see the module doc), an int (row blocks and BLAS), or
    "off"; None reads $NPGPT_BLAS_THREADS (default auto)."""
    setting = os.environ.get("NPGPT_BLAS_THREADS", "auto") if setting is None else setting
    setting = str(setting).strip().lower()
    if setting == "off":
        return None, False, "NPGPT_BLAS_THREADS=off"
    if setting != "auto":
        try:
            n = int(setting)
        except ValueError:
            n = 0
        if n < 1:
            raise NpgptError(f"NPGPT_BLAS_THREADS must be auto, off or a positive thread count, got {setting!r}")
        return n, True, f"NPGPT_BLAS_THREADS={n}: BLAS and row blocks"
    cpus = usable_cpus() if cpus is None else cpus
    load = os.getloadavg()[0] if load is None else load
    n = max(1, min(cpus, int(cpus - load + 0.5)))
    return n, False, f"row blocks, auto: {cpus} CPUs, load average {load:.2f}; BLAS as it is"


@contextmanager
def shared_cpu_threads(setting=None):
    """Run the block with the thread count choose_threads picks; yields (threads or None, why).
    BLAS's count is process-wide: when it is set here it is restored when the block ends."""
    n, blas, why = choose_threads(setting)
    if n is None:
        yield None, why
        return
    with (blas_controller().limit(limits=n, user_api="blas") if blas else nullcontext()), \
            parallel.limit_threads(n):
        yield n, why


def gemm_peak_gflops(xp=np, n=None, seconds=0.5, precision="fp32"):
    """Best observed GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) over about `seconds`, in
    `precision` (float32 operands; tf32 / fp16 as `npgpt.precision` runs them)."""
    gpu = xp is not np
    n = n or (4096 if gpu else 1024)
    mm = Precision(precision).matmul
    r = np.random.default_rng(0)
    a = xp.asarray(r.standard_normal((n, n)).astype(np.float32))
    b = xp.asarray(r.standard_normal((n, n)).astype(np.float32))
    out = mm(a, b)                    # warm-up (thread pool start, GPU kernel selection)
    synchronize(out)
    best, start, calls = float("inf"), time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        out = mm(a, b)
        synchronize(out)
        best = min(best, time.perf_counter() - t)
        calls += 1
    return 2 * n ** 3 / best / 1e9


def tune_malloc():
    """Ask glibc's malloc to reuse freed memory for large NumPy arrays instead of returning it.

    By default glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on
    free, so each large activation or gradient of a training step (hundreds per step) is
    page-faulted and zeroed by the kernel again: at the shakespeare-char size that was ~15% of
    the step in system time. Raising the mmap and trim thresholds keeps freed blocks in the heap
    for the next step, as PyTorch's caching allocators do. Linux/glibc only; NPGPT_MALLOC_TUNING=0
    leaves malloc alone. Called where training (`npgpt.train.train`) and benchmarks start; it
    changes process-wide malloc settings, so importing npgpt alone never does.
    """
    if not sys.platform.startswith("linux") or os.environ.get("NPGPT_MALLOC_TUNING", "1") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)   # only arrays above 1 GiB get their own mmap
        libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    except (OSError, AttributeError):   # not glibc (e.g. musl): nothing to tune
        pass


def gemv_bandwidth_gbs(xp=np, mbytes=256, seconds=0.5):
    """Best observed memory bandwidth (GB/s) of a float32 matrix-vector product W @ x whose matrix
    (`mbytes` MB, far larger than any cache) is read once per call: the rate at which decoding
    can stream weights here. Measured the way `gemm_peak_gflops` is (best of about `seconds`)."""
    n = 4096
    m = max(1, int(mbytes * 1e6) // (4 * n))
    w = xp.full((m, n), 0.5, dtype=np.float32)     # the values do not matter to the memory system
    x = xp.asarray(np.random.default_rng(0).standard_normal(n, dtype=np.float32))
    out = w @ x                       # warm-up
    synchronize(out)
    best, start, calls = float("inf"), time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        out = w @ x
        synchronize(out)
        best = min(best, time.perf_counter() - t)
        calls += 1
    return w.nbytes / best / 1e9
