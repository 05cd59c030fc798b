"""`npgpt serve` against hostile clients (issue 27): every per-request cost is bounded, a costly
request leaves a cheap one its share (work counted per engine step, never timed), client errors are
4xx JSON bodies (never a 500, a traceback or the standard library's HTML page), a non-streaming
client that hangs up is noticed, and a hypothesis fuzzer of the request body finds no 500."""

import http.client
import json
import socket

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

openai = pytest.importorskip("openai")

from npgpt.sampling import Detokenizer  # noqa: E402
from npgpt.serve.protocol import MAX_LOGIT_BIAS, MAX_STOP_CHARS, MAX_STOPS  # noqa: E402

from serve_helpers import LiveServer, eot_bias, model_folder, wait_until  # noqa: E402

BUDGET = 400          # --max-request-tokens of the module's server


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("hostile") / "tiny", chat=True, block=256, seed=5)


@pytest.fixture(scope="module")
def server(folder):
    s = LiveServer(folder, "--max-batch", "4", "--max-tokens", "200", "--max-request-tokens", str(BUDGET),
                   "--max-body", "65536")
    yield s
    assert s.stop() == 0


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def post(server, path, body, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, body=body if isinstance(body, bytes) else json.dumps(body).encode(),
                 headers=headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def exchange(server, data):
    """Raw bytes in, the whole reply out (status, headers, body) for malformed HTTP."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(data)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def error(data, param=None, code=None):
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param is None or err["param"] == param, err
    assert code is None or err["code"] == code, err
    return err


def still_answers(server):
    assert client(server).models.list().data[0].id == "tiny"


# ---- bounds on what one request may cost ----------------------------------------------------------
@pytest.mark.parametrize("bad,param,code", [
    (dict(stop=["x"] * (MAX_STOPS + 1)), "stop", None),
    (dict(stop=["x" * (MAX_STOP_CHARS + 1)]), "stop", None),
    (dict(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}), "logit_bias", None),
    (dict(n=3, max_tokens=BUDGET // 3 + 1), "max_tokens", None),                 # n x max_tokens over the budget
    (dict(prompt=["a"] * 5, max_tokens=1), "n", None),                           # more choices than --max-batch
    (dict(prompt="the " * 2000), "prompt", "context_length_exceeded"),           # refused before encoding
    (dict(prompt=["the " * 450] * 2, max_tokens=1), "prompt", "context_length_exceeded"),   # the texts together
    (dict(prompt=[[3] * 200] * 3, max_tokens=1), "prompt", "context_length_exceeded"),   # 600 prompt tokens
])
def test_costs_over_the_limits_are_400s(server, bad, param, code):
    status, _, data = post(server, "/v1/completions", dict(dict(prompt="the", max_tokens=4), **bad))
    assert status == 400
    error(data, param, code)


def test_limits_themselves_are_allowed_and_shown(server, folder):
    card = client(server).models.list().data[0].model_extra["npgpt"]
    assert card["max_request_tokens"] == BUDGET and card["max_batch"] == 4
    r = client(server).completions.create(model="tiny", prompt="the", n=2, max_tokens=BUDGET // 2, temperature=0,
                                          stop=["q" * MAX_STOP_CHARS] * MAX_STOPS)
    assert len(r.choices) == 2 and r.usage.completion_tokens <= BUDGET
    # without max_tokens, chat's default (the context's room) is cut to the request's share
    msgs = [{"role": "user", "content": "hi"}]
    r = client(server).chat.completions.create(model="tiny", messages=msgs, n=4, temperature=0.5, seed=1,
                                               logit_bias=eot_bias(folder))
    assert r.usage.completion_tokens <= BUDGET
    status, _, data = post(server, "/v1/chat/completions", {"messages": msgs * 300})   # more messages than the context
    assert status == 400 and error(data, "messages", "context_length_exceeded")


# ---- client errors are 4xx JSON ----------------------------------------------------------------------
@pytest.mark.parametrize("key", ["²", "9" * 5000, "-1", " 1", "1.0", "0x1", "١"])
def test_logit_bias_keys(server, key):
    status, _, data = post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2, "logit_bias": {key: 1}})
    assert status == 400 and error(data, "logit_bias")


def test_characters_outside_the_vocabulary(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi ☃"}])
    assert "not in the vocabulary" in error(e.value.response.content, "messages")["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model="tiny", prompt="hi ☃")
    error(e.value.response.content, "prompt")


def test_stream_null_and_boolean_flags(server):
    status, _, data = post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2, "stream": None})
    assert status == 200 and json.loads(data)["object"] == "text_completion"       # null: not streamed
    for body, param in (({"stream": True, "stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
                        ({"stream": "yes"}, "stream"), ({"echo": 1}, "echo")):
        status, _, data = post(server, "/v1/completions", dict(prompt="a", max_tokens=2, **body))
        assert status == 400 and error(data, param)


@pytest.mark.parametrize("body,param", [
    ({"guided_regex": []}, "guided_regex"), ({"guided_regex": {"a": 1}}, "guided_regex"),   # found by the fuzzer
    ({"guided_choice": [{"a": 1}]}, "guided_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": []}}}, "tool_choice"),
])
def test_fuzz_findings(server, body, param):
    path = "/v1/chat/completions" if "tools" in body else "/v1/completions"
    status, _, data = post(server, path, dict(prompt="a", messages=[{"role": "user", "content": "a"}], max_tokens=2,
                                              **body))
    assert status == 400 and error(data, param)


def test_echo(server):
    c = client(server)
    plain = c.completions.create(model="tiny", prompt="the lazy", max_tokens=10, temperature=0).choices[0].text
    echoed = c.completions.create(model="tiny", prompt="the lazy", max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == "the lazy" + plain
    streamed = c.completions.create(model="tiny", prompt="the lazy", max_tokens=10, temperature=0, echo=True,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == "the lazy" + plain
    with pytest.raises(openai.BadRequestError) as e:       # scoring a prompt is answered whole, not streamed
        c.completions.create(model="tiny", prompt="the", max_tokens=2, echo=True, logprobs=1, stream=True)
    error(e.value.response.content, "echo")


def test_echo_with_logprobs_scores_the_prompt(server, folder):
    """echo + logprobs (how evaluation harnesses score a text): the prompt's tokens come first in the
    logprobs, the first with none, each as the model scores it; offsets count from the prompt's start."""
    from npgpt.loading import load_run
    from npgpt.sampling import log_softmax
    r = client(server).completions.create(model="tiny", prompt="the lazy dog", max_tokens=3, temperature=0,
                                          echo=True, logprobs=2, logit_bias=eot_bias(folder))
    ch = r.choices[0]
    lp = ch.logprobs
    assert ch.text.startswith("the lazy dog") and "".join(lp.tokens) == ch.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == list(range(len(ch.text)))            # one character a token
    model, tok = load_run(folder)[:2]
    ids = tok.encode(ch.text)
    ref = log_softmax(model.forward_cached(np.array([ids]), model.new_cache(1))[0].astype(np.float64))
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]], abs=1e-4)
        assert len(lp.top_logprobs[i]) == 2 and max(lp.top_logprobs[i].values()) >= lp.token_logprobs[i] - 1e-9


