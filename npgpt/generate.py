"""Text generation on the KV cache: greedy, temperature, top-k, top-p, stop conditions, streaming,
penalties and logit bias, beam search, and speculative decoding with a draft model.

One step of decoding:  logits of the last position -> divide by temperature -> keep the top-k
-> keep the smallest set whose probability reaches top-p -> renormalise -> draw one token
(or take the argmax when temperature is 0). The cache makes each step cost one token's forward.

Several prompts decode together: ragged prompts are left-padded, padded keys are masked, and
positions count from each row's first real token, so every row gets the tokens it would get alone.
When a row's context would pass block_size, the cache is rebuilt from the last block_size tokens
(the same window a full forward crops to), so cached and uncached decoding agree exactly.

Controls that reshape the logits before sampling (`Penalties`): logit bias is added first, then
OpenAI's presence / frequency penalties over the tokens generated so far
(logit[j] -= frequency * count[j] + presence * (count[j] > 0)), then the CTRL / Hugging Face
repetition penalty over prompt and generated tokens (a positive logit is divided by r, a negative
one multiplied). The probabilities reported in Steps stay the model's own (temperature 1, no
controls), so they read as "what the model thinks".

Beam search keeps the num_beams most likely continuations (sum of log-probabilities); a finished
hypothesis is scored sum / length ** length_penalty (length_penalty > 1 favours longer outputs).

Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"): a small draft model proposes k tokens x_1..x_k from its distributions q_i; the target
scores all of them in one cached forward, giving p_1..p_{k+1}. x_i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token is drawn from norm(max(0, p_i - q_i))
and the round ends; if all k pass, one more is drawn from p_{k+1}. Every emitted token is then
distributed exactly as under p (the paper's theorem 1), and at temperature 0 (p and q one-hot)
the output equals plain greedy decoding token for token. Both caches roll back to the accepted
prefix by resetting their length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from npgpt.backend import asnumpy
from npgpt.errors import NpgptError
from npgpt.ops.reduce import log_softmax_array, softmax_array
from npgpt.safeio import finite
from npgpt.tensor import no_grad


@dataclass
class Step:
    """One generated token of one row, with the distribution it was drawn from."""
    row: int
    token: int
    prob: float                   # the model's probability of `token` (softmax at temperature 1)
    top: list = field(default_factory=list)   # [(token, prob)] most likely first (model probabilities)
    sampled: float | None = None  # its probability in the distribution it was drawn from (after penalties,
                                  # temperature, top-k, top-p); None where not tracked (speculative)


def check_sampling_args(max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, stop=None):
    """One-line NpgptErrors for sampling options; NaN and infinity are refused (a NaN temperature
    would otherwise sample token 0 forever)."""
    if max_new_tokens is None or int(max_new_tokens) <= 0:
        raise NpgptError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature is not None:
        finite(temperature, "temperature")
    if top_p is not None:
        finite(top_p, "top_p")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise NpgptError(f"seed must be an integer >= 0, got {seed}")
    if any(not s for s in ([stop] if isinstance(stop, str) else stop or [])):
        raise NpgptError("a stop string must not be empty (it would stop every sample at once)")
    if temperature is None or temperature < 0:
        raise NpgptError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and int(top_k) <= 0:
        raise NpgptError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise NpgptError(f"top_p must be in (0, 1], got {top_p}")


@dataclass
class Penalties:
    """Logit controls applied before temperature / top-k / top-p (see the module docstring).

    logit_bias: {token id: bias}, added to the logits (-100 bans a token, +100 forces it).
    """
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    logit_bias: dict | None = None

    def check(self, vocab_size):
        for name in ("presence", "frequency"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise NpgptError(f"{name}_penalty must be in [-2, 2], got {v}")
        if not self.repetition > 0:
            raise NpgptError(f"repetition_penalty must be positive, got {self.repetition}")
        finite(self.repetition, "repetition_penalty")
        for t, b in (self.logit_bias or {}).items():
            try:
                int(t), float(b)
            except (TypeError, ValueError, OverflowError):
                raise NpgptError(f"logit_bias must map token ids to numbers, got {t!r}: {b!r}") from None
            if not 0 <= int(t) < vocab_size:
                raise NpgptError(f"logit_bias: token id {t} is out of range for vocab_size {vocab_size}")
            if not -100 <= float(b) <= 100:
                raise NpgptError(f"logit_bias: bias for token {t} must be in [-100, 100], got {b}")
        return self

    @property
    def active(self):
        return bool(self.presence or self.frequency or self.repetition != 1.0 or self.logit_bias)

    def apply(self, logits, counts, seen):
        """logits (B, V), counts (B, V) of generated tokens, seen (B, V) bool of prompt + generated
        tokens -> adjusted logits (B, V) float64, a new array."""
        z = np.array(logits, dtype=np.float64)
        for t, b in (self.logit_bias or {}).items():
            z[:, int(t)] += float(b)
        if self.presence or self.frequency:
            z -= self.frequency * counts + self.presence * (counts > 0)
        if self.repetition != 1.0:
            z = np.where(seen, np.where(z > 0, z / self.repetition, z * self.repetition), z)
        return z


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


def _check_stops(stop, tokenizer):
    if stop and tokenizer is None:
        raise NpgptError("stop strings need the tokenizer to decode text")
    return [stop] if isinstance(stop, str) else list(stop or [])


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
                    stop=None, eot_id=None, tokenizer=None, mask=None, use_cache=True, top_n=5,
                    presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=None):
    """Yield lists of Steps (one per still-running row) as tokens are produced.

    ids: one prompt (list of ints), several (list of lists, ragged allowed), or a 2-D array with
    `mask` (True = real token; left or right padding). Rows stop at `eot_id` (when given) or when
    their decoded text contains one of the `stop` strings (needs `tokenizer`). Penalties and
    logit_bias: see `Penalties`.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, seed, stop)
    stops = _check_stops(stop, tokenizer)
    pen = Penalties(presence_penalty, frequency_penalty, repetition_penalty, logit_bias).check(model.config.vocab_size)
    rows = _as_rows(ids, mask, eot_id)
    rng = np.random.default_rng(seed)
    V = model.config.vocab_size
    counts = np.zeros((len(rows), V)) if pen.active else None
    seen = np.zeros((len(rows), V), dtype=bool) if pen.active else None
    for i, r in enumerate(rows if pen.active else []):
        seen[i, r] = True
    was_training = model.training
    model.eval()
    try:
        ctx = _Context(model, rows, use_cache)
        logits = ctx.first_logits()
        done = np.zeros(len(rows), dtype=bool)
        generated = [[] for _ in rows]
        for _ in range(int(max_new_tokens)):
            logits = asnumpy(logits).astype(np.float64)
            if not np.isfinite(logits).all():
                raise NpgptError("the model's logits hold NaN or infinity; its weights are damaged (or it diverged "
                                 "in training): sampling stopped")
            p = sampling_probs(pen.apply(logits, counts, seen) if pen.active else logits, temperature, top_k, top_p)
            new = draw(p, rng) if temperature > 0 else p.argmax(axis=-1)
            if pen.active:
                counts[np.arange(len(rows)), new] += 1
                seen[np.arange(len(rows)), new] = True
            model_p = softmax(logits)
            top = top_tokens(model_p, top_n)
            steps = []
            for i in np.flatnonzero(~done):
                t = int(new[i])
                generated[i].append(t)
                steps.append(Step(int(i), t, float(model_p[i, t]),
                                  [(int(j), float(model_p[i, j])) for j in top[i]], float(p[i, t])))
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
             eot_id=None, tokenizer=None, mask=None, use_cache=True, **controls):
    """Generate up to max_new_tokens per prompt. Returns the new tokens: a list for one prompt
    given as a flat list, else a list of lists (one per row). See generate_stream for arguments;
    `controls` are its penalty / logit_bias keywords."""
    out = [[] for _ in _as_rows(ids, mask, eot_id)]
    for steps in generate_stream(model, ids, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                 eot_id, tokenizer, mask, use_cache, **controls):
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


