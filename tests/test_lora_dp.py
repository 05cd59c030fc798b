"""LoRA with data-parallel training: `mpiexec -n 2 npgpt finetune --lora-rank R` trains the adapters only
(they alone are in the flat buffers the ranks reduce), rank 0 writes one adapter checkpoint, and the run
resumes on two ranks. Skips without the data-parallel module or the `npgpt[mpi]` extra."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from npgpt.cli.main import cli

from helpers import TINY, corpus

pytest.importorskip("npgpt.distributed.comm")
pytest.importorskip("mpi4py")
HERE = Path(__file__).parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec") if (Path(sys.executable).parent / "mpiexec").exists() \
    else shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="needs the mpi extra: pip install 'npgpt[mpi]'")
NPGPT = str(Path(sys.executable).parent / "npgpt")


def mpi_npgpt(n, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([MPIEXEC, "-n", str(n), NPGPT] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_lora_finetune_on_two_ranks_trains_adapters_only_and_resumes(tmp_path):
    (tmp_path / "corpus.txt").write_text(corpus())
    run = CliRunner().invoke
    assert run(cli, ["prepare", "--input", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "data")]).exit_code == 0
    r = run(cli, ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "base"), "--max-iters", "4",
                  "--eval-interval", "2", *TINY])
    assert r.exit_code == 0, r.output
    args = ["finetune", "--init-from", tmp_path / "base", "--data", tmp_path / "data", "--out", tmp_path / "ft",
            "--lora-rank", 2, "--lr", 1e-2, "--batch-size", 2, "--block-size", 16, "--eval-interval", 2,
            "--set", "eval_iters=2"]
    r = mpi_npgpt(2, *args, "--max-iters", 4)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("done: 4 iterations") == 1                  # rank 0 alone speaks
    ck = tmp_path / "ft" / "ckpt"
    assert not (ck / "model.safetensors").exists() and json.loads((ck / "adapter_config.json").read_text())["r"] == 2
    adapter = load_file(str(ck / "adapter_model.safetensors"))
    opt = load_file(str(ck / "optimizer.safetensors"))
    n_adapter = sum(v.size for v in adapter.values())
    assert sum(v.size for v in opt.values()) == 2 * n_adapter, sorted(opt)    # m and v of the adapters only
    assert max(float(np.abs(v).max()) for k, v in adapter.items() if "lora_B" in k) > 0
    r = mpi_npgpt(2, "finetune", "--resume", "--out", tmp_path / "ft", "--max-iters", 6)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from step 4" in r.stdout and r.stdout.count("done: 6 iterations") == 1
    r = run(cli, ["sample", "--checkpoint", str(tmp_path / "ft"), "--prompt", "the", "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
