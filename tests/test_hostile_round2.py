"""Hostile inputs, round 2 (issue 27, all but the server): adapters, plots, tasks, huge sizes.

Every case goes through the command line (click's CliRunner) and checks the same contract as
tests/test_hostile.py: a non-zero exit, one `Error:` line saying what was wrong, no traceback, and
nothing the user had overwritten.
"""

import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from helpers import TINY, corpus
from npgpt.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(r):
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def clean_error(r, pattern):
    """Exit status != 0, one `Error:` line matching pattern, no traceback."""
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.output
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two bases of the same shape (different seeds and steps) and a LoRA run on the first."""
    d = tmp_path_factory.mktemp("hostile2")
    (d / "corpus.txt").write_text(corpus(1200))
    ok(run("prepare", "--input", d / "corpus.txt", "--out", d / "data"))
    ok(run("train", "--data", d / "data", "--out", d / "base", "--max-iters", 2, "--quiet", *TINY))
    ok(run("train", "--data", d / "data", "--out", d / "other", "--max-iters", 3, "--seed", 7, "--quiet", *TINY))
    ok(run("finetune", "--init-from", d / "base", "--data", d / "data", "--out", d / "ft", "--max-iters", 2,
           "--lora-rank", 2, "--lr", 1e-2, "--quiet", "--block-size", 16, "--batch-size", 4, "--set", "eval_iters=2"))
    return d


def _adapter_variant(src, dst, config=None, weights=None):
    shutil.copytree(src, dst)
    if config:
        path = dst / "adapter_config.json"
        cfg = json.loads(path.read_text())
        config(cfg)
        path.write_text(json.dumps(cfg))
    if weights:
        path = dst / "adapter_model.safetensors"
        w = load_file(str(path))
        weights(w)
        save_file(w, str(path))
    return dst


def _poison(w):
    key = next(k for k in sorted(w) if "lora_B" in k)
    w[key][0, 0] = np.inf


ADAPTER_CASES = {   # name: (config change, weights change, the error's pattern)
    "inf weight": (None, _poison, r"holds infinity"),
    "catastrophic rank_pattern": (lambda c: c.update(rank_pattern={"(a+)+$": 2}), None, r"not a module name.*literal"),
    "inline flag in rank_pattern": (lambda c: c.update(alpha_pattern={"c_(?i)attn": 2}), None, r"not a module name"),
    "rank 0": (lambda c: c.update(r=0), None, r"r must be a positive integer"),
    "rank 4.5": (lambda c: c.update(r=4.5), None, r"r must be a positive integer.*4\.5"),
    "rank_pattern 1.5": (lambda c: c.update(rank_pattern={"c_attn": 1.5}), None, r"rank_pattern.*positive integer"),
    "unknown target": (lambda c: c["target_modules"].append("q_proj"), None, r"'q_proj', which is no linear layer"),
    "nested regex target": (lambda c: c.update(target_modules="(.*)*c_attn"), None, r"repeats a repetition"),
    "alternation in repeat": (lambda c: c.update(target_modules="(c|c_)*attn"), None, r"repeats an alternation"),
    "inline flag target": (lambda c: c.update(target_modules="c_(?i)attn"), None, r"not a valid regular expression"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_hostile_adapter_is_refused(runs, tmp_path, case):
    config, weights, pattern = ADAPTER_CASES[case]
    ad = _adapter_variant(runs / "ft" / "ckpt", tmp_path / "ad", config, weights)
    clean_error(run("eval", "--checkpoint", runs / "base", "--adapter", ad, "--input", runs / "corpus.txt"), pattern)


def test_integral_float_rank_and_literal_pattern_keys_load(runs, tmp_path):
    """r: 2.0 is 2 (JSON writers do that), and a module-name key (`\\.` as PEFT escapes it) applies."""
    ad = _adapter_variant(runs / "ft" / "ckpt", tmp_path / "ad",
                          lambda c: c.update(r=2.0, rank_pattern={"h\\.0\\.attn\\.c_attn": 2}))
    args = ["--checkpoint", runs / "base", "--input", runs / "corpus.txt", "--json"]
    a = json.loads(ok(run("eval", *args, "--adapter", ad)).output)["loss"]
    b = json.loads(ok(run("eval", *args, "--adapter", runs / "ft")).output)["loss"]
    assert a == b


def test_merge_checks_the_base_and_the_place(runs, tmp_path):
    d = runs
    # the fingerprint of the base is recorded when the adapter is made ...
    from safetensors import safe_open
    with safe_open(str(d / "ft" / "ckpt" / "adapter_model.safetensors"), "np") as f:
        assert re.fullmatch(r"f-[0-9a-f]{32}", f.metadata()["npgpt_base_fingerprint"])
    # ... and checked: another base of the same shape is refused, nothing is written
    clean_error(run("merge", "--checkpoint", d / "other", "--adapter", d / "ft", "--out", tmp_path / "m1"),
                r"made on another base.*--allow-other-base")
    assert not (tmp_path / "m1").exists()
    clean_error(run("eval", "--checkpoint", d / "other", "--adapter", d / "ft", "--input", d / "corpus.txt"),
                r"made on another base")
    ok(run("merge", "--checkpoint", d / "other", "--adapter", d / "ft", "--out", tmp_path / "m1", "--allow-other-base"))
    # a LoRA run folder as the checkpoint: its own adapter onto its recorded base
    r = ok(run("merge", "--checkpoint", d / "ft", "--out", tmp_path / "m2"))
    assert "merged 4 adapted layers" in r.output and (tmp_path / "m2" / "model.safetensors").is_file()
    clean_error(run("merge", "--checkpoint", d / "ft", "--adapter", d / "ft", "--out", tmp_path / "m3"),
                r"is a LoRA run .* already has an adapter")
    clean_error(run("merge", "--checkpoint", d / "base", "--out", tmp_path / "m3"), r"not a LoRA run; give .*--adapter")
    # places that cannot be written: under a file, a read-only file system (holds for root too)
    (tmp_path / "afile").write_text("keep me")
    clean_error(run("merge", "--checkpoint", d / "base", "--adapter", d / "ft", "--out", tmp_path / "afile" / "m"),
                r"is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "keep me"
    clean_error(run("merge", "--checkpoint", d / "base", "--adapter", d / "ft", "--out", "/proc/npgpt-merged"),
                r"cannot create folder /proc/npgpt-merged")


def test_plot_survives_nan_inf_and_huge_values(tmp_path):
    rows = [{"kind": "train", "iter": i, "loss": v, "lr": 1e-3, "tokens_per_s": v, "grad_norm": v}
            for i, v in enumerate([3.0, 1e308, -1e308, 2.5, 5e-324, 1e300, 2.0])]
    rows += [{"kind": "eval", "iter": 2, "train_loss": 2.9, "val_loss": 1e308}]
    lines = [json.dumps(r) for r in rows]
    lines += ['{"kind": "train", "iter": 7, "loss": NaN}', '{"kind": "train", "iter": 8, "loss": Infinity}',
              '{"kind": "train", "iter": 1e400, "loss": 1}', '{"kind": "train", "iter": true, "loss": 1}',
              '{"kind": "train", "iter": 99999999999999999999999, "loss": 1}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    r = ok(run("plot", tmp_path))
    assert "left out 10 value(s)" in r.output and "skipped 5 unreadable line(s)" in r.output
    assert "last 2 at step 6" in r.output
    pytest.importorskip("matplotlib")
    # the PNG too, written through to /dev/stdout (a device: never renamed over), from a real process
    import subprocess
    import sys
    from pathlib import Path
    npgpt = str(Path(sys.executable).parent / "npgpt")
    r = subprocess.run([npgpt, "plot", str(tmp_path), "--png", "/dev/stdout"], capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(b"\x89PNG"), r.stderr[-500:]


def test_task_refuses_stride(runs, tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"ctx": "the quick", "endings": [" fox", " dog"], "label": 0}) + "\n")
    for stride in (0, 16):
        r = run("eval", "--checkpoint", runs / "base", "--task", task, "--stride", stride)
        assert r.exit_code == 2 and "does not combine with --input, --data or --stride" in r.output, r.output


@pytest.mark.parametrize("cmd", ["train", "bench"])
def test_impossible_model_sizes_are_one_line(runs, tmp_path, cmd):
    args = (["train", "--data", runs / "data", "--out", tmp_path / "run"] if cmd == "train" else ["bench"])
    clean_error(run(*args, "--set", "n_embd=1000000000000000000"), r"parameters needs about .* free; use a smaller")
    clean_error(run(*args, "--set", "n_layer=100000", "--set", "n_embd=4096"), r"parameters needs about .* GiB")
    assert not (tmp_path / "run").exists()             # a refused run leaves no folder behind


def test_data_parallel_ranks_must_agree_on_tokenizer_and_shapes(runs, tmp_path):
    """mpiexec MPMD: rank 1 trains on data of another tokenizer (same size), then of another size."""
    from test_distributed import MPIEXEC, mpi_env
    if MPIEXEC is None:
        pytest.skip("needs the mpi extra: pip install 'npgpt[mpi]'")
    import subprocess
    import sys
    from pathlib import Path
    npgpt = str(Path(sys.executable).parent / "npgpt")
    text = (runs / "corpus.txt").read_text()
    for name, other in (("swapped", text.replace("z", "Q")), ("bigger", text + "!\n")):
        (tmp_path / f"{name}.txt").write_text(other)
        ok(run("prepare", "--input", tmp_path / f"{name}.txt", "--out", tmp_path / name))
    args = ["train", "--out", tmp_path / "o", "--max-iters", 2, *TINY]
    for name, pattern in (("swapped", r"rank 1 has a different tokenizer"),
                          ("bigger", r"rank 1 has a different tokenizer .* and a model of other shapes")):
        cmd = [MPIEXEC, "-n", "1", npgpt, *args, "--data", runs / "data", ":",
               "-n", "1", npgpt, *args, "--data", tmp_path / name]
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, env=mpi_env())
        out = r.stdout + r.stderr
        errors = [x for x in out.splitlines() if x.startswith("Error:")]
        assert r.returncode != 0 and "Traceback" not in out and len(errors) == 1, out
        assert re.search(r"data-parallel ranks disagree before the first step: " + pattern, errors[0]), out
        assert not (tmp_path / "o" / "ckpt").exists()


def test_char_chat_keeps_an_encodable_history(runs, tmp_path):
    """A message a char-level model cannot encode is refused for that turn only; the next turn works,
    and a reply holding a special token's text is stored in a form that encodes back."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "the quick"},
                                                     {"role": "assistant", "content": "brown fox"}]}) + "\n"
                            for _ in range(8)))
    ok(run("finetune", "--init-from", runs / "base", "--sft", chat, "--out", tmp_path / "chat", "--max-iters", 1,
           "--quiet", "--block-size", 16, "--batch-size", 2, "--set", "eval_iters=1"))
    r = CliRunner().invoke(cli, ["chat", "--checkpoint", str(tmp_path / "chat"), "--max-new-tokens", 4, "--seed", 1],
                           input="hello <|user|> there\nthe quick\nthe lazy dog\n/quit\n")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert r.output.count("(not sent: character '<'") == 1 and r.output.count("bot> ") == 3, r.output
    from npgpt.cli.sample import ChatSession
    from npgpt.loading import load_run
    model, tok = load_run(tmp_path / "chat")[:2]
    session = ChatSession(model, tok, temperature=0, max_new_tokens=3)
    assert session._encodable("brown <|user|>fox<|end|>") == "brown fox"
    session.messages = [{"role": "user", "content": "the quick"},
                        {"role": "assistant", "content": session._encodable("fox <|user|> dog")}]
    assert "".join(session.reply("the lazy")) is not None and len(session.messages) == 4


def test_special_targets_through_the_cli(runs, tmp_path):
    """Outputs go through npgpt.fileio: a link out of the folder is refused (a device is written through:
    `plot --png /dev/stdout` above)."""
    import os
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    # prepare: a link in --out that leads out of it is not renamed over
    (tmp_path / "data").mkdir()
    os.symlink(outside, tmp_path / "data" / "tokenizer_npgpt.json")
    clean_error(run("prepare", "--input", runs / "corpus.txt", "--out", tmp_path / "data"),
                r"tokenizer_npgpt.json is a symbolic link, not a regular file")
    assert (tmp_path / "data" / "tokenizer_npgpt.json").is_symlink() and outside.read_text() == "keep me"
    # train: metrics.jsonl as such a link
    (tmp_path / "run").mkdir()
    os.symlink(outside, tmp_path / "run" / "metrics.jsonl")
    clean_error(run("train", "--data", runs / "data", "--out", tmp_path / "run", "--max-iters", 1, *TINY),
                r"metrics.jsonl is a symbolic link to .*outside its folder")
    assert outside.read_text() == "keep me"
