"""Data-parallel replicas inside one process: the batch split across threads, on the CPU.

One training step of a small model is a long chain of small matmuls. OpenBLAS spreads each over
every core, and its threads meet at a barrier after every call; between calls the NumPy passes run
on one core. With the batch cut into R slices instead, R threads each run forward and backward of
their own slice with single-threaded BLAS, so every core computes all the time and no barrier is
crossed per matmul. (On a busy machine the barrier is the expensive part: a core taken away from
one BLAS thread stalls the other. Measured on this shared 2-core EPYC, load ~10, baby preset,
batch 12: 666 ms median per step with 2 replicas against 7,450 ms with 2-thread BLAS.)

    x (B, T) ──rows──> replica 0 (the model itself)  -> loss_0 * n_0 / N -> backward -> optimizer.grad
                 └───> replica 1 (a shadow)           -> loss_1 * n_1 / N -> backward -> its own buffer
    optimizer.grad += buffer_1 (+ buffer_2 ...)       in replica order, so every run sums alike

A shadow is a deep copy of the model whose parameters share the model's weight arrays (the
optimizer's flat buffer) but own a gradient buffer, and whose dropout generators are seeded apart
(spawned from the model's) so the slices draw different masks. n_r counts the targets of slice r
that are not ignored, N their sum: the summed gradient is that of the token mean over the whole
batch, exactly what one plain forward and backward of the batch gives (up to float32 summation
order, tested in tests/test_replicas.py).

BLAS threads are set to one inside the threaded section through `threadpoolctl`, which knows every
BLAS NumPy ships, and restored after; the row-parallel passes of `npgpt.ops.parallel` stay on their
calling thread there.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from npgpt.backend import get_xp
from npgpt.ops import parallel

_controller = None


def blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries (built once: it scans the process)."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController   # imported on first use: it inspects the process
        _controller = ThreadpoolController()
    return _controller


def count_targets(y, ignore_index=-1):
    """Targets that count (not ignore_index) in a batch of target ids."""
    return int(get_xp(y).count_nonzero(y != ignore_index))


def loss_weight(local_tokens, global_tokens):
    """n_r / N: a slice's token-mean loss times this, summed over slices, is the batch's token mean
    (0, never NaN, when nothing counts)."""
    return float(local_tokens) / float(global_tokens) if global_tokens > 0 else 0.0


def default_loss(model, x, y):
    return model(x, y)[1]


def shadow_of(model, optimizer, index):
    """A copy of `model` sharing its weight arrays, with its own zeroed flat gradient buffer."""
    memo = {}
    for s in optimizer.slots:
        memo[id(s.param.data)] = s.param.data                 # share the weights ...
        if s.param.grad is not None:
            memo[id(s.param.grad)] = None                     # ... but not the gradients
    shadow = copy.deepcopy(model, memo)
    for original in [v for v in list(memo.values()) if isinstance(v, np.random.Generator)]:
        seq = getattr(original.bit_generator, "seed_seq", None)
        fresh = np.random.default_rng(seq.spawn(1)[0] if seq is not None else index)
        original.bit_generator.state = fresh.bit_generator.state   # (this is the shadow's copy)
    grad = optimizer.xp.zeros_like(optimizer.grad)
    params = dict(shadow.named_parameters())
    pairs = []
    for s in optimizer.slots:
        p = params[s.name]
        pairs.append((s, p))
        p.grad = grad[s.start:s.stop].reshape(s.shape)
    return shadow, grad, pairs


class ThreadReplicas:
    """Run forward and backward of a batch as `n` replicas on `n` threads (see the module doc).

    model: the model the optimizer was built over (replica 0); optimizer: an AdamW (its flat
    buffers hold the weights and receive the summed gradient). Use:

        loss = replicas.forward_backward(x, y, loss_fn, scale=1 / grad_accum)   # per micro-batch

    It adds scale * d(token-mean loss of the batch) to optimizer.grad, as `(loss_fn(model, x, y) *
    scale).backward()` would, and returns that loss as a float.
    """

    def __init__(self, model, optimizer, n=2):
        if optimizer.xp is not np:
            raise ValueError("in-process replicas are a CPU feature (a GPU runs one stream)")
        self.model, self.optimizer, self.n = model, optimizer, max(1, int(n))
        self.shadows = [shadow_of(model, optimizer, k) for k in range(1, self.n)]
        self._pool = ThreadPoolExecutor(self.n - 1, thread_name_prefix="npgpt-replica") if self.n > 1 else None

    def forward_backward(self, x, y, loss_fn=default_loss, scale=1.0, ignore_index=-1):
        opt = self.optimizer
        opt._sync_views()                                     # model params are the flat views again
        B = x.shape[0]
        n = min(self.n, B)
        bounds = [B * k // n for k in range(n + 1)]
        counts = [count_targets(y[lo:hi], ignore_index) for lo, hi in zip(bounds[:-1], bounds[1:])]
        total = sum(counts)
        models = [self.model] + [sh for sh, _, _ in self.shadows[:n - 1]]
        for shadow, _, pairs in self.shadows[:n - 1]:
            shadow.train(self.model.training)
            for s, p in pairs:
                p.data = s.data_view                          # follow the model's weights

        def run(k):
            lo, hi = bounds[k], bounds[k + 1]
            with parallel.single_threaded():
                loss = loss_fn(models[k], x[lo:hi], y[lo:hi])
                (loss * (loss_weight(counts[k], total) * scale)).backward()
            return float(loss.data)

        if n == 1:
            losses = [run(0)]
        else:
            with blas_controller().limit(limits=1, user_api="blas"):
                futures = [self._pool.submit(run, k) for k in range(1, n)]
                losses = [run(0)] + [f.result() for f in futures]
        for shadow, grad, _ in self.shadows[:n - 1]:          # fixed order: reproducible sums
            opt.grad += grad
            grad.fill(0)
        return sum(c * v for c, v in zip(counts, losses)) / total if total else 0.0

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
