"""The device check of the NCCL path (npgpt.distributed.comm.NCCLComm): run it where a GPU is lent.

    python examples/nccl_check.py                 # one GPU: a 1-rank NCCL communicator
    mpiexec -n 2 python examples/nccl_check.py    # two GPUs on one machine: real NCCL sums

It checks, on CuPy arrays: all-reduce, reduce-scatter, all-gather and broadcast against NumPy
sums of every rank's data (each rank builds all ranks' inputs from fixed seeds), then ten ZeRO-1
AdamW steps of a tiny GPT on the GPU over NCCL against the same steps with plain AdamW on the
CPU in one process (same global batch). Prints one line per check and exits 1 on any failure.
Without CuPy or a GPU it says so and exits 0 (nothing to check).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


# --help prints this page; the check takes no options (it writes nothing)
argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()


def main():
    from npgpt.backend import gpu_available
    from npgpt.distributed.comm import SingleProcess, for_device, get_communicator, loss_weight, shard_bounds
    from npgpt.distributed.zero import ZeroAdamW, reduce_gradients
    if not gpu_available():
        print("no usable GPU (CuPy missing or no device): nothing to check")
        return 0
    import cupy as cp
    base = get_communicator("cpu")                       # MPI under mpiexec, else one process
    comm, device = for_device(base, "gpu", force_nccl=True)
    r, n = comm.rank, comm.world_size
    failures = 0

    def check(name, err, tol):
        nonlocal failures
        ok = err <= tol
        failures += not ok
        if r == 0:
            print(f"{'PASS' if ok else 'FAIL'} {name}: max error {err:.3g} (tolerance {tol:g}) on {n} rank(s), "
                  f"backend {comm.backend}, {device}", flush=True)

    for size in (1, 7, 1000, 1_000_003):
        data = [np.random.default_rng([size, k]).standard_normal(size).astype(np.float32) for k in range(n)]
        total = sum(d.astype(np.float64) for d in data)
        lo, hi = shard_bounds(size, n)[r]
        buf = cp.asarray(data[r])
        comm.allreduce_sum(buf)
        check(f"all-reduce of {size}", float(np.abs(cp.asnumpy(buf) - total).max()), 1e-4)
        buf = cp.asarray(data[r])
        comm.reduce_scatter_sum(buf)
        check(f"reduce-scatter of {size}", float(np.abs(cp.asnumpy(buf)[lo:hi] - total[lo:hi]).max(initial=0)), 1e-4)
        buf = cp.full(size, cp.nan, dtype=cp.float32)
        buf[lo:hi] = cp.asarray(data[0][lo:hi])
        comm.allgather(buf)
        check(f"all-gather of {size}", float(np.abs(cp.asnumpy(buf) - data[0]).max()), 0.0)
        buf = cp.asarray(data[r])
        comm.broadcast(buf, root=0)
        check(f"broadcast of {size}", float(np.abs(cp.asnumpy(buf) - data[0]).max()), 0.0)

    from npgpt.model import GPT, GPTConfig
    from npgpt.optim import AdamW
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)
    B = 4
    gpu_model = GPT(cfg, seed=0, device=device)
    gpu_opt = ZeroAdamW(gpu_model.named_parameters(), comm, lr=1e-3)
    cpu_model = GPT(cfg, seed=0)
    cpu_opt = AdamW(cpu_model.named_parameters(), lr=1e-3)
    for step in range(10):
        g = np.random.default_rng(step)
        x = g.integers(0, 64, (n * B, 32))
        y = g.integers(0, 64, (n * B, 32))
        xs, ys = cp.asarray(x[r * B:(r + 1) * B]), cp.asarray(y[r * B:(r + 1) * B])
        gpu_opt.zero_grad()
        (gpu_model(xs, ys)[1] * loss_weight(B, n * B)).backward()
        reduce_gradients(comm, gpu_opt)
        gpu_opt.clip_grad_norm(1.0)
        gpu_opt.step()
        cpu_opt.zero_grad()
        cpu_model(x, y)[1].backward()
        reduce_gradients(SingleProcess(), cpu_opt)
        cpu_opt.clip_grad_norm(1.0)
        cpu_opt.step()
    check("10 ZeRO-1 steps over NCCL vs one CPU process", float(np.abs(cp.asnumpy(gpu_opt.flat) - cpu_opt.flat).max()),
          1e-3)
    return 1 if failures else 0


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
