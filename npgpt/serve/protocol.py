"""The request types and errors of the OpenAI API as npgpt serves it: `ApiError` (answered with
OpenAI's error body) and `Params`, a request's validated generation settings. Every field of a body
is checked here before anything is allocated for it: JSON types and the API's own bounds (OpenAI's
temperature <= 2, at most 4 stop strings, the server's max_tokens and n) here, and the sampling
settings by `npgpt.sampling.SamplingParams`, the same check the library and `npgpt sample` run.

What one request may cost is bounded here too, so that no client takes more than its share of the
one decoding thread: at most MAX_STOPS stop strings of MAX_STOP_CHARS characters each (their check
is linear in the new text, see npgpt.sampling.Detokenizer), MAX_LOGIT_BIAS biased tokens (applied
to every token's logits), choices x max_tokens within the server's per-request budget
(`--max-request-tokens`), and a prompt within the model's context (App checks its characters
before encoding it).
"""

from __future__ import annotations

import math
import re

from npgpt.sampling import SamplingError, SamplingParams
from npgpt.structured import Grammar, GrammarError

MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4                 # OpenAI's
MAX_STOP_CHARS = 1000         # per stop string: each costs its length to set up, per choice
MAX_LOGIT_BIAS = 300          # biased tokens: each is an add on every token's logits
_TOKEN_ID = re.compile(r"[0-9]{1,12}")     # ASCII digits only: "²".isdigit() is True, int("²") fails


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


def _flag(body, key, name=None):
    """A boolean field; absent or null is false."""
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise ApiError(400, f"'{name or key}' must be a boolean, got {str(v)[:40]!r}", name or key)
    return bool(v)


class Params:
    """Validated generation settings shared by the n choices of one prompt: the HTTP ones (n,
    stream, logprobs, ...) and `sampling`, one SamplingParams."""

    def __init__(self, body, vocab_size, limits, chat):
        self.max_tokens = _number(body, "max_completion_tokens" if chat and body.get("max_tokens") is None
                                  else "max_tokens", None, 1, None, integer=True)
        if self.max_tokens is not None and self.max_tokens > limits["max_tokens"]:
            raise ApiError(400, f"max_tokens is {self.max_tokens}; this server allows at most "
                                f"{limits['max_tokens']}", "max_tokens")
        self.temperature = _number(body, "temperature", 1.0, 0, 2)              # OpenAI's range
        self.top_p = _number(body, "top_p", 1.0)                                # ranges: SamplingParams
        self.top_k = _number(body, "top_k", None, integer=True)                 # an extension, as vLLM
        self.n = _number(body, "n", 1, 1, limits["max_batch"], integer=True)
        self.seed = _number(body, "seed", None, integer=True)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOPS
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop or ()):
            raise ApiError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters, got "
                                f"{max(len(s) for s in stop)}", "stop")
        self.stop = stop or []
        self.stream = _flag(body, "stream")                 # null is allowed, as OpenAI does: false
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options")
        self.include_usage = _flag(opts, "include_usage", "stream_options.include_usage")
        self.echo = False if chat else _flag(body, "echo")  # completions: the prompt's text comes first
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
            if self.echo and self.logprobs is not None and self.stream:
                raise ApiError(400, "'echo' with 'logprobs' (the prompt's log-probabilities) is answered whole: "
                                    "ask without 'stream'", "echo")
        bias = body.get("logit_bias")
        if bias is not None and not isinstance(bias, dict):
            raise ApiError(400, "'logit_bias' must be an object mapping token ids to biases", "logit_bias")
        if bias is not None and len(bias) > MAX_LOGIT_BIAS:
            raise ApiError(400, f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}", "logit_bias")
        parsed = {}
        for k, b in (bias or {}).items():
            if not _TOKEN_ID.fullmatch(k) or isinstance(b, bool) or not isinstance(b, (int, float)):
                raise ApiError(400, f"logit_bias: expected token id -> number, got {k[:40]!r}: {b!r}", "logit_bias")
            parsed[int(k)] = b
        try:
            self.sampling = SamplingParams(
                max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                seed=None if self.seed is None else self.seed % (1 << 64),   # OpenAI takes any integer
                stop=tuple(self.stop), presence_penalty=_number(body, "presence_penalty", 0.0),
                frequency_penalty=_number(body, "frequency_penalty", 0.0),
                repetition_penalty=_number(body, "repetition_penalty", 1.0), logit_bias=parsed,
            ).check_vocab(vocab_size)
        except SamplingError as e:
            key = "max_tokens" if e.param == "max_new_tokens" else e.param
            raise ApiError(400, str(e), key) from None
        # the output's grammar and the field it came from, named in its errors ("tools" for a forced call)
        self.grammar, self.grammar_param = parse_grammar(body)
        self.tools = None                     # the chat endpoint's npgpt.serve.tools.ToolSpec, when tools are given


def parse_grammar(body):
    """(grammar, field) of the request's output constraint (an npgpt.structured.Grammar), or (None,
    None): OpenAI's `response_format` ({"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"schema": ...}}), or vLLM's extensions `guided_json` (a schema), `guided_regex`,
    `guided_choice`. At most one."""
    given = [k for k in ("guided_json", "guided_regex", "guided_choice") if body.get(k) is not None]
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise ApiError(400, "'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}",
                           "response_format")
        if rf["type"] != "text":
            given.insert(0, "response_format")
    if len(given) > 1:
        raise ApiError(400, f"give one of {', '.join(given)}, not several", given[1])
    if not given:
        return None, None
    key = given[0]
    return _grammar(body, key, rf), key


def _grammar(body, key, rf):
    try:
        if key == "response_format":
            if rf["type"] == "json_object":
                return Grammar.json_object()
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
                raise ApiError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                               "response_format")
            return Grammar.json_schema(spec["schema"])
        if key == "guided_json":
            schema = body[key]
            if not isinstance(schema, (dict, bool)):
                raise ApiError(400, "'guided_json' must be a JSON schema object", key)
            return Grammar.json_schema(schema)
        if key == "guided_regex":
            return Grammar.regex(body[key])
        return Grammar.choice(body[key])
    except GrammarError as e:
        raise ApiError(400, str(e), key, code="unsupported_grammar") from None
