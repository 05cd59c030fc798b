"""Hostile files, faults and odd flags (issue 13): each example gets one clear line or the right result.

Every test goes through the command line (click's CliRunner, or a subprocess where a second process,
a pipe or a resource limit is the point) except the two that are Python-API-only by nature
(`GPTConfig(n_embd="abc")`, negative targets in `GPT.forward`). Nothing is lost: where a command fails,
the test checks the files it must not have touched.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import TINY, corpus
from npgpt.cli.main import cli
from npgpt.errors import NpgptError


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


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
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    (d / "corpus.txt").write_text(corpus(1500))
    ok(run("prepare", "--input", d / "corpus.txt", "--out", d / "data"))
    ok(run("train", "--data", d / "data", "--out", d / "run", "--max-iters", 2, "--quiet", *TINY))
    return d


@pytest.fixture
def work(base, tmp_path):
    """A private copy of the prepared data and the trained run."""
    shutil.copytree(base / "data", tmp_path / "data")
    shutil.copytree(base / "run", tmp_path / "run")
    shutil.copy(base / "corpus.txt", tmp_path / "corpus.txt")
    return tmp_path


def ckpt_files(run_dir):
    return {p.name: p.read_bytes() for p in sorted((run_dir / "ckpt").iterdir()) if p.is_file()}


def edit_json(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def drop_manifest(run_dir):
    (run_dir / "ckpt" / "manifest.json").unlink()


# ------------------------------------------------------------------------------------- lost data

HOLDER = textwrap.dedent("""
    import sys, time
    from npgpt.safeio import run_lock
    with run_lock(sys.argv[1], "train"):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_second_writer_of_a_run_folder_fails_at_once_naming_the_holder(work):
    before = ckpt_files(work / "run")
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(work / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        line = clean_error(run("train", "--data", work / "data", "--out", work / "run", "--force", *TINY),
                           "in use by PID")
        assert str(p.pid) in line
        clean_error(run("train", "--out", work / "run", "--resume", "--max-iters", 4), f"PID {p.pid}")
        clean_error(run("prepare", "--input", work / "corpus.txt", "--out", work / "run", "--force"), "in use|holds")
    finally:
        p.kill()
        p.wait()
    assert ckpt_files(work / "run") == before
    ok(run("train", "--out", work / "run", "--resume", "--max-iters", 3, "--quiet"))   # free again


def test_prepare_refuses_a_checkpoint_or_model_folder_even_with_force(work):
    before = ckpt_files(work / "run")
    for force in ([], ["--force"]):
        clean_error(run("prepare", "--input", work / "corpus.txt", "--out", work / "run" / "ckpt", *force),
                    "holds a model")
        clean_error(run("prepare", "--input", work / "corpus.txt", "--out", work / "run", *force),
                    "holds a (model|checkpoint)")
    assert ckpt_files(work / "run") == before


def test_prepare_force_deletes_only_files_npgpt_wrote(work):
    data = work / "data"
    (data / "notes.txt").write_text("mine")
    (data / "vocab.json").write_text("{}")          # a name npgpt can write, but this preparation's meta never listed it
    edit_json(data / "meta.json", lambda m: m.update(files=["notes.txt", "../corpus.txt", "/etc/hostname"]))
    ok(run("prepare", "--input", work / "corpus.txt", "--out", data, "--force"))
    assert (data / "notes.txt").read_text() == "mine" and (data / "vocab.json").read_text() == "{}"
    assert (work / "corpus.txt").exists()
    # what npgpt itself wrote before is replaced: a BPE preparation's files go when char replaces it
    ok(run("prepare", "--input", work / "corpus.txt", "--out", work / "b", "--tokenizer", "bpe", "--vocab-size", 270))
    ok(run("prepare", "--input", work / "corpus.txt", "--out", work / "b", "--force"))
    assert not (work / "b" / "merges.txt").exists()


def test_resume_stores_absolute_data_path_and_works_from_another_directory(work, monkeypatch):
    monkeypatch.chdir(work)
    ok(run("train", "--data", "data", "--out", "rel", "--max-iters", 2, "--quiet", *TINY))
    saved = json.loads((work / "rel" / "ckpt" / "state.json").read_text())["config"]["data"]
    assert Path(saved).is_absolute() and Path(saved) == (work / "data").resolve()
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data").mkdir()                             # a different ./data must not be used
    monkeypatch.chdir(elsewhere)
    r = ok(run("train", "--out", work / "rel", "--resume", "--max-iters", 3))
    assert "done: 3 iterations" in r.output
    assert json.loads((work / "rel" / "ckpt" / "state.json").read_text())["config"]["data"] == saved


def test_resume_refuses_data_with_another_tokenizer(work):
    other = work / "other.txt"
    other.write_text("ZYXWVUTSRQ 0123456789 " * 200)
    ok(run("prepare", "--input", other, "--out", work / "data2"))
    before = ckpt_files(work / "run")
    clean_error(run("train", "--out", work / "run", "--resume", "--data", work / "data2", "--max-iters", 4),
                "tokenizer")
    assert ckpt_files(work / "run") == before


@pytest.fixture
def sft_run(work):
    recs = [{"prompt": "the quick", "completion": " brown fox"}, {"prompt": "seven", "completion": " wizards"},
            {"prompt": "lazy", "completion": " dog"},
            {"messages": [{"role": "user", "content": "hex"}, {"role": "assistant", "content": "zebras"}]}]
    (work / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ok(run("finetune", "--init-from", work / "run", "--sft", work / "chat.jsonl", "--out", work / "sft",
           "--max-iters", 2, "--quiet", "--batch-size", 2, "--set", "eval_iters=1"))
    return work / "sft"


def test_sft_run_resumes_through_finetune_not_train(work, sft_run):
    before = ckpt_files(sft_run)
    clean_error(run("train", "--out", sft_run, "--resume", "--max-iters", 4), "finetune")
    assert ckpt_files(sft_run) == before
    r = ok(run("finetune", "--out", sft_run, "--resume", "--max-iters", 3, "--set", "eval_iters=1"))
    assert "done: 3 iterations" in r.output and "npgpt chat" in r.output


def test_force_starts_a_fresh_metrics_file(work):
    n_old = len((work / "run" / "metrics.jsonl").read_text().splitlines())
    assert n_old > 0
    ok(run("train", "--data", work / "data", "--out", work / "run", "--force", "--max-iters", 1, "--quiet", *TINY))
    recs = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs and max(r.get("iter", r.get("step", 0)) for r in recs) <= 1


# -------------------------------------------------------------------------------------- the hang

def test_catastrophic_split_pattern_from_a_file_needs_an_opt_in(work):
    drop_manifest(work / "run")
    meta = work / "run" / "ckpt" / "tokenizer_npgpt.json"
    (work / "bpe").mkdir()
    ok(run("prepare", "--input", work / "corpus.txt", "--out", work / "bpe", "--tokenizer", "bpe",
           "--vocab-size", 270))
    edit_json(work / "bpe" / "tokenizer_npgpt.json", lambda m: m.update(pattern="(a+)+$"))
    clean_error(run("prepare", "--input", work / "corpus.txt", "--out", work / "d3", "--tokenizer-from",
                    work / "bpe"), "pattern")
    assert meta.exists()
    # the named patterns load as before, and so does an explicit pattern with the opt-in
    edit_json(work / "bpe" / "tokenizer_npgpt.json", lambda m: m.update(pattern="gpt4"))
    ok(run("prepare", "--input", work / "corpus.txt", "--out", work / "d4", "--tokenizer-from", work / "bpe"))
    edit_json(work / "bpe" / "tokenizer_npgpt.json", lambda m: m.update(pattern=r"\s*\S+"))
    ok(run("--trust-pattern", "prepare", "--input", work / "corpus.txt", "--out", work / "d5",
           "--tokenizer-from", work / "bpe"))


# --------------------------------------------------------------------- memory from numbers in files

@pytest.mark.parametrize("key,value", [("n_embd", 1 << 20), ("n_layer", 100000), ("n_positions", 1 << 31),
                                       ("vocab_size", 1 << 33), ("n_inner", 1 << 30)])
def test_config_numbers_are_checked_against_the_tensors_before_allocating(work, key, value):
    drop_manifest(work / "run")
    cfg = work / "run" / "ckpt" / "config.json"
    edit_json(cfg, lambda c: c.update({key: value, "n_head": 1 if key == "n_embd" else c["n_head"]}))
    for cmd in (["sample", "--checkpoint", work / "run", "--max-new-tokens", 2],
                ["eval", "--checkpoint", work / "run", "--data", work / "data"]):
        clean_error(run(*cmd), f"config.json.*{key}|{key}.*model.safetensors")


def test_meta_vocab_size_must_match_the_tokenizer(work):
    edit_json(work / "data" / "meta.json", lambda m: m.update(vocab_size=1 << 40))
    clean_error(run("train", "--data", work / "data", "--out", work / "new", *TINY), "meta.json.*vocab_size")


def test_vocab_json_ids_must_be_below_the_entry_count(work):
    ok(run("prepare", "--input", work / "corpus.txt", "--out", work / "bpe", "--tokenizer", "bpe",
           "--vocab-size", 270))
    (work / "bpe" / "tokenizer_npgpt.json").unlink()
    edit_json(work / "bpe" / "vocab.json", lambda v: v.update({"Ġzzz": 1 << 40}))
    clean_error(run("prepare", "--input", work / "corpus.txt", "--out", work / "d2", "--tokenizer-from",
                    work / "bpe"), "vocab.json.*id")


def test_tiktoken_rank_must_be_below_the_entry_count(tmp_path):
    from npgpt.tokenizer import BPETokenizer
    import base64
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)] + ["aGk= 99999999999"]
    (tmp_path / "r.tiktoken").write_text("\n".join(lines) + "\n")
    with pytest.raises(NpgptError, match="rank"):
        BPETokenizer.from_tiktoken_file(tmp_path / "r.tiktoken", pattern="gpt2")


