"""Where a token is sampled: one set of settings, one sampler, one detokenizer.

    SamplingParams   every setting of a sampled continuation, validated once when it is made; the
                     library's keywords, `npgpt sample`'s flags and the HTTP body all become one
    Sampler          one sequence's sampling: its own random generator, the penalties' history,
                     logit bias -> penalties -> temperature -> top-k -> top-p -> draw; returns the
                     token and the probability it was drawn with
    Detokenizer      one sequence's text as its tokens arrive: UTF-8 safe (a character split over
                     two byte-level tokens comes out whole), with stop strings held back until they
                     either complete (the text ends before them) or cannot any more

`npgpt.generate` (plain and speculative decoding), `npgpt serve`'s engine and `npgpt sample` /
`npgpt chat` all sample through these; nothing else draws a token.

One step:  logits (V,) -> + logit_bias -> presence / frequency penalties over the tokens generated
so far (OpenAI's: logit[j] -= frequency * count[j] + presence * (count[j] > 0)) -> the CTRL / Hugging
Face repetition penalty over prompt and generated tokens (a positive logit is divided by r, a
negative one multiplied) -> / temperature -> keep the top-k -> keep the smallest set whose
probability reaches top-p -> renormalise -> draw one token by inverse CDF (or the argmax at
temperature 0).

A seeded sequence draws from `default_rng([seed, index])` (index: its place among the sequences of
one call or request), so a sequence's tokens do not depend on what it is batched with, and the
library, the CLI and the server give the same text for the same seed.

Stop strings cost time linear in the text, whatever their length: each stop string keeps a Knuth-
Morris-Pratt automaton state (the longest prefix of it that ends the text so far), advanced by the
new characters only (at most 2 comparisons per character and stop string, amortised;
`Detokenizer.comparisons` counts them), and the text held back is the longest of those prefixes.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field, replace

import numpy as np

from npgpt.errors import NpgptError
from npgpt.ops.reduce import log_softmax_array, softmax_array


class SamplingError(NpgptError):
    """A sampling setting out of range; `param` names it (the HTTP server reports it)."""

    def __init__(self, message, param):
        super().__init__(message)
        self.param = param


def _number(value, name, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SamplingError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if integer and not float(value).is_integer():
        raise SamplingError(f"{name} must be an integer, got {value!r}", name)
    if not math.isfinite(value):
        # a NaN temperature would otherwise sample token 0 forever
        raise SamplingError(f"{name} must be a finite number, got {value}", name)
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one continuation. Checked when made (SamplingError, a one-line NpgptError).

    max_new_tokens: tokens to generate (None: the caller's default).
    temperature: 0 is greedy (argmax); top_k: keep the k most likely (None: all); top_p: nucleus
    (1: all). seed: integer >= 0 for reproducible draws (None: fresh entropy).
    stop: strings that end the text (not included in it); stop_token_ids: tokens that end the
    sequence (end-of-text, a chat template's role tokens), not shown in the text.
    presence_penalty, frequency_penalty in [-2, 2]; repetition_penalty > 0 (1: off);
    logit_bias: {token id: bias in [-100, 100]} (-100 bans a token, +100 forces it).
    constraint: a logits mask (npgpt.structured.Constraint: a grammar over this vocabulary); each
    sequence's `constraint.begin(stop_token_ids)` gives a guide whose `allowed(remaining)` masks
    the logits after the controls and whose `advance(token)` follows each accepted token. Its
    `min_tokens` must fit in max_new_tokens.
    """
    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple = ()
    stop_token_ids: tuple = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict = field(default_factory=dict, hash=False)
    constraint: object = field(default=None, hash=False, compare=False)

    def __post_init__(self):
        put = object.__setattr__               # frozen: normalised values are set once, here
        if self.max_new_tokens is not None:
            n = _number(self.max_new_tokens, "max_new_tokens", integer=True)
            if n <= 0:
                raise SamplingError(f"max_new_tokens must be positive, got {n}", "max_new_tokens")
            put(self, "max_new_tokens", n)
        t = _number(self.temperature, "temperature")
        if t < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {t}", "temperature")
        put(self, "temperature", t)
        if self.top_k is not None:
            k = _number(self.top_k, "top_k", integer=True)
            if k <= 0:
                raise SamplingError(f"top_k must be a positive integer, got {k}", "top_k")
            put(self, "top_k", k)
        top_p = 1.0 if self.top_p is None else _number(self.top_p, "top_p")
        if not 0 < top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {top_p}", "top_p")
        put(self, "top_p", top_p)
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
                raise SamplingError(f"seed must be an integer >= 0, got {self.seed}", "seed")
            put(self, "seed", int(self.seed))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) for s in stop):
            raise SamplingError("stop must be a string or a list of strings", "stop")
        if any(not s for s in stop):
            raise SamplingError("a stop string must not be empty (it would stop every sample at once)", "stop")
        put(self, "stop", stop)
        ids = tuple(_number(t, "stop_token_ids", integer=True) for t in (self.stop_token_ids or ()))
        put(self, "stop_token_ids", ids)
        for name in ("presence_penalty", "frequency_penalty"):
            v = _number(getattr(self, name), name)
            if not -2.0 <= v <= 2.0:
                raise SamplingError(f"{name} must be in [-2, 2], got {v}", name)
            put(self, name, v)
        r = _number(self.repetition_penalty, "repetition_penalty")
        if not r > 0:
            raise SamplingError(f"repetition_penalty must be positive, got {r}", "repetition_penalty")
        put(self, "repetition_penalty", r)
        bias = {}
        for tok, b in dict(self.logit_bias or {}).items():
            try:
                tid = int(tok)
                if isinstance(tok, bool) or (isinstance(tok, str) and not tok.strip().lstrip("-").isdigit()) \
                        or (isinstance(tok, float) and tok != tid):
                    raise ValueError
            except (TypeError, ValueError, OverflowError):
                raise SamplingError(f"logit_bias must map token ids to numbers, got {tok!r}: {b!r}",
                                    "logit_bias") from None
            if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)):
                raise SamplingError(f"logit_bias must map token ids to numbers, got {tok!r}: {b!r}", "logit_bias")
            if not -100 <= float(b) <= 100:        # NaN fails this too
                raise SamplingError(f"logit_bias: bias for token {tid} must be in [-100, 100], got {b}", "logit_bias")
            bias[tid] = float(b)
        put(self, "logit_bias", bias)
        c = self.constraint
        if c is not None:
            if not (hasattr(c, "begin") and hasattr(c, "min_tokens")):
                raise SamplingError(f"constraint must be an npgpt.structured.Constraint, got {type(c).__name__}",
                                    "constraint")
            if self.max_new_tokens is not None and c.min_tokens > self.max_new_tokens:
                raise SamplingError(f"the constrained output needs at least {c.min_tokens} tokens to be complete; "
                                    f"max_new_tokens is {self.max_new_tokens}", "max_new_tokens")

    def replace(self, **changes) -> SamplingParams:
        """A copy with `changes` (checked again)."""
        return replace(self, **changes)

    def for_chat(self, tokenizer) -> SamplingParams:
        """These params for a chat reply: it also ends where the model ends its turn or starts a new
        one, at every token the tokenizer's chat format writes between turns (its end-of-turn and
        role tokens, and EOS: tokenizer.chat_stop_ids()) and before a plain-text role marker
        (tokenizer.chat_stop_strings()). `npgpt chat` and the server's /v1/chat/completions both
        sample with these, so a reply stops the same way everywhere."""
        return self.replace(stop_token_ids=tuple(dict.fromkeys(self.stop_token_ids + tuple(tokenizer.chat_stop_ids()))),
                            stop=tuple(dict.fromkeys(self.stop + tuple(tokenizer.chat_stop_strings()))))

    def check_vocab(self, vocab_size) -> SamplingParams:
        """Token ids (logit_bias, stop_token_ids) checked against a vocabulary of vocab_size."""
        for tid in self.logit_bias:
            if not 0 <= tid < vocab_size:
                raise SamplingError(f"logit_bias: token id {tid} is out of range for vocab_size {vocab_size}",
                                    "logit_bias")
        for tid in self.stop_token_ids:
            if not 0 <= tid < vocab_size:
                raise SamplingError(f"stop token id {tid} is out of range for vocab_size {vocab_size}",
                                    "stop_token_ids")
        return self

    @property
    def penalized(self) -> bool:
        """Whether any logit control (bias or penalty) is set."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    def apply_controls(self, logits, counts, seen):
        """logits (B, V), counts (B, V) of generated tokens, seen (B, V) bool of prompt + generated
        tokens -> logits after bias and penalties (B, V) float64, a new array."""
        z = np.array(logits, dtype=np.float64)
        if self.logit_bias:                    # one indexed add (ids are distinct: dict keys)
            n = len(self.logit_bias)
            z[:, np.fromiter(self.logit_bias, np.int64, n)] += np.fromiter(self.logit_bias.values(), np.float64, n)
        if self.presence_penalty or self.frequency_penalty:
            z -= self.frequency_penalty * counts + self.presence_penalty * (counts > 0)
        r = self.repetition_penalty
        if r != 1.0:
            z = np.where(seen, np.where(z > 0, z / r, z * r), z)
        return z


# ---- the distribution and the draw ----------------------------------------------------------------
def softmax(x):
    return softmax_array(x, axis=-1)


def log_softmax(x):
    return log_softmax_array(x, axis=-1)


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


def draw(p, rng):
    """One token per row from distributions p (B, V), by inverse CDF with one uniform per row."""
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(p.shape[0]) * cdf[:, -1]
    tok = (cdf <= u[:, None]).sum(axis=-1)
    # guard against u landing on the last cdf value through rounding: stay inside the support
    return np.minimum(tok, p.shape[1] - 1)


def top_tokens(p, n):
    """Indices of the n largest entries of each row of p (B, V), largest first. argpartition keeps
    this O(V) per step: a full sort of GPT-2's 50,257 probabilities would run every token."""
    n = min(n, p.shape[-1])
    part = np.argpartition(-p, n - 1, axis=-1)[:, :n]
    order = np.argsort(-np.take_along_axis(p, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


# ---- one sequence's sampler ----------------------------------------------------------------------
class History:
    """What the penalties look at: counts of generated tokens, and every token seen (prompt too)."""

    def __init__(self, vocab_size, prompt=()):
        self.counts = np.zeros((1, vocab_size))
        self.seen = np.zeros((1, vocab_size), dtype=bool)
        self.seen[0, list(prompt)] = True

    def add(self, token):
        self.counts[0, token] += 1
        self.seen[0, token] = True

    def copy(self) -> History:
        h = History.__new__(History)
        h.counts, h.seen = self.counts.copy(), self.seen.copy()
        return h


class Sampler:
    """Samples the tokens of one sequence (see the module doc).

        sampler = Sampler(params, vocab_size, prompt, index)
        token, prob = sampler.sample(logits)       # logits (V,) of the next token

    prob is the token's probability in the distribution it was drawn from (after the controls,
    temperature, top-k and top-p). Speculative decoding uses the parts: `probs(logits, history)`
    for a distribution under a tentative history, `pick(p)`, `accept(token)`, and `rng`.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, prompt=(), index: int = 0):
        self.params = params.check_vocab(vocab_size)
        self.vocab_size = vocab_size
        seed = params.seed
        self.rng = np.random.default_rng(None if seed is None else [seed, int(index)])
        self.history = History(vocab_size, prompt) if params.penalized else None
        self.generated = 0
        self.guide = None                   # the constraint's walk along this sequence
        if params.constraint is not None:
            if not params.stop_token_ids:
                raise SamplingError("a constraint needs a stop token to end the output (pass eot_id)", "constraint")
            self.guide = params.constraint.begin(params.stop_token_ids)

    def probs(self, logits, history=None):
        """logits (V,) -> the distribution (V,) float64 to draw from, under `history` (default: the
        sequence's own)."""
        z = np.asarray(logits, dtype=np.float64)[None]
        if not np.isfinite(z).all():
            raise NpgptError("the model's logits hold NaN or infinity; its weights are damaged (or it diverged "
                             "in training): sampling stopped")
        p = self.params
        if p.penalized:
            h = history if history is not None else self.history
            z = p.apply_controls(z, h.counts, h.seen)
        if self.guide is not None:          # after the controls: no bias lifts a token out of the grammar
            remaining = (1 << 30) if p.max_new_tokens is None else p.max_new_tokens - self.generated
            ok = self.guide.allowed(remaining)
            if ok.shape[0] != z.shape[1] or not ok.any():
                raise NpgptError("the constraint allows no token here (its vocabulary does not match the model's)")
            z = np.where(ok[None], z, -np.inf)
        return sampling_probs(z, p.temperature, p.top_k, p.top_p)[0]

    def pick(self, p) -> int:
        """One token from the distribution p (V,): drawn, or the argmax at temperature 0."""
        return int(draw(p[None], self.rng)[0]) if self.params.temperature > 0 else int(p.argmax())

    def accept(self, token):
        """Record `token` as generated (the penalties' history, the constraint's state)."""
        if self.history is not None:
            self.history.add(token)
        if self.guide is not None:
            self.guide.advance(token)
        self.generated += 1

    def sample(self, logits) -> tuple[int, float]:
        """The next token from logits (V,), recorded; and its probability as drawn."""
        p = self.probs(logits)
        t = self.pick(p)
        self.accept(t)
        return t, float(p[t])

    def is_stop_token(self, token) -> bool:
        return token in self.params.stop_token_ids


# ---- incremental text with stop strings ----------------------------------------------------------
def _failure(s):
    """KMP failure function: f[i] = length of the longest proper prefix of s[:i+1] that is also
    its suffix."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class Detokenizer:
    """One sequence's text, released as its tokens arrive (see the module doc).

        detok = Detokenizer(tokenizer, stop=["\\n\\n"], skip_ids=[eot])
        delta = detok.add(token)        # text now safe to show ("" while held back)
        delta = detok.flush()           # at the end: what was held back
        detok.stopped                   # a stop string completed: the text ends before it

    Tokens become text through the tokenizer's `token_bytes` and one incremental UTF-8 decoder
    (bytes of an unfinished character wait for the rest; invalid bytes become U+FFFD, exactly as
    `tokenizer.decode` of all the tokens at once). `skip_ids` (end-of-text, role tokens) add no text.
    """

    def __init__(self, tokenizer, stop=(), skip_ids=()):
        self.tokenizer = tokenizer
        self.stops = [stop] if isinstance(stop, str) else list(stop or ())
        self.skip = frozenset(int(t) for t in skip_ids)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)    # per stop: its longest prefix that ends the text so far
        self._held = ""                         # decoded text not yet released (a possible stop's start)
        self._out = []                          # released pieces
        self.stopped = False
        self.comparisons = 0                    # characters compared by the stop automata (work counter)

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._out)

    def add(self, token) -> str:
        """Feed one token; return the text it releases."""
        if self.stopped or int(token) in self.skip:
            return ""
        return self._feed(self._utf8.decode(self.tokenizer.token_bytes(int(token))))

    def flush(self) -> str:
        """The sequence ended without a stop string: release the rest (an unfinished character
        becomes U+FFFD, as a whole decode shows it)."""
        if self.stopped:
            return ""
        out = self._feed(self._utf8.decode(b"", final=True))
        if not self.stopped:
            out += self._held
            self._out.append(self._held)
            self._held = ""
        return out

    def _feed(self, new):
        if not new:
            return ""
        buf, base = self._held + new, len(self._held)
        work = 0
        for i, ch in enumerate(new):
            for k, s in enumerate(self.stops):
                st, f = self._state[k], self._fail[k]
                while st and s[st] != ch:
                    st = f[st - 1]
                    work += 1
                work += 1
                if s[st] == ch:
                    st += 1
                if st == len(s):                # a stop string completed: the text ends before it
                    self.stopped = True
                    self.comparisons += work
                    return self._release(buf[:base + i + 1 - len(s)], "")
                self._state[k] = st
        self.comparisons += work
        hold = max(self._state, default=0)
        cut = len(buf) - hold
        return self._release(buf[:cut], buf[cut:])

    def _release(self, out, held):
        self._held = held
        if out:
            self._out.append(out)
        return out
