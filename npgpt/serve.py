"""`npgpt serve`: an OpenAI-compatible HTTP server with continuous batching, and a chat page.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the model's chat
template, see npgpt.sft), GET / (npgpt/static/chat.html). Requests and responses follow OpenAI's
shapes, including server-sent events for `stream` (ending with `data: [DONE]`), logprobs and
usage; invalid values get a 400 with OpenAI's error body {"error": {message, type, param, code}}.

HTTP stack: the standard library's ThreadingHTTPServer (one thread per connection) in front of
one decoding thread, the Engine. npgpt's only dependencies are numpy, regex, click and
safetensors; an ASGI server would add several for no gain here: the work is one model on one
device, so requests have to meet in one decoding loop whatever accepts the connections, and
threads blocked on a queue cost nothing while the engine computes.

Continuous batching. The engine owns one KV cache of max_batch slots (rows) that share a
column counter `length` (the cache's write position). Every active sequence is right-aligned at
that column: row i holds its tokens in columns pad[i] .. length-1, left of that is padding that
attention masks and positions skip (the same mechanism as batched ragged prompts in
npgpt.generate). Each loop of the engine:

  1. admits waiting requests while slots are free: a prompt of L tokens is prefilled on its own
     (a one-row cache), then its keys/values are copied into a free slot at columns
     length-L .. length-1 (when L > length, the live rows shift right first);
  2. samples one token for every row that has fresh logits (each sequence has its own sampling
     settings, penalties and random generator, so batching never changes a sequence's output);
  3. drops finished and cancelled sequences (the last live row moves into the freed slot, so
     live rows stay packed at the front and the model runs on a view of just those rows);
  4. runs one cached forward of all live rows' last tokens.

A request never needs more than block_size positions (prompt + max_tokens is checked on
arrival, as OpenAI does); when the shared column reaches block_size, the rows shift left by
their smallest padding.

Safety: binds 127.0.0.1 by default; --api-key requires `Authorization: Bearer KEY` (compared in
constant time); body size, max_tokens, n and the waiting queue are bounded (413 / 400 / 429
with Retry-After); a client that goes away frees its slots at the next step; a failing request
gets an error and the server goes on; SIGTERM stops accepting, lets running requests finish
(up to a grace period, then cancels them) and returns exit status 0.
"""

from __future__ import annotations

import hmac
import json
import math
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from queue import Empty, Queue

import numpy as np

from npgpt.backend import asnumpy
from npgpt.errors import NpgptError
from npgpt.evaluate import load_model_and_tokenizer
from npgpt.generate import Penalties, draw, log_softmax, sampling_probs, top_tokens
from npgpt.sft import CHAT_TOKENS, chat_stop_ids, has_model_template, is_chat_model, render_chat
from npgpt.safeio import parse_json

MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None, type_="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request parsing ---------------------------------------------------------------------------
def _number(body, key, default, lo=None, hi=None, integer=False, lo_open=False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()) \
            or not math.isfinite(v):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r}", key)
    v = int(v) if integer else float(v)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]" if hi is not None else f">{'' if lo_open else '='} {lo}"
        raise ApiError(400, f"'{key}' must be in {rng}, got {v}", key)
    return v


