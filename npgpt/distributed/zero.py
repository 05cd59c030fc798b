"""ZeRO stage 1 (Rajbhandari et al. 2020): AdamW whose moments are sharded over the ranks, and the
one gradient reduction every data-parallel step calls.

The flat buffers are cut into N contiguous shards (`shard_bounds`); a step reduce-scatters the
gradients (rank r receives the sum of shard r only), clips with the global norm (an all-reduce of N
partial sums of squares), updates its shard of the weights with its shard of the moments, and
all-gathers the weights. The same bytes move as in one all-reduce (reduce-scatter + all-gather IS a
ring all-reduce) and each rank keeps 1/N of the Adam moments. Checkpoints gather the moments, so
they hold the full state and resume on any N.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from npgpt.distributed.comm import Communicator
from npgpt.errors import NpgptError
from npgpt.optim import AdamW


def reduce_gradients(comm: Communicator, optimizer):
    """Sum the flat gradient buffers of all ranks in place (each already weighted by loss_weight).

    ZeroAdamW reduce-scatters instead (it needs only its shard). Call once per optimizer step,
    after the last micro-batch's backward and before clipping."""
    if comm.world_size == 1:
        return
    if isinstance(optimizer, ZeroAdamW):
        optimizer.reduce_scatter_grads()
    else:
        comm.allreduce_sum(optimizer.grad)


class ZeroAdamW(AdamW):
    """AdamW whose moments are sharded over the ranks (ZeRO stage 1); see the module doc.

    The full parameters and gradients stay on every rank (forward and backward need them); this
    rank owns flat[lo:hi] and keeps exp_avg / exp_avg_sq for that slice only, so the optimizer
    state per rank is 2 * ceil(n / N) values instead of 2n. The update arithmetic is AdamW's own,
    applied to the shard; weights are identical on every rank after the all-gather.

    state_dict / load_state_dict are collective (every rank must call them): the checkpoint holds
    the full moments, in exactly AdamW's format.
    """

    def __init__(self, named_params, comm: Communicator, **kwargs):
        super().__init__(named_params, **kwargs)
        self.comm = comm
        n = self.flat.size
        self.lo, self.hi = comm.shard(n)
        xp, k = self.xp, self.hi - self.lo
        # Replace the full moments with this rank's shard (the full ones are freed here).
        self.exp_avg = xp.zeros(k, dtype=self.dtype)
        self.exp_avg_sq = xp.zeros(k, dtype=self.dtype)
        self._scratch = xp.empty(k, dtype=self.dtype)
        self._grads_reduced = False

    def optimizer_bytes(self) -> int:
        """Bytes of optimizer state (the two moments) this rank holds."""
        return int(self.exp_avg.nbytes + self.exp_avg_sq.nbytes)

    def describe(self) -> str:
        n = self.flat.size
        return (super().describe() + f"; ZeRO-1 over {self.comm.world_size} ranks: this rank holds "
                f"{self.hi - self.lo:,} of {n:,} moment values ({self.optimizer_bytes() / 2**20:.2f} MiB)")

    def reduce_scatter_grads(self):
        """grad[lo:hi] <- the sum over ranks of grad[lo:hi] (the rest of grad is stale after this)."""
        self._sync_views()
        self.comm.reduce_scatter_sum(self.grad)
        self._grads_reduced = True

    def grad_norm(self):
        """The global L2 norm: this shard's sum of squares, all-reduced (ranks agree bit for bit)."""
        self._sync_views()
        g = self.grad[self.lo:self.hi]
        local = float(self.xp.dot(g, g)) if g.size else 0.0
        return self.xp.asarray(np.sqrt(self.comm.allreduce_scalars([local])[0]), dtype=self.dtype)

    def clip_grad_norm(self, max_norm: float):
        norm = self.grad_norm()
        if max_norm is not None and max_norm > 0 and float(norm) > max_norm:
            self.grad[self.lo:self.hi] *= max_norm / (float(norm) + 1e-6)
        return norm

    @contextmanager
    def _on_shard(self):
        """Make AdamW's update see only this rank's slice of the flat buffers."""
        saved = self.flat, self.grad, self.n_decay, self._sync_views
        self.flat, self.grad = saved[0][self.lo:self.hi], saved[1][self.lo:self.hi]
        self.n_decay = min(max(saved[2] - self.lo, 0), self.hi - self.lo)
        self._sync_views = lambda: None
        try:
            yield
        finally:
            self.flat, self.grad, self.n_decay = saved[:3]
            del self._sync_views                            # back to the class's method

    def step(self, lr=None):
        """Update this rank's shard (AdamW's arithmetic), then all-gather the weights."""
        self._sync_views()
        if not self._grads_reduced and self.comm.world_size > 1:
            raise RuntimeError("ZeroAdamW.step before reduce_scatter_grads: the gradients are not summed")
        if self.hi > self.lo:
            with self._on_shard():
                AdamW.step(self, lr)
        else:
            self.t += 1                                     # an empty shard still counts the step
        self.comm.allgather(self.flat)
        self._grads_reduced = False

    def _full(self, shard):
        full = self.xp.zeros(self.flat.size, dtype=self.dtype)
        full[self.lo:self.hi] = shard
        return self.comm.allgather(full)

    def state_dict(self):
        """Collective: the full moments (gathered from every rank) in AdamW's format."""
        saved = self.exp_avg, self.exp_avg_sq
        self.exp_avg, self.exp_avg_sq = self._full(saved[0]), self._full(saved[1])
        try:
            return AdamW.state_dict(self)
        finally:
            self.exp_avg, self.exp_avg_sq = saved

    def load_state_dict(self, tensors, meta):
        """Restore from a full AdamW state (any number of ranks wrote it); keep this rank's shard."""
        n = self.flat.size
        self.exp_avg, self.exp_avg_sq = self.xp.zeros(n, self.dtype), self.xp.zeros(n, self.dtype)
        try:
            AdamW.load_state_dict(self, tensors, meta)
        finally:
            self.exp_avg = self.exp_avg[self.lo:self.hi].copy()
            self.exp_avg_sq = self.exp_avg_sq[self.lo:self.hi].copy()


def make_optimizer(named_params, comm: Communicator, zero_stage: int = 0, **kwargs) -> AdamW:
    """AdamW, or ZeroAdamW for zero_stage=1 on more than one rank."""
    if zero_stage not in (0, 1):
        raise NpgptError(f"zero_stage must be 0 or 1, got {zero_stage}")
    if zero_stage == 1:
        return ZeroAdamW(named_params, comm, **kwargs)
    return AdamW(named_params, **kwargs)
