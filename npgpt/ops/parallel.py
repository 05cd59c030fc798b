"""Row-parallel elementwise work on the CPU: split an op's rows across cores.

BLAS already spreads each matmul over every core, but NumPy's elementwise ufuncs (the passes of
LayerNorm, GELU and the attention softmax) run on one core, so between matmuls the other cores
idle. The ufuncs release the GIL, so a small thread pool can run the same kernel on disjoint row
blocks at once. Blocks are also kept small enough (about `BLOCK_ELEMS` values) that a kernel's
temporaries stay in the L2 cache: a pass over a block then runs at cache speed instead of
streaming a 100 MB activation through memory once per pass.

A kernel is a function of a row slice, `kernel(rows)`, that reads its inputs' rows and writes
the same rows of preallocated outputs, so blocks never touch the same memory. On CuPy arrays
(one GPU kernel per ufunc already uses the whole device) and for small arrays, `for_row_blocks`
just calls `kernel(slice(0, n_rows))` on the calling thread.

`NPGPT_THREADS` sets the number of threads (default: the CPUs this process may run on, at most 8);
`NPGPT_THREADS=1` turns the splitting off, and so does `with single_threaded():` for the calling
thread alone (a context variable: the in-process replicas of `npgpt.replicas` already keep every core
busy); `with limit_threads(n):` caps the count (`npgpt.perf.shared_cpu_threads`, on a busy machine).
The blocks are cut by size alone, never by the thread count, so threads change no number: a kernel
returning partial sums sees the same blocks however many threads run them. The pool's threads run
each block in a copy of the caller's context, so a kernel sees the caller's precision and grad mode.
"""

from __future__ import annotations

import contextvars
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BLOCK_ELEMS = 1 << 17          # ~1 MB of float32 per block and temporary: fits the L2 cache
# Below this, threads cost more than they save: every ufunc call hands the GIL back and forth, and
# BLAS's own workers still spin on the other cores for a while after each matmul (measured on a
# 2-core Xeon: no gain at the baby preset's 0.4M-element GELU, ~30% at shakespeare-char's 6M).
MIN_PARALLEL_ELEMS = 1 << 20

_pool = None
SINGLE = contextvars.ContextVar("npgpt_single_threaded", default=False)   # run row blocks on this thread
LIMIT = contextvars.ContextVar("npgpt_thread_limit", default=None)         # at most this many threads


class single_threaded:
    """Context manager: for_row_blocks in this context runs every block on the calling thread."""

    def __enter__(self):
        self._token = SINGLE.set(True)

    def __exit__(self, *exc):
        SINGLE.reset(self._token)


class limit_threads:
    """Context manager: for_row_blocks in this context uses at most n threads."""

    def __init__(self, n):
        self.n = max(1, int(n))

    def __enter__(self):
        self._token = LIMIT.set(self.n)

    def __exit__(self, *exc):
        LIMIT.reset(self._token)


def num_threads():
    """Threads for_row_blocks may use on the calling thread."""
    if SINGLE.get():
        return 1
    limit = LIMIT.get()
    return _configured_threads() if limit is None else min(limit, _configured_threads())


def _configured_threads():
    env = os.environ.get("NPGPT_THREADS")
    if env:
        return max(1, int(env))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _get_pool():
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_configured_threads() - 1, thread_name_prefix="npgpt-rows")
    return _pool


def for_row_blocks(n_rows, row_elems, kernel, xp=np, threaded=True, min_parallel=None):
    """Run kernel(rows) over slices covering range(n_rows); returns the list of kernel results
    in row order (for partial sums). row_elems: values per row, to size the blocks.

    threaded=False keeps the cache-sized blocks but runs them one after another on the calling
    thread (for kernels whose matmuls BLAS already spreads over the cores). min_parallel: the
    size from which threads are used (lower it for work that does not follow a matmul; None: the
    module's MIN_PARALLEL_ELEMS, read at call time so a test or a tuning script can change it)."""
    if min_parallel is None:
        min_parallel = MIN_PARALLEL_ELEMS
    total = n_rows * row_elems
    if xp is not np or n_rows < 2 or total < 2 * BLOCK_ELEMS:   # small: it fits the cache as it is
        return [kernel(slice(0, n_rows))]
    # Cache-sized blocks, cut by size alone: the same blocks (and partial sums) at any thread count.
    n_blocks = min(max(2, -(-total // BLOCK_ELEMS)), n_rows)
    threads = min(num_threads(), n_blocks) if threaded and total >= min_parallel else 1
    bounds = [n_rows * i // n_blocks for i in range(n_blocks + 1)]
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    # Deal the blocks out in `threads` contiguous groups; the calling thread runs the last group
    # itself instead of waiting idle.
    groups = [slices[len(slices) * t // threads: len(slices) * (t + 1) // threads] for t in range(threads)]

    def run(group):
        return [kernel(s) for s in group]

    if threads == 1:
        return run(slices)
    pool = _get_pool()
    futures = [pool.submit(contextvars.copy_context().run, run, g) for g in groups[:-1]]
    mine = run(groups[-1])
    out = []
    for f in futures:
        out.extend(f.result())
    return out + mine
