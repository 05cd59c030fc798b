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
    state per rank is 2 * ceil(n / N) values instead of 2n. The update is AdamW's own
    (`npgpt.optim.adamw_update`, or its GPU kernel) called on the shard; weights are identical on
    every rank after the all-gather.

    state_dict / load_state_dict are collective (every rank must call them): the checkpoint holds
    the full moments, in exactly AdamW's format.
    """

    def __init__(self, named_params, comm: Communicator, **kwargs):
        self.comm = comm
        self._grads_reduced = False
        super().__init__(named_params, **kwargs)

    def _moments(self, n):
        """Only this rank's shard of the moments (and of the scratch buffer, sized from them)."""
        self.lo, self.hi = self.comm.shard(n)
        return super()._moments(self.hi - self.lo)

    def optimizer_bytes(self) -> int:
        """Bytes of optimizer state (the two moments) this rank holds."""
        return int(self.exp_avg.nbytes + self.exp_avg_sq.nbytes)

    def describe(self) -> str:
        n = self.flat.size
        return (super().describe() + f"; ZeRO-1 over {self.comm.world_size} ranks: this rank holds "
                f"{self.hi - self.lo:,} of {n:,} moment values ({self.optimizer_bytes() / 2**20:.2f} MiB)")

    def reduce_scatter_grads(self):
        """grad[lo:hi] <- the sum over ranks of grad[lo:hi] (the rest of grad is stale after this)."""
        self.comm.reduce_scatter_sum(self.grad)
        self._grads_reduced = True

    def grad_norm(self):
        """The global L2 norm: this shard's sum of squares, all-reduced (ranks agree bit for bit)."""
        g = self.grad[self.lo:self.hi]
        local = float(self.xp.dot(g, g)) if g.size else 0.0
        return self.xp.asarray(np.sqrt(self.comm.allreduce_scalars([local])[0]), dtype=self.dtype)

    def clip_grad_norm(self, max_norm: float):
        norm = self.grad_norm()
        if max_norm is not None and max_norm > 0 and float(norm) > max_norm:
            self.grad[self.lo:self.hi] *= max_norm / (float(norm) + 1e-6)
        return norm

    def step(self, lr=None):
        """Update this rank's shard (AdamW's update on flat[lo:hi]), then all-gather the weights."""
        if not self._grads_reduced and self.comm.world_size > 1:
            raise RuntimeError("ZeroAdamW.step before reduce_scatter_grads: the gradients are not summed")
        self.t += 1                                         # an empty shard still counts the step
        flat, lo, hi = self.flat, self.lo, self.hi
        if hi > lo:
            n_decay = min(max(self.n_decay - lo, 0), hi - lo)   # the decayed part of the shard
            self._update(flat[lo:hi], self.grad[lo:hi], self.exp_avg, self.exp_avg_sq, n_decay, lr)
        self.comm.allgather(flat)
        self._grads_reduced = False

    def _full(self, shard):
        full = self.xp.zeros(self.flat.size, dtype=self.dtype)
        full[self.lo:self.hi] = shard
        return self.comm.allgather(full)

    def state_dict(self):
        """Collective: the full moments (gathered from every rank) in AdamW's format."""
        return self._state(self._full(self.exp_avg), self._full(self.exp_avg_sq))

    def load_state_dict(self, tensors, meta):
        """Restore from a full AdamW state (any number of ranks wrote it); keep this rank's shard."""
        m, v, self.t = self._read_state(tensors, meta)
        self.exp_avg[...] = self.xp.asarray(m[self.lo:self.hi])
        self.exp_avg_sq[...] = self.xp.asarray(v[self.lo:self.hi])


def make_optimizer(named_params, comm: Communicator, zero_stage: int = 0, **kwargs) -> AdamW:
    """AdamW, or ZeroAdamW for zero_stage=1 on more than one rank."""
    if zero_stage not in (0, 1):
        raise NpgptError(f"zero_stage must be 0 or 1, got {zero_stage}")
    if zero_stage == 1:
        return ZeroAdamW(named_params, comm, **kwargs)
    return AdamW(named_params, **kwargs)
