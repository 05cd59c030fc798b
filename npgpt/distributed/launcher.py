"""`mpiexec -n N npgpt ...`: the command line under a launcher, and data-parallel benchmarks.
(The trainer's data-parallel plug, the communicators and ZeRO-1 live floors down, in
npgpt.distributed's other modules.)

Under a launcher every rank runs the same `npgpt` command. `train`, `finetune` and `bench` run
data-parallel; any other command (prepare, sample, eval, ...) runs on rank 0 alone, the other ranks
exit at once (two ranks preparing into one folder would race). `run_cli` gives the job one voice:

    rank 0        prints (progress, summaries, the one error message); writes checkpoints and metrics
    other ranks   are silent; their stdout and stderr go to /dev/null
    an error      on every rank (bad input is the same everywhere): rank 0 prints it once, all exit
                  with its status; on some ranks only (a file missing on one machine): that rank
                  prints it, tagged with its rank, and ends the job (the launcher stops the others)
    Ctrl-C        the launcher forwards SIGINT to every rank; the ranks agree on the step, rank 0
                  saves once, every rank exits 130

BLAS threads: each rank gets (CPUs on its machine) / (ranks on its machine) threads, unless
OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / NPGPT_THREADS say otherwise, so N ranks on N cores do not
fight over them.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
import traceback

import numpy as np

from npgpt.backend import synchronize, to_device, xp_for
from npgpt.bench import FLOPS_FORMULA, TrainStep, blas_threads, check_counts, format_train
from npgpt.distributed.comm import Communicator, MPIComm, SingleProcess, for_device, launch_info, loss_weight
from npgpt.distributed.zero import make_optimizer, reduce_gradients
from npgpt.errors import NpgptError
from npgpt.perf import gemm_peak_gflops

DATA_PARALLEL_COMMANDS = ("train", "finetune", "bench")   # the others run on rank 0 alone under a launcher
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NPGPT_THREADS")


# ---- threads per rank ------------------------------------------------------------------------------
def set_blas_threads(n: int) -> int | None:
    """Set OpenBLAS's thread count in this process (NumPy's wheels load it before we can set the
    environment); returns n, or None when no OpenBLAS with a known setter is loaded."""
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(int(n))
                return int(n)
    return None


def threads_per_rank(comm: Communicator) -> int:
    """CPUs of this machine shared by the ranks on it (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    machines = int(comm.allreduce_scalars([1.0 if comm.local_rank == 0 else 0.0])[0])
    per_machine = max(comm.world_size // max(machines, 1), 1)
    return max(cpus // per_machine, 1)


_threads_set = None    # what _limit_threads chose for this rank (None: the user's environment rules)


def _limit_threads(comm: Communicator):
    global _threads_set
    n = threads_per_rank(comm)
    if any(os.environ.get(v) for v in THREAD_VARS):
        return                                     # the user chose; respect it
    os.environ["NPGPT_THREADS"] = str(n)           # npgpt's own row-block pool (read at first use)
    set_blas_threads(n)
    _threads_set = n


# ---- the command line under a launcher -----------------------------------------------------------------
def run_cli(group, args=None, comm: Communicator | None = None):
    """Run the click `group` on every rank of a launched job with one voice (see the module doc)."""
    import click          # the CLI's own library, needed only when the CLI runs under a launcher

    if comm is None:
        try:
            comm = MPIComm()
        except NpgptError as e:                    # no mpi4py: no way to agree, so rank 0 (by the env) speaks
            if launch_info()[0] == 0:
                print(f"Error: {e}", file=sys.stderr, flush=True)
            return 1
    argv = list(sys.argv[1:] if args is None else args)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in DATA_PARALLEL_COMMANDS:      # prepare, sample, eval, ...: rank 0 runs it alone
        if comm.rank != 0:
            return 0
        comm = SingleProcess()
    _limit_threads(comm)
    err = sys.stderr
    if comm.rank != 0:
        devnull = open(os.devnull, "w")
        sys.stdout = sys.stderr = devnull
    code, message, show = 0, None, None
    try:
        # the communicator reaches the commands as an argument: click's context object (npgpt.cli.job)
        group.main(args=args, prog_name="npgpt", standalone_mode=False, obj={"comm": comm})
    except click.exceptions.Abort:
        code, message = 130, "Aborted!"
    except click.ClickException as e:
        code, message, show = e.exit_code, e.format_message(), e
    except SystemExit as e:                        # sys.exit(130) after a saved interrupt, --help, ...
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code, message = 130, "Aborted!"
    except Exception as e:                         # a bug: keep the traceback for the report
        code, message = 1, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    if message is not None:
        stop(comm, message, code, err, show)
    sys.stdout.flush()
    return code


def stop(comm: Communicator, message: str, code: int, err=None, show=None):
    """End the job after an error on this rank with one message (see the module doc)."""
    err = err or sys.__stderr__
    together = comm.everyone_failed()
    if together:
        if comm.rank == 0:
            if show is not None:
                show.show(file=err)
            else:
                print(message if message == "Aborted!" else f"Error: {message}", file=err, flush=True)
        return
    print(f"Error: (rank {comm.rank} of {comm.world_size}) {message}", file=err, flush=True)
    comm.abort(code or 1)


# ---- benchmark ----------------------------------------------------------------------------------
def bench_data_parallel(preset, overrides=None, batch_size=6, block_size=None, device="cpu", iters=20,
                        warmup=3, seed=0, lr=6e-4, grad_clip=1.0, zero_stage=0, comm=None):
    """`npgpt bench` on N ranks: each rank times forward + backward on its own batch_size sequences,
    the all-reduce (or ZeRO-1 reduce-scatter) of the gradients, clipping and the AdamW step.
    The global batch is N * batch_size. Returns bench_train's figures for the global batch, plus
    the time spent in the gradient collective."""
    comm, device = for_device(comm or SingleProcess(), device)     # GPUs: this rank's GPU, NCCL
    check_counts(iters, warmup, batch_size)
    step = TrainStep(preset, overrides, batch_size, block_size, device, seed, lr, grad_clip)
    model, cfg, B, T = step.model, step.config, step.B, step.T
    opt = make_optimizer(model.named_parameters(), comm, zero_stage, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng([seed, comm.rank])                # each rank its own sequences
    batches = [tuple(to_device(rng.integers(0, cfg.vocab_size, (B, T)), step.device) for _ in "xy")
               for _ in range(8)]
    N = comm.world_size
    times, comm_times, loss = [], [], None
    for i in range(warmup + iters):
        x, y = batches[i % len(batches)]
        comm.barrier()                                             # start together
        synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        _, loss = model(x, y)
        (loss * loss_weight(B * T, B * T * N)).backward()          # no ignored targets: 1/N each
        synchronize()
        t1 = time.perf_counter()
        reduce_gradients(comm, opt)
        synchronize()
        t2 = time.perf_counter()
        opt.clip_grad_norm(grad_clip)
        opt.step(lr)
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            comm_times.append(t2 - t1)
    # The step ends when the slowest rank ends: report the slowest rank's times.
    med = comm.allreduce_scalars([statistics.median(times)], op="max")[0]
    fastest = comm.allreduce_scalars([min(times)], op="max")[0]
    slowest = comm.allreduce_scalars([max(times)], op="max")[0]
    comm_med = comm.allreduce_scalars([statistics.median(comm_times)], op="max")[0]
    peak = gemm_peak_gflops(xp_for(step.device))
    flops_per_iter = model.flops_per_token(T) * B * T * N
    return {
        "preset": preset, "device": str(step.device), "batch_size": B * N, "per_rank_batch_size": B,
        "world_size": N, "zero_stage": zero_stage, "block_size": T,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
        "dropout": cfg.dropout, "params": int(model.num_params()),
        "params_non_embedding": int(model.num_params(non_embedding=True)),
        "iters": iters, "warmup": warmup,
        "ms_per_iter": med * 1e3, "ms_median": med * 1e3, "ms_min": fastest * 1e3, "ms_max": slowest * 1e3,
        "ms_gradient_collective": comm_med * 1e3,
        "tokens_per_s": B * T * N / med,
        "flops_per_token": model.flops_per_token(T), "flops_per_iter": flops_per_iter,
        "flops_formula": FLOPS_FORMULA,
        "gflops": flops_per_iter / med / 1e9,
        "gemm_peak_gflops": peak * N,          # each rank measured its own share of the machine
        "mfu": flops_per_iter / med / 1e9 / (peak * N),
        "final_loss": float(loss.data),
        "blas_threads": _threads_set if _threads_set is not None else blas_threads(),
        "optimizer_bytes_per_rank": int(opt.exp_avg.nbytes + opt.exp_avg_sq.nbytes),
    }


def format_bench(r):
    lines = format_train(r).splitlines()
    lines[0] += f"; {r['world_size']} ranks x batch {r['per_rank_batch_size']} (global batch {r['batch_size']})"
    lines.append(f"gradients  {'reduce-scatter' if r['zero_stage'] else 'all-reduce'} "
                 f"{r['ms_gradient_collective']:.2f} ms/iter (median, slowest rank); optimizer state per rank "
                 f"{r['optimizer_bytes_per_rank'] / 2**20:.2f} MiB")
    return "\n".join(lines)


