"""Structured outputs: a grammar compiled to a byte-level automaton that masks the sampler's logits,
so a sampled continuation always matches a regular expression, one of fixed choices, or a JSON
Schema, whatever the model — and closes within the token budget.

    grammar = Grammar.json_schema({"type": "object", "properties": {...}, "required": [...]})
    grammar = Grammar.regex(r"\\d{3}-\\d{4}") / Grammar.choice(["yes", "no"]) / Grammar.json_object()
    constraint = grammar.for_tokens(TokenTable.of(tokenizer, model.config.vocab_size))
    params = SamplingParams(max_new_tokens=64, constraint=constraint)   # npgpt.sampling: the one sampler
    generate(model, ids, params=params, eot_id=tokenizer.eot_id)

The pipeline, each stage bounded (a grammar comes from strangers: an HTTP body, a file):

  1. a pattern or schema -> a small syntax tree (Lit, Chars, Seq, Alt, Repeat). Regexes: a parser for
     the subset below; schemas: one function per JSON type. Anything else is a GrammarError naming
     what is unsupported (the server answers 400).
  2. tree -> NFA over bytes (Thompson's construction). Character classes are code-point ranges; each
     becomes the UTF-8 byte sequences that encode it (so the automaton accepts only valid UTF-8).
  3. NFA -> DFA by subset construction over byte classes (bytes no edge tells apart move together),
     refused past MAX_STATES states, then minimised (Moore's partition refinement). State 0 is the
     dead state, 1 the start.
  4. for one vocabulary (TokenTable: each token id's bytes; special tokens map to nothing): per DFA
     state, where every token leads (one vectorised walk over the vocabulary's bytes that drops tokens
     as they die, cached per state, LRU-bounded); and per state the fewest tokens to an accepting
     state, by BFS backwards over those edges. Exact while the walks stay within EXACT_BUDGET; past
     it the states not walked count "unit" tokens (single bytes, single characters), an upper bound
     along a path that always exists. Masking every token whose destination needs more tokens than
     remain forces the value to close within max_tokens; a grammar whose start needs more than
     max_new_tokens is refused before sampling.

A step of the sampler then costs the state's cached mask (far from the budget) or one O(V) gather
(destination row -> distance -> compare), plus one walk over the vocabulary the first time a state
is met.

Supported regex syntax (Python `re` semantics with re.ASCII, whole-string match): literals, `.` (any
character but newline), escapes `\\d \\w \\s \\D \\W \\S \\n \\t \\r \\f \\v \\xHH \\uHHHH` and escaped
punctuation, classes `[...]` / `[^...]` with ranges, groups `(...)`, `(?:...)`, `(?P<name>...)`,
alternation `|`, quantifiers `* + ? {m} {m,} {m,n} {,n}` (lazy forms too; counts up to MAX_REPEAT),
`^` at the start and `$` at the end. Refused: backreferences, lookaround, `\\b`, flags, possessive
quantifiers.

Supported JSON Schema subset: `type` (string, number, integer, boolean, null, object, array, or a
list of them), `enum`, `const`, `properties`, `required`, `additionalProperties` (false, true or
absent: only the listed properties are produced), `items`, `minItems`, `maxItems`, `minLength`,
`maxLength`, `anyOf`, `$ref` into `$defs` / `definitions` (not recursive); annotations (`title`,
`description`, `default`, `examples`, ...) are ignored. Objects are written compactly with the
properties in schema order (an optional space after `:` and `,`); a schema with no constraints
(`{}`, `json_object`) allows any JSON value nested up to ANY_DEPTH levels.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from npgpt.errors import NpgptError

MAX_STATES = 4096          # DFA states of one grammar
MAX_NFA = 60_000           # NFA states while building (bounded repetition copies its body)
MAX_REPEAT = 1000          # {m,n} counts
MAX_PATTERN = 4096         # characters of a regex
MAX_CHOICES = 256
MAX_PROPERTIES = 64
MAX_SCHEMA_DEPTH = 16
MAX_NESTING = 64           # regex groups inside groups
ANY_DEPTH = 3              # nesting of a value whose schema says nothing (json_object, {})
MAX_TOKEN_BYTES = 64       # longer tokens are never proposed (a unit-token path always remains)
CACHE_BYTES = 16 << 20     # per-state destination rows kept per constraint (masks: half as much)
EXACT_BUDGET = 5_000_000   # token-bytes walked for exact shortest completions (past it: an upper bound)
UNICODE_MAX = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
INF = 1 << 30


class GrammarError(NpgptError):
    """A grammar npgpt cannot or will not compile (unsupported syntax or keyword, or too large)."""


# ---- 1. syntax trees -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Lit:
    data: bytes


@dataclass(frozen=True)
class Chars:
    ranges: tuple           # ((lo, hi), ...) code points, sorted, disjoint


@dataclass(frozen=True)
class Seq:
    items: tuple


@dataclass(frozen=True)
class Alt:
    items: tuple


@dataclass(frozen=True)
class Repeat:
    item: object
    lo: int
    hi: int | None          # None: unbounded


EMPTY = Seq(())


def _norm(ranges):
    """Sorted, merged code-point ranges."""
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _negate(ranges):
    out, at = [], 0
    for lo, hi in _norm(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= UNICODE_MAX:
        out.append((at, UNICODE_MAX))
    return tuple(out)


DIGIT = ((0x30, 0x39),)
WORD = _norm([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])
SPACE = _norm([(0x09, 0x0D), (0x20, 0x20)])
CLASSES = {"d": DIGIT, "w": WORD, "s": SPACE, "D": _negate(DIGIT), "W": _negate(WORD), "S": _negate(SPACE)}
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}


def lit(text: str) -> Lit:
    try:
        return Lit(text.encode("utf-8"))
    except UnicodeEncodeError:              # a lone surrogate (JSON allows "\ud800"; UTF-8 does not)
        raise GrammarError(f"{text[:40]!r} holds a lone surrogate, which UTF-8 cannot encode") from None


# ---- regex parser --------------------------------------------------------------------------------
class _RegexParser:
    """Recursive descent over the supported subset (see the module doc) -> a syntax tree."""

    def __init__(self, pattern):
        if not isinstance(pattern, str):
            raise GrammarError(f"a regex must be a string, got {type(pattern).__name__}")
        if len(pattern) > MAX_PATTERN:
            raise GrammarError(f"the regex is {len(pattern)} characters; at most {MAX_PATTERN} are allowed")
        self.s, self.i, self.depth = pattern, 0, 0

    def fail(self, what):
        raise GrammarError(f"regex {self.s!r} at position {self.i}: {what}")

    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else None

    def take(self):
        c = self.s[self.i]
        self.i += 1
        return c

    def parse(self):
        if self.peek() == "^":
            self.i += 1
        node = self.alternation(top=True)
        if self.i < len(self.s):
            self.fail("unbalanced ')'")
        return node

    def alternation(self, top=False):
        items = [self.sequence(top)]
        while self.peek() == "|":
            self.i += 1
            items.append(self.sequence(top))
        return items[0] if len(items) == 1 else Alt(tuple(items))

    def sequence(self, top):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            if self.peek() == "$":
                self.i += 1
                if not (top and self.i == len(self.s)):
                    self.fail("'$' is supported only at the end of the pattern")
                continue
            if self.peek() == "^":
                self.fail("'^' is supported only at the start of the pattern")
            items.append(self.quantified(self.atom()))
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def quantified(self, node):
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{":
                start = self.i
                lo, hi = self.braces()
                if lo is None:            # not a quantifier: Python reads it as a literal brace
                    self.i = start
                    self.fail("a '{' that is not a quantifier; write '\\{' for a literal brace")
            else:
                return node
            if self.peek() == "?":          # lazy: the same language under a whole-string match
                self.i += 1
            elif self.peek() == "+":
                self.fail("possessive quantifiers are not supported")
            if self.peek() in ("*", "+", "?", "{"):
                self.fail("a quantifier cannot follow a quantifier; add a group")
            node = Repeat(node, lo, hi)

    def braces(self):
        j = self.s.find("}", self.i)
        if j < 0:
            return None, None
        body = self.s[self.i + 1:j]
        lo_s, comma, hi_s = body.partition(",")
        if not (lo_s.isdigit() or (comma and not lo_s)) or not (hi_s.isdigit() or not hi_s) \
                or not (lo_s or hi_s):
            return None, None
        if not all(c.isascii() for c in body):
            return None, None
        lo = int(lo_s) if lo_s else 0
        hi = (int(hi_s) if hi_s else None) if comma else lo
        if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
            self.fail(f"repetition counts above {MAX_REPEAT} are not supported")
        if hi is not None and hi < lo:
            self.fail(f"repetition {{{body}}} has its maximum below its minimum")
        self.i = j + 1
        return lo, hi

    def atom(self):
        c = self.take()
        if c == "(":
            if self.s.startswith("?:", self.i):
                self.i += 2
            elif self.s.startswith("?P<", self.i):
                j = self.s.find(">", self.i)
                if j < 0 or not self.s[self.i + 3:j].isidentifier():
                    self.fail("a bad group name")
                self.i = j + 1
            elif self.peek() == "?":
                self.fail("lookaround, flags and other '(?' groups are not supported")
            self.depth += 1
            if self.depth > MAX_NESTING:
                self.fail(f"groups nested deeper than {MAX_NESTING}")
            node = self.alternation()
            if self.peek() != ")":
                self.fail("missing ')'")
            self.i += 1
            self.depth -= 1
            return node
        if c == "[":
            return Chars(self.char_class())
        if c == ".":
            return Chars(_negate([(0x0A, 0x0A)]))
        if c == "\\":
            r = self.escape(in_class=False)
            return Chars(r) if isinstance(r, tuple) else lit(r)
        if c in "*+?{":
            self.i -= 1
            self.fail("nothing to repeat")
        return lit(c)

    def escape(self, in_class):
        """After a backslash: a class's ranges (tuple) or one character (str)."""
        if self.peek() is None:
            self.fail("a trailing backslash")
        c = self.take()
        if c in CLASSES:
            return CLASSES[c]
        if c in ESCAPES:
            if c == "0" and self.peek() is not None and self.peek() in "01234567":
                self.fail("octal escapes are not supported")
            return ESCAPES[c]
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.s[self.i:self.i + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                self.fail(f"\\{c} needs {n} hex digits")
            self.i += n
            cp = int(digits, 16)
            if SURROGATES[0] <= cp <= SURROGATES[1]:
                self.fail("surrogate code points cannot be encoded in UTF-8")
            return chr(cp)
        if c == "b" and in_class:
            return "\b"
        if c.isalnum():
            self.fail(f"the escape \\{c} is not supported (backreferences, \\b, \\A, \\Z and the like)")
        return c                            # escaped punctuation stands for itself

    def char_class(self):
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges, first = [], True
        while True:
            c = self.peek()
            if c is None:
                self.fail("missing ']'")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self.class_item()
            if isinstance(lo, tuple):
                ranges += lo
                continue
            if self.peek() == "-" and self.i + 1 < len(self.s) and self.s[self.i + 1] != "]":
                self.i += 1
                hi = self.class_item()
                if isinstance(hi, tuple):
                    self.fail("a range cannot end in a class like \\d")
                if ord(hi) < ord(lo):
                    self.fail(f"bad range {lo}-{hi}")
                ranges.append((ord(lo), ord(hi)))
            else:
                ranges.append((ord(lo), ord(lo)))
        return _negate(ranges) if negate else _norm(ranges)

    def class_item(self):
        c = self.take()
        if c == "\\":
            return self.escape(in_class=True)
        if c == "[" and self.peek() in (":", "=", "."):
            self.fail("POSIX classes like [:alpha:] are not supported")
        return c


def parse_regex(pattern: str):
    """A regex of the supported subset -> its syntax tree (GrammarError otherwise)."""
    return _RegexParser(pattern).parse()


# ---- JSON Schema -> syntax tree ------------------------------------------------------------------
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "strict"}
KEYWORDS = {"type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems",
            "maxItems", "minLength", "maxLength", "anyOf", "$ref", "$defs", "definitions"}

