"""Run under `mpiexec -n N python tests/distributed_worker.py CASE OUT.json`: measures one case of the
data-parallel machinery on N real MPI ranks and has rank 0 write the measured figures to OUT.json.
tests/test_distributed.py launches it and judges the figures (the worker asserts nothing itself).
"""

import json
import sys

import numpy as np

from npgpt.distributed.comm import count_targets, get_communicator, global_count, loss_weight, shard_bounds
from npgpt.distributed.zero import ZeroAdamW, reduce_gradients
from npgpt.model import GPT, GPTConfig
from npgpt.optim import AdamW

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def max_diff_to_root(comm, a):
    """max |a - a on rank 0| over all ranks (0.0 means bit-identical everywhere)."""
    root = a.copy()
    comm.broadcast(root, root=0)
    return comm.allreduce_scalars([float(np.abs(a - root).max()) if a.size else 0.0], op="max")[0]


def case_collectives(comm):
    r, n = comm.rank, comm.world_size
    worst = 0.0
    for size in (1, 2, 7, 1000, 100_003):
        base = [np.random.default_rng([size, k]).standard_normal(size).astype(np.float32) for k in range(n)]
        expect = sum(b.astype(np.float64) for b in base)
        buf = base[r].copy()
        comm.allreduce_sum(buf)
        worst = max(worst, float(np.abs(buf - expect).max()))
        buf = base[r].copy()
        comm.reduce_scatter_sum(buf)
        lo, hi = shard_bounds(size, n)[r]
        worst = max(worst, float(np.abs(buf[lo:hi] - expect[lo:hi]).max()) if hi > lo else 0.0)
        buf = np.full(size, np.nan, np.float32)
        buf[lo:hi] = base[0][lo:hi] * (r + 1)                  # each rank fills its own shard
        comm.allgather(buf)
        want = np.concatenate([base[0][a:b] * (k + 1) for k, (a, b) in enumerate(shard_bounds(size, n))])
        worst = max(worst, float(np.abs(buf - want).max()))
        buf = base[r].copy()
        comm.broadcast(buf, root=n - 1)
        worst = max(worst, float(np.abs(buf - base[n - 1]).max()))
    s = comm.allreduce_scalars([r, -r], op="sum")
    m = comm.allreduce_scalars([r], op="max")
    obj = comm.broadcast_object({"from": 0} if r == 0 else None)
    worst = comm.allreduce_scalars([worst], op="max")[0]
    return {"world_size": n, "max_err": worst, "sum": s, "max": m, "object": obj,
            "ranks": comm.allreduce_scalars([1.0])[0]}


def global_batch(n_ranks, B, seed=5):
    """The global batch (N*B, T) and its targets, with rank-dependent numbers of ignored targets."""
    g = np.random.default_rng(seed)
    x = g.integers(0, TINY.vocab_size, (n_ranks * B, TINY.block_size))
    y = g.integers(0, TINY.vocab_size, (n_ranks * B, TINY.block_size))
    for k in range(n_ranks):                   # rank k's rows: ignore the first 3*k+1 targets of each row
        y[k * B:(k + 1) * B, :3 * k + 1] = -1
    return x, y


def case_grads(comm):
    """Reduced gradients on N ranks vs the one-process gradient of the concatenated batch."""
    r, n, B = comm.rank, comm.world_size, 2
    x, y = global_batch(n, B)
    model = GPT(TINY, seed=3)
    opt = AdamW(model.named_parameters(), lr=1e-3)
    xr, yr = x[r * B:(r + 1) * B], y[r * B:(r + 1) * B]
    n_local = count_targets(yr)
    n_global = global_count(comm, n_local)
    opt.zero_grad()
    _, loss = model(xr, yr)
    (loss * loss_weight(n_local, n_global)).backward()
    reduce_gradients(comm, opt)
    ref_model = GPT(TINY, seed=3)
    ref = AdamW(ref_model.named_parameters(), lr=1e-3)
    ref.zero_grad()
    _, ref_loss = ref_model(x, y)
    ref_loss.backward()
    rel = float(np.abs(opt.grad - ref.grad).max() / np.abs(ref.grad).max())
    # the mean of per-rank means, for contrast: with unequal counts it is a different gradient
    share = (float(loss.data) * n_local / n_global)
    return {"rel_err": comm.allreduce_scalars([rel], op="max")[0], "n_global": n_global,
            "counts": [int(c) for c in comm.allreduce_scalars([n_local if k == r else 0 for k in range(n)])],
            "loss": comm.allreduce_scalars([share])[0], "ref_loss": float(ref_loss.data),
            "grads_differ_across_ranks": max_diff_to_root(comm, opt.grad)}


