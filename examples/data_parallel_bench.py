"""Data-parallel speed on this machine: N MPI ranks (one BLAS thread each) against one process with
N threads (and with one thread) at the same global batch, and PyTorch eager in one process when a torch Python is given.

    python examples/data_parallel_bench.py --preset baby --global-batch 12 --rounds 5
    python examples/data_parallel_bench.py --torch-python /path/to/venv-with-torch/bin/python

Each round runs, one after another, `mpiexec -n N npgpt bench --batch-size G/N`, `npgpt bench
--batch-size G` (N threads) and, with --torch-python, examples/torch_compare.py (PyTorch eager,
N threads, batch G). Alternating rounds let a noisy neighbour slow all sides alike; the table gives
each side's median over rounds of its per-run median ms/iter. Needs the mpi extra
(pip install 'npgpt[mpi]'); torch is optional and never imported here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def main():
    from npgpt.programs import non_negative_int, positive_int   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="baby")
    ap.add_argument("--global-batch", type=positive_int, default=12)
    ap.add_argument("--ranks", type=positive_int, default=2)
    ap.add_argument("--iters", type=positive_int, default=10, help="timed iterations per run")
    ap.add_argument("--warmup", type=non_negative_int, default=2)
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--torch-python", default=None, help="a Python with torch installed (optional)")
    args = ap.parse_args()
    N, G = args.ranks, args.global_batch
    if G % N:
        raise SystemExit(f"--global-batch {G} must be a multiple of --ranks {N}")
    bindir = Path(sys.executable).parent
    npgpt = str(bindir / "npgpt") if (bindir / "npgpt").exists() else shutil.which("npgpt")
    mpiexec = str(bindir / "mpiexec") if (bindir / "mpiexec").exists() else shutil.which("mpiexec")
    if not (npgpt and mpiexec):
        raise SystemExit("needs npgpt and mpiexec on PATH: pip install -e '.[mpi]'")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                             "NPGPT_THREADS", "MKL_NUM_THREADS")}
    common = ["--preset", args.preset, "--iters", str(args.iters), "--warmup", str(args.warmup), "--json"]
    ranks_env = {**base, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NPGPT_THREADS": "1"}
    one_env = {**base, "OMP_NUM_THREADS": str(N), "OPENBLAS_NUM_THREADS": str(N), "NPGPT_THREADS": str(N)}
    single_env = {**base, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NPGPT_THREADS": "1"}
    sides = {"mpi": [], "one": [], "one_1thread": [], "torch": [], "torch_1thread": [], "mpi_comm": []}
    for r in range(args.rounds):
        res = json.loads(run([mpiexec, "-n", str(N), npgpt, "bench", "--batch-size", str(G // N)] + common,
                             ranks_env).strip().splitlines()[-1])
        sides["mpi"].append(res["ms_median"])
        sides["mpi_comm"].append(res["ms_gradient_collective"])
        res = json.loads(run([npgpt, "bench", "--batch-size", str(G)] + common, one_env).strip().splitlines()[-1])
        sides["one"].append(res["ms_median"])
        res = json.loads(run([npgpt, "bench", "--batch-size", str(G)] + common, single_env).strip().splitlines()[-1])
        sides["one_1thread"].append(res["ms_median"])
        if args.torch_python:
            out = run([args.torch_python, str(ROOT / "examples" / "torch_compare.py"), "--preset", args.preset,
                       "--batch-size", str(G), "--iters", str(args.iters), "--round", str(args.iters),
                       "--warmup", str(args.warmup), "--threads", str(N)], one_env)
            sides["torch"].append(float(re.search(r"pytorch eager\s+ms/iter median\s+([\d.]+)", out).group(1)))
            out = run([args.torch_python, str(ROOT / "examples" / "torch_compare.py"), "--preset", args.preset,
                       "--batch-size", str(G), "--iters", str(args.iters), "--round", str(args.iters),
                       "--warmup", str(args.warmup), "--threads", "1"], single_env)
            sides["torch_1thread"].append(float(re.search(r"pytorch eager\s+ms/iter median\s+([\d.]+)", out).group(1)))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in sides.items() if v), flush=True)
    med = {k: statistics.median(v) for k, v in sides.items() if v}
    print(f"\n{args.preset}, global batch {G}: medians over {args.rounds} rounds of per-run medians "
          f"({args.iters} iterations each)")
    print(f"  {N} ranks x batch {G // N} (1 thread each)   {med['mpi']:9.1f} ms/iter  "
          f"(gradient all-reduce {med['mpi_comm']:.1f} ms)")
    print(f"  1 process x batch {G} ({N} threads)      {med['one']:9.1f} ms/iter")
    print(f"  1 process x batch {G} (1 thread)       {med['one_1thread']:9.1f} ms/iter")
    print(f"  throughput ratio ({N} ranks / 1 process with {N} threads) {med['one'] / med['mpi']:.2f}; "
          f"scaling efficiency (1 thread / ({N} x {N} ranks)) {med['one_1thread'] / (N * med['mpi']):.0%}")
    if "torch" in med:
        print(f"  PyTorch eager, 1 process, {N} threads  {med['torch']:9.1f} ms/iter  "
              f"(npgpt {N} ranks / PyTorch = {med['mpi'] / med['torch']:.2f})")
        print(f"  PyTorch eager, 1 process, 1 thread   {med['torch_1thread']:9.1f} ms/iter  "
              f"(npgpt {N} ranks / PyTorch 1 thread = {med['mpi'] / med['torch_1thread']:.2f})")
    print(json.dumps({"preset": args.preset, "global_batch": G, "ranks": N, "rounds": sides, "medians": med}))
    return 0


if __name__ == "__main__":
    from npgpt.programs import run as run_program     # one `Error:` line for bad input, as the CLI
    run_program(main)    # (this file's own run() is the training loop: the name must not shadow it)