WS = Repeat(lit(" "), 0, 1)                                  # an optional space after ':' and ','
STRING_CHAR = Alt((Chars(_negate([(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)])),
                   Seq((lit("\\"), Chars(_norm([(ord(c), ord(c)) for c in '"\\/bfnrt']))))))
DIGITS = Repeat(Chars(DIGIT), 0, None)
INTEGER = Seq((Repeat(lit("-"), 0, 1), Alt((lit("0"), Seq((Chars(((0x31, 0x39),)), DIGITS))))))
NUMBER = Seq((INTEGER, Repeat(Seq((lit("."), Repeat(Chars(DIGIT), 1, None))), 0, 1),
              Repeat(Seq((Chars(((0x45, 0x45), (0x65, 0x65))), Repeat(Chars(((0x2B, 0x2B), (0x2D, 0x2D))), 0, 1),
                          Repeat(Chars(DIGIT), 1, None))), 0, 1)))
BOOLEAN = Alt((lit("true"), lit("false")))
NULL = lit("null")


def _string(lo=0, hi=None):
    return Seq((lit('"'), Repeat(STRING_CHAR, lo, hi), lit('"')))


def _joined(item, lo, hi):
    """item (',' item)* with between lo and hi items, inside brackets the caller adds."""
    if hi == 0:
        return EMPTY
    more = Repeat(Seq((lit(","), WS, item)), max(lo - 1, 0), None if hi is None else hi - 1)
    body = Seq((item, more))
    return body if lo >= 1 else Alt((EMPTY, body))