def run_steps(comm, zero, steps, B, sharded_batch=True, world=None):
    """`steps` AdamW steps of the tiny model; rank r takes its B rows of each global batch."""
    world = world or comm.world_size
    model = GPT(TINY, seed=3)
    kw = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt = ZeroAdamW(model.named_parameters(), comm, **kw) if zero else AdamW(model.named_parameters(), **kw)
    for k in range(steps):
        x, y = global_batch(world, B, seed=100 + k)
        if sharded_batch:
            x, y = x[comm.rank * B:(comm.rank + 1) * B], y[comm.rank * B:(comm.rank + 1) * B]
        n_local = count_targets(y)
        n_global = global_count(comm, n_local) if sharded_batch else n_local
        opt.zero_grad()
        _, loss = model(x, y)
        (loss * loss_weight(n_local, n_global)).backward()
        if sharded_batch:
            reduce_gradients(comm, opt)
        opt.clip_grad_norm(0.5)
        opt.step()
    return model, opt


def case_steps(comm):
    """K steps: N ranks x B (plain all-reduce and ZeRO-1) vs one process with batch N*B."""
    from npgpt.distributed.comm import SingleProcess
    K, B = 4, 2
    _, plain = run_steps(comm, False, K, B)
    _, zero = run_steps(comm, True, K, B)
    _, one = run_steps(SingleProcess(), False, K, B, sharded_batch=False, world=comm.world_size)
    state_zero, _ = zero.state_dict()                      # collective: gathered full moments
    state_one, _ = one.state_dict()
    moment_err = max(float(np.abs(state_zero[k] - state_one[k]).max()) for k in state_one)
    return {
        "plain_vs_one": comm.allreduce_scalars([float(np.abs(plain.flat - one.flat).max())], op="max")[0],
        "zero_vs_plain": comm.allreduce_scalars([float(np.abs(zero.flat - plain.flat).max())], op="max")[0],
        "zero_moments_vs_one": comm.allreduce_scalars([moment_err], op="max")[0],
        "plain_ranks_differ": max_diff_to_root(comm, plain.flat),
        "zero_ranks_differ": max_diff_to_root(comm, zero.flat),
        "zero_bytes": comm.allreduce_scalars([zero.optimizer_bytes()], op="max")[0],
        "full_bytes": float(one.exp_avg.nbytes + one.exp_avg_sq.nbytes),
        "steps": zero.t,
    }


def case_peer_vanishes(comm, how):
    """Rank 1 leaves (SIGKILL, or a normal exit that skips a collective); the others wait in an
    all-reduce that can never complete. Something must end the job: the launcher, or the watchdog."""
    import os
    import signal
    buf = np.ones(1000, np.float32)
    comm.allreduce_sum(buf)                                  # everyone is up
    if comm.rank == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(0)                                          # leaves without joining the next collective
    comm.allreduce_sum(buf)                                  # hangs without a watchdog
    return {"unreachable": True}


CASES = {"kill": lambda c: case_peer_vanishes(c, "kill"), "leave": lambda c: case_peer_vanishes(c, "leave"),
"collectives": case_collectives, "grads": case_grads, "steps": case_steps}

# ---- the trainer on N ranks (tests/test_distributed_train.py) -----------------------------------------
class GlobalBatches:
    """A batch source whose training batch of step `it` is one fixed global batch of G rows, cut by
    rank: rank r of N (batch B) gets rows r*B..(r+1)*B, one process with batch G gets them all.
    The step and rank come from the generator the trainer passes (seeded [seed, it, 0(, rank)]).
    Targets of row i ignore their first i % 5 positions, so ranks count different targets."""

    def __init__(self, data, global_rows):
        self.data, self.G = data, global_rows

    def __getattr__(self, name):
        return getattr(self.data, name)

    def get_batch(self, split, batch_size, block_size, rng, device=None):
        entropy = list(rng.bit_generator.seed_seq.entropy)
        seed, it, stream = entropy[:3]
        if stream != 0:                                            # evaluation: as the data does it
            return self.data.get_batch(split, batch_size, block_size, rng, device=device)
        rank = entropy[3] if len(entropy) > 3 else 0
        x, y = self.data.get_batch("train", self.G, block_size, np.random.default_rng([seed, it, 12345]))
        y = y.copy()
        for i in range(self.G):
            y[i, :i % 5] = -1
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        return x[rows], y[rows]


