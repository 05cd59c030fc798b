"""`npgpt prepare` through click's CliRunner: happy paths, and clean one-line errors for bad input."""

import json

import pytest
from click.testing import CliRunner

from npgpt.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, ["prepare", *map(str, args)])


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "input.txt"
    p.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40)
    return p


def test_prepare_char(corpus, tmp_path):
    r = run("--input", corpus, "--out", tmp_path / "d")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    assert f"{meta['train_tokens']:,} train, {meta['val_tokens']:,} val" in r.output
    assert "vocab size" in r.output and "npgpt train --data" in r.output


def test_prepare_bpe_and_tokenizer_from(corpus, tmp_path):
    r = run("--input", corpus, "--out", tmp_path / "b", "--tokenizer", "bpe", "--vocab-size", "300",
            "--val-fraction", "0.2")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] <= 300 and meta["val_fraction"] == 0.2
    r = run("--input", corpus, "--out", tmp_path / "c", "--tokenizer-from", tmp_path / "b")
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert again["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"]


def test_prepare_builtin_dataset(tmp_path):
    r = run("--dataset", "pydoc", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["dataset"] == "pydoc"


def test_force_replaces(corpus, tmp_path):
    assert run("--input", corpus, "--out", tmp_path / "d").exit_code == 0
    r = run("--input", corpus, "--out", tmp_path / "d")
    assert r.exit_code == 1 and "--force" in r.output
    assert run("--input", corpus, "--out", tmp_path / "d", "--force").exit_code == 0


def test_bad_inputs_exit_cleanly_and_write_nothing(corpus, tmp_path):
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\x00\x01\x02")
    latin1 = tmp_path / "l.txt"
    latin1.write_bytes(b"caf\xe9 au lait")
    empty = tmp_path / "e.txt"
    empty.write_text("")
    out = tmp_path / "out"
    cases = [
        (["--input", tmp_path / "missing.txt"], "does not exist"),
        (["--input", empty], "empty"),
        (["--input", binary], "binary"),
        (["--input", latin1], "byte offset 3"),
        (["--input", corpus, "--vocab-size", "500"], "--vocab-size applies to --tokenizer bpe"),
        (["--input", corpus, "--tokenizer", "bpe", "--vocab-size", "10"], "--vocab-size"),
        (["--input", corpus, "--val-fraction", "1.5"], "--val-fraction"),
        (["--input", corpus, "--tokenizer-from", tmp_path / "nope"], "does not exist"),
        (["--input", corpus, "--tokenizer-from", tmp_path, "--tokenizer", "bpe"], "not both"),
        (["--input", corpus, "--dataset", "pydoc"], "not both"),
        ([], "--input"),
    ]
    for args, message in cases:
        r = run(*args, "--out", out)
        assert r.exit_code == 1, (args, r.output)
        assert isinstance(r.exception, SystemExit), (args, r.exception)
        assert r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
        assert message in r.output, (args, r.output)
        assert "Traceback" not in r.output
        assert not out.exists(), args
    afile = tmp_path / "afile"
    afile.write_text("keep")
    r = run("--input", corpus, "--out", afile)
    assert r.exit_code == 1 and "is a file" in r.output and afile.read_text() == "keep"


def test_usage_errors_from_click(tmp_path, corpus):
    r = run("--input", corpus)                                           # --out missing
    assert r.exit_code == 2 and "--out" in r.output
    r = run("--input", corpus, "--out", tmp_path / "o", "--tokenizer", "word")
    assert r.exit_code == 2 and not (tmp_path / "o").exists()


def test_help_documents_every_option():
    r = CliRunner().invoke(cli, ["prepare", "--help"])
    assert r.exit_code == 0
    for flag in ("--input", "--dataset", "--out", "--tokenizer", "--vocab-size", "--tokenizer-from",
                 "--val-fraction", "--force"):
        assert flag in r.output