def _any_value(depth):
    scalars = [_string(), NUMBER, BOOLEAN, NULL]
    if depth <= 0:
        return Alt(tuple(scalars))
    inner = _any_value(depth - 1)
    return Alt(tuple(scalars) + (_array(inner, 0, None), _any_object(inner)))


def _array(item, lo, hi):
    return Seq((lit("["), _joined(item, lo, hi), lit("]")))


def _any_object(value):
    member = Seq((_string(), lit(":"), WS, value))
    return Seq((lit("{"), _joined(member, 0, None), lit("}")))


def _compact(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class _SchemaCompiler:
    def __init__(self, root):
        if not isinstance(root, (dict, bool)):
            raise GrammarError("a JSON schema must be an object")
        self.root = root
        self.defs = {}
        if isinstance(root, dict):
            for key in ("$defs", "definitions"):
                d = root.get(key, {})
                if not isinstance(d, dict):
                    raise GrammarError(f"'{key}' must be an object")
                self.defs.update({f"#/{key}/{k}": v for k, v in d.items()})
        self.refs = []                      # the $ref chain being expanded (recursion is refused)

    def fail(self, path, what):
        raise GrammarError(f"JSON schema at {path or '/'}: {what}")

    def compile(self, s, path="", depth=0):
        if depth > MAX_SCHEMA_DEPTH:
            self.fail(path, f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
        if s is True or s == {}:
            return _any_value(ANY_DEPTH - 1)
        if s is False or not isinstance(s, dict):
            self.fail(path, "a schema must be an object (or true)")
        for k in s:
            if k not in KEYWORDS and k not in ANNOTATIONS:
                self.fail(path, f"the keyword '{k}' is not supported (supported: {', '.join(sorted(KEYWORDS))})")
        if "$ref" in s:
            ref = s["$ref"]
            if set(s) - ANNOTATIONS - {"$ref", "$defs", "definitions"}:
                self.fail(path, "'$ref' beside other keywords is not supported")
            if ref not in self.defs:
                self.fail(path, f"'$ref' {ref!r} does not name an entry of '$defs' or 'definitions'")
            if ref in self.refs:
                self.fail(path, f"recursive '$ref' {ref!r} is not supported (its language is not regular)")
            self.refs.append(ref)
            try:
                return self.compile(self.defs[ref], ref[1:], depth + 1)
            finally:
                self.refs.pop()
        if "enum" in s or "const" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(values, list) or not values or len(values) > MAX_CHOICES:
                self.fail(path, f"'enum' must be a list of 1 to {MAX_CHOICES} values")
            if "type" in s:               # the type must agree; anything else is a contradiction
                types = s["type"] if isinstance(s["type"], list) else [s["type"]]
                values = [v for v in values if any(_is_type(v, ty) for ty in types)]
                if not values:
                    self.fail(path, "no 'enum' value has the schema's 'type'")
            try:
                texts = list(dict.fromkeys(_compact(v) for v in values))
            except (TypeError, ValueError):
                self.fail(path, "'enum' values must be JSON values")
            return Alt(tuple(lit(t) for t in texts))
        if "anyOf" in s:
            alts = s["anyOf"]
            if not isinstance(alts, list) or not alts or len(alts) > MAX_CHOICES:
                self.fail(path, "'anyOf' must be a non-empty list of schemas")
            if set(s) - ANNOTATIONS - {"anyOf", "$defs", "definitions"}:
                self.fail(path, "'anyOf' beside other keywords is not supported; move them into each branch")
            return Alt(tuple(self.compile(a, f"{path}/anyOf/{i}", depth + 1) for i, a in enumerate(alts)))
        t = s.get("type")
        if t is None:
            if "properties" in s:
                t = "object"
            elif "items" in s:
                t = "array"
            else:
                return _any_value(ANY_DEPTH - 1)
        if isinstance(t, list):
            if not t or not all(isinstance(x, str) for x in t):
                self.fail(path, "'type' must be a string or a non-empty list of strings")
            return Alt(tuple(self.typed(s, x, path, depth) for x in dict.fromkeys(t)))
        return self.typed(s, t, path, depth)

    def count(self, s, key, path, default):
        v = s.get(key, default)
        if v is default:
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            self.fail(path, f"'{key}' must be a non-negative integer")
        if v > MAX_REPEAT:
            self.fail(path, f"'{key}' above {MAX_REPEAT} is not supported")
        return v

    def typed(self, s, t, path, depth):
        if t == "string":
            lo, hi = self.count(s, "minLength", path, 0), self.count(s, "maxLength", path, None)
            if hi is not None and hi < lo:
                self.fail(path, "'maxLength' is below 'minLength'")
            return _string(lo, hi)
        if t == "number":
            return NUMBER
        if t == "integer":
            return INTEGER
        if t == "boolean":
            return BOOLEAN
        if t == "null":
            return NULL
        if t == "array":
            lo, hi = self.count(s, "minItems", path, 0), self.count(s, "maxItems", path, None)
            if hi is not None and hi < lo:
                self.fail(path, "'maxItems' is below 'minItems'")
            items = s.get("items", True)
            if isinstance(items, list):
                self.fail(path, "'items' as a list (tuple validation) is not supported")
            return _array(self.compile(items, f"{path}/items", depth + 1), lo, hi)
        if t == "object":
            return self.object(s, path, depth)
        self.fail(path, f"unknown type {t!r}")

    def object(self, s, path, depth):
        props = s.get("properties", {})
        required = s.get("required", [])
        extra = s.get("additionalProperties", True)
        if not isinstance(props, dict) or len(props) > MAX_PROPERTIES:
            self.fail(path, f"'properties' must be an object of at most {MAX_PROPERTIES} entries")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            self.fail(path, "'required' must be a list of property names")
        missing = [r for r in required if r not in props]
        if missing:
            self.fail(path, f"required property {missing[0]!r} is not in 'properties'")
        if not isinstance(extra, bool):
            self.fail(path, "'additionalProperties' must be true or false (a schema there is not supported)")
        if not props:
            return _any_object(_any_value(ANY_DEPTH - 1)) if extra else lit("{}")
        members = []
        for name, sub in props.items():
            value = self.compile(sub, f"{path}/properties/{name}", depth + 1)
            members.append((Seq((lit(_compact(name)), lit(":"), WS, value)), name in required))
        # properties in schema order; optional ones may be left out. after(i): what follows once
        # something was written (each present member after a comma); first(i): nothing yet.
        after = EMPTY
        afters = [None] * (len(members) + 1)
        afters[-1] = after
        for i in range(len(members) - 1, -1, -1):
            m, req = members[i]
            part = Seq((lit(","), WS, m))
            after = Seq((part if req else Repeat(part, 0, 1), after))
            afters[i] = after
        first = EMPTY
        for i in range(len(members) - 1, -1, -1):
            m, req = members[i]
            take = Seq((m, afters[i + 1]))
            first = take if req else Alt((take, first))
        return Seq((lit("{"), first, lit("}")))


def _is_type(v, t):
    return {"string": isinstance(v, str), "integer": isinstance(v, int) and not isinstance(v, bool),
            "number": isinstance(v, (int, float)) and not isinstance(v, bool), "boolean": isinstance(v, bool),
            "null": v is None, "array": isinstance(v, list), "object": isinstance(v, dict)}.get(t, False)


# ---- 2. NFA over bytes ---------------------------------------------------------------------------
def _utf8_pieces(lo, hi):
    """Code points lo..hi (one UTF-8 length, no surrogates) -> byte-range sequences that encode them."""
    n = len(chr(lo).encode("utf-8"))
    if n == 1:
        return [((lo, hi),)]
    for k in range(1, n):
        m = (1 << (6 * k)) - 1             # the low k continuation bytes
        if lo & ~m != hi & ~m:
            if lo & m:
                return _utf8_pieces(lo, lo | m) + _utf8_pieces((lo | m) + 1, hi)
            if hi & m != m:
                return _utf8_pieces(lo, (hi & ~m) - 1) + _utf8_pieces(hi & ~m, hi)
    a, b = chr(lo).encode("utf-8"), chr(hi).encode("utf-8")
    return [tuple(zip(a, b))]


def utf8_sequences(ranges):
    """Code-point ranges -> byte-range sequences ((lo, hi), ...) accepting exactly their UTF-8."""
    out = []
    for lo, hi in ranges:
        for a, b in ((lo, min(hi, SURROGATES[0] - 1)), (max(lo, SURROGATES[1] + 1), hi)):
            for edge_lo, edge_hi in ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, UNICODE_MAX)):
                x, y = max(a, edge_lo), min(b, edge_hi)
                if x <= y:
                    out += _utf8_pieces(x, y)
    return out


