"""`npgpt serve` round 2, operations: LoRA adapters chosen per request (rows of different adapters in one
decoding batch), /metrics (parsed by prometheus_client), /health, /tokenize, /detokenize and the JSON
log line per request, against one live server and the official `openai` client."""

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")
prom_parser = pytest.importorskip("prometheus_client.parser")

from click.testing import CliRunner  # noqa: E402

from npgpt.cli.main import cli  # noqa: E402
from npgpt.generate import generate  # noqa: E402
from npgpt.loading import load_run  # noqa: E402
from npgpt.lora import LoRAConfig, apply_lora, load_adapters, lora_layers, save_adapter  # noqa: E402

from serve_helpers import LiveServer, eot_bias, model_folder  # noqa: E402

PROMPTS = {"base": "the quick", "alpha": "over a", "beta": "the quick"}
MAX = 14


def make_adapter(folder, out, seed, r, targets):
    """An adapter whose B is random (not trained): distinct from the base and from another seed's."""
    model = load_run(folder)[0]
    apply_lora(model, LoRAConfig(r=r, alpha=2.0 * r, targets=targets), seed=seed)
    rng = np.random.default_rng(seed)
    for _, lin in lora_layers(model):
        lin.lora_B.data[...] = rng.normal(0, 1.0, lin.lora_B.shape)
    save_adapter(model, out, base_model=folder)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    base = model_folder(root / "base", chat=False, block=64, n_embd=32, seed=5)
    return {"base": base,
            "alpha": make_adapter(base, root / "ad-alpha", 1, 4, ("c_attn", "c_proj", "c_fc")),
            "beta": make_adapter(base, root / "ad-beta", 2, 2, ("c_attn",)),     # another rank, fewer layers
            "log": root / "requests.jsonl"}


