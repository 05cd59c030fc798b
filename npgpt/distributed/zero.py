"""ZeRO stage 1 (Rajbhandari et al. 2020): AdamW whose moments are sharded over the ranks, and the
one gradient reduction every data-parallel step calls.

The flat buffers are cut into N contiguous shards (`shard_bounds`); a step reduce-scatters the
gradients (rank r receives the sum of shard r only), clips with the global norm (an all-reduce of N
partial sums of squares), updates its shard of the weights with its shard of the moments, and
all-gathers the weights. The same bytes move as in one all-reduce (reduce-scatter + all-gather IS a
ring all-reduce) and each rank keeps 1/N of the Adam moments. Checkpoints gather the moments, so
they hold the full state and resume on any N.

Muon's matrices cannot be cut at arbitrary element boundaries: Newton-Schulz needs a whole matrix.
`ZeroMuon` therefore gives each rank whole matrices (`assign_whole_tensors`: largest first, to the
least-loaded rank) and an element range of the AdamW part; the gradients are all-reduced (every
owner sees its whole matrices' gradients), each rank updates what it owns, and one all-reduce of a
buffer in which each rank wrote only its own values (x + 0 + ... = x, exactly) gives every rank
the same new weights, bit for bit what one process computes.
"""

from __future__ import annotations

import numpy as np

from npgpt.distributed.comm import Communicator
from npgpt.errors import NpgptError
from npgpt.optim import AdamW, Muon


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


def assign_whole_tensors(sizes, world_size) -> list[int]:
    """The rank owning each tensor, balancing total sizes: largest first, to the least-loaded rank
    (ties: the lower rank), so every rank computes the same assignment."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


class ZeroMuon(Muon):
    """Muon + AdamW with their state sharded over the ranks (ZeRO-1, whole matrices; see the module doc).

    This rank keeps the momentum of the Muon matrices it owns and AdamW's moments for its range
    of the AdamW part. state_dict / load_state_dict are collective and use Muon's format (the full
    state), so checkpoints move between ZeroMuon on any N and plain Muon.
    """

    def __init__(self, named_params, comm: Communicator, **kwargs):
        self.comm = comm                                          # _moments (called by AdamW) reads it
        super().__init__(named_params, **kwargs)
        owner = assign_whole_tensors([s.stop - s.start for s in self.muon_slots], comm.world_size)
        self.owned = [s for s, r in zip(self.muon_slots, owner) if r == comm.rank]
        self._offsets, off = {}, 0
        for s in self.owned:
            self._offsets[s.name] = off
            off += s.stop - s.start
        self.momentum = self.xp.zeros(off, dtype=self.dtype)      # (owned,) this rank's matrices only

    def _moments(self, n):
        """AdamW's moments for this rank's range [alo, ahi) of the AdamW part (flat[n_muon:]) only."""
        self.alo, self.ahi = self.comm.shard(n - self.n_muon)
        return AdamW._moments(self, self.ahi - self.alo)

    def optimizer_bytes(self) -> int:
        return int(self.momentum.nbytes + self.exp_avg.nbytes + self.exp_avg_sq.nbytes)

    def describe(self) -> str:
        return (super().describe() + f"; ZeRO-1 over {self.comm.world_size} ranks by whole matrices: this rank "
                f"owns {len(self.owned)} of {len(self.muon_slots)} Muon matrices and {self.ahi - self.alo:,} "
                f"AdamW values ({self.optimizer_bytes() / 2**20:.2f} MiB of state)")

    def _momentum_of(self, s):
        """Owned matrices only: their momentum lives packed in this rank's buffer."""
        off = self._offsets[s.name]
        return self.momentum[off:off + s.stop - s.start].reshape(s.shape)

    def step(self, lr=None):
        """Update the matrices and the AdamW range this rank owns, then share the new weights."""
        lr = self.lr if lr is None else float(lr)
        flat, grad = self.flat, self.grad                      # reading the buffers checks the views
        self._step_muon(self.owned, lr)
        self.t += 1
        lo, hi = self.n_muon + self.alo, self.n_muon + self.ahi
        if hi > lo:
            n_decay = min(max(self.n_decay - lo, 0), hi - lo)
            self._update(flat[lo:hi], grad[lo:hi], self.exp_avg, self.exp_avg_sq, n_decay, lr)
        mine = self.xp.zeros(flat.size, dtype=self.dtype)
        for s in self.owned:
            mine[s.start:s.stop] = flat[s.start:s.stop]
        mine[lo:hi] = flat[lo:hi]
        self.comm.allreduce_sum(mine)                           # each value written by one rank alone
        flat[...] = mine

    def _full(self, n, pieces):
        """Collective: a (n,) buffer in which each rank wrote its pieces [(start, values)], summed."""
        full = self.xp.zeros(n, dtype=self.dtype)
        for start, values in pieces:
            full[start:start + values.size] = values.reshape(-1)
        self.comm.allreduce_sum(full)
        return full

    def state_dict(self):
        """Collective: the full state in Muon's format."""
        saved = self.momentum, self.exp_avg, self.exp_avg_sq
        self.momentum = self._full(self.n_muon, [(s.start, self._momentum_of(s)) for s in self.owned])
        n_adam = self.flat.size - self.n_muon
        self.exp_avg = self._full(n_adam, [(self.alo, saved[1])])
        self.exp_avg_sq = self._full(n_adam, [(self.alo, saved[2])])
        try:
            return Muon.state_dict(self)                        # reads the full buffers by position
        finally:
            self.momentum, self.exp_avg, self.exp_avg_sq = saved

    def load_state_dict(self, tensors, meta):
        """Restore from a full Muon state (any number of ranks wrote it); keep what this rank owns."""
        owned_momentum = self.momentum
        n_adam = self.flat.size - self.n_muon
        self.momentum = self.xp.zeros(self.n_muon, self.dtype)
        self.exp_avg, self.exp_avg_sq = self.xp.zeros(n_adam, self.dtype), self.xp.zeros(n_adam, self.dtype)
        try:
            Muon.load_state_dict(self, tensors, meta)
        finally:
            full, self.momentum = self.momentum, owned_momentum
            for s in self.owned:
                self._momentum_of(s)[...] = full[s.start:s.stop].reshape(s.shape)
            self.exp_avg = self.exp_avg[self.alo:self.ahi].copy()
            self.exp_avg_sq = self.exp_avg_sq[self.alo:self.ahi].copy()


def make_muon(named_params, comm: Communicator, zero_stage: int = 0, **kwargs) -> Muon:
    """Muon (+ AdamW for the rest), or ZeroMuon for zero_stage=1."""
    if zero_stage not in (0, 1):
        raise NpgptError(f"zero_stage must be 0 or 1, got {zero_stage}")
    return ZeroMuon(named_params, comm, **kwargs) if zero_stage == 1 else Muon(named_params, **kwargs)


def make_optimizer(named_params, comm: Communicator, zero_stage: int = 0, **kwargs) -> AdamW:
    """AdamW, or ZeroAdamW for zero_stage=1 on more than one rank."""
    if zero_stage not in (0, 1):
        raise NpgptError(f"zero_stage must be 0 or 1, got {zero_stage}")
    if zero_stage == 1:
        return ZeroAdamW(named_params, comm, **kwargs)
    return AdamW(named_params, **kwargs)
