"""The HTTP side of `npgpt serve`: App (requests in, responses out), the request handler, the server
and `serve()`, which loads a model and serves it until SIGTERM.

HTTP stack: the standard library's ThreadingHTTPServer (one thread per connection) in front of
one decoding thread, the Engine. npgpt's only dependencies are numpy, regex, click and
safetensors; an ASGI server would add several for no gain here: the work is one model on one
device, so requests have to meet in one decoding loop whatever accepts the connections, and
threads blocked on a queue cost nothing while the engine computes.

Safety: binds 127.0.0.1 by default; --api-key requires `Authorization: Bearer KEY` (compared in
constant time); body size, max_tokens, n, the tokens of one request and the waiting queue are
bounded (413 / 400 / 429 with Retry-After; the per-field bounds are in protocol.py); malformed
HTTP (other methods, an oversized request line or headers, a Content-Length that is not one
decimal number) gets OpenAI's JSON error body with its status (405 / 414 / 431 / 400), never the
standard library's HTML page; a client that goes away, streaming or not, frees its slots at the
next step; a failing request gets an error and the server goes on; SIGTERM stops accepting, lets
running requests finish (up to a grace period, then cancels them) and returns exit status 0.
README's "Security notes" list every limit.
"""

from __future__ import annotations

import hmac
import io
import json
import re
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from queue import Empty

from npgpt.errors import NpgptError
from npgpt.gguf_models import load_options
from npgpt.loading import load_run
from npgpt.lora import load_adapters
from npgpt.safeio import parse_json
from npgpt.sampling import SamplingError
from npgpt.serve import tools
from npgpt.serve.engine import Engine, Request
from npgpt.serve.metrics import Metrics, RequestLog
from npgpt.serve.protocol import ApiError, Params
from npgpt.structured import GrammarError, TokenTable
from npgpt.sft import is_chat_model


# ---- the HTTP side ------------------------------------------------------------------------------
def _token_str(tok, t):
    return tok.decode([t])


MAX_CHARS_PER_TOKEN = 8         # prompt characters encoded per token a request may hold (see App)