@pytest.fixture(scope="module")
def server(dirs):
    s = LiveServer(dirs["base"], "--adapter", f"alpha={dirs['alpha']}", "--adapter", f"beta={dirs['beta']}",
                   "--log-file", str(dirs["log"]))
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def want(dirs):
    """Each model's greedy reply by the library alone: the base, and each adapter applied by load_run
    (LoRALinear: the one-adapter path, not the server's per-row one)."""
    out = {}
    for name in ("base", "alpha", "beta"):
        model, tok = load_run(dirs["base"], adapter=None if name == "base" else dirs[name])[:2]
        ids = generate(model, tok.encode(PROMPTS[name]), MAX, temperature=0)
        out[name] = tok.decode(ids[:ids.index(tok.eot_id)] if tok.eot_id in ids else ids)
    assert out["base"] != out["beta"] and out["alpha"] != out["base"]    # the adapters change the answers
    return out


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def raw(server, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, r.getheader("Content-Type"), r.read()
    conn.close()
    return out


def metrics(server):
    """{(sample name, frozenset(labels)): value} of GET /metrics, through prometheus_client's parser."""
    status, ctype, data = raw(server, "GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in prom_parser.text_string_to_metric_families(data.decode()) for s in fam.samples}


# ---- adapters per request ------------------------------------------------------------------------
def test_models_list_the_base_and_each_adapter(server):
    cards = client(server).models.list().data
    assert [m.id for m in cards] == ["base", "alpha", "beta"]
    alpha = client(server).models.retrieve("alpha")
    assert alpha.parent == "base" and alpha.npgpt["lora"] == {"r": 4, "alpha": 8.0, "layers": 8}
    assert client(server).models.retrieve("beta").npgpt["lora"]["layers"] == 2


def test_each_request_gets_its_adapter(server, want):
    """Three models asked at once (their rows meet in the decoding batch): each reply is the one the
    library gives for that model alone."""
    c = client(server)

    def ask(name):
        r = c.completions.create(model=name, prompt=PROMPTS[name], max_tokens=MAX, temperature=0)
        assert r.model == name
        return r.choices[0].text
    for _ in range(2):
        with ThreadPoolExecutor(3) as pool:
            got = dict(zip(want, pool.map(ask, want)))
        assert got == want


def run_together(app, bodies):
    """Submit every request before the engine starts (so they are admitted together: every decoding
    step runs all their rows in one forward); their texts, and the engine's peak batch."""
    reqs = []
    for body in bodies:
        req = app.completion_request(body)
        req.model, req.adapter = app.pick_model(body)
        reqs.append(req)
        app.engine.submit(req)
    app.engine.start()
    try:
        got = []
        for req in reqs:
            text = ""
            while True:
                ev = req.events.get(timeout=60)
                assert ev[0] != "error", ev
                if ev[0] == "delta":
                    text += ev[2]
                else:
                    break
            got.append(text)
    finally:
        app.engine.stop(grace=0)
    return got, app.engine.peak


def test_mixed_adapters_share_one_batch(dirs, want):
    """Library level, deterministic: rows of the base and both adapters in every decoding step."""
    from npgpt.serve.http import App
    model, tok = load_run(dirs["base"])[:2]
    infos = load_adapters(model, [("alpha", dirs["alpha"]), ("beta", dirs["beta"])])
    app = App(model, tok, "base", adapters=infos)
    got, peak = run_together(app, [{"model": n, "prompt": PROMPTS[n], "max_tokens": MAX, "temperature": 0}
                                   for n in want])
    assert peak == 3 and dict(zip(want, got)) == want


def test_an_unnamed_adapter_beside_named_ones_is_the_default_model(dirs, want):
    """`--adapter DIR --adapter beta=DIR2`: DIR is the default model (base+DIR, also for a request
    naming no model), beta is served beside it, and the base alone is not served."""
    from npgpt.serve.http import App, load_served
    model, tok, name, infos, default = load_served(dirs["base"], str(dirs["alpha"]), [("beta", dirs["beta"])])
    assert name == "base+ad-alpha" and default == 0 and [a["name"] for a in infos] == [name, "beta"]
    app = App(model, tok, name, adapters=infos, default_adapter=default)
    assert [m["id"] for m in app.models()["data"]] == [name, "beta"]
    assert "parent" not in app.models()["data"][0] and app.models()["data"][1]["parent"] == name
    got, peak = run_together(app, [{"prompt": PROMPTS["alpha"], "max_tokens": MAX, "temperature": 0},
                                   {"model": "beta", "prompt": PROMPTS["beta"], "max_tokens": MAX, "temperature": 0}])
    assert peak == 2 and got == [want["alpha"], want["beta"]]


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_rows_on_different_adapters_match_each_adapter_alone(tmp_path, family):
    """MultiLoRALinear: a batch whose rows run on adapter 0, the base and adapter 1 gives each row the
    logits that model (LoRALinear, one adapter) gives it alone, for both families' layers."""
    from npgpt import GPT, GPTConfig
    from npgpt.layers import adapter_rows
    from npgpt.llama import Llama, LlamaConfig
    from npgpt.loading import from_pretrained
    from npgpt.lora import LLAMA_TARGETS
    if family == "gpt":
        base = GPT(GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16), seed=0)
        targets = [("c_attn", "c_proj", "c_fc"), ("mlp.c_proj",)]
    else:
        base = Llama(LlamaConfig(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                                 n_inner=24), seed=0)
        targets = [LLAMA_TARGETS, ("q_proj", "down_proj")]
    base.save_pretrained(tmp_path / "base")
    folders = []
    for k, t in enumerate(targets):
        m = from_pretrained(tmp_path / "base")
        apply_lora(m, LoRAConfig(r=2 + k, alpha=4.0, targets=t), seed=k)
        for _, lin in lora_layers(m):
            lin.lora_B.data[...] = np.random.default_rng(k).normal(0, 0.5, lin.lora_B.shape)
        save_adapter(m, tmp_path / f"a{k}")
        folders.append((f"a{k}", tmp_path / f"a{k}"))
    x = np.random.default_rng(1).integers(0, 23, (3, 7))
    rows = [0, -1, 1]
    want, want_step = [], []
    for i, k in enumerate(rows):
        m = from_pretrained(tmp_path / "base", adapter=None if k < 0 else folders[k][1])
        c = m.new_cache(1)
        want.append(m.forward_cached(x[i:i + 1], c)[0])
        want_step.append(m.forward_cached(x[i:i + 1, :1], c)[0])
    multi = from_pretrained(tmp_path / "base")
    load_adapters(multi, folders)
    cache = multi.new_cache(3)
    with adapter_rows(rows):
        got = multi.forward_cached(x, cache)
        step = multi.forward_cached(x[:, :1], cache)          # and a decoding step on the cache
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-5)
    assert not np.allclose(want[0], want[1], atol=1e-3) and not np.allclose(want[2], want[1], atol=1e-3)
    with adapter_rows(None):                                  # no rows chosen: the base for everyone
        np.testing.assert_allclose(multi.forward_cached(x, multi.new_cache(3))[1], want[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(step, np.stack(want_step), rtol=1e-4, atol=1e-5)


def test_prefix_cache_keeps_adapters_apart(server, dirs):
    """A long prompt cached under one model is not reused by another (other keys/values for the same
    tokens), and is reused by the same model: every reply is the library's for its model."""
    prompt = "the quick brown fox jumps over the lazy dog and"           # > one 16-token block
    ref = {}
    for name in ("base", "alpha"):
        model, tok = load_run(dirs["base"], adapter=None if name == "base" else dirs[name])[:2]
        ids = generate(model, tok.encode(prompt), 8, temperature=0)
        ref[name] = tok.decode(ids[:ids.index(tok.eot_id)] if tok.eot_id in ids else ids)
    assert ref["base"] != ref["alpha"]
    before = metrics(server)
    c = client(server)
    for name in ("base", "alpha", "alpha", "base"):
        r = c.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].text == ref[name], name
    after = metrics(server)
    hits = ("npgpt_prefix_cache_hits_total", frozenset())
    assert after[hits] - before[hits] == 2                # the second ask of each model


def test_unknown_model_is_a_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server).completions.create(model="gamma", prompt="a", max_tokens=2)
    err = e.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model" and "alpha" in err["message"]
    status, _, data = raw(server, "POST", "/tokenize", {"model": "gamma", "prompt": "a"})
    assert status == 404 and json.loads(data)["error"]["code"] == "model_not_found"