# ------------------------------------------------------------------------------------- tracebacks

@pytest.mark.parametrize("text,what", [("[" * 100000 + "]" * 100000, "nests deeper"),
                                       ('{"vocab_size": ' + "1" * 5000 + "}", "digits"),
                                       ('{"n_embd": 1e999}', "out of range"),
                                       ('{"n_embd": "abc"}', "n_embd"), ('{"a": NaN}', "NaN")])
def test_hostile_json_in_config_is_one_line(work, text, what):
    drop_manifest(work / "run")
    cfg = work / "run" / "ckpt" / "config.json"
    if text.startswith('{"n_embd"'):
        good = json.loads(cfg.read_text())
        text = json.dumps({**good, "n_embd": "abc"}) if "abc" in text else text
    cfg.write_text(text)
    clean_error(run("sample", "--checkpoint", work / "run", "--max-new-tokens", 1), what)
    clean_error(run("info", work / "run"), what)


@pytest.mark.parametrize("change,what", [(lambda s: s.update(iter="abc"), "iter"),
                                         (lambda s: s.update(iter=1e999), "out of range"),
                                         (lambda s: s["config"].update(learning_rate="x"), "learning_rate"),
                                         (lambda s: s.update(config=[1, 2]), "config")])
def test_malformed_state_json_is_one_line_in_info_and_resume(work, change, what):
    drop_manifest(work / "run")
    p = work / "run" / "ckpt" / "state.json"
    text = p.read_text()
    obj = json.loads(text)
    change(obj)
    p.write_text(json.dumps(obj).replace("Infinity", "1e999"))
    clean_error(run("info", work / "run"), f"state.json.*{what}")
    clean_error(run("train", "--out", work / "run", "--resume", "--max-iters", 5), f"state.json.*{what}")


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from npgpt.cli.main import main
    sys.argv = ["npgpt"] + sys.argv[2:]
    main()
