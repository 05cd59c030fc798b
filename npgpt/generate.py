"""Text generation on the KV cache: greedy, temperature, top-k, top-p, stop conditions, streaming.

One step of decoding:  logits of the last position -> divide by temperature -> keep the top-k
-> keep the smallest set whose probability reaches top-p -> renormalise -> draw one token
(or take the argmax when temperature is 0). The cache makes each step cost one token's forward.

Several prompts decode together: ragged prompts are left-padded, padded keys are masked, and
positions count from each row's first real token, so every row gets the tokens it would get alone.
When a row's context would pass block_size, the cache is rebuilt from the last block_size tokens
(the same window a full forward crops to), so cached and uncached decoding agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from npgpt.backend import asnumpy
from npgpt.errors import NpgptError
from npgpt.ops.reduce import softmax_array
from npgpt.tensor import no_grad


@dataclass
class Step:
    """One generated token of one row, with the distribution it was drawn from."""
    row: int
    token: int
    prob: float                   # the model's probability of `token` (softmax at temperature 1)
    top: list = field(default_factory=list)   # [(token, prob)] most likely first (model probabilities)


def check_sampling_args(max_new_tokens, temperature=1.0, top_k=None, top_p=None):
    if max_new_tokens is None or int(max_new_tokens) <= 0:
        raise NpgptError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature is None or temperature < 0:
        raise NpgptError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and int(top_k) <= 0:
        raise NpgptError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise NpgptError(f"top_p must be in (0, 1], got {top_p}")


def softmax(x):
    return softmax_array(x, axis=-1)


def sampling_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> the distribution to sample from (B, V), float64; zeros outside the kept set.

    temperature 0 puts all mass on the argmax (greedy). top-k then top-p, in that order.
    """
    logits = np.asarray(logits, dtype=np.float64)
    B, V = logits.shape
    if temperature == 0:
        p = np.zeros_like(logits)
        p[np.arange(B), logits.argmax(axis=-1)] = 1.0
        return p
    z = logits / temperature
    if top_k is not None and top_k < V:
        kth = np.partition(z, V - top_k, axis=-1)[:, V - top_k][:, None]   # k-th largest per row
        z = np.where(z < kth, -np.inf, z)
    p = softmax(z)
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p        # mass of strictly more likely tokens
        keep_sorted = before < top_p                            # always keeps the most likely token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def top_tokens(p, n):
    """Indices of the n largest entries of each row of p (B, V), largest first. argpartition keeps
    this O(V) per step: a full sort of GPT-2's 50,257 probabilities would run every token."""
    n = min(n, p.shape[-1])
    part = np.argpartition(-p, n - 1, axis=-1)[:, :n]
    order = np.argsort(-np.take_along_axis(p, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


def draw(p, rng):
    """One token per row from distributions p (B, V), by inverse CDF with one uniform per row."""
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(p.shape[0]) * cdf[:, -1]
    tok = (cdf <= u[:, None]).sum(axis=-1)
    # guard against u landing on the last cdf value through rounding: stay inside the support
    return np.minimum(tok, p.shape[1] - 1)


def _is_single_prompt(ids, mask=None):
    """True for one prompt given as a flat sequence of ids (generate then returns a flat list)."""
    if mask is not None:
        return False
    if hasattr(ids, "ndim"):
        return ids.ndim == 1
    return len(ids) == 0 or not isinstance(ids[0], (list, tuple, np.ndarray))


def _as_rows(ids, mask=None, eot_id=None):
    """Prompts in any accepted form -> list of token lists (padding removed)."""
    if mask is not None:
        arr, m = np.asarray(ids), np.asarray(mask, dtype=bool)
        if arr.shape != m.shape or arr.ndim != 2:
            raise NpgptError(f"ids {arr.shape} and mask {m.shape} must be equal 2-D shapes")
        rows = [list(map(int, arr[i][m[i]])) for i in range(arr.shape[0])]
    elif hasattr(ids, "ndim"):                                 # a NumPy or CuPy array
        arr = asnumpy(ids)
        rows = [list(map(int, r)) for r in (arr[None] if arr.ndim == 1 else arr)]
    elif _is_single_prompt(ids):
        rows = [list(map(int, ids))]
    else:
        rows = [list(map(int, r)) for r in ids]
    for i, r in enumerate(rows):
        if not r:
            if eot_id is None:
                raise NpgptError("an empty prompt needs an end-of-text token to start from (pass eot_id)")
            r.append(int(eot_id))   # an empty prompt starts from end-of-text
    return rows


class _Context:
    """The left-padded token matrix of all rows, and the model's view of it (cached or not)."""

    def __init__(self, model, rows, use_cache):
        self.model, self.use_cache = model, use_cache
        self.block = model.config.block_size
        longest = max(len(r) for r in rows)
        self.tokens = np.zeros((len(rows), longest), dtype=np.int64)
        self.pad = np.array([longest - len(r) for r in rows])
        for i, r in enumerate(rows):
            self.tokens[i, self.pad[i]:] = r
        self.cache = model.new_cache(len(rows)) if use_cache else None

    def _window(self):
        """The last block_size columns, and each row's padding within them."""
        T = self.tokens.shape[1]
        start = max(0, T - self.block)
        return self.tokens[:, start:], np.maximum(self.pad - start, 0)

    def first_logits(self):
        return self._full() if not self.use_cache else self._refill()

    def _refill(self):
        window, pad = self._window()
        self.cache.reset(pad=pad)
        return self.model.forward_cached(window, self.cache)[:, -1]

    def _full(self):
        window, pad = self._window()
        if pad.any():   # padded rows: run the cached path once from scratch (it masks padding)
            cache = self.model.new_cache(len(window))
            cache.reset(pad=pad)
            return self.model.forward_cached(window, cache)[:, -1]
        with no_grad():
            return self.model(window)[0].data[:, -1]

    def append(self, new):
        """Add one token per row; return the logits that predict the next one."""
        self.tokens = np.concatenate([self.tokens, new[:, None]], axis=1)
        if not self.use_cache:
            return self._full()
        if self.cache.length + 1 > self.block:
            return self._refill()          # context passes block_size: rebuild from the last window
        return self.model.forward_cached(new[:, None], self.cache)[:, -1]


def generate_stream(model, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                    stop=None, eot_id=None, tokenizer=None, mask=None, use_cache=True, top_n=5):
    """Yield lists of Steps (one per still-running row) as tokens are produced.

    ids: one prompt (list of ints), several (list of lists, ragged allowed), or a 2-D array with
    `mask` (True = real token; left or right padding). Rows stop at `eot_id` (when given) or when
    their decoded text contains one of the `stop` strings (needs `tokenizer`).
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if stop and tokenizer is None:
        raise NpgptError("stop strings need the tokenizer to decode text")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    rows = _as_rows(ids, mask, eot_id)
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    try:
        ctx = _Context(model, rows, use_cache)
        logits = ctx.first_logits()
        done = np.zeros(len(rows), dtype=bool)
        generated = [[] for _ in rows]
        for _ in range(int(max_new_tokens)):
            logits = asnumpy(logits).astype(np.float64)
            p = sampling_probs(logits, temperature, top_k, top_p)
            new = draw(p, rng) if temperature > 0 else p.argmax(axis=-1)
            model_p = softmax(logits)
            top = top_tokens(model_p, top_n)
            steps = []
            for i in np.flatnonzero(~done):
                t = int(new[i])
                generated[i].append(t)
                steps.append(Step(int(i), t, float(model_p[i, t]),
                                  [(int(j), float(model_p[i, j])) for j in top[i]]))
                if (eot_id is not None and t == eot_id) or (
                        stops and any(s in tokenizer.decode(generated[i]) for s in stops)):
                    done[i] = True
            yield steps
            if done.all():
                break
            logits = ctx.append(new)
    finally:
        model.train(was_training)


def generate(model, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, stop=None,
             eot_id=None, tokenizer=None, mask=None, use_cache=True):
    """Generate up to max_new_tokens per prompt. Returns the new tokens: a list for one prompt
    given as a flat list, else a list of lists (one per row). See generate_stream for arguments."""
    out = [[] for _ in _as_rows(ids, mask, eot_id)]
    for steps in generate_stream(model, ids, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                 eot_id, tokenizer, mask, use_cache):
        for s in steps:
            out[s.row].append(s.token)
    return out[0] if _is_single_prompt(ids, mask) else out


def cut_at_stop(text, stop):
    """Text up to (not including) the first stop string."""
    for s in ([stop] if isinstance(stop, str) else stop or []):
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text