def test_bad_adapter_options_are_clean_errors(dirs, tmp_path):
    other = model_folder(tmp_path / "other", chat=False, block=64, n_embd=48, seed=1)
    wrong = make_adapter(other, tmp_path / "wrong", 3, 2, ("c_attn",))
    twin = model_folder(tmp_path / "twin", chat=False, block=64, n_embd=32, seed=6)    # same shapes, other weights
    stranger = make_adapter(twin, tmp_path / "stranger", 3, 2, ("c_attn",))
    cases = [(["--adapter", f"a={dirs['alpha']}", "--adapter", f"a={dirs['beta']}"], "given twice"),
             (["--adapter", str(dirs["alpha"]), "--adapter", str(dirs["beta"])], "only one unnamed adapter"),
             (["--adapter", f"x={tmp_path / 'missing'}"], "does not exist"),
             (["--adapter", f"w={wrong}"], "another base"),
             (["--adapter", f"s={stranger}"], "made on another base (fingerprint"),
             (["--adapter", f"base={dirs['alpha']}"], "base model's id"),
             (["--log-file", str(tmp_path / "no" / "such" / "log.jsonl")], "cannot open --log-file")]
    for args, msg in cases:
        r = CliRunner().invoke(cli, ["serve", "--checkpoint", str(dirs["base"]), "--port", "0", *args])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, (args, r.output)


