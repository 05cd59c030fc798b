"""The main job from the command line: prepare -> train -> eval -> info -> sample, resume,
Ctrl-C, and every bad input giving one clean line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from npgpt.cli.main import cli

from helpers import TINY, corpus


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def clean_error(r, pattern):
    """Exit status != 0, one `Error:` line matching pattern, no traceback."""
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and __import__("re").search(pattern, lines[0]), r.output


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "corpus.txt").write_text(corpus())
    r = run("prepare", "--input", d / "corpus.txt", "--out", d / "data")
    assert r.exit_code == 0, r.output
    return d


@pytest.fixture(scope="module")
def trained(prepared):
    out = prepared / "run"
    r = run("train", "--data", prepared / "data", "--out", out, "--max-iters", 6, "--eval-interval", 3, *TINY)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_prepare_train_eval_info_sample(prepared, trained):
    out, output = trained
    assert "step 6: train loss" in output and f"npgpt sample --checkpoint {out}" in output
    assert "num decayed parameter tensors" in output
    r = run("eval", "--checkpoint", out, "--data", prepared / "data")
    assert r.exit_code == 0 and "perplexity" in r.output and "bits per byte" in r.output, r.output
    r = run("eval", "--checkpoint", out, "--input", prepared / "corpus.txt", "--json")
    rec = json.loads(r.output)
    assert rec["tokens"] > 1000 and abs(rec["perplexity"] - 2.718281828 ** rec["loss"]) < 1e-6
    r = run("info", out)
    assert r.exit_code == 0 and "parameters:" in r.output and "step: 6" in r.output and "tokenizer: char" in r.output
    r = run("sample", "--checkpoint", out, "--prompt", "the ", "--max-new-tokens", 20, "--seed", 1)
    assert r.exit_code == 0 and r.output.startswith("the "), r.output


def test_resume_from_cli_continues(prepared, trained, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    r = run("train", "--out", out, "--resume", "--max-iters", 9)
    assert r.exit_code == 0 and "resuming from step 6" in r.output and "step 9" in r.output, r.output


def test_bad_inputs(prepared, trained, tmp_path):
    data, out = prepared / "data", trained[0]
    clean_error(run("train", "--data", data, "--out", out, *TINY), "already holds a checkpoint")
    clean_error(run("train", "--data", data, "--out", tmp_path / "none", "--resume"), "no checkpoint")
    (tmp_path / "f").write_text("x")
    clean_error(run("train", "--data", data, "--out", tmp_path / "f", *TINY), "is a file")
    clean_error(run("train", "--data", data, "--out", "/dev/null/run", *TINY), "not writable")
    for flag, value, msg in [("--max-iters", 0, "max_iters must be positive"), ("--lr", -1, "learning_rate"),
                             ("--batch-size", 0, "batch_size")]:
        clean_error(run("train", "--data", data, "--out", tmp_path / "o", flag, value), msg)
    clean_error(run("train", "--data", data, "--out", tmp_path / "o", "--set", "nope=1"), "unknown config key 'nope'")
    clean_error(run("train", "--data", data, "--out", tmp_path / "o", "--set", "dropout=lots"), "not a valid float")
    clean_error(run("train", "--data", tmp_path / "nodata", "--out", tmp_path / "o"), "meta.json|prepare")
    clean_error(run("train", "--data", data, "--out", tmp_path / "o", "--device", "tpu"), "unknown device")
    clean_error(run("train", "--data", data, "--out", tmp_path / "o", "--block-size", 100000, *TINY[:6]),
                "block_size|tokens")
    clean_error(run("train", "--data", data, "--out", tmp_path / "o", "--init-from", out, "--block-size", 64),
                "n_positions")
    clean_error(run("eval", "--checkpoint", tmp_path / "missing", "--data", data), "does not exist")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("ckpt*"))


def test_gpu_without_cupy_is_clear(prepared, tmp_path, monkeypatch):
    from npgpt import backend
    if backend.gpu_available():
        pytest.skip("a GPU is present")
    clean_error(run("train", "--data", prepared / "data", "--out", tmp_path / "o", "--device", "gpu"),
                r"CuPy|GPU")


def test_tampered_and_truncated_checkpoints(trained, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    st = out / "ckpt" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-10])
    clean_error(run("sample", "--checkpoint", out, "--max-new-tokens", 3), "model.safetensors")
    clean_error(run("train", "--out", out, "--resume"), "model.safetensors")


def test_data_from_another_tokenizer_is_refused(prepared, trained, tmp_path):
    (tmp_path / "other.txt").write_text("completely different characters: 0123456789 XYZ!?\n" * 200)
    r = run("prepare", "--input", tmp_path / "other.txt", "--out", tmp_path / "d2")
    assert r.exit_code == 0, r.output
    clean_error(run("finetune", "--init-from", trained[0], "--data", tmp_path / "d2", "--out", tmp_path / "ft"),
                "different tokenizer.*--tokenizer-from")


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130(prepared, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "npgpt.cli.main", "train", "--data", str(prepared / "data"), "--out", str(out),
           "--max-iters", "100000", "--eval-interval", "100000", *TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 60
    for line in p.stdout:                     # wait until training is under way
        if line.startswith("iter ") or time.time() > deadline:
            break
    p.send_signal(signal.SIGINT)
    rest = p.communicate(timeout=60)[0]
    assert p.returncode == 130, rest
    assert "checkpoint saved" in rest and "--resume" in rest
    assert sum("interrupted" in line for line in rest.splitlines()) == 1, rest     # said once
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert state["reason"] == "interrupt" and state["iter"] > 0
    r = run("train", "--out", out, "--resume", "--max-iters", state["iter"] + 2)
    assert r.exit_code == 0 and f"resuming from step {state['iter']}" in r.output
