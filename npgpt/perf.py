"""Speed yardsticks and settings shared by `npgpt train` (MFU in the progress line) and `npgpt bench`:
the measured GEMM peak, and the glibc allocator tuning both call when they start.

MFU (model FLOPs utilisation) = achieved FLOP/s / peak FLOP/s. The peak is not a datasheet
number: it is measured in-process as the best fp32 GEMM rate this backend reaches on this
machine, so an MFU near 100% means "as fast as BLAS can go here".
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import numpy as np

from npgpt.backend import synchronize


def gemm_peak_gflops(xp=np, n=1024, seconds=0.5, dtype=np.float32):
    """Best observed GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) over about `seconds`."""
    r = np.random.default_rng(0)
    a = xp.asarray(r.standard_normal((n, n)).astype(dtype))
    b = xp.asarray(r.standard_normal((n, n)).astype(dtype))
    out = xp.empty((n, n), dtype=dtype)
    xp.matmul(a, b, out=out)          # warm-up (thread pool start, GPU kernel selection)
    synchronize(out)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        xp.matmul(a, b, out=out)
        synchronize(out)
        best = min(best, time.perf_counter() - t)
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