# ---- malformed HTTP, over raw sockets ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"])
def test_other_methods_get_405_json(server, method):
    status, headers, body = exchange(server, f"{method} /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 405 and headers["Allow"] == "GET, POST" and headers["Content-Type"] == "application/json"
    if method == "HEAD":
        assert body == b""                     # a reply to HEAD has no body
    else:
        assert error(body, code="method_not_allowed")


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),                    # over MAX_REQUEST_LINE
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),                              # over the stdlib's limit
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431),                    # over MAX_HEADER_BYTES
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),                    # one line over 64 KiB
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(150)) + b"\r\n", 431),
    (b"BREW /pot HTTP/1.1\r\n\r\n", 501),
    (b"GET / HTTP/9.9\r\n\r\n", 505),
])
def test_oversized_or_broken_requests_get_json(server, request_bytes, status):
    got, headers, body = exchange(server, request_bytes)
    assert got == status and headers["Content-Type"] == "application/json" and b"<html" not in body.lower()
    error(body)
    still_answers(server)


BODY = b'{"prompt": "a", "max_tokens": 2}'


@pytest.mark.parametrize("headers,status", [
    (b"Content-Length: 3_2\r\n", 400),                       # int() reads it as 32
    (b"Content-Length: +32\r\n", 400),
    (b"Content-Length: \xef\xbc\x93\xef\xbc\x92\r\n", 400),   # full-width digits, which int() also takes
    (b"Content-Length: 32\r\nContent-Length: 5\r\n", 400),   # two lengths: which one frames the body?
    (b"Content-Length: 32\r\nTransfer-Encoding: chunked\r\n", 400),
    (b"Transfer-Encoding: chunked\r\n", 411),
    (b"", 411),
    (b"Content-Length: 32\r\nContent-Length: 32\r\n", 200),  # the same value twice is one length
    (b"Content-Length: 32\r\n", 200),
])
def test_content_length_is_strict(server, headers, status):
    got, _, body = exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers
                            + b"\r\n" + BODY)
    assert got == status
    if status != 200:
        error(body)


def test_port_out_of_range_is_one_line(folder):
    from click.testing import CliRunner
    from npgpt.cli.main import cli
    for port in ("70000", "-1"):
        r = CliRunner().invoke(cli, ["serve", "--checkpoint", str(folder), "--port", port])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert r.output.strip().splitlines() == [r.output.strip()] and r.output.startswith("Error:")
        assert "--port must be in 0..65535" in r.output