class _NFA:
    def __init__(self):
        self.eps, self.edges = [], []

    def state(self):
        if len(self.eps) >= MAX_NFA:
            raise GrammarError(f"the grammar is too large (over {MAX_NFA} automaton states while compiling); "
                               f"lower its repetition counts or lengths")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node):
        """node -> (start, end) of a fragment."""
        if isinstance(node, Lit):
            s = e = self.state()
            for b in node.data:
                n = self.state()
                self.edges[e].append((b, b, n))
                e = n
            return s, e
        if isinstance(node, Chars):
            s, e = self.state(), self.state()
            for seq in utf8_sequences(node.ranges):
                at = s
                for j, (lo, hi) in enumerate(seq):
                    n = e if j == len(seq) - 1 else self.state()
                    self.edges[at].append((lo, hi, n))
                    at = n
            return s, e
        if isinstance(node, Seq):
            s = e = self.state()
            for item in node.items:
                a, b = self.build(item)
                self.eps[e].append(a)
                e = b
            return s, e
        if isinstance(node, Alt):
            s, e = self.state(), self.state()
            for item in node.items:
                a, b = self.build(item)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        if isinstance(node, Repeat):
            s = e = self.state()
            for _ in range(node.lo):
                a, b = self.build(node.item)
                self.eps[e].append(a)
                e = b
            if node.hi is None:             # one looping copy
                a, b = self.build(node.item)
                end = self.state()
                self.eps[e] += [a, end]
                self.eps[b] += [a, end]
                return s, end
            end = self.state()
            for _ in range(node.hi - node.lo):
                self.eps[e].append(end)
                a, b = self.build(node.item)
                self.eps[e].append(a)
                e = b
            self.eps[e].append(end)
            return s, end
        raise TypeError(f"not a grammar node: {node!r}")


