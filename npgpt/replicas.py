"""Data-parallel replicas inside one process: the batch split across threads, on the CPU.

One training step of a small model is a long chain of small matmuls. OpenBLAS spreads each over
every core, and its threads meet at a barrier after every call; between calls the NumPy passes run
on one core. With the batch cut into R slices instead, R threads each run forward and backward of
their own slice with single-threaded BLAS, so every core computes all the time and no barrier is
crossed per matmul. (On a busy machine the barrier is the expensive part: a core taken away from
one BLAS thread stalls the other. Measured on this shared 2-core EPYC, load ~10, baby preset,
batch 12: 666 ms median per step with 2 replicas against 7,450 ms with 2-thread BLAS.)

    x (B, T) ──rows──> replica 0 (the model itself)  -> loss_0 * n_0 / N -> backward -> optimizer.grad
                 └───> replica 1 (a shadow)           -> loss_1 * n_1 / N -> backward -> its own grads
    optimizer.grad += shadow grads                    in replica order, so every run sums alike

A shadow is a deep copy of the model whose parameters share the model's weight arrays (the
optimizer's flat buffer) but not its gradients, and whose dropout generator is derived afresh from
the model's at each batch, so the slices draw different masks and a seeded run repeats exactly. n_r counts the targets of slice r
that are not ignored, N their sum: the summed gradient is that of the token mean over the whole
batch, exactly what one plain forward and backward of the batch gives (up to float32 summation
order, tested in tests/test_replicas.py).

BLAS threads are set to one for a `with replicas.threaded():` block through `threadpoolctl` (a
dependency for this: it knows every BLAS that NumPy wheels ship, OpenBLAS, MKL, BLIS, Accelerate,
where ctypes would need a guess per library), and the row-parallel passes of `npgpt.ops.parallel`
stay on their calling thread there. The trainer owns that block (Hooks.step_context, around each
step's micro-batches and gradient reduction), so an error anywhere in the step leaves the block and
restores both; the trainer also closes the replicas (their thread pool) when training ends. The
replicas' threads run in a copy of the caller's context (its precision, grad mode, profiler). `count_targets` and `loss_weight` come from `npgpt.distributed.comm`, so
the threads here and the MPI ranks there weight slices with the same code.
"""

from __future__ import annotations

import contextvars
import copy
from concurrent.futures import wait as wait_all
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from npgpt.distributed.comm import count_targets, loss_weight   # the MPI path's own: both weight alike
from npgpt.ops import parallel
from npgpt.perf import blas_controller
from npgpt.tensor import Tensor


def default_loss(model, x, y):
    return model(x, y)[1]


def shadow_of(model):
    """A copy of `model` whose parameters share the model's weight arrays but not its gradients."""
    memo = {}
    for p in model.parameters():
        memo[id(p.data)] = p.data                             # share the weights ...
        if p.grad is not None:
            memo[id(p.grad)] = None                           # ... but not the gradients
    return copy.deepcopy(model, memo)


