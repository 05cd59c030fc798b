"""Text generation on the KV cache: greedy, temperature, top-k, top-p, stop conditions, streaming,
penalties and logit bias, beam search, and speculative decoding with a draft model.

One step of decoding:  logits of the last position -> divide by temperature -> keep the top-k
-> keep the smallest set whose probability reaches top-p -> renormalise -> draw one token
(or take the argmax when temperature is 0). The cache makes each step cost one token's forward.

Several prompts decode together: ragged prompts are left-padded, padded keys are masked, and
positions count from each row's first real token, so every row gets the tokens it would get alone.
When a row's context would pass block_size, the cache is rebuilt from the last block_size tokens
(the same window a full forward crops to), so cached and uncached decoding agree exactly.

Every token is drawn by `npgpt.sampling`: one `SamplingParams` (the keywords below become one, or
pass `params=`), one `Sampler` per row (its own generator seeded [seed, row], penalties, logit bias,
temperature, top-k, top-p) and one `Detokenizer` per row (UTF-8-safe text with stop strings held
back). The probabilities reported in Steps (`prob`, `top`) stay the model's own (temperature 1, no
controls), so they read as "what the model thinks"; `sampled` is the token's probability in the
distribution it was drawn from.

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
from npgpt.sampling import Detokenizer, Sampler, SamplingParams, log_softmax, softmax, top_tokens
from npgpt.tensor import no_grad


@dataclass
class Step:
    """One generated token of one row, with the distribution it was drawn from."""
    row: int
    token: int
    prob: float                   # the model's probability of `token` (softmax at temperature 1)
    top: list = field(default_factory=list)   # [(token, prob)] most likely first (model probabilities)
    sampled: float | None = None  # its probability in the distribution it was drawn from (after penalties,
                                  # temperature, top-k, top-p; speculative: the target's, which the output follows)
    text: str = ""                # the text this token releases (with a tokenizer; "" while held back)
    finish: str | None = None     # the row's last token: "stop" (stop token or string) or "length"


def sampling_params(params=None, max_new_tokens=None, eot_id=None, tokenizer=None, **settings) -> SamplingParams:
    """The one SamplingParams of a call: `params` as given, or made from the keyword `settings`
    (temperature, top_k, top_p, seed, stop, *_penalty, logit_bias); max_new_tokens and eot_id (a
    stop token) are added to either."""
    if params is None:
        params = SamplingParams(**{k: v for k, v in settings.items() if v is not None})
    elif not isinstance(params, SamplingParams):
        raise NpgptError(f"params must be a SamplingParams, got {type(params).__name__}")
    if max_new_tokens is not None:
        params = params.replace(max_new_tokens=max_new_tokens)
    if params.max_new_tokens is None:
        raise NpgptError("max_new_tokens must be positive, got None")
    if eot_id is not None and int(eot_id) not in params.stop_token_ids:
        params = params.replace(stop_token_ids=params.stop_token_ids + (int(eot_id),))
    if params.stop and tokenizer is None:
        raise NpgptError("stop strings need the tokenizer to decode text")
    return params


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


def generate_stream(model, ids, max_new_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=None,
                    stop=None, eot_id=None, tokenizer=None, mask=None, use_cache=True, top_n=5,
                    presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=None,
                    params=None):
    """Yield lists of Steps (one per still-running row) as tokens are produced.

    ids: one prompt (list of ints), several (list of lists, ragged allowed), or a 2-D array with
    `mask` (True = real token; left or right padding). The sampling settings are the keywords or
    one `params` (npgpt.sampling.SamplingParams; then the keywords are not read, except
    max_new_tokens and eot_id, which are added to it). Rows stop at a stop token (`eot_id`, the
    params' stop_token_ids) or when their text reaches a `stop` string (needs `tokenizer`); with a
    tokenizer each Step carries the text it releases (`Step.text`), stop strings cut off.
    """
    params = sampling_params(params, max_new_tokens, eot_id, tokenizer, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, stop=stop, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                             logit_bias=logit_bias)
    rows = _as_rows(ids, mask, eot_id)
    V = model.config.vocab_size
    samplers = [Sampler(params, V, r, i) for i, r in enumerate(rows)]
    detoks = [Detokenizer(tokenizer, params.stop, params.stop_token_ids) if tokenizer is not None else None
              for _ in rows]
    n_new = params.max_new_tokens
    was_training = model.training
    model.eval()
    try:
        ctx = _Context(model, rows, use_cache)
        logits = ctx.first_logits()
        done = np.zeros(len(rows), dtype=bool)
        new = np.array([r[-1] for r in rows], dtype=np.int64)     # a finished row repeats its last token
        for n in range(n_new):
            logits = asnumpy(logits).astype(np.float64)
            live = np.flatnonzero(~done)
            model_p = softmax(logits[live])
            top = top_tokens(model_p, top_n)
            steps = []
            for j, i in enumerate(live):
                t, sampled = samplers[i].sample(logits[i])
                new[i] = t
                finish = "stop" if samplers[i].is_stop_token(t) else None
                text = ""
                if detoks[i] is not None:
                    text = detoks[i].add(t)
                    finish = finish or ("stop" if detoks[i].stopped else None)
                finish = finish or ("length" if n == n_new - 1 else None)
                if finish and detoks[i] is not None:
                    text += detoks[i].flush()
                steps.append(Step(int(i), t, float(model_p[j, t]),
                                  [(int(k), float(model_p[j, k])) for k in top[j]], sampled, text, finish))
                done[i] = finish is not None
            yield steps
            if done.all():
                break
            logits = ctx.append(new)
    finally:
        model.train(was_training)


def generate(model, ids, max_new_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=None, stop=None,
             eot_id=None, tokenizer=None, mask=None, use_cache=True, **controls):
    """Generate up to max_new_tokens per prompt. Returns the new tokens: a list for one prompt
    given as a flat list, else a list of lists (one per row). See generate_stream for arguments;
    `controls` are its penalty / logit_bias / params keywords."""
    out = [[] for _ in _as_rows(ids, mask, eot_id)]
    for steps in generate_stream(model, ids, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                 eot_id, tokenizer, mask, use_cache, **controls):
        for s in steps:
            out[s.row].append(s.token)
    return out[0] if _is_single_prompt(ids, mask) else out


def beam_search(model, ids, max_new_tokens, num_beams=4, length_penalty=1.0, eot_id=None):
    """The most likely continuation of one prompt found by beam search; returns its new tokens.

    Each step extends every live beam by every token and keeps the num_beams best by summed
    log-probability. A beam that emits eot_id is finished, scored sum / length ** length_penalty;
    the search ends when num_beams hypotheses have finished or after max_new_tokens, and the
    best-scored hypothesis (finished or live) wins. With num_beams=1 this is greedy decoding.
    """
    max_new_tokens = SamplingParams(max_new_tokens=max_new_tokens).max_new_tokens   # checked as everywhere
    if max_new_tokens is None:
        raise NpgptError("max_new_tokens must be positive, got None")
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


def speculative_stream(model, draft, ids, max_new_tokens=None, temperature=1.0, top_k=None, top_p=None,
                       seed=None, stop=None, eot_id=None, tokenizer=None, num_draft=4, top_n=5, stats=None,
                       presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=None,
                       params=None):
    """Like generate_stream for one prompt, with `draft` proposing num_draft tokens per target
    forward (see the module docstring). Yields lists of Steps (row 0); several tokens may come
    per round. `stats`, when a dict, receives rounds / proposed / accepted counts.
    """
    params = sampling_params(params, max_new_tokens, eot_id, tokenizer, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, stop=stop, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                             logit_bias=logit_bias)
    if params.constraint is not None:     # its state follows accepted tokens; drafts are tentative
        raise NpgptError("speculative decoding does not take a constraint (structured output); drop the draft")
    V = model.config.vocab_size
    if draft.config.vocab_size != V:
        raise NpgptError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({V}); a draft must share the target's tokenizer")
    if int(num_draft) < 1:
        raise NpgptError(f"num_draft must be a positive integer, got {num_draft}")
    rows = _as_rows(ids, None, eot_id)
    if len(rows) != 1:
        raise NpgptError("speculative decoding takes one prompt")
    tokens = list(rows[0])
    sampler = Sampler(params, V, tokens)
    detok = Detokenizer(tokenizer, params.stop, params.stop_token_ids) if tokenizer is not None else None
    n_new = params.max_new_tokens
    stats = {} if stats is None else stats
    stats.update(rounds=0, proposed=0, accepted=0)
    block = min(model.config.block_size, draft.config.block_size)

    def tentative():                   # a copy of the penalties' history to extend with drafts
        return sampler.history.copy() if sampler.history is not None else None

    def extend(history, x):
        if history is not None:
            history.add(x)

    modes = (model.training, draft.training)
    model.eval(), draft.eval()
    tcache, dcache = model.new_cache(1), draft.new_cache(1)
    produced, done = 0, False
    try:
        while not done and produced < n_new:
            n = len(tokens)
            k = min(int(num_draft), block - n, n_new - produced - 1)
            if k < 1 and n <= block:        # one token left: a plain cached step of the target
                raw = [asnumpy(model.forward_cached(np.array([tokens[tcache.length:]]), tcache)[0, -1])]
                ps = [sampler.probs(raw[0])]
                new = [sampler.pick(ps[0])]
            elif k < 1:                     # past the context: a plain step on the last block_size tokens
                raw = [_window_logits(model, tokens)]
                ps = [sampler.probs(raw[0])]
                new, tcache.length, dcache.length = [sampler.pick(ps[0])], 0, 0
            else:
                # draft: k tokens, remembering q_i and the history each was drawn with
                hist, drafted, qs = tentative(), [], []
                feed = tokens[dcache.length:]
                for _ in range(k):
                    dl = asnumpy(draft.forward_cached(np.array([feed]), dcache)[0, -1])
                    q = sampler.probs(dl, hist)
                    x = sampler.pick(q)
                    drafted.append(x), qs.append(q)
                    extend(hist, x)
                    feed = [x]
                # target: every drafted position in one forward
                tl = asnumpy(model.forward_cached(np.array([tokens[tcache.length:] + drafted]), tcache)[0])
                raw = list(tl[-(k + 1):])
                hist, new, ps = tentative(), [], []
                for i, x in enumerate(drafted):
                    p = sampler.probs(raw[i], hist)
                    ps.append(p)
                    if sampler.rng.random() < min(1.0, p[x] / qs[i][x]):
                        new.append(x)
                        extend(hist, x)
                        continue
                    resid = np.maximum(p - qs[i], 0.0)
                    new.append(sampler.pick(resid / resid.sum()) if resid.sum() > 0 else sampler.pick(p))
                    break
                else:
                    ps.append(sampler.probs(raw[k], hist))
                    new.append(sampler.pick(ps[-1]))
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
                sampler.accept(t)
                finish, text = "stop" if sampler.is_stop_token(t) else None, ""
                if detok is not None:
                    text = detok.add(t)
                    finish = finish or ("stop" if detok.stopped else None)
                finish = finish or ("length" if produced >= n_new else None)
                if finish and detok is not None:
                    text += detok.flush()
                steps.append(Step(0, t, float(mp[0, t]), [(int(j), float(mp[0, j])) for j in top],
                                  float(ps[i][t]), text, finish))
                if finish:
                    done = True
                    break
            yield steps
    finally:
        model.train(modes[0])
        draft.train(modes[1])
