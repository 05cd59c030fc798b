"""The decoding engine of `npgpt serve`: one thread, continuous batching.

Continuous batching. The engine owns one KV cache of max_batch slots (rows) that share a
column counter `length` (the cache's write position). Every active sequence is right-aligned at
that column: row i holds its tokens in columns pad[i] .. length-1, left of that is padding that
attention masks and positions skip (the same mechanism as batched ragged prompts in
npgpt.generate). Each loop of the engine:

  1. admits waiting requests while slots are free: a prompt of L tokens is prefilled on its own
     (a one-row cache), then its keys/values are copied into a free slot at columns
     length-L .. length-1 (when L > length, the live rows shift right first);
  2. samples one token for every row that has fresh logits through its own npgpt.sampling.Sampler
     (settings, penalties, random generator: batching never changes a sequence's output) and
     Detokenizer (UTF-8-safe text, stop strings held back until decided);
  3. drops finished and cancelled sequences (the last live row moves into the freed slot, so
     live rows stay packed at the front and the model runs on a view of just those rows);
  4. runs one cached forward of all live rows' last tokens.

A request never needs more than block_size positions (prompt + max_tokens is checked on
arrival, as OpenAI does); when the shared column reaches block_size, the rows shift left by
their smallest padding.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import time
import uuid
from collections import deque
from queue import Queue

import numpy as np

from npgpt.backend import asnumpy
from npgpt.layers import adapter_rows
from npgpt.sampling import Detokenizer, Sampler, log_softmax, top_tokens
from npgpt.serve.protocol import ApiError


# ---- sequences and requests --------------------------------------------------------------------
class Request:
    """One HTTP request: its choices (Sequences) and the queue of events its handler thread reads.

    params.sampling is complete here (max_new_tokens and the stop tokens set by the HTTP side)."""

    def __init__(self, kind, prompts, params, prompt_texts, tok, vocab_size):
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.kind, self.params, self.created = kind, params, int(time.time())
        self.arrived = time.monotonic()       # for time to first token and the request's duration
        self.model = None                     # the model id it asked for (set by the HTTP side)
        self.adapter = -1                     # its adapter's index (npgpt.layers.adapter_rows), -1: the base
        self.events = Queue()
        self.cancelled = False
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.seqs = [Sequence(self, i * params.n + j, p, prompt_texts[i], tok, vocab_size)
                     for i, p in enumerate(prompts) for j in range(params.n)]
        self.open = len(self.seqs)


class Sequence:
    """One choice: its prompt, generated tokens, its Sampler and Detokenizer."""

    def __init__(self, req, index, prompt, prompt_text, tok, vocab_size):
        sp = req.params.sampling
        self.req, self.index, self.prompt = req, index, list(prompt)
        self.sampler = Sampler(sp, vocab_size, self.prompt, index)     # seeded [seed, index]
        self.detok = Detokenizer(tok, sp.stop, sp.stop_token_ids)
        self.max_tokens = sp.max_new_tokens
        self.tokens, self.logits, self.finish = [], None, None
        self.pending = []                     # logprob entries for tokens whose text is not yet sent
        self.offset = len(prompt_text)        # text_offset of the next token (completions logprobs)
        self.first_at = self.last_at = None   # time.monotonic() of its first and latest token


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

    def __init__(self, model, tok, max_batch=16, max_queue=64, metrics=None):
        self.model, self.tok = model, tok
        self.max_batch, self.max_queue = max_batch, max_queue
        self.block = model.config.block_size
        self.cache = model.new_cache(max_batch)
        self.active = []                      # Sequences; active[i] lives in cache row i
        self.waiting = deque()                # Requests not yet admitted
        self.cond = threading.Condition()
        self.accepting, self.running = True, True
        self.steps = self.peak = self.cancelled = 0        # counters shown by /v1/models
        self.prefix_hits = 0                  # prompts that reused cached keys/values (none yet: no prefix cache)
        self.metrics = metrics                # npgpt.serve.metrics.Metrics: per-token latency, batch sizes
        self.thread = None

    def start(self):
        """Start the decoding thread, in a copy of the calling thread's context: it keeps the
        precision (and grad / reference mode) in force here, and no `with` block another thread
        enters later (a no_grad, reference_ops or use_precision) ever reaches it."""
        ctx = contextvars.copy_context()
        self.thread = threading.Thread(target=ctx.run, args=(self._loop,), name="npgpt-engine", daemon=True)
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
        if self.thread is not None:
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
            with adapter_rows([req.adapter]):
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
        p = s.req.params
        logits, s.logits = s.logits, None
        t, _ = s.sampler.sample(logits)
        s.tokens.append(t)
        now = time.monotonic()
        if s.last_at is not None and self.metrics is not None:
            self.metrics.token_gap(now - s.last_at)
        s.first_at, s.last_at = s.first_at or now, now
        if p.logprobs is not None:
            lp = log_softmax(logits.astype(np.float64)[None])[0]
            top = top_tokens(lp[None], p.logprobs)[0] if p.logprobs else []
            s.pending.append((t, float(lp[t]), [(int(j), float(lp[j])) for j in top]))
        delta = s.detok.add(t)
        reason = "stop" if s.sampler.is_stop_token(t) or s.detok.stopped else None
        if reason is None and len(s.tokens) >= s.max_tokens:
            reason = "length"
        if reason:
            delta += s.detok.flush()          # what a stop string's possible start held back
        if delta or reason:
            self._emit(s, delta)
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
        with adapter_rows([s.req.adapter for s in self.active]):
            logits = asnumpy(self.model.forward_cached(last, view)[:, -1])
        c.length = view.length
        for s, row in zip(self.active, logits):
            s.logits = row
        self.steps += 1
        if self.metrics is not None:
            self.metrics.batch(n)