def log_softmax(x):
    return log_softmax_array(x, axis=-1)


def beam_search(model, ids, max_new_tokens, num_beams=4, length_penalty=1.0, eot_id=None):
    """The most likely continuation of one prompt found by beam search; returns its new tokens.

    Each step extends every live beam by every token and keeps the num_beams best by summed
    log-probability. A beam that emits eot_id is finished, scored sum / length ** length_penalty;
    the search ends when num_beams hypotheses have finished or after max_new_tokens, and the
    best-scored hypothesis (finished or live) wins. With num_beams=1 this is greedy decoding.
    """
    check_sampling_args(max_new_tokens)
    if int(num_beams) < 1:
        raise NpgptError(f"num_beams must be a positive integer, got {num_beams}")
    rows = _as_rows(ids, None, eot_id)
    if len(rows) != 1:
        raise NpgptError("beam search takes one prompt")
    nb = int(num_beams)
    was_training = model.training
    model.eval()
    try:
        ctx = _Context(model, rows, use_cache=True)
        logits = ctx.first_logits()
        seqs, scores = [[]], np.zeros(1)
        finished = []                                   # (normalised score, tokens)
        for step in range(int(max_new_tokens)):
            logp = log_softmax(asnumpy(logits).astype(np.float64))        # (beams, V)
            cand = (scores[:, None] + logp).ravel()
            V = logp.shape[1]
            n_cand = min(2 * nb, cand.size)
            best = top_tokens(cand[None], n_cand)[0]
            keep_beam, keep_tok, keep_score = [], [], []
            for rank, c in enumerate(best):
                b, t = divmod(int(c), V)
                if eot_id is not None and t == eot_id:
                    if rank < nb:                       # only a top-nb candidate may finish
                        toks = seqs[b] + [t]
                        finished.append((cand[c] / len(toks) ** length_penalty, toks))
                    continue
                keep_beam.append(b), keep_tok.append(t), keep_score.append(cand[c])
                if len(keep_beam) == nb:
                    break
            if len(finished) >= nb or not keep_beam or step == int(max_new_tokens) - 1:
                if step == int(max_new_tokens) - 1 or not finished:
                    finished += [(s / (len(seqs[b]) + 1) ** length_penalty, seqs[b] + [t])
                                 for b, t, s in zip(keep_beam, keep_tok, keep_score)]
                break
            idx = np.array(keep_beam)
            seqs = [seqs[b] + [t] for b, t in zip(keep_beam, keep_tok)]
            scores = np.array(keep_score)
            ctx.tokens = ctx.tokens[idx]
            ctx.pad = ctx.pad[idx]
            cache = ctx.cache
            cache.k, cache.v, cache.pad = cache.k[:, idx], cache.v[:, idx], cache.pad[idx]
            cache.batch_size = len(idx)
            logits = ctx.append(np.array(keep_tok))
        return max(finished, key=lambda f: f[0])[1]
    finally:
        model.train(was_training)