class App:
    """What the handlers share: the engine, the tokenizer, the limits, the model ids, the metrics.

    `adapters` ([{"name", "r", "alpha", "layers", ...}] from npgpt.lora.load_adapters, in the order of
    their indices) are served as models of their own names; `default_adapter` is the index `model_name`
    runs on (-1: the base alone). `log`: a RequestLog for one JSON line per request, or None."""

    def __init__(self, model, tok, model_name, api_key=None, max_batch=16, max_queue=64, max_tokens=1024,
                 max_body=1 << 20, max_request_tokens=None, engine_options=None, adapters=(), default_adapter=-1,
                 log=None):
        self.model, self.tok, self.model_name, self.api_key = model, tok, model_name, api_key
        if max_request_tokens is None:       # four full-length replies
            max_request_tokens = 4 * max_tokens
        self.limits = {"max_batch": max_batch, "max_tokens": max_tokens, "max_body": max_body,
                       "max_request_tokens": max_request_tokens}
        # the prompt text of one request, refused before encoding it: encoding is Python work that holds
        # the GIL (a megabyte of letters takes seconds of BPE merges), and prompts hold at most
        # max(max_request_tokens, context) tokens; natural text runs 3-5 characters a token
        self.max_prompt_chars = MAX_CHARS_PER_TOKEN * max(max_request_tokens, model.config.block_size)
        self.has_chat = is_chat_model(tok)     # the model's own template, or npgpt's chat tokens
        self.adapters = list(adapters)
        self.model_ids = {model_name: default_adapter}           # model id -> adapter index
        for k, a in enumerate(self.adapters):
            self.model_ids.setdefault(a["name"], k)
        self.metrics, self.log = Metrics(), log
        self.engine = Engine(model, tok, max_batch, max_queue, metrics=self.metrics, **(engine_options or {}))
        self.metrics.engine = self.engine
        self.created = int(time.time())
        self.inflight = 0
        self.lock = threading.Lock()
        self._tokens = None                   # npgpt.structured.TokenTable, made for the first constrained request
        self._grammar_lock = threading.Lock()

    # ---- building requests ------------------------------------------------------------------------
    def pick_model(self, body):
        """(model id, adapter index) that the body's `model` asks for. A server of one model answers
        whatever `model` says (as llama.cpp does; the chat page and scripts send any name); with
        adapters the name chooses, and an unknown one is a 404 in OpenAI's shape."""
        name = body.get("model")
        if len(self.model_ids) == 1 or name is None:
            return self.model_name, self.model_ids[self.model_name]
        if not isinstance(name, str) or name not in self.model_ids:
            raise ApiError(404, f"The model {str(name)[:100]!r} does not exist; this server serves "
                                f"{', '.join(self.model_ids)}", "model", code="model_not_found")
        return name, self.model_ids[name]

    def _encode(self, text):
        return self.tok.encode_prompt(text)      # as `npgpt sample`: BPE special-token strings are specials

    def completion_request(self, body):
        params = Params(body, self.model.config.vocab_size, self.limits, chat=False)
        prompt = body.get("prompt", "")
        V = self.model.config.vocab_size
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids", "prompt")
        if len(prompts) * params.n > self.limits["max_batch"]:     # before encoding any of them
            raise ApiError(400, f"{len(prompts) * params.n} choices asked; this server decodes at most "
                                f"{self.limits['max_batch']} at once", "n")
        self._check_chars(sum(len(p) for p in prompts if isinstance(p, str)), "prompt")
        ids, texts = [], []
        for p in prompts:
            if isinstance(p, str):
                try:
                    ids.append(self._encode(p) if p else [self.tok.eot_id])
                except NpgptError as e:
                    raise ApiError(400, f"prompt: {e}", "prompt") from None
                texts.append(p)
            else:
                if not p or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in p):
                    raise ApiError(400, f"token-id prompts need ids in [0, {V})", "prompt")
                ids.append(p)
                texts.append(self.tok.decode(p))
        return self._request("completion", ids, params, [self.tok.eot_id], texts)

    def chat_request(self, body):
        self._need_chat()
        params = Params(body, self.model.config.vocab_size, self.limits, chat=True)
        ids, spec = self.chat_prompt(body)
        if spec is not None and spec.active:
            params.tools = spec
            if spec.forced:                      # constrained to one call with arguments valid for its schema
                if params.grammar is not None:
                    raise ApiError(400, "a forced tool_choice does not combine with response_format / guided_*",
                                   "tool_choice")
                params.grammar, params.grammar_param = tools.forced_grammar(spec), "tools"
        # a reply ends where the model ends its turn or starts another (SamplingParams.for_chat)
        chat = params.sampling.for_chat(self.tok)
        if params.grammar is not None:        # the grammar ends it: a turn marker inside a JSON string must not cut it
            chat = chat.replace(stop=params.sampling.stop)
        params.sampling = chat
        return self._request("chat", [ids], params, params.sampling.stop_token_ids, [""])

    def _need_chat(self):
        if not self.has_chat:
            raise ApiError(400, f"model {self.model_name} has no chat template (its tokenizer lacks the "
                                f"<|user|>/<|assistant|>/<|end|> tokens added by `npgpt finetune --sft`); "
                                f"use /v1/completions", "messages", code="no_chat_template")

    def chat_prompt(self, body):
        """(prompt ids, ToolSpec or None) of a chat body: its messages and tools, checked and rendered
        with the model's chat template (or npgpt's tool fallback), ending with the assistant's opening."""
        self._need_chat()
        msgs = body.get("messages")
        if isinstance(msgs, list) and len(msgs) > self.model.config.block_size:    # every message costs a token at least
            raise ApiError(400, f"{len(msgs)} messages cannot fit this model's context of "
                                f"{self.model.config.block_size} tokens", "messages", code="context_length_exceeded")
        spec = tools.parse_tools(body)
        messages = tools.clean_messages(msgs)
        self._check_chars(sum(len(m["content"]) + sum(len(json.dumps(c["function"]["arguments"]))
                                                      for c in m.get("tool_calls", ())) for m in messages)
                          + (len(json.dumps(spec.tools)) if spec is not None else 0), "messages")
        return tools.render_prompt(self.tok, messages, spec), spec

    def _check_chars(self, n, param):
        if n > self.max_prompt_chars:
            raise ApiError(400, f"the {param} has {n} characters; this server encodes at most "
                                f"{self.max_prompt_chars} per request ({MAX_CHARS_PER_TOKEN} a token of the "
                                f"prompt allowance)", param, code="context_length_exceeded")

    def _request(self, kind, prompts, params, stop_ids, texts):
        block = self.model.config.block_size
        longest = max(len(p) for p in prompts)
        choices = len(prompts) * params.n
        budget = self.limits["max_request_tokens"]
        if params.max_tokens is None:           # the default fits the context and the request budget
            params.max_tokens = max(1, min(16 if kind == "completion" else block - longest,
                                           self.limits["max_tokens"], budget // choices))
        if longest + max(params.max_tokens, 1) > block:
            raise ApiError(400, f"this model's maximum context length is {block} tokens; the prompt has {longest} "
                                f"and max_tokens asks for {params.max_tokens} more", "max_tokens",
                           code="context_length_exceeded")
        if choices > self.limits["max_batch"]:
            raise ApiError(400, f"{choices} choices asked; this server decodes at most "
                                f"{self.limits['max_batch']} at once", "n")
        prompt_tokens, prompt_budget = sum(len(p) for p in prompts), max(budget, block)
        if prompt_tokens > prompt_budget:      # one full context is always allowed
            raise ApiError(400, f"the prompts hold {prompt_tokens} tokens; this server allows at most {prompt_budget} "
                                f"per request", "prompt", code="context_length_exceeded")
        if choices * params.max_tokens > budget:
            raise ApiError(400, f"{choices} choices x max_tokens {params.max_tokens} = "
                                f"{choices * params.max_tokens} tokens; this server allows at most {budget} "
                                f"per request (fewer choices or a smaller max_tokens)", "max_tokens")
        constraint = self.constraint(params.grammar, params.grammar_param) if params.grammar is not None else None
        try:
            params.sampling = params.sampling.replace(max_new_tokens=params.max_tokens,
                                                      stop_token_ids=tuple(stop_ids), constraint=constraint)
        except SamplingError as e:               # the constrained value cannot close within max_tokens
            raise ApiError(400, str(e), "max_tokens", code="grammar_does_not_fit") from None
        return Request(kind, prompts, params, texts, self.tok, self.model.config.vocab_size)

    def constraint(self, grammar, param):
        """`grammar` over this model's vocabulary (the token table is built on first use)."""
        with self._grammar_lock:               # one build at a time; requests without a grammar never wait here
            if self._tokens is None:
                self._tokens = TokenTable.of(self.tok, self.model.config.vocab_size)
            try:
                return grammar.for_tokens(self._tokens)
            except GrammarError as e:
                raise ApiError(400, str(e), param, code="unsupported_grammar") from None

    # ---- response pieces --------------------------------------------------------------------------
    def logprobs_piece(self, req, s_index, entries, offsets=None):
        tok = self.tok
        if req.kind == "chat":
            def item(t, lp):
                txt = _token_str(tok, t)
                return {"token": txt, "logprob": lp, "bytes": list(txt.encode("utf-8"))}
            return {"content": [dict(item(t, lp), top_logprobs=[item(j, l) for j, l in top])
                                for t, lp, top in entries]}
        return {"tokens": [_token_str(tok, t) for t, _, _ in entries],
                "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {_token_str(tok, j): l for j, l in top}
                                 for _, _, top in entries],       # None: an echoed prompt's first token
                "text_offset": offsets or []}

    def chunk(self, req, choices):
        obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
        return {"id": req.id, "object": obj, "created": req.created, "model": req.model or self.model_name,
                "choices": choices}

    def models(self):
        return {"object": "list", "data": [self.model_card(m) for m in self.model_ids]}

    def model_card(self, model_id=None):
        c = self.model.config
        model_id = model_id or self.model_name
        card = {"id": model_id, "object": "model", "created": self.created, "owned_by": "npgpt",
                "npgpt": {"chat_template": self.has_chat, "context_length": c.block_size,
                          "vocab_size": c.vocab_size, "max_tokens": self.limits["max_tokens"],
                          "max_batch": self.limits["max_batch"],
                          "max_request_tokens": self.limits["max_request_tokens"], "active": len(self.engine.active),
                          "peak_batch": self.engine.peak, "steps": self.engine.steps,
                          "cancelled": self.engine.cancelled,
                          "engine": dict(self.engine.stats)}}
        k = self.model_ids[model_id]
        if k >= 0:                              # served through a LoRA adapter (vLLM names the base `parent`)
            a = self.adapters[k]
            card["npgpt"]["lora"] = {"r": a["r"], "alpha": a["alpha"], "layers": a["layers"]}
            if model_id != self.model_name:
                card["parent"] = self.model_name
        return card

    # ---- utility endpoints ------------------------------------------------------------------------
    def tokenize(self, body):
        """POST /tokenize: {"prompt" (vLLM) or "content" (llama.cpp): text, "with_pieces": bool} ->
        {"tokens", "count", "max_model_len", "model"} (+ "pieces": [{"id", "piece"}]). The ids are the
        ones /v1/completions prefills for that string (special-token strings become specials); with
        "messages" (and "tools") instead, the ones /v1/chat/completions prefills for that conversation."""
        model_id, _ = self.pick_model(body)
        pieces = body.get("with_pieces", False)
        if not isinstance(pieces, bool):
            raise ApiError(400, "'with_pieces' must be a boolean", "with_pieces")
        if "messages" in body:                # vLLM's chat form: the prompt /v1/chat/completions would run
            ids, _ = self.chat_prompt(body)
        else:
            text = body.get("prompt", body.get("content"))
            if not isinstance(text, str):
                raise ApiError(400, "'prompt' (or 'content') must be a string, or give 'messages'", "prompt")
            self._check_chars(len(text), "prompt")
            try:
                ids = self._encode(text) if text else []
            except NpgptError as e:
                raise ApiError(400, f"prompt: {e}", "prompt") from None
        out = {"tokens": ids, "count": len(ids), "max_model_len": self.model.config.block_size, "model": model_id}
        if pieces:
            out["pieces"] = [{"id": t, "piece": _token_str(self.tok, t)} for t in ids]
        return out

    def detokenize(self, body):
        """POST /detokenize: {"tokens": [ids]} -> {"prompt": text, "content": text (llama.cpp's name), "model"}."""
        model_id, _ = self.pick_model(body)
        ids, V = body.get("tokens"), self.model.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V
                                                for t in ids):
            raise ApiError(400, f"'tokens' must be a list of token ids in [0, {V})", "tokens")
        text = self.tok.decode(ids)
        return {"prompt": text, "content": text, "model": model_id}

    def health(self):
        """(status, body) of GET /health: 200 while the decoding thread runs and takes requests."""
        e = self.engine
        if not e.accepting:
            return 503, {"status": "shutting_down"}
        if e.thread is None or not e.thread.is_alive():
            return 503, {"status": "engine_stopped"}
        return 200, {"status": "ok", "running": len(e.active), "waiting": len(e.waiting)}

    def finished(self, path, status, req, started, error=None):
        """Count a POST request in the metrics and write its log line."""
        self.metrics.request(path, status)
        record = {"id": None, "endpoint": path[:100], "model": None, "adapter": None, "status": status}
        if req is not None:
            done = [s for s in req.seqs if s.first_at is not None]
            ttft = min(s.first_at for s in done) - req.arrived if done else None
            out_tokens = sum(len(s.tokens) for s in req.seqs)
            duration = time.monotonic() - req.arrived
            self.metrics.generation(req.model, req.prompt_tokens, out_tokens, ttft, duration)
            record.update(id=req.id, model=req.model,
                          adapter=self.adapters[req.adapter]["name"] if req.adapter >= 0 else None,
                          prompt_tokens=req.prompt_tokens, completion_tokens=out_tokens,
                          ttft_s=None if ttft is None else round(ttft, 6), duration_s=round(duration, 6),
                          finish_reasons=[s.finish for s in req.seqs], stream=req.params.stream)
        else:
            record["duration_s"] = round(time.monotonic() - started, 6)
        if error is not None:
            record["error"] = error
        if self.log is not None:
            self.log.write(record)



