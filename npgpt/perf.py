"""Speed yardsticks shared by `npgpt train` (MFU in the progress line) and `npgpt bench`.

MFU (model FLOPs utilisation) = achieved FLOP/s / peak FLOP/s. The peak is not a datasheet
number: it is measured in-process as the best fp32 GEMM rate this backend reaches on this
machine, so an MFU near 100% means "as fast as BLAS can go here".
"""

from __future__ import annotations

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
