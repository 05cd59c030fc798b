"""Examples are programs too: bad arguments end a lesson, an app or a benchmark script with one line.

Each case runs a script as `python SCRIPT ARGS` would (runpy, run_name "__main__", in this process:
every case stops before any training, so this stays cheap) and checks the CLI's contract: a
non-zero exit (2 for a bad argument, as argparse and click's usage errors; 1 for what the library
refuses), exactly one error line saying what was wrong, and no traceback (no exception escapes).
"""

import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CASES = [   # (script, arguments, exit status, the error line's pattern)
    ("learn/07_bigram_to_gpt.py", ["--text", "missing.txt"], 2, r"--text: missing.txt does not exist"),
    ("learn/07_bigram_to_gpt.py", ["--text", "two.txt", "--fast"], 1, r"too short for training windows"),
    ("learn/07_bigram_to_gpt.py", ["--steps", "0"], 2, r"--steps: must be a positive integer, got 0"),
    ("learn/07_bigram_to_gpt.py", ["--out", "afile"], 2, r"--out: afile .*is a file, not a folder"),
    ("learn/07_bigram_to_gpt.py", ["--out", "/proc/npgpt-out"], 2, r"--out: cannot create folder /proc/npgpt-out"),
    ("learn/09_tokenizers.py", ["--text", "two.txt"], 1, r"two.txt has 2 characters; this lesson needs at least"),
    ("learn/01_chain_rule.py", ["--out", "afile"], 2, r"--out: afile .*is a file"),
    ("apps/generation.py", ["--text", "two.txt", "--fast"], 1, r"too short for training windows"),
    ("apps/generation.py", ["--text", "empty.txt"], 2, r"--text: empty.txt is empty"),
    ("apps/translation.py", ["--steps", "0"], 2, r"--steps: must be a positive integer"),
    ("data_parallel_bench.py", ["--ranks", "0"], 2, r"--ranks: must be a positive integer, got 0"),
    ("lora_qa.py", ["--rank", "0"], 2, r"--rank: must be a positive integer"),
    ("lora_memory.py", ["--rank", "0"], 2, r"--rank: must be a positive integer"),
    ("serve_bench.py", ["--checkpoint", "missing"], 2, r"--checkpoint: missing does not exist"),
    ("serve_bench.py", ["--checkpoint", ".", "--rounds", "0"], 2, r"--rounds: must be a positive integer"),
    ("decode_compare.py", ["missing.gguf"], 2, r"gguf: missing.gguf does not exist"),
    ("decode_compare.py", ["two.txt", "--batches", "1,x"], 2, r"--batches: a comma list of positive batch sizes"),
    ("decode_compare.py", ["two.txt", "--llama-cpp", "nope"], 1, r"--llama-cpp: no llama-batched-bench program at nope"),
    ("speculative_bench.py", ["--checkpoint", "missing", "--draft", "missing"], 2, r"--checkpoint: missing does not"),
    ("speedrun.py", ["--text", "missing.txt"], 2, r"--text: missing.txt does not exist"),
    ("speedrun.py", ["--out", "afile"], 2, r"--out: afile .*is a file"),
    ("preference_rl.py", ["--out", "afile", "--fast"], 2, r"--out: afile .*is a file"),
    ("shakespeare_char.py", ["--input", "two.txt", "--iters", "1"], 1, r"too short to split"),
]


@pytest.mark.parametrize("script,args,status,pattern", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_argument_is_one_line(script, args, status, pattern, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.txt").write_text("ab")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "afile").write_text("keep me")
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), *args])
    monkeypatch.setattr(sys, "path", [str((EXAMPLES / script).parent), *sys.path])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == status, err
    lines = [x for x in err.splitlines() if re.search(r"(^Error: |: error: )", x)]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "keep me"