MAX_REQUEST_LINE = 8192          # bytes of "METHOD /path HTTP/1.1" (414 beyond)
MAX_HEADER_BYTES = 32768         # all header lines together (431 beyond; the standard library also
                                 # stops at 100 headers or a 64 KiB line, answered 431 as well)
_DIGITS = re.compile(rb"[0-9]{1,18}")
_STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                 411: "length_required", 413: "request_too_large", 414: "uri_too_long",
                 431: "request_header_fields_too_large", 501: "not_implemented", 505: "http_version_not_supported"}


class _DeadlineReader(io.RawIOBase):
    """The connection's bytes, read under a deadline: a client that trickles its request a byte at a
    time (each within the idle timeout) is still cut off when the deadline passes."""

    def __init__(self, sock, idle):
        self.sock, self.idle, self.deadline = sock, idle, None

    def readable(self):
        return True

    def readinto(self, b):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request did not arrive whole in time")
            self.sock.settimeout(min(left, self.idle))
        return self.sock.recv_into(b)

    def done(self):
        """The request is in: reads (and writes) go back to the idle timeout alone."""
        if self.deadline is not None:
            self.deadline = None
            self.sock.settimeout(self.idle)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "npgpt"
    timeout = 60                  # a client that sends nothing for a minute is dropped
    request_deadline = 30.0       # seconds for a request (line, headers, body; keep-alive idle too) to arrive
    disconnect_poll = 0.25        # seconds between checks that a waiting client is still there
    app: App = None

    def setup(self):
        super().setup()
        self._reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        self._reader.deadline = time.monotonic() + self.request_deadline
        try:
            super().handle_one_request()
        finally:
            self._reader.done()
    status = None                 # the HTTP status sent for the current request (None: none yet)
    req = None                    # the current generation Request, once built
    error = None                  # the current request's error message, if it failed

    def version_string(self):                 # the Server header: no Python version for a stranger to read
        return self.server_version

    def log_message(self, fmt, *args):        # quiet by default; errors go to stderr
        if self.server.verbose:
            super().log_message(fmt, *args)

    def send_response(self, code, message=None):
        self.status = code                    # what the request is counted and logged with
        super().send_response(code, message)

    # ---- malformed HTTP: the standard library's checks, answered with OpenAI's JSON error body ----
    def send_error(self, code, message=None, explain=None):
        """Every protocol error the standard library finds (a request line or header over its limits,
        a bad version, an unknown method) as a JSON error instead of its HTML page."""
        code = int(code)
        if self.request_version == "HTTP/0.9":   # still the default (an unreadable request line): an
            self.request_version = "HTTP/1.0"    # error with a status line and headers, not bare text
        reason = message or self.responses.get(code, ("error",))[0]
        self._send_error(ApiError(code, f"{code} {reason}", code=_STATUS_CODES.get(code),
                                  type_="invalid_request_error" if code < 500 else "server_error"))

    def parse_request(self):
        if not super().parse_request():
            return False
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.send_error(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
            return False
        if sum(len(k) + len(v) + 4 for k, v in self.headers.items()) > MAX_HEADER_BYTES:
            self.send_error(431, f"request headers longer than {MAX_HEADER_BYTES} bytes")
            return False
        if self.command != "POST":                # no body to wait for
            self._reader.done()
        return True

    def _not_allowed(self):
        self._send_error(ApiError(405, f"method {self.command} is not allowed; this server answers GET and POST",
                                  code="method_not_allowed", headers={"Allow": "GET, POST"}))

    do_HEAD = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = _not_allowed

    # ---- plumbing -------------------------------------------------------------------------------
    def _send_json(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":               # a reply to HEAD has headers only
            self.wfile.write(data)

    def _send_error(self, e: ApiError):
        self.error = e.message
        if e.status >= 400 and (self.command != "GET" or e.status not in (401, 404)):
            self.close_connection = True          # an unread body, or a broken request, may still be on the wire
            e.headers = {**e.headers, "Connection": "close"}
        self._send_json(e.status, e.body(), e.headers)

    def _authorised(self):
        key = self.app.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        ok = hmac.compare_digest(token.strip().encode(), key.encode()) and scheme.lower() == "bearer"
        if not ok:
            self._send_error(ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                      code="invalid_api_key"))
        return ok

    def _gone(self):
        """True when the client has closed its side (readable with nothing to read)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            return bool(r) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # ---- routes ---------------------------------------------------------------------------------
    def _answer(self, route):
        """Run one route: a client that went away closes the connection, an ApiError is answered as
        JSON, and anything else is a 500 that never takes the server down."""
        try:
            route()
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except ApiError as e:
            self._safe_error(e)
        except Exception as e:
            print(f"npgpt serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            self._safe_error(ApiError(500, f"internal error: {type(e).__name__}", type_="server_error"))

    def do_GET(self):
        self.status = None
        try:
            self._answer(self._get)
        finally:
            self.app.metrics.request(self.path.split("?")[0], self.status or 499)

    def _get(self):
        if self.headers.get("Content-Length", "0").strip() != "0" or self.headers.get("Transfer-Encoding"):
            self.close_connection = True          # a GET's body is never read: it must not pass for a request
        path = self.path.split("?")[0]
        if path == "/health":                 # no API key: load balancers and orchestrators probe it
            self._send_json(*self.app.health())
        elif path == "/metrics":
            if not self._authorised():
                return
            data = self.app.metrics.render(self.app.model_ids).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif path in ("/", "/index.html"):
            page = files("npgpt.serve").joinpath("static/chat.html").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                             "style-src 'unsafe-inline'; connect-src 'self'; img-src data:")
            self.end_headers()
            self.wfile.write(page)
        elif path.startswith("/v1/"):
            if not self._authorised():
                return
            if path == "/v1/models":
                self._send_json(200, self.app.models())
            elif path.startswith("/v1/models/") and path[len("/v1/models/"):] in self.app.model_ids:
                self._send_json(200, self.app.model_card(path[len("/v1/models/"):]))
            else:
                self._send_error(ApiError(404, f"no such endpoint or model: GET {path}", code="not_found"))
        else:
            self._send_error(ApiError(404, f"no such page: {path}", code="not_found"))

    def do_POST(self):
        self.status, self.req, self.error, started = None, None, None, time.monotonic()
        try:
            self._answer(self._post)
        finally:                            # 499: the client went away before an answer (nginx's code)
            self.app.finished(self.path.split("?")[0], self.status or 499, self.req, started, self.error)

    def _safe_error(self, e):
        try:
            self._send_error(e)
        except OSError:
            self.close_connection = True

    def _post(self):
        path = self.path.split("?")[0]
        routes = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
        utility = {"/tokenize": App.tokenize, "/detokenize": App.detokenize}
        if path not in routes and path not in utility:
            raise ApiError(404, f"no such endpoint: POST {path}", code="not_found")
        if not self._authorised():
            return
        length = self._content_length()
        if length > self.app.limits["max_body"]:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of "
                                f"{self.app.limits['max_body']} bytes", code="request_too_large")
        raw = self.rfile.read(length)
        self._reader.done()
        try:
            body = parse_json(raw, "the request body", sent=True)    # depth / number limits: a nested body is a 400
        except NpgptError as e:
            raise ApiError(400, str(e)) from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        app = self.app
        if path in utility:
            self._send_json(200, utility[path](app, body))
            return
        model_id, adapter = app.pick_model(body)          # an unknown model is a 404 before anything else
        req = app.chat_request(body) if routes[path] == "chat" else app.completion_request(body)
        req.model, req.adapter, self.req = model_id, adapter, req
        with app.lock:
            app.inflight += 1
        try:
            app.engine.submit(req)
            if req.params.stream:
                self._stream(req)
            else:
                self._complete(req)
        finally:
            req.cancelled = True              # frees the slots if the client went away
            app.engine.wake()
            with app.lock:
                app.inflight -= 1

    def _content_length(self):
        """The body's length: exactly one Content-Length of ASCII digits (int() would also take "3_4",
        " 34" or "３４"), no Transfer-Encoding (a body framed two ways is how requests are smuggled)."""
        values = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") is not None:
            raise ApiError(411 if not values else 400, "Transfer-Encoding is not supported: send the JSON body "
                                                       "with a Content-Length header", code="length_required")
        if not values:
            raise ApiError(411, "a JSON body with a Content-Length header is required", code="length_required")
        raw = {v.strip().encode("utf-8", "replace") for v in values}
        if len(raw) > 1 or not _DIGITS.fullmatch(next(iter(raw))):
            raise ApiError(400, f"invalid Content-Length: {', '.join(v[:20] for v in values)!r} (one decimal "
                                f"number of bytes is required)", code="invalid_content_length")
        return int(next(iter(raw)))

    def _events(self, req):
        """Engine events for `req` until all its choices finished. Every `disconnect_poll` seconds
        (whether events flow or not) it checks that the client is still there, and cancels the
        request if it went away: a non-streaming client is noticed as soon as a streaming one."""
        next_poll = time.monotonic()            # the first check comes with the first event
        while req.open:
            try:
                ev = req.events.get(timeout=self.disconnect_poll)
            except Empty:
                ev = None
            if ev is None or time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.disconnect_poll
                if self._gone():
                    req.cancelled = True
                    return
            if ev is None:
                continue
            if ev[0] == "error":
                raise ev[1]
            if ev[0] == "finish":
                req.open -= 1
            yield ev

    def _complete(self, req):
        app, n = self.app, len(req.seqs)
        texts, entries, reasons, counts = [""] * n, [[] for _ in range(n)], [None] * n, [0] * n
        for ev in self._events(req):
            if ev[0] == "delta":
                _, i, delta, lps = ev
                texts[i] += delta
                entries[i] += lps
            else:
                _, i, reason, count = ev
                reasons[i], counts[i] = reason, count
        if req.cancelled and req.open:
            return
        if req.params.echo:
            texts = [req.prompt_texts[i // req.params.n] + t for i, t in enumerate(texts)]
        choices = []
        for i, s in enumerate(req.seqs):
            lp = None
            if req.params.logprobs is not None:
                offs = _offsets(app.tok, 0 if req.params.echo else s.offset, entries[i])   # echo: from the prompt's start
                lp = app.logprobs_piece(req, i, entries[i], offs)
            if req.kind == "chat":
                message, reason = {"role": "assistant", "content": texts[i]}, reasons[i]
                if req.params.tools is not None:          # <tool_call> blocks -> tool_calls
                    content, calls = tools.parse_reply(texts[i], req.params.tools)
                    if calls:
                        message = {"role": "assistant", "content": content, "tool_calls": calls}
                        reason = "tool_calls" if reason == "stop" else reason
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": reasons[i]})
        obj = "chat.completion" if req.kind == "chat" else "text_completion"
        self._send_json(200, {"id": req.id, "object": obj, "created": req.created, "model": req.model or app.model_name,
                              "choices": choices, "usage": _usage(req, sum(counts))})

    def _stream(self, req):
        app = self.app
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(obj):
            self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
            self.wfile.flush()

        if req.kind == "chat":
            send(app.chunk(req, [{"index": s.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None} for s in req.seqs]))
        elif req.params.echo:
            send(app.chunk(req, [{"index": s.index, "text": req.prompt_texts[s.index // req.params.n],
                                  "logprobs": None, "finish_reason": None} for s in req.seqs]))
        total = 0
        spec = req.params.tools
        calls = {s.index: tools.ToolStream(spec) for s in req.seqs} if spec is not None else {}

        def send_tool_events(i, events, lp=None):
            """A choice's text and tool calls as chunks: a call comes as OpenAI streams one, its id and
            name first, then its arguments."""
            for kind, value in events:
                if kind == "content":
                    send(app.chunk(req, [{"index": i, "delta": {"content": value}, "logprobs": lp,
                                          "finish_reason": None}]))
                else:
                    k, fn = value.pop("index"), value["function"]
                    head = {"index": k, "id": value["id"], "type": "function",
                            "function": {"name": fn["name"], "arguments": ""}}
                    for part in (head, {"index": k, "function": {"arguments": fn["arguments"]}}):
                        send(app.chunk(req, [{"index": i, "delta": {"tool_calls": [part]}, "logprobs": lp,
                                              "finish_reason": None}]))
                lp = None
            if lp is not None:                    # the text is held back (a possible tool call): logprobs go now
                send(app.chunk(req, [{"index": i, "delta": {"content": ""}, "logprobs": lp, "finish_reason": None}]))

        try:
            for ev in self._events(req):
                if ev[0] == "delta":
                    _, i, delta, lps = ev
                    s = req.seqs[i]
                    lp = None
                    if req.params.logprobs is not None:
                        offs = _offsets(app.tok, s.offset, lps)
                        if lps:
                            s.offset = offs[-1] + len(_token_str(app.tok, lps[-1][0]))
                        lp = app.logprobs_piece(req, i, lps, offs)
                    if not delta and not lps:
                        continue
                    if i in calls:
                        send_tool_events(i, calls[i].feed(delta), lp)
                        continue
                    piece = {"delta": {"content": delta}} if req.kind == "chat" else {"text": delta}
                    send(app.chunk(req, [{"index": i, **piece, "logprobs": lp, "finish_reason": None}]))
                else:
                    _, i, reason, count = ev
                    total += count
                    if i in calls:
                        send_tool_events(i, calls[i].finish())
                        if calls[i].calls and reason == "stop":
                            reason = "tool_calls"
                    piece = {"delta": {}} if req.kind == "chat" else {"text": ""}
                    send(app.chunk(req, [{"index": i, **piece, "logprobs": None, "finish_reason": reason}]))
        except ApiError as e:
            self.error = e.message
            send(e.body())
            send(b"[DONE]")
            return
        if req.cancelled and req.open:
            return
        if req.params.include_usage:
            send(dict(app.chunk(req, []), usage=_usage(req, total)))
        send(b"[DONE]")


def _offsets(tok, start, entries):
    offs, o = [], start
    for t, _, _ in entries:
        offs.append(o)
        o += len(_token_str(tok, t))
    return offs


def _usage(req, completion_tokens):
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": req.prompt_tokens + completion_tokens}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128      # listen backlog: socketserver's 5 resets a burst of 16 clients
    verbose = False
    linger_bytes, linger_s = 1 << 20, 1.0
    max_connections = 512         # open connections, each a thread; more are answered 503 at once
    open_connections = 0          # connections being served now (their threads)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._connections_lock = threading.Lock()
        self._refused = deque()        # (socket, deadline): refused connections closing without a thread

    def _take_connection(self):
        with self._connections_lock:
            if self.open_connections >= self.max_connections:
                return False
            self.open_connections += 1
            return True

    def _release_connection(self):
        with self._connections_lock:
            self.open_connections -= 1

    def process_request(self, request, client_address):
        """One thread per connection, up to max_connections: a client that opens thousands of idle
        connections gets 503s, not a thread each."""
        if not self._take_connection():
            body = json.dumps(ApiError(503, f"too many open connections ({self.max_connections}); retry shortly",
                                       code="too_many_connections", type_="server_error").body()).encode()
            try:
                request.setblocking(False)        # the accepting thread must never wait on a client
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                request.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            # closed later (service_actions), after the client has read the reply: closing now, with its
            # request unread, would reset the connection and lose the reply
            self._refused.append((request, time.monotonic() + self.linger_s))
            while len(self._refused) > self.max_connections:
                self.close_request(self._refused.popleft()[0])
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release_connection()
            raise

    def service_actions(self):
        """Between accepts (serve_forever's loop): drain refused connections, close those the client
        has closed or whose time is up."""
        now, keep = time.monotonic(), deque()
        while self._refused:
            request, deadline = self._refused.popleft()
            try:
                while request.recv(65536):
                    pass
                done = True                       # the client closed its side
            except BlockingIOError:
                done = now >= deadline
            except OSError:
                done = True
            if done:
                self.close_request(request)
            else:
                keep.append((request, deadline))
        self._refused = keep

    def server_close(self):
        super().server_close()
        while self._refused:
            self.close_request(self._refused.popleft()[0])

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release_connection()

    def handle_error(self, request, client_address):
        """One line on stderr (the standard library prints a traceback) for a connection that broke
        outside a handler's own error handling."""
        e = sys.exc_info()[1]
        print(f"npgpt serve: connection from {client_address[0]} failed: {type(e).__name__}: {e}", file=sys.stderr)

    def shutdown_request(self, request):
        """A lingering close (in the connection's own thread): closing a socket with unread bytes
        (the rest of an oversized header or body we refused) resets the connection, and the client
        may lose the error reply; so send FIN, then read and drop what still comes, within bounds."""
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(self.linger_s)
            deadline, left = time.monotonic() + self.linger_s, self.linger_bytes
            while left > 0 and time.monotonic() < deadline:
                chunk = request.recv(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        self.close_request(request)


def _check_port(port):
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise NpgptError(f"--port must be in 0..65535 (0: any free port), got {port}")


def make_server(app, host="127.0.0.1", port=8000, verbose=False, max_connections=512):
    handler = type("BoundHandler", (Handler,), {"app": app})
    _check_port(port)
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise NpgptError(f"--max-connections must be a positive integer, got {max_connections}")
    try:
        httpd = Server((host, port), handler)
    except (OSError, OverflowError, UnicodeError) as e:
        raise NpgptError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    httpd.verbose, httpd.max_connections = verbose, max_connections
    return httpd


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def parse_adapter_options(values):
    """`--adapter` values -> (plain folder or None, [(name, folder)]). `NAME=DIR` names an adapter
    served as model NAME (NAME: letters, digits, . _ : -; a value that is an existing path is a folder
    whatever it contains); a plain `DIR` is applied to the default model, as before."""
    plain, named = None, []
    for v in values or ():
        name, eq, folder = str(v).partition("=")
        if eq and _ADAPTER_NAME.fullmatch(name) and folder and not Path(v).exists():
            if any(name == n for n, _ in named):
                raise NpgptError(f"--adapter {name}=... is given twice; each adapter needs its own name")
            named.append((name, folder))
        elif plain is not None:
            raise NpgptError(f"--adapter {v}: only one unnamed adapter (the default model's); name the others "
                             f"as NAME=DIR to serve them side by side")
        else:
            plain = str(v)
    return plain, named


def load_served(checkpoint, adapter=None, adapters=(), device="cpu", keep_quantized=False, trust_pattern=False,
                model_name=None):
    """The model a server serves and its ids: (model, tok, model_name, adapter infos, default adapter index).

    Without named `adapters`, `adapter` (a folder) is applied to the model as LoRALinear layers, as
    `npgpt sample --adapter` does. With them, every adapter becomes a row-selectable one
    (npgpt.lora.load_adapters): the unnamed `adapter`, if any, is adapter 0 and the default model
    (`base+DIR`), the named ones follow in order; -1 is the base alone."""
    adapters = list(adapters or [])
    model, tok, ckpt = load_run(checkpoint, adapter=None if adapters else adapter, device=device,
                                trust_pattern=trust_pattern,
                                **load_options(checkpoint, keep_quantized))[:3]
    model.eval()
    if model_name is None:
        ckpt = Path(ckpt).resolve()
        model_name = ckpt.parent.name if ckpt.name == "ckpt" else ckpt.name
        if adapter is not None:                  # the id says the adapter is on: base+adapter
            a = Path(adapter).resolve()
            model_name += "+" + (a.parent.name if a.name == "ckpt" else a.name)
    infos, default = [], -1
    if adapters:
        clash = [n for n, _ in adapters if n == model_name]
        if clash:
            raise NpgptError(f"--adapter {clash[0]}=...: {clash[0]!r} is the base model's id; choose another name")
        infos = load_adapters(model, ([(model_name, adapter)] if adapter is not None else []) + adapters)
        default = 0 if adapter is not None else -1
    return model, tok, model_name, infos, default


def cap_context(model, context):
    """Serve at most `context` positions per request (prompt + reply; None: the model's whole context).

    The engine's KV cache holds max_batch rows of the model's block_size positions; a model trained
    for 8,192 positions (SmolLM2) then sets aside ~360 MB a row, and the first request in each row
    pays for touching it. A smaller context is llama.cpp's `-c` and vLLM's `--max-model-len`: longer
    requests get the same 400 `context_length_exceeded` as past the model's own limit."""
    if context is None:
        return model
    block = model.config.block_size
    if context > block:
        raise NpgptError(f"--context {context} is longer than the model's context ({block} positions); "
                         f"give at most {block}")
    model.config = replace(model.config, block_size=context)
    return model


def serve(checkpoint, host="127.0.0.1", port=8000, api_key=None, device="cpu", max_batch=16, max_queue=64,
          max_tokens=1024, max_body=1 << 20, model_name=None, grace=10.0, verbose=False, ready=print, adapter=None,
          keep_quantized=False, prefill_chunk=256, prefix_cache_mb=512, prefix_request_mb=128, max_request_tokens=None,
          trust_pattern=False, adapters=None, log_file=None, request_log=True, max_connections=512, context=None):
    """Load a model (with an optional LoRA adapter folder) and serve it until SIGTERM / SIGINT; returns 0
    after a graceful stop. prefill_chunk: prompt tokens prefilled per engine step; prefix_cache_mb
    (0 = off) and prefix_request_mb: the prefix cache's bounds (npgpt.serve.engine.PrefixCache).
    trust_pattern: the tokenizer may use a split regex that is not a named one (`npgpt --trust-pattern`).
    context: positions per request, at most the model's (see `cap_context`).

    `adapters` ([(name, folder)]) serves LoRA adapters side by side over the one base, each as the model
    id `name` (rows of different adapters share a decoding batch); `adapter` (one folder) is applied to
    the default model as before. `request_log`: one JSON line per POST request, to `log_file` (appended)
    or stderr."""
    for name, v in (("max_batch", max_batch), ("max_queue", max_queue), ("max_tokens", max_tokens),
                    ("max_body", max_body), ("max_request_tokens", max_request_tokens)):
        if (v is None and name != "max_request_tokens") or (v is not None and int(v) < 1):
            raise NpgptError(f"--{name.replace('_', '-')} must be positive, got {v}")
    _check_port(port)
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise NpgptError(f"--max-connections must be a positive integer, got {max_connections}")
    if prefill_chunk is None or int(prefill_chunk) < 1:
        raise NpgptError(f"--prefill-chunk must be at least 1 token, got {prefill_chunk}")
    for name, v in (("prefix_cache_mb", prefix_cache_mb), ("prefix_request_mb", prefix_request_mb)):
        if v is None or not 0 <= float(v) <= 1 << 20:
            raise NpgptError(f"--{name.replace('_', '-')} must be between 0 and {1 << 20} (MiB), got {v}")
    if api_key is not None and not api_key:
        raise NpgptError("--api-key must not be empty")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise NpgptError(f"--context must be a positive number of positions, got {context}")
    model, tok, model_name, infos, default = load_served(checkpoint, adapter, adapters, device, keep_quantized,
                                                         trust_pattern, model_name)
    cap_context(model, context)
    log = None
    if request_log:
        try:
            log = RequestLog(log_file)
        except (OSError, NpgptError) as e:      # npgpt.fileio.open_log: a missing folder, a link out of it
            raise NpgptError(f"cannot open --log-file {log_file} ({getattr(e, 'strerror', None) or e})") from None
    app = App(model, tok, model_name, api_key, max_batch, max_queue, max_tokens, max_body, max_request_tokens,
              engine_options={"prefill_chunk": int(prefill_chunk), "prefix_cache_mb": float(prefix_cache_mb),
                              "prefix_request_mb": float(prefix_request_mb)},
              adapters=infos, default_adapter=default, log=log)
    httpd = make_server(app, host, port, verbose, max_connections)
    app.engine.start()
    stopping = threading.Event()

    def on_signal(signum, frame):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=httpd.shutdown, daemon=True).start()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    h, p = httpd.server_address[:2]
    for a in infos:
        if a["name"] == model_name:
            ready(f"npgpt serve: LoRA adapter {a['folder']} is the default model {model_name} (r={a['r']}, "
                  f"alpha={a['alpha']:g}, {a['layers']} layers)")
            continue
        base = f"; it records base {a['base']}" if a["base"] else ""
        ready(f"npgpt serve: LoRA adapter {a['folder']} served as model {a['name']} (r={a['r']}, "
              f"alpha={a['alpha']:g}, {a['layers']} layers{base})")
    if adapter is not None and model.lora is not None:
        ready(f"npgpt serve: LoRA adapter {adapter} loaded (r={model.lora.r}, alpha={model.lora.alpha:g}, "
              f"targets {t if isinstance(t := model.lora.targets, str) else ','.join(t)}), unmerged over the base")
    ready(f"npgpt serve: {model_name} on http://{h}:{p}/ (chat page at /, API at /v1; "
          f"{'API key required' if api_key else 'no API key'}); Ctrl-C or SIGTERM stops")
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        app.engine.stop(grace)
        deadline = time.monotonic() + 2.0
        while app.inflight and time.monotonic() < deadline:       # let handlers write their last bytes
            time.sleep(0.02)
        httpd.server_close()
        if log is not None:
            log.close()
        for s, h in old.items():
            signal.signal(s, h)
    print("npgpt serve: stopped", flush=True)
    return 0