def _window_logits(model, tokens):
    """Logits (V,) after `tokens`, from the last block_size of them (what a full forward sees)."""
    window = np.asarray(tokens[-model.config.block_size:], dtype=np.int64)[None]
    return asnumpy(model.forward_cached(window, model.new_cache(1))[0, -1])


def speculative_stream(model, draft, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                       stop=None, eot_id=None, tokenizer=None, num_draft=4, top_n=5, stats=None,
                       presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=None):
    """Like generate_stream for one prompt, with `draft` proposing num_draft tokens per target
    forward (see the module docstring). Yields lists of Steps (row 0); several tokens may come
    per round. `stats`, when a dict, receives rounds / proposed / accepted counts.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, seed, stop)
    stops = _check_stops(stop, tokenizer)
    V = model.config.vocab_size
    if draft.config.vocab_size != V:
        raise NpgptError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({V}); a draft must share the target's tokenizer")
    if int(num_draft) < 1:
        raise NpgptError(f"num_draft must be a positive integer, got {num_draft}")
    pen = Penalties(presence_penalty, frequency_penalty, repetition_penalty, logit_bias).check(V)
    rows = _as_rows(ids, None, eot_id)
    if len(rows) != 1:
        raise NpgptError("speculative decoding takes one prompt")
    tokens = list(rows[0])
    rng = np.random.default_rng(seed)
    stats = {} if stats is None else stats
    stats.update(rounds=0, proposed=0, accepted=0)
    counts, seen = np.zeros((1, V)), np.zeros((1, V), dtype=bool)
    seen[0, tokens] = True
    block = min(model.config.block_size, draft.config.block_size)

    def probs(logits, cnt, sn):        # the distribution to sample from, after the controls
        z = logits[None].astype(np.float64)
        return sampling_probs(pen.apply(z, cnt, sn) if pen.active else z, temperature, top_k, top_p)[0]

    def pick(p):
        return int(draw(p[None], rng)[0]) if temperature > 0 else int(p.argmax())

    modes = (model.training, draft.training)
    model.eval(), draft.eval()
    tcache, dcache = model.new_cache(1), draft.new_cache(1)
    produced, done = 0, False
    try:
        while not done and produced < int(max_new_tokens):
            n = len(tokens)
            k = min(int(num_draft), block - n, int(max_new_tokens) - produced - 1)
            if k < 1 and n <= block:        # one token left: a plain cached step of the target
                raw = [asnumpy(model.forward_cached(np.array([tokens[tcache.length:]]), tcache)[0, -1])]
                new = [pick(probs(raw[0], counts, seen))]
            elif k < 1:                     # past the context: a plain step on the last block_size tokens
                raw = [_window_logits(model, tokens)]
                new, tcache.length, dcache.length = [pick(probs(raw[0], counts, seen))], 0, 0
            else:
                # draft: k tokens, remembering q_i and the history each was drawn with
                cnt, sn, drafted, qs = counts.copy(), seen.copy(), [], []
                feed = tokens[dcache.length:]
                for _ in range(k):
                    dl = asnumpy(draft.forward_cached(np.array([feed]), dcache)[0, -1])
                    q = probs(dl, cnt, sn)
                    x = pick(q)
                    drafted.append(x), qs.append(q)
                    cnt[0, x] += 1
                    sn[0, x] = True
                    feed = [x]
                # target: every drafted position in one forward
                tl = asnumpy(model.forward_cached(np.array([tokens[tcache.length:] + drafted]), tcache)[0])
                raw = list(tl[-(k + 1):])
                cnt, sn, new = counts.copy(), seen.copy(), []
                for i, x in enumerate(drafted):
                    p = probs(raw[i], cnt, sn)
                    if rng.random() < min(1.0, p[x] / qs[i][x]):
                        new.append(x)
                        cnt[0, x] += 1
                        sn[0, x] = True
                        continue
                    resid = np.maximum(p - qs[i], 0.0)
                    new.append(pick(resid / resid.sum()) if resid.sum() > 0 else pick(p))
                    break
                else:
                    new.append(pick(probs(raw[k], cnt, sn)))
                a = len(new) - 1                 # drafted tokens accepted (all k when none was rejected)
                stats["rounds"] += 1
                stats["proposed"] += k
                stats["accepted"] += a
                tcache.length = n + a            # K/V valid for tokens + accepted drafts
                dcache.length = min(n + a, dcache.length)
            steps = []
            for i, t in enumerate(new):
                mp = softmax(raw[i].astype(np.float64)[None])
                top = top_tokens(mp, top_n)[0]
                tokens.append(t)
                produced += 1
                counts[0, t] += 1
                seen[0, t] = True
                steps.append(Step(0, t, float(mp[0, t]), [(int(j), float(mp[0, j])) for j in top]))
                gen = tokens[len(rows[0]):]
                if (eot_id is not None and t == eot_id) or produced >= int(max_new_tokens) or (
                        stops and any(s in tokenizer.decode(gen) for s in stops)):
                    done = True
                    break
            yield steps
    finally:
        model.train(modes[0])
        draft.train(modes[1])