class Params:
    """Validated generation settings shared by the n choices of one prompt."""

    def __init__(self, body, vocab_size, limits, chat):
        self.max_tokens = _number(body, "max_completion_tokens" if chat and body.get("max_tokens") is None
                                  else "max_tokens", None, 1, None, integer=True)
        if self.max_tokens is not None and self.max_tokens > limits["max_tokens"]:
            raise ApiError(400, f"max_tokens is {self.max_tokens}; this server allows at most "
                                f"{limits['max_tokens']}", "max_tokens")
        self.temperature = _number(body, "temperature", 1.0, 0, 2)
        self.top_p = _number(body, "top_p", 1.0, 0, 1, lo_open=True)
        self.top_k = _number(body, "top_k", None, 1, None, integer=True)        # an extension, as vLLM
        self.n = _number(body, "n", 1, 1, limits["max_batch"], integer=True)
        self.seed = _number(body, "seed", None, integer=True)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOPS
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
        self.stop = stop or []
        self.stream = body.get("stream", False)
        if not isinstance(self.stream, bool):
            raise ApiError(400, "'stream' must be a boolean", "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options")
        self.include_usage = bool(opts.get("include_usage", False))
        if chat:
            lp = body.get("logprobs", False)
            if lp is not None and not isinstance(lp, bool):
                raise ApiError(400, "'logprobs' must be a boolean", "logprobs")
            top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
            if top and not lp:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
            self.logprobs = top if lp else None
        else:
            self.logprobs = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        bias = body.get("logit_bias")
        if bias is not None and not isinstance(bias, dict):
            raise ApiError(400, "'logit_bias' must be an object mapping token ids to biases", "logit_bias")
        parsed = {}
        for k, b in (bias or {}).items():
            if not str(k).isdigit() or isinstance(b, bool) or not isinstance(b, (int, float)):
                raise ApiError(400, f"logit_bias: expected token id -> number, got {k!r}: {b!r}", "logit_bias")
            parsed[int(k)] = float(b)
        self.penalties = Penalties(_number(body, "presence_penalty", 0.0), _number(body, "frequency_penalty", 0.0),
                                   _number(body, "repetition_penalty", 1.0), parsed or None)
        try:
            self.penalties.check(vocab_size)
        except NpgptError as e:
            raise ApiError(400, str(e), str(e).split(" ")[0].split(":")[0]) from None


# ---- sequences and requests --------------------------------------------------------------------
class Request:
    """One HTTP request: its choices (Sequences) and the queue of events its handler thread reads."""

    def __init__(self, kind, prompts, params, stop_ids, prompt_texts):
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.kind, self.params, self.created = kind, params, int(time.time())
        self.events = Queue()
        self.cancelled = False
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.seqs = [Sequence(self, i * params.n + j, p, stop_ids, prompt_texts[i])
                     for i, p in enumerate(prompts) for j in range(params.n)]
        self.open = len(self.seqs)


class Sequence:
    """One choice: its prompt, generated tokens, sampling state and text sent so far."""

    def __init__(self, req, index, prompt, stop_ids, prompt_text):
        p = req.params
        self.req, self.index, self.prompt, self.stop_ids = req, index, list(prompt), set(stop_ids)
        self.rng = np.random.default_rng(None if p.seed is None else [p.seed % (1 << 64), index])
        self.tokens, self.logits, self.finish = [], None, None
        self.sent = 0                         # characters of text already sent
        self.pending = []                     # logprob entries for tokens whose text is not yet sent
        self.offset = len(prompt_text)        # text_offset of the next token (completions logprobs)
        self.counts = self.seen = None

    def text(self, tok):
        return tok.decode([t for t in self.tokens if t not in self.stop_ids])


# ---- the decoding engine ------------------------------------------------------------------------
class _CacheView:
    """The first n rows of the engine's cache, as forward_cached sees a KVCache (k, v are views)."""

    def __init__(self, cache, n):
        self.k, self.v, self.pad, self.length = cache.k[:, :n], cache.v[:, :n], cache.pad[:n], cache.length

    @property
    def padded(self):
        return bool((self.pad > 0).any())