# ---- 3. DFA ---------------------------------------------------------------------------------------
class DFA:
    """table (N, 256) int32 of next states (0: dead), accept (N,) bool, start state 1."""

    def __init__(self, table, accept):
        self.table, self.accept = table, accept
        self.start = 1

    @classmethod
    def from_tree(cls, node):
        nfa = _NFA()
        s, e = nfa.build(node)
        cuts = sorted({0, 256} | {x for edges in nfa.edges for lo, hi, _ in edges for x in (lo, hi + 1)})
        byte_class = np.searchsorted(np.array(cuts), np.arange(256), side="right") - 1
        moves = [[(byte_class[lo], byte_class[hi], t) for lo, hi, t in edges] for edges in nfa.edges]

        memo = {}

        def closure(states):
            key = frozenset(states)
            hit = memo.get(key)
            if hit is None:
                stack, seen = list(key), set(key)
                while stack:
                    for t in nfa.eps[stack.pop()]:
                        if t not in seen:
                            seen.add(t)
                            stack.append(t)
                hit = memo[key] = frozenset(seen)
            return hit

        start = closure([s])
        ids = {frozenset(): 0, start: 1}
        order = [frozenset(), start]
        rows = [[0] * (len(cuts) - 1)]
        i = 1
        while i < len(order):
            cur = order[i]
            targets = {}
            for st in cur:
                for clo, chi, t in moves[st]:
                    for c in range(clo, chi + 1):
                        targets.setdefault(c, set()).add(t)
            row = [0] * (len(cuts) - 1)
            for c, ts in targets.items():
                nxt = closure(ts)
                if nxt not in ids:
                    if len(order) > MAX_STATES:
                        raise GrammarError(f"the grammar compiles to more than {MAX_STATES} states; simplify it "
                                           f"(fewer optional parts, smaller repetition counts and lengths)")
                    ids[nxt] = len(order)
                    order.append(nxt)
                row[c] = ids[nxt]
            rows.append(row)
            i += 1
        table, accept = _minimise(np.array(rows, dtype=np.int64), np.array([e in st for st in order], dtype=bool))
        return cls(np.ascontiguousarray(table[:, byte_class].astype(np.int32)), accept)

    def matches(self, data: bytes) -> bool:
        s = self.start
        for b in data:
            s = self.table[s, b]
        return bool(self.accept[s])