COMM = None    # this worker's communicator, passed to train() explicitly (as `mpiexec -n N npgpt train` does)


def train_tiny(data_dir, out, batch_size, source_rows=None, comm="job", **over):
    from npgpt.data import TokenData
    from npgpt.train import TrainConfig, train
    cfg = TrainConfig(data=str(data_dir), out=str(out), n_layer=1, n_head=2, n_embd=16, block_size=16,
                      batch_size=batch_size, max_iters=over.pop("max_iters", 6), eval_interval=3, eval_iters=4,
                      log_interval=2, warmup_iters=2, quiet=True, force=True, **over)
    seen = {}

    def keep_model(model, src, cfg, hooks):
        seen["model"] = model
    source = GlobalBatches(TokenData(data_dir), source_rows) if source_rows else None
    result = train(cfg, batch_source=source, plugins=[keep_model], comm=COMM if comm == "job" else comm)
    flat = np.concatenate([p.data.reshape(-1) for _, p in seen["model"].named_parameters()])
    return result, flat


def case_train_equiv(comm, data_dir, tmp):
    """N ranks x B with count weighting vs one process x N*B on the same sequences (trainer level)."""
    from pathlib import Path

    from npgpt.distributed.comm import SingleProcess
    n, B = comm.world_size, 2
    tmp = Path(tmp)
    res, flat = train_tiny(data_dir, tmp / f"dp{n}", B, source_rows=n * B)
    res_z, flat_z = train_tiny(data_dir, tmp / f"dp{n}-zero", B, source_rows=n * B, zero_stage=1)
    out = {"ranks_differ": max_diff_to_root(comm, flat), "zero_ranks_differ": max_diff_to_root(comm, flat_z),
           "zero_vs_plain": comm.allreduce_scalars([float(np.abs(flat_z - flat).max())], op="max")[0],
           "history": res.history, "iters": res.iters}
    if comm.rank == 0:
        res1, flat1 = train_tiny(data_dir, tmp / "one", n * B, source_rows=n * B, comm=SingleProcess())
        # the same eval batches (batch B) on the same initial weights, in one process
        res_b, _ = train_tiny(data_dir, tmp / "one-b", B, source_rows=n * B, max_iters=1, comm=SingleProcess())
        out.update(one_vs_ranks=float(np.abs(flat1 - flat).max()), eval0_one=res_b.history[0])
    return out


CASES["train_equiv"] = lambda c: case_train_equiv(c, sys.argv[3], sys.argv[4])


def case_muon_equiv(comm, data_dir, tmp):
    """Muon: N ranks x B (one all-reduce of the flat gradients) vs one process x N*B, same sequences."""
    from pathlib import Path

    from npgpt.distributed.comm import SingleProcess
    n, B = comm.world_size, 2
    tmp = Path(tmp)
    res, flat = train_tiny(data_dir, tmp / f"muon{n}", B, source_rows=n * B, optimizer="muon", learning_rate=1e-2)
    _, flat_z = train_tiny(data_dir, tmp / f"muon{n}-zero", B, source_rows=n * B, optimizer="muon",
                           learning_rate=1e-2, zero_stage=1)
    out = {"ranks_differ": max_diff_to_root(comm, flat), "history": res.history, "iters": res.iters,
           "zero_ranks_differ": max_diff_to_root(comm, flat_z),
           "zero_vs_plain": comm.allreduce_scalars([float(np.abs(flat_z - flat).max())], op="max")[0]}
    if comm.rank == 0:
        _, flat1 = train_tiny(data_dir, tmp / "muon-one", n * B, source_rows=n * B, optimizer="muon",
                              learning_rate=1e-2, comm=SingleProcess())
        out.update(one_vs_ranks=float(np.abs(flat1 - flat).max()), moved=float(np.abs(flat1).max()))
    return out


CASES["muon_equiv"] = lambda c: case_muon_equiv(c, sys.argv[3], sys.argv[4])


if __name__ == "__main__":
    case, out = sys.argv[1], sys.argv[2]
    comm = COMM = get_communicator("cpu")   # what `mpiexec -n N npgpt ...` hands the commands (launcher.run_cli)
    result = CASES[case](comm)
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
