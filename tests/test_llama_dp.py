"""Data-parallel training of a Llama on real MPI ranks: `mpiexec -n 2 npgpt train --preset llama-baby`
runs, with ZeRO-1 too, and a ZeRO-1 run resumed half way ends bit-identical to an uninterrupted one.
Skips cleanly without the `npgpt[mpi]` extra."""

import numpy as np
import pytest
from click.testing import CliRunner

from npgpt.cli.main import cli

from helpers import corpus
from test_distributed import needs_mpi
from test_distributed_train import ckpt_files, mpi_npgpt

pytestmark = needs_mpi

LLAMA = ["--preset", "llama-baby", "--set", "n_layer=1", "--set", "n_embd=32", "--block-size", 16,
         "--set", "eval_iters=2", "--eval-interval", 3, "--set", "log_interval=1", "--set", "warmup_iters=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_dp")
    (d / "corpus.txt").write_text(corpus())
    r = CliRunner().invoke(cli, ["prepare", "--input", str(d / "corpus.txt"), "--out", str(d / "data")])
    assert r.exit_code == 0, r.output
    return d / "data"


def test_two_ranks_train_a_llama_and_zero1_resumes_exactly(data, tmp_path):
    r = mpi_npgpt(2, "train", "--data", data, "--out", tmp_path / "dp", "--max-iters", 6, "--batch-size", 2, *LLAMA)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "model: llama" in r.stdout
    assert "model.layers.0.self_attn.k_proj.weight" in ckpt_files(tmp_path / "dp")
    z = mpi_npgpt(2, "train", "--data", data, "--out", tmp_path / "z", "--max-iters", 3, "--batch-size", 2,
                  "--set", "zero_stage=1", *LLAMA)
    assert z.returncode == 0, z.stdout + z.stderr
    z = mpi_npgpt(2, "train", "--resume", "--out", tmp_path / "z", "--max-iters", 6)
    assert z.returncode == 0 and "resuming from step 3" in z.stdout, z.stdout + z.stderr
    full = mpi_npgpt(2, "train", "--data", data, "--out", tmp_path / "zf", "--max-iters", 6, "--batch-size", 2,
                     "--set", "zero_stage=1", *LLAMA)
    assert full.returncode == 0, full.stdout + full.stderr
    x, y = ckpt_files(tmp_path / "z"), ckpt_files(tmp_path / "zf")
    assert all(np.array_equal(x[k], y[k]) for k in x if not k.startswith("opt."))