class ThreadReplicas:
    """Run forward and backward of each batch as `n` replicas on `n` threads (see the module doc).

    It plugs into the trainer's two seams (`npgpt.train.Hooks`):

        hooks.loss_fn = replicas.loss_fn        # splits the batch, starts the shadows' slices
        hooks.reduce_grads = replicas.reduce    # waits for them, adds their gradients in order
        hooks.step_context = replicas.threaded  # BLAS at one thread per replica, for the step

    loss_fn(model, x, y) starts slices 1..n-1 on the shadows' threads (each backpropagates its
    own token-mean loss times n_r / N times `scale`) and returns the batch's loss for the caller to
    backpropagate (times `scale`): its value is the token mean over the whole batch, its gradient
    flows through slice 0 only, weighted n_0 / N. `scale` is what the caller multiplies the loss by
    before backward (1 / gradient-accumulation steps). Inside `with replicas.threaded():` BLAS runs
    one thread per replica. `forward_backward` is the three in one call (used by `npgpt bench`).
    """

    def __init__(self, model, n=2, scale=1.0, base_loss=default_loss, ignore_index=-1):
        self.model, self.n, self.scale = model, max(1, int(n)), float(scale)
        self.base_loss, self.ignore_index = base_loss, ignore_index
        self.shadows = []            # [(shadow model, [(param, shadow param)])], built on first use
        self._pool = None
        self._pending = []           # futures of the shadows' slices

    def _build(self):
        params = list(self.model.parameters())
        for _ in range(1, self.n):
            shadow = shadow_of(self.model)
            self.shadows.append((shadow, list(zip(params, shadow.parameters()))))
        self._pool = ThreadPoolExecutor(self.n - 1, thread_name_prefix="npgpt-replica")

    def _seed_shadow(self, k, shadow):
        """Dropout: the shadow's modules draw from a generator derived from the model's current one
        (the trainer may set a fresh one per step), so the slices get different masks."""
        for m, sm in zip(self.model.modules(), shadow.modules()):
            if isinstance(getattr(m, "rng", None), np.random.Generator):
                seed = int(m.rng.integers(2**63))
                fresh = np.random.default_rng((seed, k))
                for mm in shadow.modules():
                    if hasattr(mm, "rng"):
                        mm.rng = fresh
                return

    def loss_fn(self, model, x, y):
        if self.n == 1 or x.shape[0] < 2:
            return self.base_loss(model, x, y)
        if not self.shadows:
            self._build()
        self._wait()
        B = x.shape[0]
        n = min(self.n, B)
        bounds = [B * k // n for k in range(n + 1)]
        counts = [count_targets(y[lo:hi], self.ignore_index) for lo, hi in zip(bounds[:-1], bounds[1:])]
        total = sum(counts)

        def run(k, shadow, pairs, forward_done):
            try:
                for p, sp in pairs:
                    sp.data = p.data                          # follow the model's weights
                lo, hi = bounds[k], bounds[k + 1]
                with parallel.single_threaded():
                    loss = self.base_loss(shadow, x[lo:hi], y[lo:hi])
                    forward_done.set_result(counts[k] * float(loss.data))
                    (loss * (loss_weight(counts[k], total) * self.scale)).backward()
            except BaseException as e:
                if not forward_done.done():
                    forward_done.set_exception(e)
                raise

        forwards = []
        for k, (shadow, pairs) in enumerate(self.shadows[:n - 1], start=1):
            shadow.train(model.training)
            self._seed_shadow(k, shadow)
            forwards.append(Future())
            # in a copy of the caller's context: the replica sees the caller's precision, grad mode
            # and profiler, and its own settings stay in its thread
            ctx = contextvars.copy_context()
            self._pending.append(self._pool.submit(ctx.run, run, k, shadow, pairs, forwards[-1]))
        loss0 = self.base_loss(model, x[:bounds[1]], y[:bounds[1]])
        rest = sum(f.result() for f in forwards) / total if total else 0.0
        # value: the whole batch's token mean; gradient: slice 0's, weighted n_0 / N (the shadows'
        # backward runs on while the caller backpropagates this)
        return loss0 * loss_weight(counts[0], total) + Tensor(np.asarray(rest, dtype=loss0.dtype))

    def _wait(self):
        for f in self._pending:
            f.result()
        self._pending = []

    def reduce(self, flat_grad=None, n_tokens=None):
        """After the last micro-batch's backward: add the shadows' gradients into the model's (the
        optimizer's flat buffer), shadow by shadow, parameter by parameter, and zero them."""
        self._wait()
        for shadow, pairs in self.shadows:
            for p, sp in pairs:
                if sp.grad is not None:
                    if p.grad is None:
                        p.grad = sp.grad.copy()
                    else:
                        p.grad += sp.grad
                    sp.grad = None

    @contextmanager
    def threaded(self):
        """For the block: BLAS at one thread (each replica's thread keeps one core busy) and the
        row-parallel passes on their calling thread; both restored on leaving, however it is left."""
        if self.n == 1:
            yield
            return
        with blas_controller().limit(limits=1, user_api="blas"), parallel.single_threaded():
            yield

    def forward_backward(self, x, y):
        """One plain micro-batch: loss_fn, backward, reduce. Returns the batch's loss as a float."""
        with self.threaded():
            loss = self.loss_fn(self.model, x, y)
            (loss * self.scale).backward()
            self.reduce()
        return float(loss.data)

    def close(self):
        """Wait for any slice still running (an error in it was the step's to report) and shut the
        thread pool down."""
        wait_all(self._pending)
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def training_plugin(model, src, cfg, hooks):
    """The trainer's plugin (npgpt.train.Hooks): `replicas = n` in the training config splits each
    micro-batch over n threads. It wraps whatever loss function earlier plugins set and runs before
    any reduce_grads already there (MPI data parallelism sums across processes after the threads
    have summed inside this one). It owns the step's BLAS limit (hooks.step_context) and is closed
    when training ends (hooks.close). CPU and fp32 only; elsewhere it stays out. Distillation runs
    split too: its teacher forward sits under `no_grad()`, a context variable, so it holds in the
    replica thread that entered it and no other replica's graph is lost."""
    n = int(getattr(cfg, "replicas", 1) or 1)
    if n <= 1 or str(getattr(cfg, "device", "cpu")) != "cpu" or getattr(cfg, "precision", "fp32") != "fp32":
        return None
    reps = ThreadReplicas(model, n, scale=1.0 / int(getattr(cfg, "gradient_accumulation_steps", 1) or 1),
                          base_loss=hooks.loss_fn)
    previous = hooks.reduce_grads

    def reduce_grads(flat_grad, n_tokens):
        reps.reduce(flat_grad, n_tokens)
        if previous is not None:
            previous(flat_grad, n_tokens)

    hooks.loss_fn = reps.loss_fn
    hooks.reduce_grads = reduce_grads
    hooks.step_context = reps.threaded
    hooks.close.append(reps.close)
    return reps