def _minimise(table, accept):
    """Moore's partition refinement: states that accept the same continuations merge. table (N, C)
    over byte classes, state 0 dead, 1 the start -> the minimal (M, C) table, same numbering rule."""
    part = accept.astype(np.int64)
    N = len(part)
    cols = np.unique(table, axis=1)             # byte classes no state tells apart refine alike
    mix = np.random.default_rng(0).integers(1, 1 << 62, size=cols.shape[1] + 1, dtype=np.uint64) | np.uint64(1)
    while True:
        sig = np.concatenate([part[:, None], part[cols]], axis=1)                  # (N, C + 1)
        # one 64-bit key per row, split on it, then checked: a collision (never seen) falls back to exact keys
        key = (sig.astype(np.uint64) * mix).sum(axis=1, dtype=np.uint64)
        _, first, new = np.unique(key, return_index=True, return_inverse=True)
        new = new.ravel()
        if not (sig == sig[first[new]]).all():
            new = part
            for c in range(cols.shape[1]):      # one column at a time: keys stay below N * N
                new = np.unique(new * N + part[cols[:, c]], return_inverse=True)[1].ravel()
        if new.max() == part.max():
            break
        part = new
    if part[1] == part[0]:
        raise GrammarError("the grammar matches no text at all")
    blocks = np.unique(part)
    rank = np.empty(blocks.max() + 1, dtype=np.int64)
    rest = [b for b in blocks if b not in (part[0], part[1])]
    rank[[part[0], part[1], *rest]] = np.arange(len(blocks))
    reps = np.empty(len(blocks), dtype=np.int64)
    reps[rank[part[::-1]]] = np.arange(len(part))[::-1]       # each block's first state
    return rank[part[table[reps]]], accept[reps]


# ---- grammars --------------------------------------------------------------------------------------
class Grammar:
    """A compiled grammar: its DFA over bytes. Make one with regex / choice / json_schema /
    json_object (compiled grammars are cached by their source)."""

    def __init__(self, dfa: DFA, kind: str):
        self.dfa, self.kind = dfa, kind
        self._constraints = OrderedDict()

    @staticmethod
    def regex(pattern: str) -> Grammar:
        if not isinstance(pattern, str):         # a request body's value: the cache below needs a string
            raise GrammarError(f"a regular expression must be a string, got {type(pattern).__name__}")
        return _compiled("regex", pattern)

    @staticmethod
    def choice(choices) -> Grammar:
        if not isinstance(choices, (list, tuple)) or not choices or len(choices) > MAX_CHOICES \
                or not all(isinstance(c, str) and c for c in choices):
            raise GrammarError(f"choices must be a list of 1 to {MAX_CHOICES} non-empty strings")
        if sum(len(c) for c in choices) > MAX_PATTERN * 4:
            raise GrammarError(f"the choices total more than {MAX_PATTERN * 4} characters")
        return _compiled("choice", json.dumps(list(choices)))

    @staticmethod
    def json_schema(schema) -> Grammar:
        try:
            key = json.dumps(schema, allow_nan=False)      # property order matters: kept
        except (TypeError, ValueError):
            raise GrammarError("a JSON schema must be JSON data") from None
        return _compiled("json_schema", key)

    @staticmethod
    def json_object() -> Grammar:
        return _compiled("json_object", "")

    @staticmethod
    def tool_call(functions: dict) -> Grammar:
        """One Hermes-style call of one of `functions` ({name: parameters schema}):
        <tool_call>{"name": NAME, "arguments": {...}}</tool_call> (a newline allowed inside each tag)."""
        if not isinstance(functions, dict) or not functions or len(functions) > MAX_PROPERTIES:
            raise GrammarError(f"a tool call needs 1 to {MAX_PROPERTIES} functions")
        try:
            key = json.dumps(functions, allow_nan=False)
        except (TypeError, ValueError):
            raise GrammarError("function parameters must be JSON schemas") from None
        return _compiled("tool_call", key)

    def matches(self, text: str) -> bool:
        """Whether the whole of `text` is in the grammar's language."""
        return self.dfa.matches(text.encode("utf-8"))

    def for_tokens(self, vocab: TokenTable) -> Constraint:
        """This grammar over one vocabulary (kept: the same table gets the same Constraint)."""
        key = id(vocab)
        c = self._constraints.get(key)
        if c is None or c.vocab is not vocab:
            c = Constraint(self.dfa, vocab)
            self._constraints[key] = c
            while len(self._constraints) > 4:
                self._constraints.popitem(last=False)
        return c


