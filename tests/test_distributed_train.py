"""`mpiexec -n N npgpt train / finetune` end to end on real MPI ranks (tiny models, oversubscribed on
2 cores): equivalence with one process, reproducibility, ZeRO-1, resume on another N, Ctrl-C,
SIGKILL, one error message, and a plain `npgpt train` that never imports mpi4py.
Skips cleanly without the `npgpt[mpi]` extra."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from npgpt.cli.main import cli

from helpers import TINY, WORDS, corpus
from test_distributed import HERE, MPIEXEC, WORKER, mpi_env, needs_mpi

pytestmark = needs_mpi
NPGPT = str(Path(sys.executable).parent / "npgpt")


def mpi_npgpt(n, *args, timeout=300, env=None):
    cmd = [MPIEXEC, "-n", str(n), NPGPT] + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or mpi_env())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    (d / "corpus.txt").write_text(corpus())
    r = CliRunner().invoke(cli, ["prepare", "--input", str(d / "corpus.txt"), "--out", str(d / "data")])
    assert r.exit_code == 0, r.output
    return d / "data"


def tensors(path):
    from safetensors.numpy import load_file
    return load_file(str(path))


def ckpt_files(out):
    ck = Path(out) / "ckpt"
    optimizer = {"opt." + k: v for k, v in tensors(ck / "optimizer.safetensors").items()}
    return {**tensors(ck / "model.safetensors"), **optimizer}


TRAIN = ["--max-iters", 6, "--eval-interval", 3, *TINY]


@pytest.mark.parametrize("n", [2, 3])
def test_n_ranks_equal_one_process_on_the_same_sequences(n, data, tmp_path):
    """Trainer level: N ranks x B (count-weighted, some targets ignored) == 1 process x N*B."""
    out = tmp_path / "r.json"
    proc = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(WORKER), "train_equiv", str(out), str(data),
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=mpi_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["iters"] == 6
    assert r["ranks_differ"] == 0.0 and r["zero_ranks_differ"] == 0.0
    assert r["one_vs_ranks"] < 1e-5
    assert r["zero_vs_plain"] < 1e-6
    shared, one = r["history"][0], r["eval0_one"]             # step 0: the same weights, the same batches
    assert shared["iter"] == one["iter"] == 0
    assert shared["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)
    assert shared["train_loss"] == pytest.approx(one["train_loss"], abs=1e-6)


def test_two_identical_runs_write_bit_identical_checkpoints_and_rank0_alone_writes(data, tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        r = mpi_npgpt(2, "train", "--data", data, "--out", out, *TRAIN)
        assert r.returncode == 0, r.stdout + r.stderr
        outs.append(out)
    a, b = ckpt_files(outs[0]), ckpt_files(outs[1])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # one voice: one summary line, one metrics record per log/eval point
    assert r.stdout.count("done: 6 iterations") == 1 and r.stderr == ""
    recs = [json.loads(x) for x in (outs[1] / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in recs if x["kind"] == "eval"] == [0, 3, 6]
    state = json.loads((outs[1] / "ckpt" / "state.json").read_text())
    assert state["iter"] == 6 and state["config"]["batch_size"] == 4


def test_zero1_checkpoint_resumes_on_another_n(data, tmp_path):
    out = tmp_path / "z"
    r = mpi_npgpt(2, "train", "--data", data, "--out", out, *TRAIN, "--set", "zero_stage=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ZeRO-1 over 2 ranks" in r.stdout
    plain = tmp_path / "p"
    r = mpi_npgpt(2, "train", "--data", data, "--out", plain, *TRAIN)
    assert r.returncode == 0, r.stdout + r.stderr
    z, p = ckpt_files(out), ckpt_files(plain)
    assert z.keys() == p.keys()                                    # the same files, full optimizer state
    assert max(float(np.abs(z[k] - p[k]).max()) for k in z) < 1e-6
    r = mpi_npgpt(3, "train", "--out", out, "--resume", "--max-iters", 9)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from step 6" in r.stdout and "done: 9 iterations" in r.stdout
    r = CliRunner().invoke(cli, ["train", "--out", str(out), "--resume", "--max-iters", 12])    # and N = 1
    assert r.exit_code == 0, r.output


def test_sft_finetune_on_two_ranks(data, tmp_path):
    base = tmp_path / "base"
    r = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(base), *[str(a) for a in TRAIN]])
    assert r.exit_code == 0, r.output
    recs = tmp_path / "qa.jsonl"
    recs.write_text("".join(json.dumps({"prompt": f"the {w} fox", "completion": " jumps" * (1 + i % 3)}) + "\n"
                            for i, w in enumerate(WORDS * 2)))        # answers of 1-3 words: unequal counts
    r = mpi_npgpt(2, "finetune", "--init-from", base / "ckpt", "--sft", recs, "--out", tmp_path / "ft",
                  "--max-iters", 4, "--batch-size", 3, "--set", "eval_iters=2", "--eval-interval", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("done: 4 iterations") == 1


@pytest.mark.slow
def test_two_ranks_prepare_the_builtin_corpus_once(tmp_path):
    """No --data: local rank 0 prepares the pydoc corpus into an empty cache, then the others read it."""
    env = {**mpi_env(), "NPGPT_HOME": str(tmp_path / "home")}
    r = mpi_npgpt(2, "train", "--out", tmp_path / "o", "--max-iters", 2, "--eval-interval", 2, *TINY, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("no --data given") == 1 and "done: 2 iterations" in r.stdout


def test_other_commands_run_on_rank_0_alone(tmp_path):
    (tmp_path / "c.txt").write_text(corpus(300))
    r = mpi_npgpt(3, "prepare", "--input", tmp_path / "c.txt", "--out", tmp_path / "d")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "d" / "meta.json").is_file() and r.stderr == ""


def test_bad_input_gives_one_error_line(tmp_path):
    r = mpi_npgpt(2, "train", "--data", tmp_path / "missing", "--out", tmp_path / "o")
    assert r.returncode == 1
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: data folder"), r.stdout + r.stderr


def test_error_on_one_rank_only_ends_the_job_with_that_ranks_message(data, tmp_path):
    cmd = [MPIEXEC, "-n", "1", NPGPT, "train", "--data", str(data), "--out", str(tmp_path / "a"), *map(str, TRAIN),
           ":", "-n", "1", NPGPT, "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "b"),
           *map(str, TRAIN)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=mpi_env())
    assert r.returncode != 0 and time.monotonic() - t0 < 60
    assert "Error: (rank 1 of 2) data folder" in r.stderr


def _launch(args, env=None):
    return subprocess.Popen([MPIEXEC, "-n", "2", NPGPT] + [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or mpi_env())


def _wait_for_line(proc, needle, timeout=120):
    t0 = time.monotonic()
    lines = []
    while time.monotonic() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}: {''.join(lines)}")


LONG = ["--max-iters", 100000, "--eval-interval", 5, *TINY]


@pytest.mark.slow
def test_ctrl_c_to_the_launcher_saves_once_and_exits_130(data, tmp_path):
    out = tmp_path / "run"
    proc = _launch(["train", "--data", data, "--out", out, *LONG])
    _wait_for_line(proc, "saved checkpoint")                # past step 5: training for real
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    # one line says it (not a log line and then the error repeating it), from one rank
    said = [line for line in (stdout + stderr).splitlines() if "interrupted" in line]
    assert len(said) == 1 and "at step" in said[0] and "continue with --resume" in said[0], stdout + stderr
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert state["reason"] == "interrupt"
    r = mpi_npgpt(3, "train", "--out", out, "--resume", "--max-iters", state["iter"] + 2)
    assert r.returncode == 0, r.stdout + r.stderr


def _rank_pids(tag):
    """pids of the ranks launched with NPGPT_TEST_TAG=tag, by rank."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"NPGPT_TEST_TAG={tag}".encode() in env:
            for e in env:
                if e.startswith(b"PMI_RANK="):
                    found[int(e.split(b"=")[1])] = int(d.name)
    return found


@pytest.mark.slow
def test_sigkill_of_one_rank_ends_the_job_and_the_checkpoint_resumes(data, tmp_path):
    out = tmp_path / "run"
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    proc = _launch(["train", "--data", data, "--out", out, *LONG], env={**mpi_env(), "NPGPT_TEST_TAG": tag})
    _wait_for_line(proc, "saved checkpoint")
    pids = _rank_pids(tag)
    assert set(pids) == {0, 1}, pids
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    proc.communicate(timeout=90)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    r = mpi_npgpt(2, "train", "--out", out, "--resume", "--max-iters",
                  json.loads((out / "ckpt" / "state.json").read_text())["iter"] + 2)
    assert r.returncode == 0, r.stdout + r.stderr


def test_plain_train_never_imports_mpi4py(data, tmp_path):
    """The real entry point (npgpt.cli.main:main), outside any launcher."""
    argv = ["npgpt", "train", "--data", str(data), "--out", str(tmp_path / "o"), *map(str, TRAIN)]
    code = ("import atexit, sys; atexit.register(lambda: print('imported mpi4py:', 'mpi4py' in sys.modules)); "
            f"sys.argv = {argv!r}; from npgpt.cli.main import main; main()")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done: 6 iterations" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "imported mpi4py: False"
