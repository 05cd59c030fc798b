"""LoRA from the command line: finetune --lora-rank, resume, sample/eval --adapter, merge, int8 bases, errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from npgpt.cli.main import cli

from helpers import TINY, corpus


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def clean_error(r, pattern):
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and __import__("re").search(pattern, lines[0]), r.output


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    (d / "corpus.txt").write_text(corpus())
    assert run("prepare", "--input", d / "corpus.txt", "--out", d / "data").exit_code == 0
    r = run("train", "--data", d / "data", "--out", d / "base", "--max-iters", 20, "--eval-interval", 10,
            "--lr", 3e-3, *TINY)
    assert r.exit_code == 0, r.output
    return d


LORA = ["--lora-rank", 4, "--lr", 1e-2, "--eval-interval", 4, "--set", "eval_iters=2", "--batch-size", 4,
        "--block-size", 16]


def _text(r):
    """The sample, without the timing line."""
    assert r.exit_code == 0, r.output
    return [x for x in r.output.splitlines() if not x.startswith("(")]


def _adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_lora_finetune_saves_peft_adapter_and_base_is_untouched(base):
    d = base
    before = load_file(str(d / "base" / "ckpt" / "model.safetensors"))
    r = run("finetune", "--init-from", d / "base", "--data", d / "data", "--out", d / "ft", "--max-iters", 8,
            "--lora-targets", "c_attn,mlp.c_proj", *LORA)
    assert r.exit_code == 0, r.output
    assert "LoRA: r=4" in r.output and "trainable parameters" in r.output
    ckpt = d / "ft" / "ckpt"
    assert not (ckpt / "model.safetensors").exists()          # adapters only, not a copy of the base
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["c_attn", "mlp.c_proj"]
    assert cfg["base_model_name_or_path"] == str((d / "base" / "ckpt").resolve())
    ad = _adapter(ckpt)
    assert sorted(ad) == ["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
                          "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight",
                          "base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight",
                          "base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight"]
    assert np.abs(ad["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]).max() > 0   # it trained
    r = run("info", d / "ft")
    assert r.exit_code == 0 and "LoRA adapter: r=4, alpha=8, 2 layers (c_attn, mlp.c_proj)" in r.output, r.output
    after = load_file(str(d / "base" / "ckpt" / "model.safetensors"))
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # the optimizer holds state for the adapters only
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    n_state = sum(v.size for v in opt.values())
    assert n_state == 2 * sum(v.size for v in ad.values()), (n_state, list(opt))


def test_sample_eval_merge_agree(base):
    d = base
    if not (d / "ft" / "ckpt").exists():
        test_lora_finetune_saves_peft_adapter_and_base_is_untouched(base)
    args = ["--prompt", "the ", "--max-new-tokens", 12, "--seed", 3, "--temperature", 0]
    via_run = run("sample", "--checkpoint", d / "ft", *args)
    via_adapter = run("sample", "--checkpoint", d / "base", "--adapter", d / "ft" / "ckpt", *args)
    plain = run("sample", "--checkpoint", d / "base", *args)
    assert _text(via_run) == _text(via_adapter)
    r = run("merge", "--checkpoint", d / "base", "--adapter", d / "ft", "--out", d / "merged")
    assert r.exit_code == 0, r.output
    merged = run("sample", "--checkpoint", d / "merged", *args)
    assert _text(merged) == _text(via_run)
    ev = [json.loads(run("eval", "--checkpoint", *c, "--input", d / "corpus.txt", "--json").output)["loss"]
          for c in ([d / "ft"], [d / "base", "--adapter", d / "ft"], [d / "merged"], [d / "base"])]
    assert abs(ev[0] - ev[1]) < 1e-9 and abs(ev[0] - ev[2]) < 1e-5 and abs(ev[0] - ev[3]) > 1e-4
    assert plain.exit_code == 0
    clean_error(run("merge", "--checkpoint", d / "base", "--adapter", d / "ft", "--out", d / "merged"), "--force")


def test_lora_resume_is_exact(base):
    d = base
    common = ["--init-from", d / "base", "--data", d / "data", *LORA, "--set", "lora_dropout=0.1"]
    assert run("finetune", *common, "--out", d / "full", "--max-iters", 8).exit_code == 0
    assert run("finetune", *common, "--out", d / "half", "--max-iters", 4).exit_code == 0
    r = run("finetune", "--resume", "--out", d / "half", "--max-iters", 8)
    assert r.exit_code == 0 and "resuming from step 4" in r.output, r.output
    a, b = _adapter(d / "full" / "ckpt"), _adapter(d / "half" / "ckpt")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_lora_on_int8_base(base):
    d = base
    assert run("quantize", "--checkpoint", d / "base", "--out", d / "base8").exit_code == 0
    r = run("finetune", "--init-from", d / "base8", "--data", d / "data", "--out", d / "ft8", "--max-iters", 6, *LORA)
    assert r.exit_code == 0, r.output
    assert "8-bit" in r.output
    r = run("eval", "--checkpoint", d / "ft8", "--input", d / "corpus.txt", "--json")
    assert r.exit_code == 0, r.output
    r = run("merge", "--checkpoint", d / "base8", "--adapter", d / "ft8", "--out", d / "merged8")
    assert r.exit_code == 0 and "dequantised" in r.output, r.output
    cfg = json.loads((d / "merged8" / "config.json").read_text())
    assert not cfg.get("npgpt", {}).get("quantization")


def test_eval_task_and_stride_from_cli(base, tmp_path):
    d = base
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"ctx": "the quick brown", "endings": [e, "zzzz"], "label": 0}) + "\n"
                            for e in ("fox", "dog", "lazy")))
    r = run("eval", "--checkpoint", d / "base", "--task", task, "--out", tmp_path / "res.jsonl", "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.output)
    assert rec["items"] == 3 and 0 <= rec["acc"] <= 1
    rows = [json.loads(x) for x in (tmp_path / "res.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(x["loglik"]) == 2 for x in rows)
    assert rec["acc"] == sum(x["correct"] for x in rows) / 3
    plain = json.loads(run("eval", "--checkpoint", d / "base", "--input", d / "corpus.txt", "--json").output)
    strided = json.loads(run("eval", "--checkpoint", d / "base", "--input", d / "corpus.txt", "--json",
                             "--stride", 16).output)
    assert plain["tokens"] == strided["tokens"] and abs(plain["loss"] - strided["loss"]) < 1e-6


def test_lora_bad_inputs(base, tmp_path):
    d = base
    clean_error(run("finetune", "--init-from", d / "base", "--data", d / "data", "--out", tmp_path / "x",
                    "--lora-rank", 0), "lora-rank must be a positive")
    clean_error(run("finetune", "--init-from", d / "base", "--data", d / "data", "--out", tmp_path / "x",
                    "--lora-rank", 2, "--lora-targets", "q_proj"), "matches no layer")
    clean_error(run("finetune", "--init-from", d / "base", "--data", d / "data", "--out", tmp_path / "x",
                    "--lora-rank", 2, "--lora-dropout", 1.5), "lora-dropout")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    clean_error(run("finetune", "--init-from", d / "base", "--sft", chat, "--out", tmp_path / "y", "--lora-rank", 2),
                "new tokens")
    clean_error(run("sample", "--checkpoint", d / "base", "--adapter", tmp_path), "adapter_config.json is missing")
    clean_error(run("eval", "--checkpoint", d / "base", "--task", tmp_path / "nope.jsonl"), "does not exist")
    clean_error(run("eval", "--checkpoint", d / "base", "--input", d / "corpus.txt", "--stride", 0), "--stride")


def test_serve_with_adapter_equals_library(tmp_path):
    """`npgpt serve --adapter DIR` answers as the library does with the same adapter (greedy)."""
    import http.client

    from serve_helpers import LiveServer, model_folder

    from npgpt.loading import load_run
    from npgpt.generate import generate
    from npgpt.lora import LoRAConfig, apply_lora, lora_layers, save_adapter

    folder = model_folder(tmp_path / "plain", chat=False, block=64, n_embd=32, seed=5)
    model, tok = load_run(folder)[:2]
    ids = tok.encode("the quick")
    base_out = generate(model, ids, 16, temperature=0)
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    r = np.random.default_rng(0)
    for _, lin in lora_layers(model):
        lin.lora_B.data[...] = r.normal(0, 1.0, lin.lora_B.shape)
    save_adapter(model, tmp_path / "ad", base_model=folder)
    want = generate(model, ids, 16, temperature=0)
    assert want != base_out                                  # the adapter changes the answer
    server = LiveServer(folder, "--adapter", str(tmp_path / "ad"))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "plain", "prompt": "the quick",
                                                                 "max_tokens": 16, "temperature": 0}),
                     headers={"Content-Type": "application/json"})
        resp = json.loads(conn.getresponse().read())
        conn.request("GET", "/v1/models")
        models = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        assert server.stop() == 0
    # the server says the adapter is on, and its model id shows it
    assert any("LoRA adapter" in line and "r=4" in line for line in server.lines), server.lines
    assert models["data"][0]["id"] == "plain+ad"
    cut = [t for t in want]
    if tok.eot_id in cut:
        cut = cut[:cut.index(tok.eot_id)]
    assert resp["choices"][0]["text"] == tok.decode(cut)


def test_train_api_trains_lora_adapters_alone(base, tmp_path):
    """train(cfg) with lora_rank, no plugin passed: only the adapters train (never every weight), and
    the checkpoint holds them alone."""
    from npgpt.train import TrainConfig, train
    cfg = TrainConfig(init_from=str(base / "base"), data=str(base / "data"), out=str(tmp_path / "z"), lora_rank=2,
                      max_iters=2, block_size=16, batch_size=2, eval_iters=1, eval_interval=2, quiet=True)
    train(cfg)
    ckpt = tmp_path / "z" / "ckpt"
    assert not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 2
    assert any(np.abs(a).max() > 0 for k, a in _adapter(ckpt).items() if "lora_B" in k)   # the adapters moved
