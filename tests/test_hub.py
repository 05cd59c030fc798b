"""`hf:ORG/NAME[@REVISION]` through huggingface_hub, offline: a cache laid out as huggingface_hub lays
it out (blobs, refs, snapshots of symlinks), never a download."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("huggingface_hub")

import npgpt  # noqa: E402
from npgpt.cli.main import cli  # noqa: E402
from npgpt.errors import NpgptError  # noqa: E402
from npgpt.hub import parse_hub_ref, snapshot  # noqa: E402

from chat_templates import CHATML  # noqa: E402
from helpers import hf_chat_tokenizer  # noqa: E402

REPO = "npgpt-test/tiny-chat"


def put_in_cache(cache: Path, repo: str, folder: Path, commit: str, refs=("main",)):
    """Store `folder`'s files as huggingface_hub does: content-addressed blobs, a snapshot of relative
    symlinks named by the commit, and refs/<branch or tag> holding the commit hash."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """Two revisions of a tiny chat model: main (commit A) and tag v1 (commit B, other weights)."""
    from npgpt import GPT, GPTConfig
    base = tmp_path_factory.mktemp("hub")
    tok = hf_chat_tokenizer(CHATML)
    commits = {}
    for name, seed, refs in (("a", 0, ("main",)), ("b", 1, ("v1",))):
        d = base / name
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=256, vocab_size=tok.vocab_size), seed=seed).save_pretrained(d)
        tok.save(d)
        (d / "pytorch_model.bin").write_bytes(b"never read")       # a pickle in the repo is ignored
        commits[name] = hashlib.sha1(name.encode()).hexdigest()
        put_in_cache(base / "cache", REPO, d, commits[name], refs)
    return base / "cache", commits


@pytest.fixture
def offline(hub_cache, monkeypatch):
    import huggingface_hub.constants as constants
    cache, commits = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, commits


def test_parse_refs():
    assert parse_hub_ref("hf:HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert parse_hub_ref("hf:Qwen/Qwen2.5-0.5B@v1.0") == ("Qwen/Qwen2.5-0.5B", "v1.0")
    for bad in ("hf:", "hf:noslash", "hf:a/b/c", "hf:../x", "hf:a/b@", "hf:a/b@../../etc", "hf:a b/c"):
        with pytest.raises(NpgptError, match="not a Hub model reference"):
            parse_hub_ref(bad)


def test_revisions_resolve_in_the_cache(offline):
    cache, commits = offline
    assert snapshot(f"hf:{REPO}").name == commits["a"]                      # main
    assert snapshot(f"hf:{REPO}@v1").name == commits["b"]                   # a tag
    assert snapshot(f"hf:{REPO}@{commits['a']}").name == commits["a"]       # a commit hash
    with pytest.raises(NpgptError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        snapshot("hf:npgpt-test/absent")


def test_from_pretrained_and_load_run(offline, hub_cache):
    _, commits = offline
    a, b = npgpt.from_pretrained(f"hf:{REPO}"), npgpt.from_pretrained(f"hf:{REPO}@v1")
    local = npgpt.from_pretrained(snapshot(f"hf:{REPO}"))
    wa, wb, wl = (m.state_dict()["transformer.wte.weight"] for m in (a, b, local))
    assert np.array_equal(wa, wl) and not np.array_equal(wa, wb)
    run = npgpt.load_run(f"hf:{REPO}")
    assert run.tokenizer.chat_template == CHATML and run.state is None


def test_cli_offline_in_a_subprocess(hub_cache, tmp_path):
    """The real thing: env variables only, huggingface_hub imported fresh, every command's --checkpoint."""
    cache, _ = hub_cache
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), OPENBLAS_NUM_THREADS="1")
    run = lambda *a, inp=None: subprocess.run([sys.executable, "-m", "npgpt.cli.main", *a], env=env,  # noqa: E731
                                               capture_output=True, text=True, input=inp, timeout=300)
    r = run("sample", "--checkpoint", f"hf:{REPO}@v1", "--prompt", "the", "--max-new-tokens", "3", "--seed", "0")
    assert r.returncode == 0, r.stderr
    r = run("chat", "--checkpoint", f"hf:{REPO}", "--max-new-tokens", "3", inp="the fox\n/quit\n")
    assert r.returncode == 0 and "bot> " in r.stdout, r.stderr
    r = run("sample", "--checkpoint", "hf:npgpt-test/absent", "--prompt", "x")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in r.stderr


def test_finetune_init_from_hub(offline, tmp_path):
    import json
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"the {w}"},
                                                    {"role": "assistant", "content": f"a {w}"}]})
                           for w in ("fox", "dog", "quick")) + "\n")
    r = CliRunner().invoke(cli, ["finetune", "--init-from", f"hf:{REPO}", "--sft", str(f), "--lora-rank", "4",
                                 "--out", str(tmp_path / "ft"), "--max-iters", "2", "--eval-interval", "2",
                                 "--batch-size", "2", "--set", "eval_iters=1"])
    assert r.exit_code == 0, r.output
    # the adapter records the local snapshot as its base, so the run reloads offline
    cfg = json.loads((tmp_path / "ft" / "ckpt" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).name == offline[1]["a"]
    assert npgpt.load_run(tmp_path / "ft").tokenizer.chat_template == CHATML


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(NpgptError, match=r"pip install 'npgpt\[hub\]'"):
        snapshot(f"hf:{REPO}")