""")


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(work):
    before = ckpt_files(work / "run")
    limit = (work / "run" / "ckpt" / "model.safetensors").stat().st_size // 2   # the weights no longer fit
    p = subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), "train", "--out", str(work / "run"),
                        "--resume", "--max-iters", "3", "--quiet"], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and re.search("cannot write|space|too large", errors[0]), p.stderr
    assert ckpt_files(work / "run") == before
    assert not (work / "run" / "ckpt.tmp").exists()
    ok(run("sample", "--checkpoint", work / "run", "--max-new-tokens", 2))


def test_read_only_run_folder_is_one_line(work):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    before = ckpt_files(work / "run")
    os.chmod(work / "run", 0o555)
    try:
        clean_error(run("train", "--out", work / "run", "--resume", "--max-iters", 3), "cannot|not writable")
    finally:
        os.chmod(work / "run", 0o755)
    assert ckpt_files(work / "run") == before


def test_negative_seed_is_refused(work):
    clean_error(run("train", "--data", work / "data", "--out", work / "n", "--seed", -1, *TINY), "seed")
    clean_error(run("sample", "--checkpoint", work / "run", "--seed", -1), "seed")


def test_inspect_png_into_a_missing_folder(work):
    pytest.importorskip("matplotlib")
    png = work / "missing" / "deeper" / "att.png"
    r = run("inspect", "--checkpoint", work / "run", "--prompt", "the fox", "--png", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_token_id_beyond_the_vocabulary_in_train_bin(work):
    meta = json.loads((work / "data" / "meta.json").read_text())
    dtype = np.dtype(meta.get("dtype", "uint16"))
    for split in ("train", "val"):
        arr = np.fromfile(work / "data" / f"{split}.bin", dtype=dtype)
        arr[len(arr) // 2] = meta["vocab_size"] + 5
        arr.tofile(work / "data" / f"{split}.bin")
    for name in ("train", "val"):
        edit_json(work / "data" / "meta.json", lambda m: None)
    clean_error(run("train", "--data", work / "data", "--out", work / "n", *TINY), "token id|beyond|vocab")
    clean_error(run("eval", "--checkpoint", work / "run", "--data", work / "data"), "token id|beyond|vocab")


def test_empty_validation_split_in_eval(work):
    # prepare never writes an empty split; a data folder from elsewhere (or cut by hand) can hold one
    edit_json(work / "data" / "meta.json", lambda m: m.update(val_tokens=0))
    (work / "data" / "val.bin").write_bytes(b"")
    clean_error(run("eval", "--checkpoint", work / "run", "--data", work / "data"), "val split.*0 tokens")
    ok(run("eval", "--checkpoint", work / "run", "--data", work / "data", "--split", "train"))


def test_malformed_quantised_scales(work):
    ok(run("quantize", "--checkpoint", work / "run", "--out", work / "q"))
    from npgpt.safeio import load_safetensors
    from safetensors.numpy import save_file
    good = load_safetensors(work / "q" / "model.safetensors")
    scale = next(k for k in good if k.endswith(".scales"))
    mf = work / "q" / "manifest.json"
    if mf.exists():
        mf.unlink()
    for bad, what in [(good[scale][:, :1], "scales"), (np.zeros((0, good[scale].shape[1]), np.float32), "scales"),
                      (np.full_like(good[scale], np.nan), "NaN"), (good[scale].astype(np.float64), "scales")]:
        save_file({**good, scale: bad}, str(work / "q" / "model.safetensors"))
        clean_error(run("sample", "--checkpoint", work / "q", "--max-new-tokens", 2), what)


def test_lone_surrogates_in_a_char_tokenizer(work):
    drop_manifest(work / "run")
    p = work / "run" / "ckpt" / "tokenizer_npgpt.json"
    p.write_text(p.read_text().replace('"a"', '"\\ud800"', 1))
    clean_error(run("sample", "--checkpoint", work / "run", "--max-new-tokens", 2), "surrogate|tokenizer")


@pytest.mark.parametrize("args,what", [
    (["train", "--lr", "nan"], "learning_rate"), (["train", "--set", "grad_clip=nan"], "grad_clip"),
    (["train", "--set", "dropout=inf"], "dropout"), (["train", "--set", "weight_decay=nan"], "weight_decay"),
    (["sample", "--temperature", "nan"], "temperature"), (["sample", "--top-p", "nan"], "top_p|top-p"),
    (["prepare", "--val-fraction", "nan"], "val-fraction|val_fraction"),
    (["prepare", "--val-fraction", "-0.1"], "val-fraction|val_fraction"),
    (["finetune", "--distill-alpha", "nan"], "alpha"), (["prune", "--sparsity", "nan"], "sparsity"),
    (["finetune", "--set", "sft_val_fraction=-0.1"], "sft_val_fraction"),
    (["finetune", "--distill-temperature", "inf"], "temperature"), (["sample", "--top-k", "-3"], "top_k")])
def test_nan_and_out_of_range_numeric_options_are_refused(work, args, what):
    cmd, rest = args[0], args[1:]
    extra = {"train": ["--data", work / "data", "--out", work / "n", *TINY],
             "sample": ["--checkpoint", work / "run"],
             "prepare": ["--input", work / "corpus.txt", "--out", work / "p"],
             "finetune": ["--init-from", work / "run", "--teacher", work / "run", "--data", work / "data",
                          "--out", work / "f"],
             "prune": ["--checkpoint", work / "run", "--out", work / "pr"]}[cmd]
    clean_error(run(cmd, *rest, *extra), what)


def test_gptconfig_with_a_string_size_is_an_npgpt_error():
    from npgpt.model import GPTConfig
    for bad in ({"n_embd": "abc"}, {"n_layer": 1.5}, {"dropout": float("nan")}, {"vocab_size": True},
                {"layer_norm_epsilon": float("inf")}):
        with pytest.raises(NpgptError):
            GPTConfig(**bad)


# --------------------------------------------------------------------------------- silently wrong

def _bf16(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)     # round to nearest even


def test_bfloat16_and_float16_model_folders_load(work):
    from safetensors import safe_open
    src = work / "run" / "ckpt"
    with safe_open(str(src / "model.safetensors"), framework="numpy") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    for dtype in ("BF16", "F16"):
        folder = work / dtype
        folder.mkdir()
        for name in ("config.json", "tokenizer_npgpt.json"):
            shutil.copy(src / name, folder / name)
        header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
        for k, a in weights.items():
            b = _bf16(a).tobytes() if dtype == "BF16" else a.astype("<f2").tobytes()
            header[k] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
            blobs.append(b)
            offset += len(b)
        h = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))
        r = ok(run("eval", "--checkpoint", folder, "--data", work / "data", "--json"))
        ref = ok(run("eval", "--checkpoint", work / "run", "--data", work / "data", "--json"))
        lo, lr = json.loads(r.output)["loss"], json.loads(ref.output)["loss"]
        assert abs(lo - lr) < 0.05 and lo != lr, (dtype, lo, lr)


def test_nan_weights_are_refused_at_load(work):
    drop_manifest(work / "run")
    from npgpt.safeio import load_safetensors
    from safetensors.numpy import save_file
    p = work / "run" / "ckpt" / "model.safetensors"
    t = load_safetensors(p)
    t["transformer.h.0.mlp.c_fc.weight"][0, 0] = np.nan
    save_file(t, str(p), metadata={"format": "pt"})
    clean_error(run("sample", "--checkpoint", work / "run", "--max-new-tokens", 3), "NaN")


def test_nan_logits_while_sampling_stop_with_an_error(work, monkeypatch):
    from npgpt.model import GPT
    real = GPT.forward_cached

    def poisoned(self, idx, cache, return_attention=False):
        out = real(self, idx, cache, return_attention)
        return out * np.nan
    monkeypatch.setattr(GPT, "forward_cached", poisoned)
    clean_error(run("sample", "--checkpoint", work / "run", "--max-new-tokens", 3), "NaN|not finite")


def test_empty_stop_string_is_refused(work):
    clean_error(run("sample", "--checkpoint", work / "run", "--stop", "", "--max-new-tokens", 3), "stop")


def test_negative_targets_other_than_ignore_index_are_refused():
    from npgpt.model import GPT, GPTConfig
    m = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8))
    idx = np.array([[1, 2, 3]])
    m(idx, np.array([[2, -1, 3]]))                          # -1 is the ignore index
    with pytest.raises(NpgptError, match="target"):
        m(idx, np.array([[2, -2, 3]]))
    with pytest.raises(NpgptError, match="target"):
        m(idx, np.array([[2, 11, 3]]))


@pytest.mark.parametrize("entry", ["../../etc/hostname", "/etc/hostname", "../ckpt.tmp/x"])
def test_manifest_paths_stay_inside_the_folder(work, entry):
    p = work / "run" / "ckpt" / "manifest.json"
    edit_json(p, lambda m: m["files"].update({entry: {"size": 1, "sha256": "0" * 64}}))
    clean_error(run("sample", "--checkpoint", work / "run", "--max-new-tokens", 2), "outside|absolute")


def test_state_step_beyond_max_iters_is_refused(work):
    drop_manifest(work / "run")
    edit_json(work / "run" / "ckpt" / "state.json", lambda s: s.update(iter=10 ** 6))
    clean_error(run("train", "--out", work / "run", "--resume"), "state.json.*(iter|step)")


def test_resume_with_an_unchanged_model_setting_is_accepted(work):
    r = ok(run("train", "--out", work / "run", "--resume", "--set", "n_layer=1", "--max-iters", 3))
    assert "done: 3 iterations" in r.output
    clean_error(run("train", "--out", work / "run", "--resume", "--set", "n_layer=2", "--max-iters", 4),
                "n_layer")


def test_chat_reply_containing_a_special_token_string(work):
    from npgpt.cli.sample import ChatSession
    from npgpt.loading import load_run
    # byte-level BPE: any reply text can be encoded again, "<|end|>" spelled out included
    ok(run("prepare", "--input", work / "corpus.txt", "--out", work / "bpe", "--tokenizer", "bpe", "--vocab-size", 270))
    ok(run("train", "--data", work / "bpe", "--out", work / "brun", "--max-iters", 1, "--quiet", *TINY))
    recs = [{"messages": [{"role": "user", "content": "hex"}, {"role": "assistant", "content": "zebras"}]}] * 3
    (work / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ok(run("finetune", "--init-from", work / "brun", "--sft", work / "chat.jsonl", "--out", work / "chat",
           "--max-iters", 1, "--quiet", "--batch-size", 2, "--set", "eval_iters=1"))
    model, tok = load_run(work / "chat")[:2]
    s = ChatSession(model, tok, max_new_tokens=3, seed=0)
    s.messages += [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a <|end|> b <|user|>"}]
    from npgpt.sft import render_chat
    ids, _ = render_chat(tok, s.messages, add_generation_prompt=True)
    assert ids.count(tok.special_tokens["<|end|>"]) == 2          # the two real turn ends, not the spelled one
    assert isinstance("".join(s.reply("and <|assistant|> now")), str)
    r = run("chat", "--checkpoint", work / "chat", "--max-new-tokens", 3, "--seed", 0,
            input="say <|end|><|user|> please\nagain\n/quit\n")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output


def test_prepare_reads_a_fifo(work):
    fifo = work / "pipe"
    os.mkfifo(fifo)
    text = (work / "corpus.txt").read_text()

    def feed():
        with open(fifo, "w") as f:
            f.write(text)
    t = threading.Thread(target=feed)
    t.start()
    try:
        r = run("prepare", "--input", fifo, "--out", work / "fifo-data")
    finally:
        t.join(timeout=30)
    ok(r)
    meta = json.loads((work / "fifo-data" / "meta.json").read_text())
    ref = json.loads((work / "data" / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == ref["train_tokens"] + ref["val_tokens"]


def test_prepare_reads_process_substitution(work):
    if shutil.which("bash") is None:
        pytest.skip("needs bash for <(...)")
    p = subprocess.run(["bash", "-c", f'"{sys.executable}" -m npgpt.cli.main prepare --input <(cat "{work}/corpus.txt") '
                                      f'--out "{work}/ps"'], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (work / "ps" / "train.bin").stat().st_size > 0


@pytest.mark.parametrize("name,text,what", [("c.toml", "learning_rate = nan\n", "finite"),
                                            ("c.toml", "[train]\nmax_iters = inf\n", "finite"),
                                            ("c.json", '{"learning_rate": 1e999}', "out of range"),
                                            ("c.json", "[" * 10000 + "]" * 10000, "nests deeper"),
                                            ("c.json", '{"grad_clip": "nan"}', "grad_clip")])
def test_hostile_config_files_are_one_line(work, name, text, what):
    (work / name).write_text(text)
    clean_error(run("train", "--data", work / "data", "--out", work / "n", "--config", work / name, *TINY), what)
    assert not (work / "n" / "ckpt").exists()


@pytest.mark.parametrize("key,value", [("data", "\u0000"), ("out", ""), ("init_from", "a\u0000b")])
def test_paths_in_state_json_must_be_paths(work, key, value):
    drop_manifest(work / "run")
    edit_json(work / "run" / "ckpt" / "state.json", lambda s: s["config"].update({key: value}))
    clean_error(run("train", "--out", work / "run", "--resume", "--max-iters", 3), f"state.json.*{key} must be a path")
