"""What a new user reads in the first hour: log lines that add up and say what they mean."""

import re

import pytest
from click.testing import CliRunner

from npgpt.cli.main import cli

from helpers import TINY, corpus


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("first-hour")
    (d / "corpus.txt").write_text(corpus())
    assert run("prepare", "--input", d / "corpus.txt", "--out", d / "data").exit_code == 0
    r = run("train", "--data", d / "data", "--out", d / "base", "--max-iters", 4, "--eval-interval", 2,
            "--set", "n_layer=1", *[a for a in TINY if a not in ("n_layer=2",)])
    assert r.exit_code == 0, r.output
    return d, r.output


def test_training_log_counts_and_words(base):
    _, output = base
    model_line = next(line for line in output.splitlines() if line.startswith("model:"))
    assert re.search(r"\b1 layer,", model_line) and "1 layers" not in model_line, model_line
    assert "MFU" not in output                       # the per-step line no longer shows a misleading MFU


def test_lora_percentage_is_of_the_whole_base(base):
    d, _ = base
    r = run("finetune", "--init-from", d / "base", "--data", d / "data", "--out", d / "lora", "--lora-rank", 4,
            "--max-iters", 2, "--eval-interval", 2, "--set", "eval_iters=1", "--batch-size", 2)
    assert r.exit_code == 0, r.output
    total = int(re.search(r"model: .*: ([\d,]+) parameters", r.output).group(1).replace(",", ""))
    m = re.search(r"([\d,]+) trainable parameters \(([\d.]+)% of the base's ([\d,]+)\)", r.output)
    assert m, r.output
    n_train, pct, n_base = int(m.group(1).replace(",", "")), float(m.group(2)), int(m.group(3).replace(",", ""))
    assert n_base == total                           # the base is the model the "model:" line counts
    assert abs(pct - 100 * n_train / n_base) < 0.01


def test_resume_with_another_batch_says_tokens_per_iteration_changed(base, tmp_path):
    d, _ = base
    out = tmp_path / "run"
    common = ["--data", d / "data", "--out", out, "--eval-interval", 2, *TINY]
    assert run("train", "--max-iters", 2, *common).exit_code == 0
    r = run("train", "--resume", "--max-iters", 4, *common, "--batch-size", 8)     # later flags win
    assert r.exit_code == 0, r.output
    note = [line for line in r.output.splitlines() if line.startswith("note: this run took")]
    assert len(note) == 1 and "it now takes" in note[0], r.output


def test_sample_defaults_to_the_contexts_remaining_room(base):
    d, _ = base
    r = run("sample", "--checkpoint", d / "base", "--prompt", "the ", "--seed", 1, "--no-stream")
    assert r.exit_code == 0, r.output
    from npgpt.loading import load_run
    model, tok = load_run(d / "base")[:2]
    text = r.stdout.rstrip("\n")                       # the timing line goes to stderr
    assert text.startswith("the ")
    n_new = len(tok.encode_plain(text)) - len(tok.encode_plain("the "))
    assert n_new == model.config.block_size - 4          # 16-token context, 4-token prompt: 12 new tokens


def test_special_tokens_in_a_prompt_get_a_cli_hint(base):
    d, _ = base
    r = run("sample", "--checkpoint", d / "base", "--prompt", "the <|endoftext|>", "--max-new-tokens", 2)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "--prompt contains the special token '<|endoftext|>'; add --allow-special" in r.output, r.output
    assert "allowed_special" not in r.output
    r = run("sample", "--checkpoint", d / "base", "--prompt", "the <|endoftext|>", "--max-new-tokens", 2,
            "--allow-special")
    assert r.exit_code == 0, r.output


def test_a_bad_request_body_is_not_called_a_damaged_file():
    from npgpt.errors import NpgptError
    from npgpt.safeio import parse_json
    for body in (b"{", b'{"a": 1, "a": 2}', b"\xff"):
        with pytest.raises(NpgptError) as e:
            parse_json(body, "the request body", sent=True)
        assert "damaged" not in str(e.value) and "send valid JSON" in str(e.value)
    with pytest.raises(NpgptError, match="damaged"):
        parse_json(b"{", "config.json")                  # a file on disk is still called damaged


def test_gpu_errors_name_the_device_as_the_user_wrote_it():
    from npgpt.backend import gpu_available, parse_device, require_gpu
    from npgpt.errors import NpgptError
    if gpu_available():
        pytest.skip("a GPU is usable here: the error path cannot be reached")
    with pytest.raises(NpgptError, match=r"^--device gpu "):
        require_gpu(parse_device("gpu"))
    assert parse_device("gpu") == parse_device("cuda:0")
