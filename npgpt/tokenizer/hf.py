"""Hugging Face `tokenizer.json`: the byte-level BPE tokenizers of GPT-2, Llama 3, Qwen2 and SmolLM2.

A `tokenizer.json` (the format of the `tokenizers` library) describes a pipeline; npgpt reads the
parts byte-level BPE models use and refuses the rest by name:

    added_tokens    strings cut out of the text first, each becoming its own id. `special` ones
                    (`<|im_start|>`, `<|begin_of_text|>`) are npgpt special tokens (see `base`:
                    `encode` refuses them unless allowed); the others always match. `lstrip` /
                    `rstrip` swallow the whitespace beside a match, `single_word` matches only
                    between non-word characters, `normalized` ones are matched after the normalizer.
    normalizer      null, NFC (Qwen2), NFD, NFKC, NFKD, or a Sequence of these
    pre_tokenizer   how each remaining piece is cut into pre-tokens, in steps:
                      ByteLevel  {add_prefix_space, use_regex}: GPT-2's split when use_regex
                      Split      {pattern: {Regex | String}, behavior, invert}: Llama 3 and Qwen2
                      Digits     {individual_digits}: SmolLM2 puts every digit on its own
                      Sequence   {pretokenizers: [...]} of the above
                    A Split regex other than the named patterns (npgpt.tokenizer.bpe.PATTERNS) needs
                    the user's trust, as any pattern from a file does (see `bpe.check_pattern`).
    model           {"type": "BPE", vocab, merges, ignore_merges}: tokens spelled in GPT-2's byte
                    alphabet (`files.bytes_to_unicode`); merges as "left right" strings or pairs.
                    `ignore_merges` (Llama 3) takes a pre-token that is itself a token as is.
    post_processor  null, ByteLevel (changes no ids), TemplateProcessing (Llama 3 adds
                    `<|begin_of_text|>`), or a Sequence of these: applied when
                    `encode(..., add_special_tokens=True)` asks for it, as in `tokenizers`.

`tokenizer_config.json` beside it names `bos_token`, `eos_token`, `pad_token` and holds the model's
Jinja `chat_template` (a `chat_template.jinja` file wins over it, as in transformers).

Encoding equals the tokenizers library's (tests/test_tokenizer_hf.py checks it on generated text) for
characters in the Unicode version Python's and the `regex` module's tables share with Oniguruma's; a
character assigned since may be classed differently (a letter to one, unassigned to the other).

SentencePiece-style files (Llama 2, TinyLlama, Mistral: Metaspace, byte_fallback) and other models
(Unigram, WordPiece, WordLevel) are refused with an error naming what they are.

The in-memory tokenizer is built from parts (`HFTokenizer(vocab, merges, added_tokens,
pre_tokenizer=...)`), so a GGUF file's metadata can build one too; `PRE_TOKENIZERS` holds the named
pre-tokenizer specs. Every file is read as a stranger's: JSON through npgpt.safeio's limits, counts
and string lengths bounded before anything is built, ids dense (exactly 0..n-1).
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import regex

from npgpt.errors import NpgptError
from npgpt.fileio import write_files_atomically
from npgpt.safeio import read_json, read_limited
from npgpt.tokenizer.base import META_FILE, alternation, regroup_at_safe_cuts
from npgpt.tokenizer.bpe import GPT2_PATTERN, LLAMA3_PATTERN, PATTERNS, QWEN2_PATTERN, BPETokenizer, check_pattern
from npgpt.tokenizer.files import bytes_to_gpt2_string, gpt2_string_to_bytes

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

MAX_VOCAB = 1 << 21          # entries in vocab or merges (the largest real vocabularies hold ~256k)
MAX_ADDED = 1 << 17          # added tokens (Llama 3 has 256)
MAX_TOKEN_CHARS = 1 << 12    # characters in one token string
MAX_PATTERN_CHARS = 1 << 12  # characters in a Split regex
MAX_STEPS = 32               # pre-tokenizer / normalizer / post-processor steps
MAX_TEMPLATE_CHARS = 1 << 20  # a chat template (real ones are a few kB)

SENTENCEPIECE_HINT = ("a SentencePiece-style BPE tokenizer (Metaspace / byte_fallback, as in Llama 2, TinyLlama "
                      "and Mistral), which is not supported yet; npgpt reads byte-level BPE tokenizers (GPT-2, "
                      "Llama 3, Qwen2, SmolLM2)")

# Named pre-tokenizers, as tokenizer.json spells them (GGUF's `tokenizer.ggml.pre` names map here).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTE_LEVEL_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def _split_spec(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS = {
    "gpt2": _BYTE_LEVEL,
    "llama3": {"type": "Sequence", "pretokenizers": [_split_spec(LLAMA3_PATTERN), _BYTE_LEVEL_NO_REGEX]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split_spec(QWEN2_PATTERN), _BYTE_LEVEL_NO_REGEX]},
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


@dataclass(frozen=True)
class AddedToken:
    """One entry of tokenizer.json's `added_tokens` (field names as the file spells them)."""
    id: int
    content: str
    special: bool = True
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False


