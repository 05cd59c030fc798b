"""The interface every npgpt tokenizer offers, and the special-token rules they share.

A tokenizer turns text into a list of integer ids and back:

    ids = tok.encode("Hello world")       # list[int], each in range(tok.vocab_size)
    tok.decode(ids) == "Hello world"      # for every string
    tok.eot_id                            # id of <|endoftext|>, the document separator

Special tokens (`<|endoftext|>`, chat markers added with `add_special_tokens`) are strings that map to
one id of their own. Following tiktoken, `encode` is strict about them by default:

    encode(text)                                  text containing a special token's string raises
                                                  NpgptError (a corpus rarely means it, and silently
                                                  emitting a separator id corrupts training data)
    encode(text, allowed_special={"<|endoftext|>"})   that string becomes its id
    encode(text, allowed_special="all")           every special string becomes its id
    encode(text, disallowed_special=())           special strings are encoded as ordinary text

Chat templates: a tokenizer loaded with a model may carry the model's own Jinja `chat_template`
(Hugging Face, GGUF); `apply_chat_template(messages)` renders it as transformers does (see
`chat_template`). npgpt-trained tokenizers have none; npgpt.sft holds npgpt's own format.

Subclasses provide `_encode_ordinary`, `decode`, `token_bytes`, `_append_special`, `_canonical` and
`save`; everything else lives here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterable, Iterator

import regex

from npgpt.errors import NpgptError
from npgpt.tokenizer.chat_template import (CHAT_TOKENS, ChatTemplate, assistant_spans, end_of_turn, token_mask,
                                           turn_markers)
from npgpt.tokenizer.files import DEFAULT_CHUNK_BYTES, iter_text_chunks

EOT = "<|endoftext|>"
DEFAULT_SPECIALS = (EOT,)
META_FILE = "tokenizer_npgpt.json"   # written by every npgpt tokenizer's save(); holds its "kind"
FORMAT_VERSION = 1
MAX_CARRY_CHARS = 1 << 26          # text held back while looking for a safe place to cut a stream


def check_special_names(special_tokens) -> tuple[str, ...]:
    """Validate a sequence of special-token strings (no duplicates, none empty)."""
    if isinstance(special_tokens, str):
        special_tokens = (special_tokens,)
    names = tuple(special_tokens)
    for name in names:
        if not isinstance(name, str) or not name:
            raise NpgptError(f"special tokens must be non-empty strings, got {name!r}")
    if len(set(names)) != len(names):
        raise NpgptError(f"special tokens {list(names)} contain a duplicate; list each once")
    return names


def alternation(strings: Iterable[str]) -> regex.Pattern:
    """A regex matching any of `strings`, longest first so `<|a|>x` wins over its prefix `<|a|>`."""
    return regex.compile("|".join(regex.escape(s) for s in sorted(strings, key=len, reverse=True)))


def regroup_at_safe_cuts(chunks: Iterable[str], safe_cut: Callable[[str], int],
                         specials: Collection[str]) -> Iterator[str]:
    """Regroup a stream of text chunks into pieces that end at safe cut points.

    `safe_cut(text)` gives the largest index where `text` can be cut without changing how it is
    tokenized (0 if there is none); the rest is carried into the next piece. A cut inside a special
    token's string would hide it, so such a cut moves before that string.
    """
    specials = tuple(specials)
    longest = max(map(len, specials), default=0)
    special_regex = alternation(specials) if longest > 1 else None
    carry = ""
    for chunk in chunks:
        text = carry + chunk
        cut = safe_cut(text)
        while cut > 0 and special_regex is not None:
            window = special_regex.finditer(text, max(0, cut - longest + 1), min(len(text), cut + longest - 1))
            clash = next((m for m in window if m.start() < cut < m.end()), None)
            if clash is None:
                break
            cut = safe_cut(text[:clash.start()])
        if cut == 0 and len(text) > MAX_CARRY_CHARS:
            cut = len(text)   # no safe point in a huge run of text: accept one possibly split pre-token
        if cut > 0:
            yield text[:cut]
        carry = text[cut:]
    if carry:
        yield carry


class Tokenizer:
    """Common behaviour of CharTokenizer and BPETokenizer."""

    kind: str = ""
    chat_template: str | None = None   # the model's own Jinja chat template, when it came with one
    bos_token: str | None = None       # names of special tokens the chat template may use
    eos_token: str | None = None
    pad_token: str | None = None

    def __init__(self, special_tokens: dict[str, int]):
        self.special_tokens: dict[str, int] = dict(special_tokens)
        self._special_regex_cache: dict[frozenset, regex.Pattern] = {}

    # ------------------------------------------------------------------ subclass responsibilities

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _encode_ordinary(self, text: str, offset: int) -> list[int]:
        """Ids of `text`, which holds no special token; `offset` is its position in the caller's text."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes token `token_id` stands for (a BPE token may be part of a character)."""
        raise NotImplementedError

    def _append_special(self, name: str, token_id: int) -> None:
        raise NotImplementedError

    def _canonical(self) -> dict:
        """Everything that decides the ids, as plain JSON data (for `fingerprint`)."""
        raise NotImplementedError

    def save(self, folder) -> None:
        raise NotImplementedError

    def _safe_cut(self, text: str) -> int:
        """Largest index where `text` may be split without changing its encoding (0 if none)."""
        return len(text)

    # ------------------------------------------------------------------------- shared behaviour

    def split_stream(self, chunks: Iterable[str]) -> Iterator[str]:
        """Regroup a stream of text chunks into pieces that encode exactly as the whole text does
        (the one streaming splitter: `encode_file` and `npgpt prepare` use it)."""
        return regroup_at_safe_cuts(chunks, self._safe_cut, self.special_tokens)

    def encode_plain(self, text: str) -> list[int]:
        """User text as ordinary text: a special token's string in it is plain text, never its id (a chat
        reply that spells `<|end|>` must not end the turn, nor be an error in the next one)."""
        return self.encode(text, disallowed_special=())

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt typed by the user. BPE: special-token strings become their ids; the char
        tokenizer keeps `encode`'s default."""
        return self.encode(text)

    @property
    def eot_id(self) -> int:
        """Id of `<|endoftext|>`, the token that separates documents."""
        try:
            return self.special_tokens[EOT]
        except KeyError:
            raise NpgptError(f"this tokenizer has no {EOT} token; add it with "
                             f"tok.add_special_tokens(['{EOT}'])") from None

    def id_to_piece(self, token_id: int) -> str:
        """Printable text of one token, for display (a partial UTF-8 character shows as U+FFFD)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _check_id(self, token_id) -> int:
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise NpgptError(f"token ids must be integers, got {token_id!r}")
        token_id = token_id.__index__()
        if not 0 <= token_id < self.vocab_size:
            raise NpgptError(f"token id {token_id} is outside this tokenizer's vocabulary "
                             f"(0..{self.vocab_size - 1}); was the data made with another tokenizer?")
        return token_id

    def _id_list(self, ids) -> list:
        """ids (a list or NumPy array) as a list of ints, rejecting negative or non-integer ids."""
        if hasattr(ids, "tolist"):   # a NumPy array of ids
            ids = ids.tolist()
        ids = list(ids)
        try:
            if ids and min(ids) < 0:   # a negative index would silently wrap around
                raise self._bad_ids_error(ids)
        except TypeError:
            raise self._bad_ids_error(ids) from None
        return ids

    def _bad_ids_error(self, ids: list) -> NpgptError:
        """Explain the first unusable id in `ids` (called once a fast decode path has failed)."""
        for token_id in ids:
            self._check_id(token_id)
        return NpgptError("token ids could not be decoded; pass a list of integers")

    def fingerprint(self) -> str:
        """Short stable hash of everything that decides the ids (16 hex digits of a sha256).

        Two tokenizers with equal fingerprints turn every text into the same ids, so token files and
        checkpoints can record it and be checked against the tokenizer in use.
        """
        canonical = json.dumps(self._canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]

    def add_special_tokens(self, names) -> list[int]:
        """Add special tokens at the end of the vocabulary; return their ids (existing ones keep theirs)."""
        ids = []
        for name in check_special_names(names):
            if name not in self.special_tokens:
                token_id = self.vocab_size
                self._append_special(name, token_id)
                self.special_tokens[name] = token_id
                self._special_regex_cache.clear()
            ids.append(self.special_tokens[name])
        return ids

    # ------------------------------------------------------------------------------- encoding

    def _resolve_specials(self, allowed_special, disallowed_special) -> tuple[frozenset, frozenset]:
        known = self.special_tokens.keys()
        if allowed_special == "all":
            allowed = frozenset(known)
        else:
            allowed = frozenset(check_special_names(allowed_special))
            unknown = allowed - known
            if unknown:
                raise NpgptError(f"allowed_special names {sorted(unknown)} which are not special tokens "
                                 f"of this tokenizer (it has {sorted(known)})")
        if disallowed_special == "all":
            disallowed = frozenset(known) - allowed
        else:
            disallowed = frozenset(check_special_names(disallowed_special))
        return allowed, disallowed

    def _special_regex(self, names: frozenset) -> regex.Pattern:
        pattern = self._special_regex_cache.get(names)
        if pattern is None:
            pattern = self._special_regex_cache[names] = alternation(names)
        return pattern

    def _refuse_specials(self, text: str, disallowed: frozenset) -> None:
        found = self._special_regex(disallowed).search(text)
        if found:
            raise NpgptError(
                f"text contains the special token {found.group()!r} at position {found.start()}; pass "
                f"allowed_special={{{found.group()!r}}} to encode it as its id, or "
                f"disallowed_special=() to encode it as plain text")

    def encode(self, text: str, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        """Ids of `text`; see the module docstring for how special-token strings are treated."""
        if not isinstance(text, str):
            raise NpgptError(f"encode expects a str, got {type(text).__name__}")
        allowed, disallowed = self._resolve_specials(allowed_special, disallowed_special)
        if disallowed:
            self._refuse_specials(text, disallowed)
        if not allowed:
            return self._encode_ordinary(text, 0)
        ids: list[int] = []
        start = 0
        for match in self._special_regex(allowed).finditer(text):
            ids += self._encode_ordinary(text[start:match.start()], start)
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids += self._encode_ordinary(text[start:], start)
        return ids

    def encode_batch(self, texts, allowed_special=frozenset(), disallowed_special="all") -> list[list[int]]:
        """`encode` each of many documents (they share the tokenizer's caches)."""
        if isinstance(texts, str):
            raise NpgptError("encode_batch expects a list of strings; use encode for a single string")
        return [self.encode(text, allowed_special, disallowed_special) for text in texts]

    def encode_file(self, path, chunk_bytes: int = DEFAULT_CHUNK_BYTES, errors: str = "strict",
                    allowed_special=frozenset(), disallowed_special="all") -> Iterator[list[int]]:
        """Encode a UTF-8 text file of any size, yielding the ids chunk by chunk.

        Chunks are cut only where the tokenizer's splitting cannot change (see `_safe_cut`), so the
        concatenated ids equal `encode(read_text_checked(path))`.
        """
        chunks = iter_text_chunks(path, chunk_bytes, errors)
        for piece in self.split_stream(chunks):
            yield self.encode(piece, allowed_special, disallowed_special)

    # ------------------------------------------------------------------------- chat template

    def normalize_text(self, text: str) -> str:
        """`text` as the tokenizer's normalizer leaves it (none here; NFC for Qwen2's tokenizer.json)."""
        return text

    def _chat_template(self, chat_template: str | None) -> ChatTemplate:
        source = self.chat_template if chat_template is None else chat_template
        if source is None:
            raise NpgptError("this tokenizer has no chat template (npgpt-trained models use npgpt's own chat "
                             "format, npgpt.sft.render_chat); pass chat_template=... to use one")
        return ChatTemplate(source)

    def template_variables(self) -> dict:
        """The special-token names a chat template sees (transformers passes its special_tokens_map)."""
        return {name: getattr(self, name) for name in ("bos_token", "eos_token", "pad_token")
                if getattr(self, name) is not None}

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True,
                            tools=None, documents=None, continue_final_message: bool = False,
                            return_assistant_tokens_mask: bool = False, chat_template: str | None = None,
                            **kwargs):
        """Render `messages` with the model's chat template, as transformers' apply_chat_template does.

        tokenize=False returns the text; tokenize=True (the default) its ids as a list (transformers
        4's default; transformers 5 wraps them in a dict), special-token strings becoming their ids
        (the template writes them). `continue_final_message` leaves the last
        message open for the model to continue. `return_assistant_tokens_mask` returns
        {"input_ids": ids, "assistant_masks": [0/1 per token]} marking what assistant messages add
        ({% generation %} blocks when the template has them, else found prefix by prefix).
        """
        if add_generation_prompt and continue_final_message:
            raise NpgptError("add_generation_prompt and continue_final_message cannot both be set")
        template = self._chat_template(chat_template)
        variables = {**self.template_variables(), **kwargs, "tools": tools, "documents": documents}
        if return_assistant_tokens_mask:
            if not tokenize or add_generation_prompt or continue_final_message:
                raise NpgptError("return_assistant_tokens_mask needs tokenize=True and a whole conversation")
            ids, mask = self.chat_ids_and_mask(messages, template, variables)
            return {"input_ids": ids, "assistant_masks": [int(m) for m in mask]}
        text = template.render(messages, add_generation_prompt=add_generation_prompt, **variables)
        if continue_final_message:
            text = _cut_after_final_message(text, messages)
        return self.encode(text, allowed_special="all") if tokenize else text

    def chat_ids_and_mask(self, messages, template: ChatTemplate | None = None,
                          variables: dict | None = None) -> tuple[list[int], list[bool]]:
        """(ids, mask) of a whole conversation in the model's template; mask marks assistant tokens."""
        template = template or self._chat_template(None)
        variables = self.template_variables() if variables is None else variables
        messages = [dict(m, content=self.normalize_text(m["content"]))
                    if isinstance(m, dict) and isinstance(m.get("content"), str) else m for m in messages]
        text, spans = assistant_spans(template, messages, variables)
        ids = self.encode(text, allowed_special="all")
        return ids, token_mask(self, text, ids, spans)

    def chat_stop_ids(self) -> list[int]:
        """Ids that end an assistant reply: with the model's template, its end-of-turn token, then every
        special token it writes between turns (a role start such as <|im_start|>: a model that opens a
        new turn without closing its own stops there too); with npgpt's own format, its role tokens
        (CHAT_TOKENS); then the tokenizer's EOS."""
        if self.chat_template is None:
            stops = [self.special_tokens[t] for t in CHAT_TOKENS if t in self.special_tokens]
        else:
            names = self._turn_markers()[0]
            stops = [self.special_tokens[n] for n in names]
        try:
            stops.append(self.eot_id)
        except NpgptError:
            pass
        return list(dict.fromkeys(stops))

    def chat_stop_strings(self) -> list[str]:
        """Plain-text turn markers of a template that writes no special token between turns ("User:"):
        a reply stops before one. Empty for templates with turn tokens and for npgpt's own format."""
        return [] if self.chat_template is None else self._turn_markers()[1]

    _turn_cache: tuple | None = None         # (template source, turn_markers result): rendered once per template

    def _turn_markers(self) -> tuple[list[str], list[str]]:
        if self._turn_cache is None or self._turn_cache[0] != self.chat_template:
            template, variables = self._chat_template(None), self.template_variables()
            names, texts = turn_markers(template, self.special_tokens, variables)
            eot = end_of_turn(template, self.special_tokens, variables)
            names = list(dict.fromkeys(([eot] if eot is not None else []) + names))   # end-of-turn first
            self._turn_cache = (self.chat_template, (names, texts))
        return self._turn_cache[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, specials={len(self.special_tokens)})"


def _cut_after_final_message(text: str, messages) -> str:
    """`text` cut right after the last message's content (transformers' continue_final_message)."""
    final = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
    if isinstance(final, list):            # [{"type": "text", "text": ...}, ...]
        final = next((p.get("text") for p in reversed(final) if isinstance(p, dict) and "text" in p), None)
    if not isinstance(final, str):
        raise NpgptError("continue_final_message needs a last message with text content")
    for needle in (final, final.strip()):
        at = text.rfind(needle)
        if needle and at >= 0:
            return text[:at + len(needle)]
    raise NpgptError("continue_final_message: the chat template does not write the last message's text as is")
