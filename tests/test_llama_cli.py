"""The Llama family through the whole CLI, on tiny random Llama and Qwen2 folders written here (Hugging
Face layout + an npgpt tokenizer): sample (controls, beam, speculative with a Llama draft), chat, eval
(loss, --stride, --task), inspect (heads, logit lens), quantize / prune / trim, finetune (full, SFT,
distillation, LoRA with PEFT's names) + merge + resume, and serve with the official openai client."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from npgpt.cli.main import cli
from npgpt.generate import beam_search, generate
from npgpt.llama import Llama, LlamaConfig
from npgpt.loading import from_pretrained
from npgpt.sft import ensure_chat_tokens
from npgpt.tokenizer import CharTokenizer
from npgpt.tokenizer import load as load_tokenizer

from helpers import corpus


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(r):
    assert r.exit_code == 0, r.output
    return r.output


def clean_error(r, pattern):
    import re
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.output


def text(r):
    return [x for x in ok(r).splitlines() if not x.startswith("(")]


def llama_folder(path, seed=0, scale=3.0, **kw):
    """A tiny random Llama (or Qwen2) with a char tokenizer (chat tokens included), weights scaled up
    so its distributions are peaked and greedy decoding never hinges on float noise."""
    tok = CharTokenizer.train(corpus(300))
    ensure_chat_tokens(tok)
    cfg = dict(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=48)
    m = Llama(LlamaConfig(**{**cfg, **kw}), seed=seed)
    for name, p in m.named_parameters():
        if p.data.ndim > 1:
            p.data *= scale
        elif name.endswith("bias"):
            p.data[...] = np.random.default_rng(seed).normal(0, 0.5, p.shape)
    m.save_pretrained(path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    llama_folder(d / "llama")
    llama_folder(d / "qwen", seed=1, qkv_bias=True, model_type="qwen2", n_kv_head=1)
    llama_folder(d / "draft", seed=2, n_layer=1)
    (d / "corpus.txt").write_text(corpus(2000))
    ok(run("prepare", "--input", d / "corpus.txt", "--out", d / "data", "--tokenizer-from", d / "llama"))
    return d


GREEDY = ["--prompt", "the ", "--max-new-tokens", 16, "--temperature", 0, "--seed", 1]


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_sample_greedy_equals_the_library_and_controls_run(d, name):
    folder = d / name
    tok, model = load_tokenizer(folder), from_pretrained(folder)
    want = tok.decode(generate(model, tok.encode("the "), 16, temperature=0))
    out = "\n".join(text(run("sample", "--checkpoint", folder, *GREEDY)))
    assert want and want in out
    ok(run("sample", "--checkpoint", folder, "--prompt", "the ", "--max-new-tokens", 12, "--top-k", 5, "--top-p",
           0.9, "--temperature", 0.8, "--repetition-penalty", 1.3, "--presence-penalty", 0.5, "--num-samples", 2,
           "--stop", "zz", "--stream", "--seed", 4))
    beam = tok.decode(beam_search(model, tok.encode("the "), 10, num_beams=3))
    assert beam in ok(run("sample", "--checkpoint", folder, "--prompt", "the ", "--max-new-tokens", 10,
                          "--num-beams", 3))


def test_speculative_with_a_llama_draft_equals_greedy(d):
    plain = text(run("sample", "--checkpoint", d / "llama", *GREEDY))
    spec = text(run("sample", "--checkpoint", d / "llama", "--draft", d / "draft", "--num-draft", 3, *GREEDY))
    assert [x for x in spec if not x.startswith("speculative")] == plain


def test_eval_loss_stride_and_task(d, tmp_path):
    plain = json.loads(ok(run("eval", "--checkpoint", d / "llama", "--input", d / "corpus.txt", "--json")))
    strided = json.loads(ok(run("eval", "--checkpoint", d / "llama", "--input", d / "corpus.txt", "--json",
                                "--stride", 32)))
    assert plain["tokens"] == strided["tokens"] and plain["loss"] > 0
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"ctx": "the quick brown", "endings": [e, "zzzz"], "label": 0}) + "\n"
                            for e in ("fox", "dog")))
    rec = json.loads(ok(run("eval", "--checkpoint", d / "qwen", "--task", task, "--json")))
    assert rec["items"] == 2 and 0 <= rec["acc"] <= 1


def test_info_and_inspect(d):
    out = ok(run("info", d / "qwen"))
    assert "qwen2, 2 layers, 4 heads (1 key/value)" in out
    out = ok(run("inspect", "--checkpoint", d / "llama", "--prompt", "the lazy", "--layer", 1, "--head", 3))
    assert "layer 1" in out
    clean_error(run("inspect", "--checkpoint", d / "llama", "--prompt", "the", "--head", 4), "out of range")
    out = ok(run("inspect", "--checkpoint", d / "llama", "--prompt", "the lazy", "--logit-lens"))
    assert "emb" in out


def test_logit_lens_last_row_is_the_models_own_prediction(d):
    from npgpt.interpret import logit_lens
    model, tok = from_pretrained(d / "llama"), load_tokenizer(d / "llama")
    ids = tok.encode("the lazy")
    probs = logit_lens(model, ids)
    logits = model(np.array([ids]))[0].data[0].astype(np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    assert probs.shape == (3, len(ids), tok.vocab_size)
    np.testing.assert_allclose(probs[-1], e / e.sum(-1, keepdims=True), rtol=1e-6, atol=1e-9)


def test_quantize_prune_trim(d):
    ok(run("quantize", "--checkpoint", d / "qwen", "--out", d / "q8", "--embedding"))
    ok(run("quantize", "--checkpoint", d / "llama", "--out", d / "q4", "--bits", 4, "--group-size", 16))
    from npgpt.layers import QuantizedLinear
    q = from_pretrained(d / "q4")
    assert isinstance(q.model.layers[0].self_attn.k_proj, QuantizedLinear) and q.config.n_kv_head == 2
    assert text(run("sample", "--checkpoint", d / "q8", *GREEDY))
    ok(run("prune", "--checkpoint", d / "llama", "--out", d / "pruned", "--sparsity", 0.5))
    sd = load_file(str(d / "pruned" / "model.safetensors"))
    w = sd["model.layers.0.mlp.gate_proj.weight"]
    assert 0.3 < (w == 0).mean() < 0.7
    ok(run("trim", "--checkpoint", d / "llama", "--out", d / "trimmed", "--mlp-keep", 0.5, "--drop-layers", 0))
    t = from_pretrained(d / "trimmed")
    assert t.config.n_layer == 1 and t.config.n_inner == 24 and text(run("sample", "--checkpoint", d / "trimmed",
                                                                         *GREEDY))
    # keeping every unit reproduces the model exactly; dropping half keeps the most important ones
    from npgpt.compress import mlp_importance, trim_model
    m = from_pretrained(d / "llama")
    x = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(trim_model(m, 1.0)(x)[0].data, m(x)[0].data)
    layer = m.model.layers[1]
    units = np.sort(np.argsort(-mlp_importance(layer, "llama"), kind="stable")[:24])
    np.testing.assert_array_equal(t.model.layers[0].mlp.gate_proj.weight.data, layer.mlp.gate_proj.weight.data[:, units])
    np.testing.assert_array_equal(t.model.layers[0].mlp.down_proj.weight.data, layer.mlp.down_proj.weight.data[units])


LORA = ["--lr", 1e-2, "--eval-interval", 4, "--set", "eval_iters=2", "--batch-size", 4, "--block-size", 16]


def test_lora_finetune_peft_names_sample_merge_and_resume(d):
    ok(run("finetune", "--init-from", d / "llama", "--data", d / "data", "--out", d / "ft", "--max-iters", 8,
           "--lora-rank", 8, *LORA))
    ckpt = d / "ft" / "ckpt"
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["fan_in_fan_out"] is False
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ad = load_file(str(ckpt / "adapter_model.safetensors"))
    assert len(ad) == 2 * 7 * 2
    a = ad["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    b = ad["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    assert a.shape == (8, 32) and b.shape == (16, 8) and np.abs(b).max() > 0     # (r, in), (out = nkv hs, r)
    via_run = text(run("sample", "--checkpoint", d / "ft", *GREEDY))
    assert via_run == text(run("sample", "--checkpoint", d / "llama", "--adapter", ckpt, *GREEDY))
    ok(run("merge", "--checkpoint", d / "llama", "--adapter", d / "ft", "--out", d / "merged"))
    assert json.loads((d / "merged" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert text(run("sample", "--checkpoint", d / "merged", *GREEDY)) == via_run
    # resume is exact
    common = ["--init-from", d / "llama", "--data", d / "data", "--lora-rank", 4, "--lora-targets", "q_proj,down_proj",
              *LORA]
    ok(run("finetune", *common, "--out", d / "full", "--max-iters", 8))
    ok(run("finetune", *common, "--out", d / "half", "--max-iters", 4))
    assert "resuming from step 4" in ok(run("finetune", "--resume", "--out", d / "half", "--max-iters", 8))
    x, y = load_file(str(d / "full" / "ckpt" / "adapter_model.safetensors")), \
        load_file(str(d / "half" / "ckpt" / "adapter_model.safetensors"))
    assert sorted(x) == sorted(y) and len(x) == 2 * 2 * 2 and all(np.array_equal(x[k], y[k]) for k in x)
    clean_error(run("finetune", "--init-from", d / "llama", "--data", d / "data", "--out", d / "bad", "--max-iters", 2,
                    "--lora-rank", 4, "--lora-targets", "c_attn", *LORA), "q_proj")


def test_lora_on_an_int8_qwen_base(d):
    ok(run("quantize", "--checkpoint", d / "qwen", "--out", d / "qwen8"))
    ok(run("prepare", "--input", d / "corpus.txt", "--out", d / "qdata", "--tokenizer-from", d / "qwen"))
    out = ok(run("finetune", "--init-from", d / "qwen8", "--data", d / "qdata", "--out", d / "qft", "--max-iters", 4,
                 "--lora-rank", 8, *LORA))
    assert "8-bit" in out
    assert text(run("sample", "--checkpoint", d / "qft", *GREEDY))


def test_full_finetune_sft_chat_and_distillation(d, tmp_path):
    ok(run("finetune", "--init-from", d / "llama", "--data", d / "data", "--out", d / "full_ft", "--max-iters", 4,
           *LORA))
    ft = from_pretrained(d / "full_ft" / "ckpt")
    assert isinstance(ft, Llama)
    sft = tmp_path / "chat.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "the fox"},
                                                    {"role": "assistant", "content": "jumps over"}]}) + "\n"
                           for _ in range(8)))
    ok(run("finetune", "--init-from", d / "llama", "--sft", sft, "--out", d / "sft", "--max-iters", 4, "--lr", 1e-2,
           "--batch-size", 4, "--eval-interval", 4, "--set", "eval_iters=1"))
    r = CliRunner().invoke(cli, ["chat", "--checkpoint", str(d / "sft"), "--max-new-tokens", "8", "--temperature", "0"],
                           input="the fox\n")
    assert r.exit_code == 0, r.output
    # distillation from a Qwen2 teacher (same tokenizer): the same run as full_ft but for the loss
    ok(run("finetune", "--init-from", d / "llama", "--data", d / "data", "--out", d / "student", "--teacher",
           d / "qwen", "--distill-alpha", 1.0, "--max-iters", 4, *LORA))
    a = load_file(str(d / "student" / "ckpt" / "model.safetensors"))
    b = load_file(str(d / "full_ft" / "ckpt" / "model.safetensors"))
    assert a.keys() == b.keys() and not all(np.array_equal(a[k], b[k]) for k in a)


def test_train_from_scratch_llama_and_resume(d):
    common = ["--data", d / "data", "--preset", "llama-baby", "--set", "n_layer=1", "--block-size", 16,
              "--batch-size", 4, "--set", "eval_iters=2", "--eval-interval", 4]
    ok(run("train", *common, "--out", d / "s_full", "--max-iters", 6))
    ok(run("train", *common, "--out", d / "s_half", "--max-iters", 3))
    ok(run("train", "--resume", "--out", d / "s_half", "--max-iters", 6))
    x, y = load_file(str(d / "s_full" / "ckpt" / "model.safetensors")), \
        load_file(str(d / "s_half" / "ckpt" / "model.safetensors"))
    assert "model.layers.0.self_attn.k_proj.weight" in x and all(np.array_equal(x[k], y[k]) for k in x)
    clean_error(run("train", "--resume", "--out", d / "s_half", "--max-iters", 7, "--set", "arch=gpt"), "arch")


def test_serve_with_the_openai_client(d):
    openai = pytest.importorskip("openai")
    from serve_helpers import LiveServer
    from npgpt.sft import CHAT_TOKENS, render_chat
    s = LiveServer(d / "llama")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        tok, model = load_tokenizer(d / "llama"), from_pretrained(d / "llama")
        r = c.completions.create(model="llama", prompt="the quick", max_tokens=12, temperature=0)
        ref = generate(model, tok.encode("the quick"), 12, temperature=0, eot_id=tok.eot_id)
        assert r.choices[0].text == tok.decode([t for t in ref if t != tok.eot_id])
        # continuous batching: several choices and requests share the GQA cache
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(3) as ex:
            outs = list(ex.map(lambda p: c.completions.create(model="llama", prompt=p, max_tokens=8, temperature=0),
                               ["the lazy", "a", "the quick"]))
        assert outs[2].choices[0].text == r.choices[0].text[:len(outs[2].choices[0].text)]
        msgs = [{"role": "user", "content": "the lazy dog"}]
        chat = c.chat.completions.create(model="llama", messages=msgs, max_tokens=10, temperature=0)
        ids, _ = render_chat(tok, msgs, add_generation_prompt=True)
        stops = {tok.special_tokens[t] for t in CHAT_TOKENS} | {tok.eot_id}
        ref = generate(model, ids, 10, temperature=0)
        cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
        assert chat.choices[0].message.content == tok.decode(ref[:cut])
    finally:
        assert s.stop() == 0