# ---- observability and utility endpoints --------------------------------------------------------
def test_metrics_parse_and_move(server):
    before = metrics(server)
    c = client(server)
    r = c.completions.create(model="alpha", prompt="the", max_tokens=6, temperature=0)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="alpha", prompt="the", max_tokens=6, temperature=5)
    after = metrics(server)

    def delta(name, **labels):
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)
    assert delta("npgpt_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("npgpt_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("npgpt_requests_total", endpoint="/metrics", status="200") == 1      # the first scrape
    assert delta("npgpt_prompt_tokens_total", model="alpha") == r.usage.prompt_tokens
    assert delta("npgpt_completion_tokens_total", model="alpha") == r.usage.completion_tokens > 0
    assert delta("npgpt_completion_tokens_total", model="beta") == 0
    assert delta("npgpt_time_to_first_token_seconds_count") == 1
    assert delta("npgpt_request_duration_seconds_count") == 1     # the 400 never became a generation
    assert delta("npgpt_time_per_output_token_seconds_count") == r.usage.completion_tokens - 1
    assert delta("npgpt_steps_total") >= r.usage.completion_tokens - 1
    assert after[("npgpt_queue_length", frozenset())] == 0 and after[("npgpt_running_sequences", frozenset())] == 0
    assert after[("npgpt_prefix_cache_hits_total", frozenset())] >= 0
    assert after[("npgpt_time_to_first_token_seconds_bucket", frozenset({("le", "+Inf")}))] \
        == after[("npgpt_time_to_first_token_seconds_count", frozenset())]


def test_health_tokenize_detokenize(server, dirs):
    tok = load_run(dirs["base"])[1]
    status, _, data = raw(server, "GET", "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"
    status, _, data = raw(server, "POST", "/tokenize", {"prompt": "the quick fox", "with_pieces": True})
    out = json.loads(data)
    assert status == 200 and out["tokens"] == tok.encode("the quick fox") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 64 and "".join(p["piece"] for p in out["pieces"]) == "the quick fox"
    status, _, data = raw(server, "POST", "/tokenize", {"content": "over", "model": "beta"})  # llama.cpp's key
    assert status == 200 and json.loads(data)["tokens"] == tok.encode("over")
    status, _, data = raw(server, "POST", "/detokenize", {"tokens": out["tokens"]})
    back = json.loads(data)
    assert status == 200 and back["prompt"] == back["content"] == "the quick fox"
    status, _, data = raw(server, "POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and json.loads(data)["error"]["code"] == "no_chat_template"     # a plain model
    for body in ({"tokens": [tok.vocab_size]}, {"tokens": "12"}, {"prompt": 3}, {"prompt": "a", "with_pieces": 1}):
        path = "/detokenize" if "tokens" in body else "/tokenize"
        status, _, data = raw(server, "POST", path, body)
        assert status == 400 and json.loads(data)["error"]["message"], body


def test_tokenize_a_conversation(tmp_path):
    """/tokenize with `messages`: the ids /v1/chat/completions prefills for them (the chat template,
    ending with the assistant's opening); a model without a chat template says so."""
    from npgpt.serve.http import App
    from npgpt.sft import render_chat
    model, tok = load_run(model_folder(tmp_path / "chat", chat=True, block=64))[:2]
    app = App(model, tok, "chat")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}]
    out = app.tokenize({"messages": msgs})
    assert out["tokens"] == render_chat(tok, msgs, add_generation_prompt=True)[0]
    assert out["count"] == app.chat_request({"messages": msgs, "max_tokens": 2}).prompt_tokens
    from npgpt.serve.protocol import ApiError
    with pytest.raises(ApiError) as e:
        app.tokenize({"messages": [{"role": "wizard", "content": "x"}]})
    assert e.value.status == 400 and e.value.param == "messages"


def test_one_json_log_line_per_request(server, dirs):
    c = client(server)
    r = c.completions.create(model="beta", prompt="a b", max_tokens=5, temperature=0)
    chunks = list(c.completions.create(model="base", prompt="a", max_tokens=4, temperature=0, stream=True,
                                       logit_bias=eot_bias(dirs["base"])))
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="a", max_tokens=2)
    lines = dirs["log"].read_text().splitlines()
    records = [json.loads(line) for line in lines]            # every line is one JSON object
    by_id = {rec["id"]: rec for rec in records if rec["id"]}
    rec = by_id[r.id]
    assert rec["model"] == "beta" and rec["adapter"] == "beta" and rec["status"] == 200
    assert rec["prompt_tokens"] == r.usage.prompt_tokens and rec["completion_tokens"] == r.usage.completion_tokens
    assert 0 < rec["ttft_s"] <= rec["duration_s"] and rec["finish_reasons"] == [r.choices[0].finish_reason]
    rec = by_id[chunks[0].id]
    assert rec["stream"] is True and rec["adapter"] is None and rec["model"] == "base"
    assert rec["completion_tokens"] == 4
    assert records[-1]["status"] == 404 and records[-1]["id"] is None and "nope" in records[-1]["error"]