# ---- a client that hangs up on a non-streaming request ---------------------------------------------------
def test_non_streaming_client_that_leaves_is_cancelled(server, folder):
    def card():
        return client(server).models.list().data[0].model_extra["npgpt"]
    before = card()["cancelled"]
    body = json.dumps({"prompt": "the", "max_tokens": 200, "n": 2, "temperature": 0,
                       "logit_bias": eot_bias(folder)}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    sock.close()
    assert wait_until(lambda: card()["cancelled"] >= before + 2, timeout=30)    # both choices, before their 200 tokens
    assert wait_until(lambda: card()["active"] == 0)
    still_answers(server)


# ---- fairness: a costly request beside a cheap one, work counted per step ----------------------------------
def test_a_costly_request_leaves_a_cheap_one_its_share(tmp_path):
    from npgpt.loading import load_run
    from npgpt.serve.http import App
    folder = model_folder(tmp_path / "m", chat=False, block=256)
    model, tok = load_run(folder)[:2]
    app = App(model, tok, "m", max_batch=8, max_tokens=64, engine_options={"prefill_chunk": 64})
    a = tok.encode("a")[0]
    stops = ["a" * (MAX_STOP_CHARS - 1) + x for x in "bcde"]      # the worst case of a naive hold-back check
    costly = app.completion_request({
        "prompt": "a" * 190, "n": 4, "max_tokens": 64, "temperature": 0.7, "seed": 1, "stop": stops,
        "logit_bias": dict({str(t): -1 for t in range(min(tok.vocab_size, MAX_LOGIT_BIAS))}, **{str(a): 100}),
        "presence_penalty": 0.5, "repetition_penalty": 1.1})
    cheap = app.completion_request({"prompt": "the", "max_tokens": 2, "temperature": 0})
    eng = app.engine                         # driven step by step here: no thread, the same loop
    eng.trace = []
    eng.submit(costly)
    for _ in range(3):
        eng.step()
    eng.submit(cheap)                        # arrives while the costly one decodes
    for _ in range(200):
        if all(s.finish for s in costly.seqs + cheap.seqs):
            break
        eng.step()
    assert [s.finish for s in costly.seqs] == ["length"] * 4 and cheap.seqs[0].finish in ("length", "stop")
    assert not any(ev[0] == "error" for req in (costly, cheap) for ev in list(req.events.queue))
    steps_cheap = [i for i, w in enumerate(eng.trace) if cheap.id in w]
    steps_costly = [i for i, w in enumerate(eng.trace) if costly.id in w]
    # the costly prompt is prefilled 64 tokens a step (3 steps), then decodes; the cheap request is done
    # in the 2 steps after it arrived (its 2 tokens), beside the costly one
    assert steps_cheap == [3, 4] and steps_costly == list(range(2 + 64))
    assert sum(eng.trace[i][cheap.id]["sampled"] for i in steps_cheap) == len(cheap.seqs[0].tokens)
    assert [eng.trace[i][costly.id]["prefill"] for i in range(3)] == [64, 64, 62]
    for i in steps_costly:
        w = eng.trace[i][costly.id]
        assert w["prefill"] <= 64 and w["rows"] <= 4 and w["sampled"] <= 4
        # the stop check is linear: at most 2 comparisons per new character and stop string (each token
        # here is one character), not the hundreds per character of a check that rescans the held text
        assert w["compared"] <= 2 * len(stops) * w["sampled"]
    assert sum(eng.trace[i][costly.id]["prefill"] for i in steps_costly) == 190   # one prompt, once, for 4 choices
    assert sum(eng.trace[i][costly.id]["compared"] for i in steps_costly) >= 4 * 64 * len(stops)   # it did check


def test_connections_are_bounded(tmp_path):
    """Idle connections each hold a thread: past --max-connections a new one gets a 503 JSON at once;
    a request that trickles in is cut off at the request deadline."""
    import threading
    from npgpt.loading import load_run
    from npgpt.serve.http import App, make_server
    model, tok = load_run(model_folder(tmp_path / "m", chat=False))[:2]
    app = App(model, tok, "m")
    httpd = make_server(app, port=0, max_connections=2)
    app.engine.start()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    class S:
        port = httpd.server_address[1]
    try:
        idle = [socket.create_connection(("127.0.0.1", S.port)) for _ in range(2)]
        assert wait_until(lambda: httpd.open_connections == 2)
        status, headers, body = exchange(S, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and headers["Retry-After"] == "1" and error(body, code="too_many_connections")
        idle[0].close()                          # a slot comes back when a connection ends
        assert wait_until(lambda: httpd.open_connections == 1)
        status, _, body = exchange(S, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200 and json.loads(body)["data"][0]["id"] == "m"
        idle[1].close()
        # a client that trickles its headers a byte at a time (each well within the idle timeout) is cut
        # off at the request deadline, and its connection slot comes back
        httpd.RequestHandlerClass.request_deadline = 1.0
        assert wait_until(lambda: httpd.open_connections == 0)
        slow = socket.create_connection(("127.0.0.1", S.port))
        slow.sendall(b"GET /v1/models HTTP/1.1\r\nX-Slow: ")
        slow.settimeout(0.1)
        closed, got, sent = False, b"", 0
        for _ in range(600):                     # at most a minute of trickling
            try:
                slow.sendall(b"a")
                sent += 1
                chunk = slow.recv(1024)
                got += chunk
                closed = chunk == b""
            except socket.timeout:
                continue
            except OSError:
                closed = True
            if closed:
                break
        slow.close()
        assert closed and got == b"" and sent >= 2       # dropped at the deadline, not refused at once
        assert wait_until(lambda: httpd.open_connections == 0)
    finally:
        httpd.shutdown()
        app.engine.stop(grace=1)
        httpd.server_close()


def test_detokenizer_stop_check_is_linear():
    from npgpt.tokenizer import CharTokenizer
    tok = CharTokenizer.train("ab")
    a = tok.encode("a")[0]
    for S in (100, 10000):
        d = Detokenizer(tok, ["a" * S + "b", "a" * (S // 2) + "b" + "a"])
        for _ in range(3 * S):
            d.add(a)
        assert d.comparisons <= 2 * 2 * 3 * S and not d.stopped
        assert d.text + d.flush() == "a" * 3 * S


# ---- fuzzing the body schema against the live server ---------------------------------------------------------
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "stop", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "seed", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "logit_bias", "user", "model", "suffix", "response_format",
          "guided_json", "guided_regex", "guided_choice", "content", "tokens", "with_pieces", "tools", "tool_choice"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6), st.sampled_from(["²", "1_0", "9" * 60]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)
GOOD = {
    "prompt": st.one_of(st.text("abcthe xyz\n", max_size=12), st.lists(st.integers(-1, 70), max_size=5),
                        st.lists(st.text("abc ", max_size=4), max_size=3)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                                "content": st.text("abc ☃", max_size=5) | VALUES},
                                               optional={"tool_calls": VALUES, "tool_call_id": VALUES}), max_size=3),
    "max_tokens": st.integers(-1, 12), "n": st.integers(0, 5), "stream": st.booleans() | st.none(),
    "stream_options": st.fixed_dictionaries({"include_usage": VALUES}), "logprobs": st.integers(-1, 21) | st.booleans(),
    "stop": st.lists(st.text("ab ", max_size=3), max_size=5), "echo": st.booleans(),
    "logit_bias": st.dictionaries(st.text("0123456789²-", min_size=1, max_size=4), st.integers(-120, 120), max_size=3),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"},
                                        {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}}]),
    "guided_regex": st.text("ab|*+?()[]{}0-9,^$\\", max_size=8),
    "guided_choice": st.lists(st.text("ab ☃", max_size=3), max_size=3),
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.sampled_from(["f", "get_x"]) | VALUES}, optional={"parameters": st.sampled_from(
            [{"type": "object", "properties": {"a": {"type": "integer"}}}, {}]) | VALUES, "description": VALUES})}),
        max_size=2),
    "tool_choice": st.sampled_from(["none", "auto", "required"]) | st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.just("f") | VALUES})}),
}


def _body(junk, good):
    body = {**junk, **good}
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4            # keep each example short; the defaults are tested above
    return body


BASE = {"prompt": "the", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
BODIES = st.one_of(
    st.builds(_body, st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6),
              st.fixed_dictionaries({}, optional=GOOD)),
    # a valid request with one field changed: reaches generation more often
    st.builds(lambda k, v: {**BASE, k: v}, st.sampled_from(FIELDS), VALUES),
    st.builds(lambda good: {**BASE, **good}, st.fixed_dictionaries({}, optional=GOOD)))


def check_reply(status, headers, data):
    assert 200 <= status < 300 or 400 <= status < 500, (status, data[:300])
    if headers.get("Content-Type") == "text/event-stream":
        events = [e for e in data.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        for e in events[:-1]:
            assert "error" not in json.loads(e[len("data: "):]), e
    else:
        obj = json.loads(data)
        assert ("error" in obj) == (status >= 400)


@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]), body=BODIES)
def test_fuzzed_bodies_never_500(server, path, body):
    check_reply(*post(server, path, body))


def test_fuzz_leaves_the_server_answering(server):
    still_answers(server)
    r = client(server).completions.create(model="tiny", prompt="the", max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