class Engine:
    """The single decoding thread: continuous batching over max_batch KV cache slots."""

    def __init__(self, model, tok, max_batch=16, max_queue=64):
        self.model, self.tok = model, tok
        self.max_batch, self.max_queue = max_batch, max_queue
        self.block = model.config.block_size
        self.cache = model.new_cache(max_batch)
        self.active = []                      # Sequences; active[i] lives in cache row i
        self.waiting = deque()                # Requests not yet admitted
        self.cond = threading.Condition()
        self.accepting, self.running = True, True
        self.steps = self.peak = self.cancelled = 0        # counters shown by /v1/models
        self.thread = threading.Thread(target=self._loop, name="npgpt-engine", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def submit(self, req):
        with self.cond:
            if not self.accepting:
                raise ApiError(503, "the server is shutting down", code="server_shutting_down", type_="server_error")
            if len(self.waiting) >= self.max_queue:
                raise ApiError(429, f"too many requests waiting ({self.max_queue}); retry shortly",
                               code="rate_limit_exceeded", type_="rate_limit_error", headers={"Retry-After": "1"})
            self.waiting.append(req)
            self.cond.notify()

    def wake(self):
        with self.cond:
            self.cond.notify()

    def stop(self, grace=10.0):
        """Stop accepting; refuse the waiting requests, let running ones finish for `grace` seconds
        then cancel them; end the decoding thread."""
        with self.cond:
            self.accepting = False
            while self.waiting:
                req = self.waiting.popleft()
                req.events.put(("error", ApiError(503, "the server is shutting down", code="server_shutting_down",
                                                  type_="server_error")))
            self.cond.notify()
        deadline = time.monotonic() + grace
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.cond:
            self.running = False
            self.cond.notify()
        self.thread.join(timeout=5)
        for s in list(self.active):
            s.req.events.put(("error", ApiError(503, "the server shut down before this request finished",
                                                code="server_shutting_down", type_="server_error")))

    # ---- the loop -------------------------------------------------------------------------------
    def _loop(self):
        while True:
            with self.cond:
                while self.running and not self.active and not self.waiting:
                    self.cond.wait(timeout=1.0)
                if not self.running:
                    return
                admit = []
                free = self.max_batch - len(self.active)
                while self.waiting and len(self.waiting[0].seqs) <= free:
                    req = self.waiting.popleft()
                    if not req.cancelled:
                        admit.append(req)
                        free -= len(req.seqs)
            try:
                for req in admit:
                    self._admit(req)
                self._sample()
                self._drop()
                if self.active:
                    self._forward()
            except Exception as e:           # a bug must not kill the server: fail the running requests
                err = ApiError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error")
                for s in list(self.active):
                    s.req.events.put(("error", err))
                    s.req.cancelled = True
                self.active = []
                self.cache.length = 0
                print(f"npgpt serve: {err.message}", file=sys.stderr)

    def _admit(self, req):
        """Prefill each distinct prompt once and place its choices into free slots."""
        c, model = self.cache, self.model
        by_prompt = {}
        for s in req.seqs:
            by_prompt.setdefault(tuple(s.prompt), []).append(s)
        for prompt, seqs in by_prompt.items():
            L = len(prompt)
            one = model.new_cache(1)
            logits = asnumpy(model.forward_cached(np.array([prompt], dtype=np.int64), one)[0, -1])
            n = len(self.active)
            P = c.length if n else 0
            if L > P:                         # the new prompt is longer: shift live rows right
                D = L - P
                if n:
                    for a in (c.k, c.v):
                        a[:, :n, :, D:D + P] = a[:, :n, :, :P].copy()
                    c.pad[:n] += D
                P = L
            c.length = P
            for s in seqs:
                i = len(self.active)
                c.k[:, i, :, P - L:P] = one.k[:, 0, :, :L]
                c.v[:, i, :, P - L:P] = one.v[:, 0, :, :L]
                c.pad[i] = P - L
                s.logits = logits
                if s.req.params.penalties.active:
                    V = self.model.config.vocab_size
                    s.counts, s.seen = np.zeros((1, V)), np.zeros((1, V), dtype=bool)
                    s.seen[0, list(prompt)] = True
                self.active.append(s)
        self.peak = max(self.peak, len(self.active))

    def _sample(self):
        for s in self.active:
            if s.logits is None or s.finish or s.req.cancelled:
                continue
            try:
                self._sample_one(s)
            except Exception as e:
                s.req.events.put(("error", ApiError(500, f"generation failed: {type(e).__name__}: {e}",
                                                    type_="server_error")))
                s.req.cancelled = True

    def _sample_one(self, s):
        p, tok = s.req.params, self.tok
        logits = s.logits.astype(np.float64)[None]
        s.logits = None
        z = p.penalties.apply(logits, s.counts, s.seen) if p.penalties.active else logits
        probs = sampling_probs(z, p.temperature, p.top_k, p.top_p)
        t = int(draw(probs, s.rng)[0]) if p.temperature > 0 else int(probs.argmax())
        s.tokens.append(t)
        if s.counts is not None:
            s.counts[0, t] += 1
            s.seen[0, t] = True
        if p.logprobs is not None:
            lp = log_softmax(logits)[0]
            top = top_tokens(lp[None], p.logprobs)[0] if p.logprobs else []
            s.pending.append((t, float(lp[t]), [(int(j), float(lp[j])) for j in top]))
        reason = None
        if t in s.stop_ids:
            reason = "stop"
        text = s.text(tok)
        cut = len(text)
        for stop in p.stop:
            i = text.find(stop)
            if i >= 0 and i < cut:
                cut, reason = i, "stop"
        if reason is None and len(s.tokens) >= s.max_tokens:
            reason = "length"
        if reason is None:
            # hold back a possible start of a stop string and an unfinished multi-byte character
            hold = max((k for stop in p.stop for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
            cut = len(text) - hold
            while cut > s.sent and text[cut - 1] == "\ufffd":
                cut -= 1
        if cut > s.sent or reason:
            self._emit(s, text[s.sent:cut])
            s.sent = max(s.sent, cut)
        if reason:
            self._finish(s, reason)

    def _emit(self, s, delta):
        s.req.events.put(("delta", s.index, delta, s.pending))
        s.pending = []

    def _finish(self, s, reason):
        if s.finish is None:
            s.finish = reason
            s.req.events.put(("finish", s.index, reason, len(s.tokens)))

    def _drop(self):
        """Remove finished and cancelled sequences, keeping live rows packed at the front."""
        c = self.cache
        i = 0
        while i < len(self.active):
            s = self.active[i]
            if s.finish or s.req.cancelled:
                last = len(self.active) - 1
                if i != last:
                    P = c.length
                    c.k[:, i, :, :P] = c.k[:, last, :, :P]
                    c.v[:, i, :, :P] = c.v[:, last, :, :P]
                    c.pad[i] = c.pad[last]
                    self.active[i] = self.active[last]
                self.active.pop()
                if s.finish is None:
                    s.finish = "cancelled"
                    self.cancelled += 1
            else:
                i += 1
        if not self.active:
            c.length = 0

    def _forward(self):
        """One cached step for every live row: feed its last token, keep the logits."""
        c, n = self.cache, len(self.active)
        if c.length + 1 > self.block:         # shift left by the smallest padding
            m = int(asnumpy(c.pad[:n]).min())
            P = c.length
            for a in (c.k, c.v):
                a[:, :n, :, :P - m] = a[:, :n, :, m:P].copy()
            c.pad[:n] -= m
            c.length = P - m
        view = _CacheView(c, n)
        last = np.array([[s.tokens[-1]] for s in self.active], dtype=np.int64)
        logits = asnumpy(self.model.forward_cached(last, view)[:, -1])
        c.length = view.length
        for s, row in zip(self.active, logits):
            s.logits = row
        self.steps += 1


# ---- the HTTP side ------------------------------------------------------------------------------
def _token_str(tok, t):
    return tok.decode([t])


class App:
    """What the handlers share: the engine, the tokenizer, the limits, the model's name."""

    def __init__(self, model, tok, model_name, api_key=None, max_batch=16, max_queue=64, max_tokens=1024,
                 max_body=1 << 20):
        self.model, self.tok, self.model_name, self.api_key = model, tok, model_name, api_key
        self.limits = {"max_batch": max_batch, "max_tokens": max_tokens, "max_body": max_body}
        self.has_chat = is_chat_model(tok)     # the model's own template, or npgpt's chat tokens
        self.engine = Engine(model, tok, max_batch, max_queue)
        self.created = int(time.time())
        self.inflight = 0
        self.lock = threading.Lock()

    # ---- building requests ------------------------------------------------------------------------
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
        if not self.has_chat:
            raise ApiError(400, f"model {self.model_name} has no chat template (its tokenizer lacks the "
                                f"<|user|>/<|assistant|>/<|end|> tokens added by `npgpt finetune --sft`); "
                                f"use /v1/completions", "messages", code="no_chat_template")
        params = Params(body, self.model.config.vocab_size, self.limits, chat=True)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        clean = []
        for m in msgs:
            if not isinstance(m, dict):
                raise ApiError(400, "each message must be an object with 'role' and 'content'", "messages")
            role = {"developer": "system"}.get(m.get("role"), m.get("role"))
            content = m.get("content")
            if isinstance(content, list):         # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(400, "message content parts must be {'type': 'text', 'text': ...}", "messages")
                content = "".join(p["text"] for p in content)
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ApiError(400, f"unsupported message role {m.get('role')!r} or non-text content; "
                                    f"use system, user or assistant with text", "messages")
            clean.append({"role": role, "content": content})
        try:
            ids, _ = render_chat(self.tok, clean, add_generation_prompt=True)
        except NpgptError as e:                  # the model's template refused the conversation, or its budget ran out
            raise ApiError(400, str(e), "messages") from None
        # npgpt's template: a reply ends at <|end|>, any other turn marker ends it too; a model's own
        # template: at its end-of-turn token or the tokenizer's EOS
        stop_ids = (chat_stop_ids(self.tok) if has_model_template(self.tok)
                    else [self.tok.special_tokens[t] for t in CHAT_TOKENS] + [self.tok.eot_id])
        return self._request("chat", [ids], params, stop_ids, [""])

    def _request(self, kind, prompts, params, stop_ids, texts):
        block = self.model.config.block_size
        longest = max(len(p) for p in prompts)
        if params.max_tokens is None:
            params.max_tokens = min(16 if kind == "completion" else block - longest, self.limits["max_tokens"])
        if longest + max(params.max_tokens, 1) > block:
            raise ApiError(400, f"this model's maximum context length is {block} tokens; the prompt has {longest} "
                                f"and max_tokens asks for {params.max_tokens} more", "max_tokens",
                           code="context_length_exceeded")
        if len(prompts) * params.n > self.limits["max_batch"]:
            raise ApiError(400, f"{len(prompts) * params.n} choices asked; this server decodes at most "
                                f"{self.limits['max_batch']} at once", "n")
        req = Request(kind, prompts, params, stop_ids, texts)
        for s in req.seqs:
            s.max_tokens = params.max_tokens
        return req

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
                "top_logprobs": [{_token_str(tok, j): l for j, l in top} for _, _, top in entries],
                "text_offset": offsets or []}

    def chunk(self, req, choices):
        obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
        return {"id": req.id, "object": obj, "created": req.created, "model": self.model_name, "choices": choices}

    def models(self):
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self):
        c = self.model.config
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "npgpt",
                "npgpt": {"chat_template": self.has_chat, "context_length": c.block_size,
                          "vocab_size": c.vocab_size, "max_tokens": self.limits["max_tokens"],
                          "max_batch": self.limits["max_batch"], "active": len(self.engine.active),
                          "peak_batch": self.engine.peak, "steps": self.engine.steps,
                          "cancelled": self.engine.cancelled}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "npgpt"
    timeout = 60                  # a client that sends nothing for a minute is dropped
    app: App = None

    def log_message(self, fmt, *args):        # quiet by default; errors go to stderr
        if self.server.verbose:
            super().log_message(fmt, *args)

    # ---- plumbing -------------------------------------------------------------------------------
    def _send_json(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: ApiError):
        if e.status in (413, 400) and self.command == "POST":
            self.close_connection = True          # the unread body may still be on the wire
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
    def do_GET(self):
        try:
            path = self.path.split("?")[0]
            if path in ("/", "/index.html"):
                page = files("npgpt").joinpath("static/chat.html").read_bytes()
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
                elif path == f"/v1/models/{self.app.model_name}":
                    self._send_json(200, self.app.model_card())
                else:
                    self._send_error(ApiError(404, f"no such endpoint or model: GET {path}", code="not_found"))
            else:
                self._send_error(ApiError(404, f"no such page: {path}", code="not_found"))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except ApiError as e:
            self._safe_error(e)
        except Exception as e:              # never let one request take the server down
            print(f"npgpt serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            self._safe_error(ApiError(500, f"internal error: {type(e).__name__}", type_="server_error"))

    def _safe_error(self, e):
        try:
            self._send_error(e)
        except OSError:
            self.close_connection = True

    def _post(self):
        path = self.path.split("?")[0]
        routes = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
        if path not in routes:
            raise ApiError(404, f"no such endpoint: POST {path}", code="not_found")
        if not self._authorised():
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            raise ApiError(411 if "Content-Length" not in self.headers else 400,
                           "a JSON body with a Content-Length header is required") from None
        if length > self.app.limits["max_body"]:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of "
                                f"{self.app.limits['max_body']} bytes", code="request_too_large")
        raw = self.rfile.read(length)
        try:
            body = parse_json(raw, "the request body")    # depth / number limits: a nested body is a 400
        except NpgptError as e:
            raise ApiError(400, str(e)) from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        app = self.app
        req = app.chat_request(body) if routes[path] == "chat" else app.completion_request(body)
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

    def _events(self, req):
        """Engine events for `req` until all its choices finished; stops if the client goes away."""
        while req.open:
            try:
                ev = req.events.get(timeout=0.25)
            except Empty:
                if self._gone():
                    req.cancelled = True
                    return
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
        choices = []
        for i, s in enumerate(req.seqs):
            lp = None
            if req.params.logprobs is not None:
                offs = _offsets(app.tok, s.offset, entries[i])
                lp = app.logprobs_piece(req, i, entries[i], offs)
            if req.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": lp, "finish_reason": reasons[i]})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": reasons[i]})
        obj = "chat.completion" if req.kind == "chat" else "text_completion"
        self._send_json(200, {"id": req.id, "object": obj, "created": req.created, "model": app.model_name,
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
        total = 0
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
                    piece = {"delta": {"content": delta}} if req.kind == "chat" else {"text": delta}
                    send(app.chunk(req, [{"index": i, **piece, "logprobs": lp, "finish_reason": None}]))
                else:
                    _, i, reason, count = ev
                    total += count
                    piece = {"delta": {}} if req.kind == "chat" else {"text": ""}
                    send(app.chunk(req, [{"index": i, **piece, "logprobs": None, "finish_reason": reason}]))
        except ApiError as e:
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


def make_server(app, host="127.0.0.1", port=8000, verbose=False):
    handler = type("BoundHandler", (Handler,), {"app": app})
    try:
        httpd = Server((host, port), handler)
    except OSError as e:
        raise NpgptError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    httpd.verbose = verbose
    return httpd


def serve(checkpoint, host="127.0.0.1", port=8000, api_key=None, device="cpu", max_batch=16, max_queue=64,
          max_tokens=1024, max_body=1 << 20, model_name=None, grace=10.0, verbose=False, ready=print, adapter=None):
    """Load a model (with an optional LoRA adapter folder) and serve it until SIGTERM / SIGINT; returns 0
    after a graceful stop."""
    for name, v in (("max_batch", max_batch), ("max_queue", max_queue), ("max_tokens", max_tokens),
                    ("max_body", max_body)):
        if v is None or int(v) < 1:
            raise NpgptError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if api_key is not None and not api_key:
        raise NpgptError("--api-key must not be empty")
    model, tok, ckpt = load_model_and_tokenizer(checkpoint, device, adapter)
    model.eval()
    if model_name is None:
        ckpt = Path(ckpt).resolve()
        model_name = ckpt.parent.name if ckpt.name == "ckpt" else ckpt.name
    app = App(model, tok, model_name, api_key, max_batch, max_queue, max_tokens, max_body)
    httpd = make_server(app, host, port, verbose)
    app.engine.start()
    stopping = threading.Event()

    def on_signal(signum, frame):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=httpd.shutdown, daemon=True).start()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    h, p = httpd.server_address[:2]
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
        for s, h in old.items():
            signal.signal(s, h)
    print("npgpt serve: stopped", flush=True)
    return 0
