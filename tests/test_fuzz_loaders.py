"""Fuzz the loaders: mutated model, checkpoint, tokenizer, data and SFT files fail with one clean line.

Valid folders are made once through the CLI (tiny char-level GPT-2 and Llama runs, a BPE tokenizer, a tiktoken
file, SFT records, a Hugging Face style folder with tokenizer.json and a chat template); then, for each
file kind, tests/fuzz_loaders_worker.py runs in a subprocess
under an address-space limit and checks MAX_EXAMPLES hypothesis mutations of that file: the command
reading it must exit 0 or print one `Error:` line, never raise, run out of memory or hang. The
example count is bounded (derandomized, as the CI profile is) so this stays a CI test;
FUZZ_EXAMPLES=N runs more.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from chat_templates import CHATML
from helpers import TINY, corpus, hf_chat_tokenizer
from npgpt import GPT, GPTConfig
from npgpt.cli.main import cli

WORKER = Path(__file__).with_name("fuzz_loaders_worker.py")
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
TARGETS = ["gguf", "llama_config", "llama_index", "config", "safetensors", "state", "manifest", "bpe_files", "tokenizer_meta",
           "tiktoken", "sft", "meta", "tokenizer_json", "chat_template", "hub",
           "adapter"]


def _ok(args):
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-pristine")
    (root / "corpus.txt").write_text(corpus(800))
    _ok(["prepare", "--input", str(root / "corpus.txt"), "--out", str(root / "data"), "--tokenizer", "char"])
    _ok(["train", "--data", str(root / "data"), "--out", str(root / "run"), "--max-iters", "2", "--quiet", *TINY])
    _ok(["train", "--data", str(root / "data"), "--out", str(root / "llama"), "--preset", "llama-baby", "--max-iters",
         "2", "--quiet", *TINY])
    _ok(["prepare", "--input", str(root / "corpus.txt"), "--out", str(root / "bpe"), "--tokenizer", "bpe",
         "--vocab-size", "300"])
    from npgpt.tokenizer import load
    load(root / "bpe").save_tiktoken(root / "ranks.tiktoken")
    records = [{"prompt": "the quick", "completion": " brown fox"},
               {"messages": [{"role": "user", "content": "hex"}, {"role": "assistant", "content": "zebras"}]},
               {"prompt": "seven", "completion": " wizards"}]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # a Hugging Face style folder: tokenizer.json, tokenizer_config.json with a ChatML template
    tok = hf_chat_tokenizer(CHATML)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=128, vocab_size=tok.vocab_size)).save_pretrained(root / "hf")
    tok.save(root / "hf")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_mutated_files_fail_cleanly_within_a_memory_bound(pristine, target):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(WORKER), target, str(pristine), str(EXAMPLES)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, f"{target}: {(p.stdout + p.stderr)[-6000:]}"
    assert f"{target}: {EXAMPLES} examples passed" in p.stdout
