"""The decoding engine of `npgpt serve`: one thread, continuous batching.

Continuous batching. The engine owns one KV cache of max_batch slots (rows) that share a
column counter `length` (the cache's write position). Every active sequence is right-aligned at
that column: row i holds its tokens in columns pad[i] .. length-1, left of that is padding that
attention masks and positions skip (the same mechanism as batched ragged prompts in
npgpt.generate). Each loop of the engine:

  1. admits waiting requests while slots are free (reserving their slots) and prefills their prompts
     a chunk at a time (at most `prefill_chunk` tokens per loop, so a long prompt never stalls the
     running streams for more than one chunk): a prompt of L tokens is prefilled on its own (a
     one-row cache of L columns), starting from the keys/values of its longest prefix found in the
     PrefixCache; once complete its keys/values are copied into its slot at columns
     length-L .. length-1 (when L > length, the live rows shift right first);
  2. samples one token for every row that has fresh logits through its own npgpt.sampling.Sampler
     (settings, penalties, random generator: batching never changes a sequence's output) and
     Detokenizer (UTF-8-safe text, stop strings held back until decided);
  3. drops finished and cancelled sequences (the last live row moves into the freed slot, so
     live rows stay packed at the front and the model runs on a view of just those rows);
  4. runs one cached forward of all live rows' last tokens.

Prefix cache. Requests that share a prefix (a system prompt, a few-shot block, a chat history)
reuse its keys/values: the PrefixCache keeps them in a trie of token blocks (block_tokens tokens a
node), bounded in bytes (max_bytes in all, max_request_bytes added by one prompt), evicting the
least recently used leaves. A position's key depends only on the tokens up to it and on its
position counted from the row's first token, so a cached block is valid in any slot. Hits, misses
and sizes are counted in `Engine.stats` (a dict of plain numbers other threads may read).

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
from collections import OrderedDict, deque
from dataclasses import replace
from queue import Queue

import numpy as np

from npgpt.backend import asnumpy, get_xp
from npgpt.layers import adapter_rows
from npgpt.model import KVCache
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
        self.prompt_texts = list(prompt_texts)  # what `echo` puts before each choice's text
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


# ---- the prefix cache ---------------------------------------------------------------------------
class _Node:
    """One block of a cached prefix: its tokens, keys and values (n_layer, nkv, block_tokens, hs)."""
    __slots__ = ("parent", "tokens", "k", "v", "children")

    def __init__(self, parent, tokens, k, v):
        self.parent, self.tokens, self.k, self.v, self.children = parent, tokens, k, v, {}


class PrefixCache:
    """Keys/values of prompt prefixes in a trie of token blocks, bounded in bytes, LRU-evicted.

    A node holds the keys/values of `block_tokens` tokens; its path from the root spells the
    prefix they belong to. `lookup` finds the longest cached run of whole blocks a prompt starts
    with (never the prompt's last token: its logits must be computed), `insert` adds a prefilled
    prompt's whole blocks. Memory: at most max_bytes in all; one prompt adds at most
    max_request_bytes (a single huge prompt cannot flush everyone's system prompt). Eviction takes
    the least recently used leaf: a lookup or insert touches its path deepest-first, so a parent is
    always more recent than its children and the oldest node is a leaf. `ns` keeps prefixes apart
    whose keys/values differ for the same tokens (each LoRA adapter served has its own trie; the
    memory bounds are shared)."""

    def __init__(self, block_tokens=16, max_bytes=512 << 20, max_request_bytes=128 << 20):
        if block_tokens < 1 or max_bytes < 0 or max_request_bytes < 0:
            raise ValueError("block_tokens must be >= 1 and the byte bounds >= 0")
        self.block_tokens, self.max_bytes, self.max_request_bytes = block_tokens, max_bytes, max_request_bytes
        self.root = _Node(None, (), None, None)
        self.roots = {None: self.root}        # ns -> the root of its trie
        self.lru = OrderedDict()              # node -> None, least recently used first
        self.bytes = 0
        self.evictions = 0

    def __len__(self):
        return len(self.lru)

    def _blocks(self, tokens):
        b = self.block_tokens
        return [tuple(tokens[i:i + b]) for i in range(0, len(tokens) - b + 1, b)]

    def _touch(self, path):
        for node in reversed(path):           # deepest first: parents end up more recent than children
            self.lru.move_to_end(node)

    def _root(self, ns):
        return self.roots.setdefault(ns, _Node(None, (), None, None))

    def lookup(self, prompt, ns=None):
        """The cached nodes of the longest whole-block prefix of prompt[:-1], root side first."""
        path, node = [], self._root(ns)
        for key in self._blocks(prompt[:-1]):
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        self._touch(path)
        return path

    def insert(self, prompt, k, v, ns=None):
        """Add the whole blocks of a prefilled prompt; k, v: (n_layer, nkv, >= len(prompt), hs)."""
        b, node, path, added = self.block_tokens, self._root(ns), [], 0
        for j, key in enumerate(self._blocks(prompt)):
            child = node.children.get(key)
            if child is None:
                size = 2 * k[:, :, :b].nbytes
                if added + size > self.max_request_bytes or size > self.max_bytes:
                    break
                if not self._make_room(size, path):
                    break
                xp = get_xp(k)
                child = _Node(node, key, xp.ascontiguousarray(k[:, :, j * b:(j + 1) * b]),
                              xp.ascontiguousarray(v[:, :, j * b:(j + 1) * b]))
                node.children[key] = child
                self.lru[child] = None
                self.bytes += size
                added += size
            else:
                self.lru.move_to_end(child)    # keep the path being extended out of eviction's reach
            path.append(child)
            node = child
        self._touch(path)
        return added

    def _make_room(self, size, path):
        """Evict least recently used leaves until `size` more bytes fit; False if only the path
        being extended is left to evict."""
        keep = set(map(id, path))
        while self.bytes + size > self.max_bytes:
            node = next(iter(self.lru), None)
            if node is None or id(node) in keep:
                return False
            self._remove(node)
        return True

    def _remove(self, node):
        for child in list(node.children.values()):  # never needed while parents outlive children
            self._remove(child)
        del node.parent.children[node.tokens]
        del self.lru[node]
        self.bytes -= 2 * node.k.nbytes
        self.evictions += 1

    def clear(self):
        for root in self.roots.values():
            for node in list(root.children.values()):
                self._remove(node)


class Prefill:
    """One prompt being prefilled a chunk at a time into its own one-row cache of len(prompt)
    columns. `reuse` first copies in the keys/values of a cached prefix (looked up when the prompt's
    turn comes, so prompts admitted together still share what the earlier ones computed). `logits`
    is set when it is complete."""

    def __init__(self, model, prompt, seqs, like, ns=None, prompt_logprobs=None):
        self.prompt, self.seqs = list(prompt), seqs
        self.ns = ns                          # the prefix cache's namespace: the request's adapter
        self.cache = KVCache(replace(model.config, block_size=len(prompt)), 1, like)
        self.logits = None
        self.started = False
        self.reused = 0
        # `echo` with `logprobs`: top-k to keep for each prompt token (None: not asked); the entries
        # (token, logprob, top) of prompt tokens 1.. as the model scored them (token 0 has none)
        self.prompt_logprobs, self.prompt_entries = prompt_logprobs, []

    def reuse(self, prefix):
        """Start from the cached prefix (PrefixCache.lookup's nodes)."""
        self.started = True
        if prefix:
            b = prefix[0].k.shape[2]
            for j, node in enumerate(prefix):
                self.cache.k[:, 0, :, j * b:(j + 1) * b] = node.k
                self.cache.v[:, 0, :, j * b:(j + 1) * b] = node.v
            self.reused = self.cache.length = len(prefix) * b

    @property
    def remaining(self):
        return len(self.prompt) - self.cache.length

    def run(self, model, budget):
        """Prefill up to `budget` more tokens; returns how many were run."""
        p0 = self.cache.length
        n = min(budget, self.remaining)
        out = model.forward_cached(np.array([self.prompt[p0:p0 + n]], dtype=np.int64), self.cache)
        if self.prompt_logprobs is not None:  # position j scores prompt token j + 1
            lp = log_softmax(asnumpy(out[0]).astype(np.float64))
            k = self.prompt_logprobs
            for j in range(min(n, len(self.prompt) - 1 - p0)):
                t = self.prompt[p0 + j + 1]
                top = top_tokens(lp[j][None], k)[0] if k else []
                self.prompt_entries.append((t, float(lp[j, t]), [(int(x), float(lp[j, x])) for x in top]))
        if self.remaining == 0:
            self.logits = asnumpy(out[0, -1])
        return n


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

    def __init__(self, model, tok, max_batch=16, max_queue=64, prefill_chunk=256, prefix_cache_mb=512,
                 prefix_request_mb=128, prefix_block=16, metrics=None):
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1 token")
        self.model, self.tok = model, tok
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.block = model.config.block_size
        self.cache = model.new_cache(max_batch)
        self.prefix = (PrefixCache(prefix_block, int(prefix_cache_mb * (1 << 20)), int(prefix_request_mb * (1 << 20)))
                       if prefix_cache_mb > 0 else None)
        self.active = []                      # Sequences; active[i] lives in cache row i
        self.prefilling = deque()             # Prefill jobs of admitted prompts, oldest first (slots reserved)
        self.waiting = deque()                # Requests not yet admitted
        self.cond = threading.Condition()
        self.accepting, self.running = True, True
        self.steps = self.peak = self.cancelled = 0        # counters shown by /v1/models
        # plain numbers, updated by the engine thread, read by anyone (/metrics, /v1/models, benchmarks)
        self.stats = {"decode_steps": 0, "prefill_chunks": 0, "prefill_tokens": 0,
                      "prefix_cache_hits": 0, "prefix_cache_misses": 0, "prefix_cache_hit_tokens": 0,
                      "prefix_cache_bytes": 0, "prefix_cache_blocks": 0, "prefix_cache_evictions": 0}
        self.metrics = metrics                # npgpt.serve.metrics.Metrics: per-token latency, batch sizes
        self.thread = None
        # work per loop, when a list: {request id: {"prefill": prompt tokens run, "sampled": tokens drawn,
        # "compared": stop-string comparisons, "rows": rows in the step's forward}} (fairness tests)
        self.trace = None
        self._work = None

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
        while (self.active or self.prefilling) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.cond:
            self.running = False
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=5)
        for s in list(self.active) + [s for job in self.prefilling for s in job.seqs]:
            s.req.events.put(("error", ApiError(503, "the server shut down before this request finished",
                                                code="server_shutting_down", type_="server_error")))

    # ---- the loop -------------------------------------------------------------------------------
    def _loop(self):
        while True:
            with self.cond:
                while self.running and not self.active and not self.prefilling and not self.waiting:
                    self.cond.wait(timeout=1.0)
                if not self.running:
                    return
            self.step()

    def step(self):
        """One loop of the engine: admit, one prefill chunk, sample, drop, one decode step (the
        decoding thread calls this; tests may call it directly on an engine never started)."""
        with self.cond:
            admit = []
            free = self.max_batch - len(self.active) - sum(len(job.seqs) for job in self.prefilling)
            while self.waiting and len(self.waiting[0].seqs) <= free:
                req = self.waiting.popleft()
                if not req.cancelled:
                    admit.append(req)
                    free -= len(req.seqs)
        self._work = {} if self.trace is not None else None
        try:
            for req in admit:
                self._admit(req)
            self._prefill()
            self._sample()
            self._drop()
            if self.active:
                self._forward()
            if self._work:
                self.trace.append(self._work)
        except Exception as e:           # a bug must not kill the server: fail the running requests
            err = ApiError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error")
            failed = {id(r): r for r in admit}
            failed.update((id(s.req), s.req) for s in self.active)
            failed.update((id(s.req), s.req) for job in self.prefilling for s in job.seqs)
            for req in failed.values():
                for s in req.seqs:
                    if s.finish is None:
                        s.req.events.put(("error", err))
                req.cancelled = True
            self.active = []
            self.prefilling.clear()
            self.cache.length = 0
            print(f"npgpt serve: {err.message}", file=sys.stderr)

    def _note(self, req, key, amount):
        if self._work is not None:
            w = self._work.setdefault(req.id, {"prefill": 0, "sampled": 0, "compared": 0, "rows": 0})
            w[key] += amount

    def _admit(self, req):
        """Queue one Prefill per distinct prompt of the request (its choices share it)."""
        by_prompt = {}
        for s in req.seqs:
            by_prompt.setdefault(tuple(s.prompt), []).append(s)
        for prompt, seqs in by_prompt.items():
            echo = req.params.logprobs if getattr(req.params, "echo", False) else None
            self.prefilling.append(Prefill(self.model, prompt, seqs, self.cache.k, ns=req.adapter,
                                           prompt_logprobs=echo))

    def _prefill(self):
        """Run at most prefill_chunk prompt tokens, oldest prompt first (each starting from the
        longest prefix cached by then); place the finished ones."""
        budget, st = self.prefill_chunk, self.stats
        while self.prefilling and budget > 0:
            job = self.prefilling[0]
            if job.seqs[0].req.cancelled:      # a prompt's choices share one request
                self.prefilling.popleft()
                for s in job.seqs:
                    s.finish = "cancelled"
                    self.cancelled += 1
                continue
            if not job.started:               # (a prompt to score runs whole: cached positions have no logits)
                job.reuse(self.prefix.lookup(job.prompt, job.ns) if self.prefix is not None
                          and job.prompt_logprobs is None else None)
                if self.prefix is not None:
                    st["prefix_cache_hits" if job.reused else "prefix_cache_misses"] += 1
                    st["prefix_cache_hit_tokens"] += job.reused
            with adapter_rows(None if job.ns is None else [job.ns]):     # a request's choices share its adapter
                n = job.run(self.model, budget)
            budget -= n
            self._note(job.seqs[0].req, "prefill", n)
            st["prefill_chunks"] += 1
            st["prefill_tokens"] += n
            if job.logits is not None:
                self.prefilling.popleft()
                if self.prefix is not None:
                    self.prefix.insert(job.prompt, job.cache.k[:, 0], job.cache.v[:, 0], job.ns)
                    st.update(prefix_cache_bytes=self.prefix.bytes, prefix_cache_blocks=len(self.prefix),
                              prefix_cache_evictions=self.prefix.evictions)
                self._place(job)

    def _place(self, job):
        """Copy a prefilled prompt's keys/values into a free slot for each of its live choices."""
        c, one, L = self.cache, job.cache, len(job.prompt)
        seqs = job.seqs
        n = len(self.active)
        P = c.length if n else 0
        if L > P:                             # the new prompt is longer: shift live rows right
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
            s.logits = job.logits
            if job.prompt_logprobs is not None:   # the prompt's entries go out before the first token's
                s.pending = [(job.prompt[0], None, None)] + list(job.prompt_entries)
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
        before = s.detok.comparisons
        delta = s.detok.add(t)
        reason = "stop" if s.sampler.is_stop_token(t) or s.detok.stopped else None
        if reason is None and len(s.tokens) >= s.max_tokens:
            reason = "length"
        if reason:
            delta += s.detok.flush()          # what a stop string's possible start held back
        self._note(s.req, "sampled", 1)
        self._note(s.req, "compared", s.detok.comparisons - before)
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
            self._note(s.req, "rows", 1)
        self.steps += 1
        self.stats["decode_steps"] = self.steps
        if self.metrics is not None:
            self.metrics.batch(n)