@lru_cache(maxsize=32)
def _compiled(kind, source):
    if kind == "regex":
        tree = parse_regex(source)
    elif kind == "choice":
        tree = Alt(tuple(lit(c) for c in json.loads(source)))
    elif kind == "json_object":
        tree = _any_object(_any_value(ANY_DEPTH - 1))
    elif kind == "tool_call":
        calls = []
        for name, schema in json.loads(source).items():
            args = _SchemaCompiler(schema).compile(schema, f"/{name}/parameters")
            calls.append(Seq((lit('{"name":'), WS, lit(_compact(name)), lit(","), WS, lit('"arguments":'), WS,
                              args, lit("}"))))
        newline = Repeat(lit("\n"), 0, 1)
        tree = Seq((lit("<tool_call>"), newline, Alt(tuple(calls)), newline, lit("</tool_call>")))
    else:
        tree = _SchemaCompiler(json.loads(source)).compile(json.loads(source))
    return Grammar(DFA.from_tree(tree), kind)


# ---- 4. over a vocabulary ------------------------------------------------------------------------
class TokenTable:
    """A vocabulary as bytes: ids sorted by byte length (longest first) in a padded byte matrix, so
    one walk from a DFA state over all tokens is a handful of gathers. Special tokens (and ids the
    tokenizer lacks, padding rows of a model's embedding) map to nothing: a constraint never proposes
    them except as stop tokens."""

    def __init__(self, token_bytes, vocab_size):
        self.vocab_size = int(vocab_size)
        lengths = np.array([0 if b is None or len(b) > MAX_TOKEN_BYTES else len(b) for b in token_bytes]
                           + [0] * (self.vocab_size - len(token_bytes)), dtype=np.int64)[:self.vocab_size]
        self.order = np.argsort(-lengths, kind="stable")
        self.lengths = lengths[self.order]
        n_live = int((self.lengths > 0).sum())
        width = int(self.lengths[0]) if n_live else 0
        self.bytes = np.zeros((n_live, width), dtype=np.uint8)
        for row, tid in enumerate(self.order[:n_live]):
            b = token_bytes[tid]
            self.bytes[row, :len(b)] = np.frombuffer(b, dtype=np.uint8)
        self.lengths = self.lengths[:n_live]
        self.first = self.bytes[:, 0] if width else np.zeros(0, dtype=np.uint8)
        self.units = self._units(token_bytes)

    @classmethod
    def of(cls, tok, vocab_size=None) -> TokenTable:
        """The table of a npgpt tokenizer (token_bytes, special_tokens) for a model of vocab_size."""
        n = tok.vocab_size if vocab_size is None else int(vocab_size)
        specials = set(tok.special_tokens.values())
        out = []
        for i in range(min(n, tok.vocab_size)):
            if i in specials:
                out.append(None)
                continue
            try:
                out.append(tok.token_bytes(i))
            except NpgptError:             # a gap in the ids
                out.append(None)
        return cls(out, n)

    def _units(self, token_bytes):
        """Tokens that are one byte, or one whole character whose bytes are not all single-byte
        tokens: the shortest-completion counts walk over these (an upper bound that always exists)."""
        single = {}
        for tid, b in enumerate(token_bytes):
            if b is not None and len(b) == 1:
                single.setdefault(b, tid)
        units = [b for b in single]
        for b in token_bytes:
            if b is not None and 1 < len(b) <= 4 and not all(bytes([x]) in single for x in b):
                try:
                    if len(b.decode("utf-8")) == 1:
                        units.append(b)
                except UnicodeDecodeError:
                    pass
        return list(dict.fromkeys(units))[:4096]


