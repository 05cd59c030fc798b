"""`npgpt serve` against the official `openai` client and raw HTTP: completions, chat, streaming,
logprobs, n > 1, penalties, errors, the API key, limits, continuous batching, disconnects, SIGTERM."""

import http.client
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")

from npgpt.sampling import log_softmax  # noqa: E402
from npgpt.sft import CHAT_TOKENS, render_chat  # noqa: E402

from serve_helpers import LiveServer, eot_bias, greedy_reference, model_folder, wait_until  # noqa: E402

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("chat") / "tiny-chat", chat=True)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("plain") / "tiny-plain", chat=False, block=256, n_embd=48, seed=3)


@pytest.fixture(scope="module")
def chat_server(chat_dir):
    s = LiveServer(chat_dir, "--api-key", KEY)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def plain_server(plain_dir):
    s = LiveServer(plain_dir, "--max-tokens", "240", "--max-body", "4096")
    yield s
    assert s.stop() == 0


def client(server, key=KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def raw(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def assert_error_body(data, status_code_param=None):
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if status_code_param:
        assert err["param"] == status_code_param
    return err


# ---- the openai client ---------------------------------------------------------------------------
def test_models(chat_server, plain_server):
    ids = [m.id for m in client(chat_server).models.list()]
    assert ids == ["tiny-chat"]
    assert [m.id for m in client(plain_server, "anything").models.list()] == ["tiny-plain"]


def test_completion_greedy_equals_library(plain_server, plain_dir):
    r = client(plain_server).completions.create(model="tiny-plain", prompt="the quick", max_tokens=20, temperature=0)
    from npgpt.tokenizer import load
    tok = load(plain_dir)
    ref, _, _ = greedy_reference(plain_dir, tok.encode("the quick"), 20, {tok.eot_id})
    assert r.choices[0].text == tok.decode(ref)
    assert r.choices[0].finish_reason == ("length" if len(ref) == 20 else "stop")
    assert r.usage.prompt_tokens == 9 and r.usage.completion_tokens == len(ref) + (len(ref) < 20)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_chat_greedy_equals_library(chat_server, chat_dir):
    from npgpt.tokenizer import load
    tok = load(chat_dir)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lazy dog"}]
    r = client(chat_server).chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=30, temperature=0)
    ids, _ = render_chat(tok, msgs, add_generation_prompt=True)
    stops = {tok.special_tokens[t] for t in CHAT_TOKENS} | {tok.eot_id}
    ref, _, _ = greedy_reference(chat_dir, ids, 30, stops)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(ref)
    assert r.usage.prompt_tokens == len(ids)
    assert r.object == "chat.completion"


def test_streaming_matches_non_streaming(chat_server, plain_server):
    c = client(plain_server)
    full = c.completions.create(model="m", prompt="over a", max_tokens=30, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="m", prompt="over a", max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    cc = client(chat_server)
    msgs = [{"role": "user", "content": "hi"}]
    full = cc.chat.completions.create(model="m", messages=msgs, max_tokens=20, temperature=0).choices[0].message.content
    chunks = list(cc.chat.completions.create(model="m", messages=msgs, max_tokens=20, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_stream_ends_with_done(plain_server):
    status, headers, data = raw(plain_server, "POST", "/v1/completions",
                                {"prompt": "a", "max_tokens": 5, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_completion_logprobs(plain_server, plain_dir):
    from npgpt.loading import load_run
    r = client(plain_server).completions.create(model="m", prompt="the", max_tokens=12, temperature=0, logprobs=3)
    ch = r.choices[0]
    lp = ch.logprobs
    assert "".join(lp.tokens) == ch.text and len(lp.tokens) == len(lp.token_logprobs) == 12
    model, tok = load_run(plain_dir)[:2]
    ids = tok.encode("the" + ch.text)
    ref = log_softmax(model.forward_cached(np.array([ids]), model.new_cache(1))[0].astype(np.float64))
    for i, (t, l, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        row = ref[len(tok.encode("the")) - 1 + i]
        assert l == pytest.approx(row[tok.encode(t)[0]], abs=1e-4)
        assert len(top) == 3 and max(top.values()) == pytest.approx(l, abs=1e-9)    # greedy: chosen = top-1
        assert sorted(top.values(), reverse=True) == list(top.values())
    assert lp.text_offset == [3 + i for i in range(12)]


def test_chat_logprobs_streamed(chat_server):
    chunks = list(client(chat_server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "fox"}], max_tokens=15, temperature=0.7, seed=1,
        logprobs=True, top_logprobs=2, stream=True))
    entries = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert entries and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    assert all(e.bytes == list(e.token.encode()) for e in entries)


def test_n_choices_and_seed(plain_server):
    c = client(plain_server)
    kw = dict(model="m", prompt="jumps", max_tokens=16, temperature=1.0, n=3, seed=42)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]           # seeded: reproducible
    assert len({ch.text for ch in a.choices}) > 1                                     # independent samples
    assert a.usage.completion_tokens == sum(16 if ch.finish_reason == "length" else len(ch.text) + 1
                                            for ch in a.choices)
    other = c.completions.create(**dict(kw, seed=43))
    assert [ch.text for ch in other.choices] != [ch.text for ch in a.choices]
    two = c.completions.create(model="m", prompt=["the", "over"], max_tokens=4, temperature=0, n=2)
    assert len(two.choices) == 4 and two.choices[0].text == two.choices[1].text


def test_stop_strings(plain_server):
    c = client(plain_server)
    full = c.completions.create(model="m", prompt="the", max_tokens=60, temperature=0).choices[0].text
    stop = full[10:12]
    r = c.completions.create(model="m", prompt="the", max_tokens=60, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="m", prompt="the", max_tokens=60, temperature=0, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_penalties_and_logit_bias(plain_server, plain_dir):
    from npgpt.tokenizer import load
    tok = load(plain_dir)
    c = client(plain_server)
    z = tok.encode("z")[0]
    r = c.completions.create(model="m", prompt="a", max_tokens=8, temperature=0.9, logit_bias={str(z): 100})
    assert r.choices[0].text == "z" * 8
    kw = dict(presence_penalty=1.0, frequency_penalty=0.5)
    r = c.completions.create(model="m", prompt="the", max_tokens=25, temperature=0, **kw)
    ref, _, _ = greedy_reference(plain_dir, tok.encode("the"), 25, {tok.eot_id}, **kw)
    assert r.choices[0].text == tok.decode(ref)
    r2 = c.completions.create(model="m", prompt="the", max_tokens=25, temperature=0,
                              extra_body={"repetition_penalty": 1.3})
    ref2, _, _ = greedy_reference(plain_dir, tok.encode("the"), 25, {tok.eot_id}, repetition_penalty=1.3)
    assert r2.choices[0].text == tok.decode(ref2)


@pytest.mark.parametrize("bad,param", [
    (dict(temperature=5), "temperature"), (dict(n=0), "n"), (dict(max_tokens=100000), "max_tokens"),
    (dict(top_p=0), "top_p"), (dict(logit_bias={"99999": 1}), "logit_bias"), (dict(stop=["a"] * 5), "stop"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(max_tokens=200, prompt="x" * 100), "max_tokens"),
    (dict(logprobs=50), "logprobs"), (dict(seed="x"), "seed")])
def test_invalid_values_get_openai_400(plain_server, bad, param):
    kw = dict(model="m", prompt="the", max_tokens=4)
    kw.update(bad)
    with pytest.raises(openai.BadRequestError) as e:
        client(plain_server).completions.create(**kw)
    assert e.value.status_code == 400
    assert_error_body(e.value.response.content, param)


def test_chat_without_template_is_a_clear_400(plain_server):
    with pytest.raises(openai.BadRequestError) as e:
        client(plain_server).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    err = assert_error_body(e.value.response.content)
    assert err["code"] == "no_chat_template" and "/v1/completions" in err["message"]


def test_bad_messages(chat_server):
    for msgs in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": 3}], ["hi"]):
        with pytest.raises(openai.BadRequestError):
            client(chat_server).chat.completions.create(model="m", messages=msgs)
    r = client(chat_server).chat.completions.create(   # content parts and the developer role are accepted
        model="m", max_tokens=3, messages=[{"role": "developer", "content": "x"},
                                           {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_api_key(chat_server):
    with pytest.raises(openai.AuthenticationError) as e:
        client(chat_server, "sk-wrong").models.list()
    assert e.value.status_code == 401 and assert_error_body(e.value.response.content)["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}, {"Authorization": "Bearer"}):
        status, _, data = raw(chat_server, "POST", "/v1/completions", {"prompt": "a"}, headers)
        assert status == 401, headers
    status, _, _ = raw(chat_server, "GET", "/v1/models", headers={"Authorization": "Bearer " + KEY})
    assert status == 200
    status, _, page = raw(chat_server, "GET", "/")          # the page itself needs no key; its API calls do
    assert status == 200 and b"<html" in page and b"http://" not in page.split(b"</style>")[0].lower()
    # /metrics and /tokenize, /detokenize need the key too; /health is for probes and needs none
    assert raw(chat_server, "GET", "/metrics")[0] == 401
    assert raw(chat_server, "GET", "/metrics", headers={"Authorization": "Bearer " + KEY})[0] == 200
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        assert raw(chat_server, "POST", path, body)[0] == 401
        assert raw(chat_server, "POST", path, body, {"Authorization": "Bearer " + KEY})[0] == 200
    assert raw(chat_server, "GET", "/health")[0] == 200


def test_bad_requests_never_take_the_server_down(plain_server):
    for body, status in ((b"{bad json", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400), (b"", 400),
                         (b'{"prompt": 5}', 400), (b"[" * 1900 + b"]" * 1900, 400)):   # nested: a 400, not a 500
        s, _, data = raw(plain_server, "POST", "/v1/completions", body, {"Content-Type": "application/json"})
        assert s == status, body
        assert_error_body(data)
    s, _, data = raw(plain_server, "POST", "/v1/nothing", {"prompt": "a"})
    assert s == 404 and assert_error_body(data)["code"] == "not_found"
    s, _, data = raw(plain_server, "GET", "/v1/nothing")
    assert s == 404
    # a body over --max-body (4096) is refused before it is read
    s, headers, data = raw(plain_server, "POST", "/v1/completions", b"{" + b" " * 5000 + b"}")
    assert s == 413 and assert_error_body(data)["code"] == "request_too_large"
    # a client that sends headers, then garbage, then hangs up
    sock = socket.create_connection(("127.0.0.1", plain_server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pro")
    sock.close()
    r = client(plain_server).completions.create(model="m", prompt="a", max_tokens=2)
    assert len(r.choices) == 1


# ---- concurrency -----------------------------------------------------------------------------------
PROMPTS = ["the quick", "over a lazy", "jolly", "seven wizards quietly", "a", "nymphs waltz by the", "hex",
           "bright", "the the", "zebras and", "quick brown fox", "dog while", "waltz", "vexing", "by", "over"]


def _stream_text(server, i):
    kw = dict(model="m", prompt=PROMPTS[i], max_tokens=20 + 7 * i, stream=True, logprobs=2)
    kw.update(dict(temperature=0) if i % 2 == 0 else dict(temperature=0.9, top_p=0.9, seed=1000 + i))
    chunks = list(client(server).completions.create(**kw))
    return ("".join(c.choices[0].text for c in chunks if c.choices),
            [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs])


def assert_same_outputs(got, want):
    """Identical text; log-probabilities equal up to float32 rounding (a batched matmul may sum in
    another order than a single row's)."""
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_16_concurrent_streams_equal_one_at_a_time(plain_server):
    alone = [_stream_text(plain_server, i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: _stream_text(plain_server, i), range(16)))
    assert_same_outputs(together, alone)
    card = client(plain_server).models.list().data[0].model_extra["npgpt"]
    assert card["peak_batch"] > 4          # requests really shared decoding steps


def test_disconnecting_client_does_not_disturb_others(tmp_path):
    # a 7M-parameter model: a 500-token request takes seconds, so it is still running when its client leaves
    folder = model_folder(tmp_path / "m", chat=False, block=512, n_embd=384, n_layer=4, scale=1.0)
    server = LiveServer(folder)
    try:
        _disconnect_check(server, folder)
    finally:
        assert server.stop() == 0


def _disconnect_check(plain_server, folder):
    alone = [_stream_text(plain_server, i) for i in range(4)]
    before = client(plain_server).models.list().data[0].model_extra["npgpt"]["cancelled"]
    # a long request (end-of-text banned, so it cannot finish early) whose client leaves after two chunks
    sock = socket.create_connection(("127.0.0.1", plain_server.port))
    body = json.dumps({"prompt": "the", "max_tokens": 500, "stream": True, "temperature": 0,
                       "logit_bias": eot_bias(folder)}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_stream_text, plain_server, i) for i in range(4)]
        got = b""
        while got.count(b"data: ") < 3:
            got += sock.recv(4096)
        sock.close()
        assert_same_outputs([f.result() for f in futures], alone)
    assert wait_until(lambda: client(plain_server).models.list().data[0].model_extra["npgpt"]["cancelled"] > before)
    assert wait_until(lambda: client(plain_server).models.list().data[0].model_extra["npgpt"]["active"] == 0)


def test_queue_limit_answers_429_with_retry_after(tmp_path):
    folder = model_folder(tmp_path / "m", chat=False, block=256, n_embd=48)
    server = LiveServer(folder, "--max-batch", "1", "--max-queue", "1")
    try:
        barrier = threading.Barrier(8)
        body = {"prompt": "a", "max_tokens": 250, "temperature": 0, "logit_bias": eot_bias(folder)}

        def go(_):
            barrier.wait()
            return raw(server, "POST", "/v1/completions", body)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(go, range(8)))
        statuses = sorted(s for s, _, _ in results)
        assert statuses.count(200) >= 2 and 429 in statuses and set(statuses) <= {200, 429}
        for s, h, data in results:
            if s == 429:
                assert h["Retry-After"] == "1" and assert_error_body(data)["type"] == "rate_limit_error"
        with pytest.raises(openai.BadRequestError):          # n above --max-batch
            client(server).completions.create(model="m", prompt="a", n=2, max_tokens=2)
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_running_requests_and_exits_0(tmp_path):
    # 16 choices of 150 tokens from a 7M-parameter model: seconds of work, in flight when SIGTERM comes
    folder = model_folder(tmp_path / "m", chat=False, block=512, n_embd=384, n_layer=4, scale=1.0)
    server = LiveServer(folder, "--grace", "120")
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"prompt": "a", "max_tokens": 150, "n": 16, "stream": True,
                           "stream_options": {"include_usage": True},
                           "logit_bias": eot_bias(folder)}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        got = b""
        while got.count(b"data: ") < 2:
            got += sock.recv(65536)
        assert client(server).models.list().data[0].model_extra["npgpt"]["active"] == 16    # still decoding
        assert server.stop() == 0
        while chunk := sock.recv(65536):
            got += chunk
        sock.close()
        text = got.decode()
        assert text.rstrip().endswith("data: [DONE]")
        chunks = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
        finish = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                  if c["choices"] and c["choices"][0]["finish_reason"]}
        assert finish == {i: "length" for i in range(16)}             # every choice was finished, not cut
        assert chunks[-1]["usage"]["completion_tokens"] == 150 * 16
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2)
        assert "stopped" in "".join(server.lines)
    finally:
        if server.proc.poll() is None:       # a failed check above must not leave the server running
            server.proc.kill()
            server.proc.wait()


def test_serve_cli_errors(tmp_path):
    from click.testing import CliRunner
    from npgpt.cli.main import cli
    r = CliRunner().invoke(cli, ["serve", "--checkpoint", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.output.startswith("Error:") and "Traceback" not in r.output
    folder = model_folder(tmp_path / "m", chat=False)
    r = CliRunner().invoke(cli, ["serve", "--checkpoint", str(folder), "--max-batch", "0"])
    assert r.exit_code == 1 and "--max-batch" in r.output


def test_a_crashing_request_fails_alone(tmp_path, monkeypatch):
    """A request whose generation raises gets a 500 error body; the engine and server go on."""
    import npgpt.sampling as sampling
    from npgpt.loading import load_run
    from npgpt.serve.http import App, make_server
    folder = model_folder(tmp_path / "m", chat=False)
    model, tok = load_run(folder)[:2]
    real = sampling.sampling_probs

    def flaky(logits, temperature=1.0, top_k=None, top_p=None):
        if temperature == 0.123:
            raise RuntimeError("boom")
        return real(logits, temperature, top_k, top_p)
    monkeypatch.setattr(sampling, "sampling_probs", flaky)
    app = App(model, tok, "m")
    httpd = make_server(app, port=0)
    app.engine.start()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    class S:
        port = httpd.server_address[1]
    try:
        with ThreadPoolExecutor(3) as pool:
            good = [pool.submit(raw, S, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 30})
                    for _ in range(2)]
            bad = raw(S, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 30, "temperature": 0.123})
            assert bad[0] == 500 and "boom" in assert_error_body(bad[2])["message"]
            assert [g.result()[0] for g in good] == [200, 200]
        streamed = raw(S, "POST", "/v1/completions", {"prompt": "a", "temperature": 0.123, "stream": True})
        assert streamed[0] == 200 and b'"error"' in streamed[2] and streamed[2].rstrip().endswith(b"[DONE]")
        assert raw(S, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 5})[0] == 200
    finally:
        httpd.shutdown()
        app.engine.stop(grace=1)
        httpd.server_close()