# ------------------------------------------------------------------------------ small readers

def _fail(where, what: str) -> NpgptError:
    return NpgptError(f"{where}: {what}; restore the file from the model you downloaded")


def _get(spec: dict, key: str, kind, where, default=None):
    """spec[key], checked to be of `kind` (bool is not an int); `default` when absent or null."""
    value = spec.get(key)
    if value is None:
        return default
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise _fail(where, f"field {key!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _check_token_string(s, where) -> str:
    if not isinstance(s, str) or not s:
        raise _fail(where, f"a token must be a non-empty string, got {s!r:.60}")
    if len(s) > MAX_TOKEN_CHARS:
        raise _fail(where, f"a token of {len(s)} characters is longer than {MAX_TOKEN_CHARS}")
    return s


def _check_id(i, where) -> int:
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
        raise _fail(where, f"token ids must be non-negative integers, got {i!r:.40}")
    return i


# ------------------------------------------------------------------------------ normalizers

_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


def _normalizer_steps(spec, where, depth=0) -> list[str]:
    """A normalizer spec as a list of Unicode normal forms applied in order ([] for none)."""
    if spec is None:
        return []
    if not isinstance(spec, dict):
        raise _fail(where, "'normalizer' must be an object or null")
    kind = spec.get("type")
    if kind in _UNICODE_FORMS:
        return [kind]
    if kind == "Sequence" and depth < 2:
        steps = _get(spec, "normalizers", list, where, [])
        if len(steps) > MAX_STEPS:
            raise _fail(where, f"the normalizer has {len(steps)} steps, more than {MAX_STEPS}")
        return [form for step in steps for form in _normalizer_steps(step, where, depth + 1)]
    if kind in ("Prepend", "Replace"):
        raise NpgptError(f"{where} is {SENTENCEPIECE_HINT}")
    raise NpgptError(f"{where}: normalizer {kind!r} is not supported yet (npgpt reads none, NFC, NFD, NFKC, "
                     f"NFKD and Sequences of them)")


# ----------------------------------------------------------------------------- pre-tokenizers

_BEHAVIOURS = ("Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous")
_NUMBER = regex.compile(r"\p{N}")          # Rust's char::is_numeric: general categories Nd, Nl, No
_BYTE_LEVEL_REGEX = regex.compile(GPT2_PATTERN)
_LAST_CUT_BEFORE_SPACE = regex.compile(r"\p{L}(?= )", regex.REVERSE)


def split_by(text: str, pattern: regex.Pattern, behavior: str, invert: bool = False) -> list[str]:
    """`text` cut by the matches of `pattern` as the tokenizers library cuts it (empty pieces dropped).

    The text is a run of alternating gaps and matches; `invert` swaps which is which. Isolated keeps
    each as a piece, Removed drops the matches, MergedWithPrevious / MergedWithNext glue a match to the
    gap before / after it, Contiguous glues runs of adjacent matches together.
    """
    runs: list[list] = []            # [start, end, is_match]
    prev = 0
    for m in pattern.finditer(text):
        if m.start() != prev:
            runs.append([prev, m.start(), invert])
        runs.append([m.start(), m.end(), not invert])
        prev = m.end()
    if prev != len(text) or not runs:
        runs.append([prev, len(text), invert])
    if behavior == "Isolated":
        kept = runs
    elif behavior == "Removed":
        kept = [r for r in runs if not r[2]]
    else:
        kept = []
        previous_match = False
        order = reversed(runs) if behavior == "MergedWithNext" else runs
        for start, end, is_match in order:
            if behavior == "Contiguous":
                glue = is_match == previous_match and kept
            else:
                glue = is_match and not previous_match and kept
            if glue:
                if behavior == "MergedWithNext":
                    kept[-1][0] = start
                else:
                    kept[-1][1] = end
            else:
                kept.append([start, end, False])
            previous_match = is_match
        if behavior == "MergedWithNext":
            kept.reverse()
    return [text[start:end] for start, end, *_ in kept if end > start]


class _ByteLevel:
    def __init__(self, add_prefix_space: bool, use_regex: bool):
        self.add_prefix_space, self.use_regex = add_prefix_space, use_regex

    def __call__(self, piece: str) -> list[str]:
        if self.add_prefix_space and not piece.startswith(" "):
            piece = " " + piece
        return split_by(piece, _BYTE_LEVEL_REGEX, "Isolated") if self.use_regex else [piece]


class _Split:
    def __init__(self, pattern: regex.Pattern, behavior: str, invert: bool):
        self.pattern, self.behavior, self.invert = pattern, behavior, invert

    def __call__(self, piece: str) -> list[str]:
        return split_by(piece, self.pattern, self.behavior, self.invert)


class _Digits:
    def __init__(self, individual: bool):
        self.behavior = "Isolated" if individual else "Contiguous"

    def __call__(self, piece: str) -> list[str]:
        return split_by(piece, _NUMBER, self.behavior)


def _pre_tokenizer_steps(spec, where, trust_pattern, depth=0) -> list:
    """A pre_tokenizer spec as a list of callables piece -> pieces."""
    if spec is None:
        raise NpgptError(f"{where}: a tokenizer without a pre_tokenizer is not a byte-level BPE; npgpt reads "
                         f"byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2) only")
    if not isinstance(spec, dict):
        raise _fail(where, "'pre_tokenizer' must be an object")
    kind = spec.get("type")
    if kind == "ByteLevel":
        return [_ByteLevel(_get(spec, "add_prefix_space", bool, where, False),
                           _get(spec, "use_regex", bool, where, True))]
    if kind == "Split":
        pattern = _get(spec, "pattern", dict, where)
        behavior = _get(spec, "behavior", str, where)
        if behavior not in _BEHAVIOURS:
            raise _fail(where, f"Split behavior {behavior!r} is not one of {', '.join(_BEHAVIOURS)}")
        if pattern is None or len(pattern) != 1 or not isinstance(next(iter(pattern.values())), str):
            raise _fail(where, "a Split pattern must be {\"Regex\": ...} or {\"String\": ...}")
        (form, text), = pattern.items()
        if len(text) > MAX_PATTERN_CHARS:
            raise _fail(where, f"a Split pattern of {len(text)} characters is longer than {MAX_PATTERN_CHARS}")
        if form == "String":
            compiled = regex.compile(regex.escape(text)) if text else regex.compile(r"(?!)")
        elif form == "Regex":
            text = check_pattern(text, where, trust_pattern)
            try:
                compiled = regex.compile(PATTERNS.get(text, text))
            except regex.error as e:
                raise _fail(where, f"the Split regex does not compile ({e})") from None
        else:
            raise _fail(where, f"a Split pattern must be Regex or String, not {form!r}")
        return [_Split(compiled, behavior, _get(spec, "invert", bool, where, False))]
    if kind == "Digits":
        return [_Digits(_get(spec, "individual_digits", bool, where, False))]
    if kind == "Sequence" and depth < 2:
        steps = _get(spec, "pretokenizers", list, where, [])
        if len(steps) > MAX_STEPS:
            raise _fail(where, f"the pre_tokenizer has {len(steps)} steps, more than {MAX_STEPS}")
        return [f for step in steps for f in _pre_tokenizer_steps(step, where, trust_pattern, depth + 1)]
    if kind == "Metaspace":
        raise NpgptError(f"{where} is {SENTENCEPIECE_HINT}")
    raise NpgptError(f"{where}: pre_tokenizer {kind!r} is not supported yet (npgpt reads ByteLevel, Split, "
                     f"Digits and Sequences of them)")


def _is_byte_level(spec, depth=0) -> bool:
    if not isinstance(spec, dict) or depth > 2:
        return False
    if spec.get("type") == "ByteLevel":
        return True
    return spec.get("type") == "Sequence" and any(
        _is_byte_level(s, depth + 1) for s in spec.get("pretokenizers") or [])


# ---------------------------------------------------------------------------- post-processors

def _template_single(spec, where, ids_of, depth=0) -> list | None:
    """The `single` template of a post_processor as [int | "A", ...] (None: adds nothing)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise _fail(where, "'post_processor' must be an object or null")
    kind = spec.get("type")
    if kind == "ByteLevel":
        return None                      # trims offsets only; the ids stay as they are
    if kind == "Sequence" and depth < 2:
        steps = _get(spec, "processors", list, where, [])
        if len(steps) > MAX_STEPS:
            raise _fail(where, f"the post_processor has {len(steps)} steps, more than {MAX_STEPS}")
        found = [t for t in (_template_single(s, where, ids_of, depth + 1) for s in steps) if t is not None]
        if len(found) > 1:
            raise NpgptError(f"{where}: a post_processor with two templates is not supported yet")
        return found[0] if found else None
    if kind == "TemplateProcessing":
        specials = _get(spec, "special_tokens", dict, where, {})
        if len(specials) > MAX_STEPS:
            raise _fail(where, f"the post_processor names {len(specials)} special tokens, more than {MAX_STEPS}")
        single = _get(spec, "single", list, where, [])
        if len(single) > MAX_STEPS:
            raise _fail(where, f"the post_processor template has {len(single)} parts, more than {MAX_STEPS}")
        out: list = []
        for part in single:
            if not isinstance(part, dict) or len(part) != 1:
                raise _fail(where, "each part of a TemplateProcessing template is {SpecialToken: ...} or {Sequence: ...}")
            (form, body), = part.items()
            if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                raise _fail(where, f"template part {part!r:.80} lacks its 'id'")
            if form == "Sequence":
                if body["id"] != "A":
                    raise _fail(where, f"a single-sequence template can only hold sequence A, not {body['id']!r}")
                out.append("A")
            elif form == "SpecialToken":
                entry = specials.get(body["id"])
                if not isinstance(entry, dict) or not isinstance(entry.get("ids"), list) or len(entry["ids"]) > MAX_STEPS:
                    raise _fail(where, f"the template's special token {body['id']!r} is not in its special_tokens")
                for token_id in entry["ids"]:
                    out.append(ids_of(_check_id(token_id, where)))
            else:
                raise _fail(where, f"template part {form!r} is not SpecialToken or Sequence")
        if out.count("A") != 1:
            raise _fail(where, "the post_processor's single template must hold sequence A once")
        return out
    raise NpgptError(f"{where}: post_processor {kind!r} is not supported yet (npgpt reads ByteLevel, "
                     f"TemplateProcessing and Sequences of them)")


# ---------------------------------------------------------------------------------- tokenizer

class HFTokenizer(BPETokenizer):
    """A byte-level BPE tokenizer read from tokenizer.json (or built from a GGUF file's parts)."""

    kind = "hf"
    partial_bytes = True          # as the tokenizers library: a byte without a token is dropped

    def __init__(self, vocab: dict[bytes, int], merges: list[tuple[bytes, bytes]],
                 added_tokens: list[AddedToken] = (), pre_tokenizer: dict | str = "gpt2",
                 normalizer: dict | None = None, post_processor: dict | None = None, ignore_merges: bool = False,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, trust_pattern: bool = False, where: str = "tokenizer",
                 extra_vocab: dict[str, int] | None = None):
        """Build from parts: ordinary tokens `{bytes: id}`, merges as byte pairs in rank order, the
        added tokens, and the pipeline specs as tokenizer.json spells them (`pre_tokenizer` may be a
        name in PRE_TOKENIZERS). `extra_vocab` holds model-vocabulary strings outside the byte
        alphabet (decodable by their UTF-8, never produced by merges). `bos_token` / `eos_token` /
        `pad_token` name tokens of the vocabulary."""
        if isinstance(pre_tokenizer, str):
            if pre_tokenizer not in PRE_TOKENIZERS:
                raise NpgptError(f"unknown pre-tokenizer {pre_tokenizer!r}; named ones are {sorted(PRE_TOKENIZERS)}")
            pre_tokenizer = PRE_TOKENIZERS[pre_tokenizer]
        self.added_tokens = sorted(added_tokens, key=lambda t: t.id)
        self.pre_tokenizer_spec, self.normalizer_spec, self.post_processor_spec = pre_tokenizer, normalizer, post_processor
        self._steps = _pre_tokenizer_steps(pre_tokenizer, where, trust_pattern)
        self._forms = _normalizer_steps(normalizer, where)
        self.ignore_merges = bool(ignore_merges)
        self.extra_vocab = dict(extra_vocab or {})

        by_content: dict[str, AddedToken] = {}
        if len({t.id for t in self.added_tokens}) != len(self.added_tokens):
            raise _fail(where, "two added tokens share an id")
        for t in self.added_tokens:
            if t.content in by_content:
                raise _fail(where, f"added token {t.content!r:.60} is listed twice")
            by_content[t.content] = t
        # An added token may repeat a model token under the same id (GPT-2's <|endoftext|>): it is
        # then the added token, and leaves the ordinary vocabulary.
        ordinary = dict(vocab)
        for t in self.added_tokens:
            token = t.content.encode("utf-8")
            if ordinary.get(token) == t.id:
                del ordinary[token]
        taken = set(ordinary.values()) | set(self.extra_vocab.values())
        clash = next((t for t in self.added_tokens if t.id in taken), None)
        if clash is not None:
            raise _fail(where, f"added token {clash.content!r:.60} has id {clash.id}, which an ordinary token also has")
        self._model_vocab = dict(vocab)          # what ignore_merges looks a whole pre-token up in
        specials = {t.content: t.id for t in self.added_tokens if t.special}
        super().__init__(ordinary, merges, specials, pattern="gpt2")
        self.pattern = None
        for token_id, token in [(t.id, t.content) for t in self.added_tokens if not t.special] + \
                [(i, s) for s, i in self.extra_vocab.items()]:
            if token_id >= len(self._id_to_bytes):
                self._id_to_bytes += [None] * (token_id + 1 - len(self._id_to_bytes))
            self._id_to_bytes[token_id] = token.encode("utf-8")
        self._ids_dense(where)
        self._added = by_content
        self._normalized_added = {self._normalize(t.content): t for t in self.added_tokens if t.normalized}
        self._added_regex_cache: dict[tuple, regex.Pattern | None] = {}
        self._template = _template_single(post_processor, where, self._id_in_vocab)
        self.bos_token, self.eos_token, self.pad_token = (
            self._name_token(bos_token, "bos_token", where), self._name_token(eos_token, "eos_token", where),
            self._name_token(pad_token, "pad_token", where))
        self.chat_template = chat_template

    def _ids_dense(self, where) -> None:
        gap = next((i for i, t in enumerate(self._id_to_bytes) if t is None), None)
        if gap is not None:
            raise _fail(where, f"no token has id {gap} though ids run to {len(self._id_to_bytes) - 1}; "
                               f"ids must be exactly 0..n-1")

    def _id_in_vocab(self, token_id: int) -> int:
        if token_id >= self.vocab_size:
            raise NpgptError(f"the post_processor names token id {token_id}, outside the vocabulary "
                             f"(0..{self.vocab_size - 1})")
        return token_id

    def _name_token(self, name, field, where) -> str | None:
        if name is None:
            return None
        if name in self._added or name.encode("utf-8") in self._model_vocab:
            return name
        raise NpgptError(f"{where}: {field} {name!r:.60} is not a token of this vocabulary; restore the files "
                         f"from the model you downloaded")

    # ------------------------------------------------------------------------------- ids

    def token_id(self, name: str) -> int:
        """Id of a token given by its text (an added token, or an ordinary token's UTF-8)."""
        if name in self._added:
            return self._added[name].id
        found = self._model_vocab.get(name.encode("utf-8"))
        if found is None:
            raise NpgptError(f"{name!r} is not a token of this tokenizer")
        return found

    @property
    def eot_id(self) -> int:
        """The end-of-sequence id: tokenizer_config's eos_token, else `<|endoftext|>`."""
        if self.eos_token is not None:
            return self.token_id(self.eos_token)
        return super().eot_id

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_id(self.bos_token)

    @property
    def add_bos(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` puts a token before the text."""
        return bool(self._template) and self._template[0] != "A"

    # --------------------------------------------------------------------------- encoding

    def _normalize(self, text: str) -> str:
        for form in self._forms:
            text = unicodedata.normalize(form, text)
        return text

    def normalize_text(self, text: str) -> str:
        return self._normalize(text)

    def _split(self, text: str) -> list[str]:
        pieces = [text]
        for step in self._steps:
            pieces = [p for piece in pieces for p in step(piece) if p]
        return pieces

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        if self.ignore_merges:
            whole = self._model_vocab.get(piece.encode("utf-8"))
            if whole is not None:
                return (whole,)
        return super()._encode_piece(piece)

    def _added_regex(self, allowed: frozenset, normalized: bool) -> regex.Pattern | None:
        """Leftmost-longest matcher of the added tokens that may match (`normalized` ones, or not)."""
        key = (allowed, normalized)
        if key not in self._added_regex_cache:
            names = [t.content if not normalized else self._normalize(t.content) for t in self.added_tokens
                     if t.normalized == normalized and (not t.special or t.content in allowed)]
            self._added_regex_cache[key] = alternation(names) if names else None
        return self._added_regex_cache[key]

    def _cut_added(self, text: str, pattern: regex.Pattern | None, normalized: bool) -> list:
        """`text` as a list of plain strings and added-token ids, as tokenizers' AddedVocabulary cuts it."""
        if pattern is None or not text:
            return [text] if text else []
        lookup = self._normalized_added if normalized else self._added
        out: list = []
        done = 0
        for m in pattern.finditer(text):
            token = lookup[m.group()]
            start, stop = m.start(), m.end()
            if token.single_word and ((start > 0 and regex.search(r"\w\Z", text[:start]))
                                      or (stop < len(text) and regex.match(r"\w", text[stop:]))):
                continue
            if token.lstrip:
                start = max(done, start - (len(text[:start]) - len(text[:start].rstrip())))
            if token.rstrip:
                stop += len(text[stop:]) - len(text[stop:].lstrip())
            if done < start:
                out.append(text[done:start])
            out.append(token.id)
            done = stop
        if done < len(text):
            out.append(text[done:])
        return out

    def _encode_ordinary(self, text: str, offset: int) -> list[int]:
        return self._encode_segments(text, frozenset())

    def _encode_segments(self, text: str, allowed: frozenset) -> list[int]:
        ids: list[int] = []
        for part in self._cut_added(text, self._added_regex(allowed, False), False):
            if isinstance(part, int):
                ids.append(part)
                continue
            for sub in self._cut_added(self._normalize(part), self._added_regex(allowed, True), True):
                if isinstance(sub, int):
                    ids.append(sub)
                else:
                    ids += super()._encode_ordinary(sub, 0)
        return ids

    def encode(self, text: str, allowed_special=frozenset(), disallowed_special="all",
               add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`. Special tokens follow npgpt's rules (see `base`); non-special added tokens
        always match. `add_special_tokens=True` applies the post_processor (Llama 3's BOS), so
        `encode(text, allowed_special="all", add_special_tokens=b)` equals the tokenizers library's
        `encode(text, add_special_tokens=b).ids`."""
        if not isinstance(text, str):
            raise NpgptError(f"encode expects a str, got {type(text).__name__}")
        allowed, disallowed = self._resolve_specials(allowed_special, disallowed_special)
        if disallowed:
            self._refuse_specials(text, disallowed)
        ids = self._encode_segments(text, allowed)
        if add_special_tokens and self._template:
            ids = [i for part in self._template for i in (ids if part == "A" else (part,))]
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt typed by the user, as transformers tokenizes one: special-token strings become their
        ids and the post_processor adds what it adds (Llama 3's BOS)."""
        return self.encode(text, allowed_special="all", add_special_tokens=True)

    def _safe_cut(self, text: str) -> int:
        # A letter before whitespace ends a pre-token in every named split; with add_prefix_space the
        # next piece must start with a space, or a space would be added there.
        if any(isinstance(s, _ByteLevel) and s.add_prefix_space for s in self._steps):
            found = _LAST_CUT_BEFORE_SPACE.search(text)
            return found.end() if found else 0
        return super()._safe_cut(text)

    def split_stream(self, chunks):
        return regroup_at_safe_cuts(chunks, self._safe_cut, self._added)

    def _append_special(self, name: str, token_id: int) -> None:
        super()._append_special(name, token_id)
        token = AddedToken(token_id, name, special=True)
        self.added_tokens.append(token)
        self._added[name] = token
        self._added_regex_cache.clear()

    # ------------------------------------------------------------------------- persistence

    def _canonical(self) -> dict:
        table = self._id_to_bytes
        return {"kind": self.kind, "tokens": [t.hex() for t in table],
                "added": [asdict(t) for t in self.added_tokens], "merges": [list(p) for p in self.merges],
                "pre_tokenizer": self.pre_tokenizer_spec, "normalizer": self.normalizer_spec,
                "post_processor": self.post_processor_spec, "ignore_merges": self.ignore_merges}

    def to_json(self) -> dict:
        """This tokenizer as a tokenizer.json object (the tokenizers library reads it back)."""
        vocab = {bytes_to_gpt2_string(token): token_id for token, token_id in self._model_vocab.items()}
        vocab.update(self.extra_vocab)
        # An added token whose id falls inside the model's id range must be in the model's vocab too (as
        # GPT-2's and SmolLM2's files have them), or the tokenizers library gives it a new id at the end.
        top = max(vocab.values(), default=-1)
        vocab.update({t.content: t.id for t in self.added_tokens if t.id < top and t.content not in vocab})
        table = self._id_to_bytes
        merges = [[bytes_to_gpt2_string(table[a]), bytes_to_gpt2_string(table[b])] for a, b in self.merges]
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [asdict(t) for t in self.added_tokens],
            "normalizer": self.normalizer_spec, "pre_tokenizer": self.pre_tokenizer_spec,
            "post_processor": self.post_processor_spec,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": self.ignore_merges,
                      "vocab": dict(sorted(vocab.items(), key=lambda kv: kv[1])), "merges": merges},
        }

    def save(self, folder) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `folder`."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for field in ("bos_token", "eos_token", "pad_token"):
            if getattr(self, field) is not None:
                config[field] = getattr(self, field)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_files_atomically(folder, {
            TOKENIZER_JSON: json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n",
            TOKENIZER_CONFIG: json.dumps(config, ensure_ascii=False, indent=1) + "\n",
        })
        for stale in (META_FILE, CHAT_TEMPLATE_FILE):   # another tokenizer's files would win over these
            (Path(folder) / stale).unlink(missing_ok=True)

    # ----------------------------------------------------------------------------- reading

    @classmethod
    def from_folder(cls, folder, trust_pattern: bool = False) -> HFTokenizer:
        """Read `folder`/tokenizer.json and, when present, tokenizer_config.json and chat_template.jinja."""
        folder = Path(folder)
        config = read_tokenizer_config(folder)
        template = config.get("chat_template")
        jinja = folder / CHAT_TEMPLATE_FILE
        if jinja.is_file():
            try:
                template = read_limited(jinja, "chat template", MAX_TEMPLATE_CHARS).decode("utf-8")
            except UnicodeDecodeError:
                raise NpgptError(f"{jinja} is not valid UTF-8; restore the file from the model you downloaded") from None
        return cls.from_json(read_json(folder / TOKENIZER_JSON, "tokenizer file"), folder / TOKENIZER_JSON,
                             trust_pattern=trust_pattern, bos_token=config.get("bos_token"),
                             eos_token=config.get("eos_token"), pad_token=config.get("pad_token"),
                             chat_template=template)

    @classmethod
    def from_json(cls, data, where="tokenizer.json", trust_pattern: bool = False, **names) -> HFTokenizer:
        """Build from a parsed tokenizer.json object (checked here: it may come from anyone); `names`:
        bos_token, eos_token, pad_token, chat_template (tokenizer_config.json's)."""
        if not isinstance(data, dict):
            raise _fail(where, "the file must hold a JSON object")
        model = data.get("model")
        if not isinstance(model, dict):
            raise _fail(where, "'model' must be an object")
        kind = model.get("type", "BPE" if "merges" in model else None)
        if kind in ("Unigram", "WordPiece", "WordLevel"):
            raise NpgptError(f"{where} holds a {kind} tokenizer, which is not supported yet; npgpt reads byte-level "
                             f"BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2)")
        if kind != "BPE":
            raise _fail(where, f"unknown model type {kind!r}")
        if model.get("byte_fallback") or not _is_byte_level(data.get("pre_tokenizer")):
            raise NpgptError(f"{where} is {SENTENCEPIECE_HINT}" if model.get("byte_fallback")
                             or (data.get("pre_tokenizer") or {}).get("type") == "Metaspace" else
                             f"{where} has no ByteLevel pre_tokenizer, so it is not a byte-level BPE; npgpt reads "
                             f"byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2) only")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise NpgptError(f"{where}: a BPE with {key} {model[key]!r} is not supported yet")
        if model.get("dropout"):
            raise NpgptError(f"{where}: BPE dropout is for training; save the tokenizer without it")

        raw_vocab = _get(model, "vocab", dict, where)
        raw_merges = _get(model, "merges", list, where, [])
        raw_added = _get(data, "added_tokens", list, where, [])
        if raw_vocab is None:
            raise _fail(where, "the BPE model has no 'vocab'")
        for name, items, limit in (("vocab", raw_vocab, MAX_VOCAB), ("merges", raw_merges, MAX_VOCAB),
                                   ("added_tokens", raw_added, MAX_ADDED)):
            if len(items) > limit:
                raise _fail(where, f"{name} has {len(items)} entries, more than npgpt reads ({limit})")

        added = []
        for entry in raw_added:
            if not isinstance(entry, dict):
                raise _fail(where, "each added token must be an object")
            flags = {k: _get(entry, k, bool, where, d) for k, d in
                     (("special", False), ("single_word", False), ("lstrip", False), ("rstrip", False),
                      ("normalized", False))}
            added.append(AddedToken(_check_id(entry.get("id"), where),
                                    _check_token_string(entry.get("content"), where), **flags))

        n_ids = len(raw_vocab) + len(added)     # no id may reach past every entry: ids size allocations
        vocab: dict[bytes, int] = {}
        extra: dict[str, int] = {}
        added_content = {t.content: t.id for t in added}
        for s, token_id in raw_vocab.items():
            _check_token_string(s, where)
            if _check_id(token_id, where) >= n_ids:
                raise _fail(where, f"token {s!r:.40} has id {token_id}, beyond the {n_ids} entries")
            token = gpt2_string_to_bytes(s)
            if token is None:
                if added_content.get(s) != token_id:
                    extra[s] = token_id
                continue
            if token in vocab:
                raise _fail(where, f"two vocab entries spell the bytes {token!r:.40}")
            vocab[token] = token_id
        if len(set(vocab.values()) | set(extra.values())) != len(vocab) + len(extra):
            raise _fail(where, "two vocab entries share an id")
        for t in added:
            if t.id >= n_ids:
                raise _fail(where, f"added token {t.content!r:.40} has id {t.id}, beyond the {n_ids} entries")

        merges = []
        for rank, m in enumerate(raw_merges):
            if isinstance(m, str):
                parts = m.split(" ")
            elif isinstance(m, list):
                parts = m
            else:
                parts = None
            if not parts or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
                raise _fail(where, f"merge {rank} is not \"left right\" or [left, right]: {m!r:.60}")
            left, right = (gpt2_string_to_bytes(p) for p in parts)
            if left is None or right is None:
                raise _fail(where, f"merge {rank} {parts!r:.60} uses characters outside GPT-2's byte alphabet")
            merges.append((left, right))

        try:
            return cls(vocab, merges, added, pre_tokenizer=data.get("pre_tokenizer"),
                       normalizer=data.get("normalizer"), post_processor=data.get("post_processor"),
                       ignore_merges=_get(model, "ignore_merges", bool, where, False),
                       trust_pattern=trust_pattern, where=str(where), extra_vocab=extra, **names)
        except NpgptError as e:
            msg = str(e)
            raise NpgptError(msg if str(where) in msg else f"{where}: {msg}") from None


def read_tokenizer_config(folder) -> dict:
    """tokenizer_config.json's fields npgpt uses: bos/eos/pad token names and the chat template."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    config = read_json(path, "tokenizer config")
    if not isinstance(config, dict):
        raise _fail(path, "the file must hold a JSON object")
    out = {}
    for field in ("bos_token", "eos_token", "pad_token"):
        value = config.get(field)
        if isinstance(value, dict):            # {"content": "<s>", "__type": "AddedToken", ...}
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise _fail(path, f"{field} must be a string or an AddedToken object")
        out[field] = value
    template = config.get("chat_template")
    if isinstance(template, list):             # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise _fail(path, "chat_template must be a string or a list of {name, template}")
    if template is not None and len(template) > MAX_TEMPLATE_CHARS:
        raise _fail(path, f"the chat template is {len(template)} characters, more than {MAX_TEMPLATE_CHARS}")
    out["chat_template"] = template
    return out