class Constraint:
    """One grammar over one vocabulary: per DFA state, where each token leads (cached) and the fewest
    tokens to an accepting state. `begin()` starts one sequence's Guide."""

    def __init__(self, dfa: DFA, vocab: TokenTable):
        self.dfa, self.vocab = dfa, vocab
        self._rows = OrderedDict()
        self._masks = OrderedDict()            # state -> (tokens that can still close, the farthest one's distance)
        self._max_rows = max(8, CACHE_BYTES // (4 * max(vocab.vocab_size, 1)))
        self.exact, self.work = False, 0        # work: token-bytes walked (bounds the exact distances)
        self.dist = self._distances()
        self.min_tokens = int(self.dist[dfa.start])
        if self.min_tokens >= INF:
            raise GrammarError("no output in this vocabulary can match the grammar (its characters are not "
                               "tokens of this model)")

    def _distances(self):
        """Fewest tokens from each state to an accepting one (INF: none), by BFS backwards over the
        state graph. Exact (every token's edge from every state) while the walks stay within
        EXACT_BUDGET token-bytes; past it, the states walked so far keep their edges and every state
        adds its unit tokens' (single bytes and characters): an upper bound, always reachable."""
        table, N, v = self.dfa.table, len(self.dfa.table), self.vocab
        src, dst = [], []
        self.work, self.exact = 0, True
        for state in range(1, N):
            nxt = np.unique(self.dest_row(state))
            src.append(np.full(len(nxt), state))
            dst.append(nxt)
            if self.work > EXACT_BUDGET:
                self.exact = False
                break
        if not self.exact:                     # the walked states' edges, and unit tokens' edges everywhere
            dests = []
            for u in v.units:
                d = np.arange(N, dtype=np.int32)
                for b in u:
                    d = table[d, b]
                dests.append(d)
            D = np.stack(dests, axis=1) if dests else np.zeros((N, 0), dtype=np.int32)     # (N, U)
            src.append(np.repeat(np.arange(N), D.shape[1]))
            dst.append(D.ravel())
        src, dst = np.concatenate(src), np.concatenate(dst)
        keep = (dst != 0) & (src != 0)
        pairs = np.unique(src[keep].astype(np.int64) * N + dst[keep])
        src, dst = pairs // N, pairs % N
        by_dst = np.argsort(dst, kind="stable")
        src, dst = src[by_dst], dst[by_dst]
        starts = np.searchsorted(dst, np.arange(N + 1))
        dist = np.full(N, INF, dtype=np.int64)
        frontier = list(np.flatnonzero(self.dfa.accept))
        dist[frontier] = 0
        level = 0
        while frontier:
            level += 1
            nxt = []
            for d in frontier:
                for s in src[starts[d]:starts[d + 1]]:
                    if dist[s] == INF:
                        dist[s] = level
                        nxt.append(s)
            frontier = nxt
        dist[0] = INF
        return dist

    def dest_row(self, state) -> np.ndarray:
        """(V,) int32: the state each token leads to from `state` (0: dead or not a text token)."""
        row = self._rows.get(state)
        if row is not None:
            self._rows.move_to_end(state)
            return row
        row = self._walk(state)
        self._rows[state] = row
        if len(self._rows) > self._max_rows:
            self._rows.popitem(last=False)
        return row

    def _walk(self, state):
        """Every token's bytes from `state` at once, dropping tokens as they die or end: a state that
        allows few first bytes (most of a JSON schema's) costs little more than one gather."""
        v, table = self.vocab, self.dfa.table
        out = np.zeros(len(v.bytes), dtype=np.int32)
        d = table[state, v.first]
        pos = np.flatnonzero(d)
        d = d[pos]
        j = 1
        while pos.size:
            self.work += pos.size
            ends = v.lengths[pos] == j
            out[pos[ends]] = d[ends]
            pos, d = pos[~ends], d[~ends]
            if not pos.size:
                break
            d = table[d, v.bytes[pos, j]]
            alive = d != 0
            pos, d = pos[alive], d[alive]
            j += 1
        row = np.zeros(v.vocab_size, dtype=np.int32)
        row[v.order[:len(out)]] = out
        return row

    def mask(self, state, remaining) -> np.ndarray:
        """(V,) bool: tokens from `state` that stay in the language and leave a value that can close
        within remaining - 1 more tokens. Far from the budget (every destination can close in time) it
        is the state's cached mask; near it, one gather and compare."""
        hit = self._masks.get(state)
        if hit is None:
            d = self.dist[self.dest_row(state)]
            live = d < INF
            hit = self._masks[state] = (live, int(d[live].max(initial=0)))
            if len(self._masks) > 2 * self._max_rows:
                self._masks.popitem(last=False)
        live, far = hit
        if remaining - 1 >= far:
            return live
        return self.dist[self.dest_row(state)] <= remaining - 1

    def begin(self, stop_ids=()) -> Guide:
        return Guide(self, stop_ids)


class Guide:
    """One sequence under a Constraint: `allowed(remaining)` -> bool mask (V,) of the tokens that keep
    the output in the language and able to close within `remaining` tokens (this one included);
    `advance(token)` moves along. Stop tokens are allowed where the output is complete."""

    def __init__(self, constraint: Constraint, stop_ids=()):
        self.c, self.state = constraint, constraint.dfa.start
        V = constraint.vocab.vocab_size
        self.stop_ids = np.array([t for t in stop_ids if 0 <= t < V], dtype=np.int64)

    @property
    def complete(self) -> bool:
        """Whether the output so far is a whole value of the language."""
        return bool(self.c.dfa.accept[self.state])

    def allowed(self, remaining: int) -> np.ndarray:
        ok = self.c.mask(self.state, remaining)           # dist[0] is INF: dead tokens are out
        if self.complete and len(self.stop_ids):
            ok = ok.copy()                                # the mask may be the constraint's cached one
            ok[self.stop_ids] = True
        return ok

    def advance(self, token: int):
        if token in self.stop_ids:
            return
        nxt = int(self.c.dest_row(self.state)[token])
        if nxt == 0:
            raise NpgptError(f"token {token} does not continue the constrained output")
        self.state = nxt


def constraint_for(tok, vocab_size=None, json_schema=None, regex=None, choice=None, json_object=False):
    """The library's one call: a Constraint for `tok` (and a model of vocab_size) from exactly one of
    json_schema, regex, choice or json_object=True. Pass it as SamplingParams(constraint=...)."""
    given = [x for x in (json_schema is not None, regex is not None, choice is not None, bool(json_object)) if x]
    if len(given) != 1:
        raise GrammarError("give exactly one of json_schema, regex, choice, json_object")
    if json_schema is not None:
        g = Grammar.json_schema(json_schema)
    elif regex is not None:
        g = Grammar.regex(regex)
    elif choice is not None:
        g = Grammar.choice(choice)
    else:
        g = Grammar.json_object()
    return g.for_tokens(token_table(tok, vocab_size))


_TABLES = OrderedDict()


def token_table(tok, vocab_size=None) -> TokenTable:
    """The TokenTable of `tok` (cached per tokenizer object and size: building one walks the vocabulary)."""
    key = (id(tok), vocab_size, tok.vocab_size)
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is tok:
        return hit[1]
    table = TokenTable.of(tok, vocab_size)
    _TABLES[key] = (tok, table)
    while len(_TABLES) > 4:
        _TABLES.popitem(last=False)
    return table
