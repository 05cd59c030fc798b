"""Character tokenizer: one id per character of the training corpus.

The vocabulary is the sorted set of characters seen in training (ids 0..n-1), followed by the special
tokens (ids n, n+1, ...; `<|endoftext|>` is always among them). Encoding a character the corpus never
contained raises `NpgptError` naming it and its position.

Saved format: `tokenizer_npgpt.json` in the tokenizer folder,

    {"kind": "char", "version": 1,
     "chars": ["\\n", " ", "!", ..., "z"],            # id i is chars[i]
     "special_tokens": {"<|endoftext|>": 65}}
"""

from __future__ import annotations

import json
from pathlib import Path

from npgpt.errors import NpgptError
from npgpt.tokenizer.base import DEFAULT_SPECIALS, EOT, FORMAT_VERSION, META_FILE, Tokenizer, check_special_names
from npgpt.fileio import write_files_atomically
from npgpt.tokenizer.files import DEFAULT_CHUNK_BYTES, iter_text_chunks


class CharTokenizer(Tokenizer):
    """Maps each character to an id; see the module docstring."""

    kind = "char"

    def __init__(self, chars, special_tokens: dict[str, int] | None = None):
        chars = list(chars)
        if not chars:
            raise NpgptError("a character tokenizer needs at least one character; train it on some text")
        for char in chars:
            if not isinstance(char, str) or len(char) != 1:
                raise NpgptError(f"vocabulary entries must be single characters, got {char!r}")
        if len(set(chars)) != len(chars):
            raise NpgptError("the character list repeats a character; list each once")
        if special_tokens is None:
            special_tokens = {name: len(chars) + i for i, name in enumerate(DEFAULT_SPECIALS)}
        check_special_names(special_tokens)
        expected = list(range(len(chars), len(chars) + len(special_tokens)))
        if sorted(special_tokens.values()) != expected:
            raise NpgptError(f"special token ids {sorted(special_tokens.values())} must follow the "
                             f"characters, as ids {expected}")
        super().__init__(special_tokens)
        self.chars = chars
        self._char_to_id = {char: i for i, char in enumerate(chars)}
        # One list for decoding: characters first, then each special's text at its id.
        self._id_to_text = chars + [""] * len(special_tokens)
        for name, token_id in special_tokens.items():
            self._id_to_text[token_id] = name

    # ------------------------------------------------------------------------------- training

    @classmethod
    def train(cls, text_or_iterable, special_tokens=DEFAULT_SPECIALS) -> CharTokenizer:
        """Vocabulary = sorted unique characters of a str, or of an iterable of str chunks.

        `<|endoftext|>` is added to `special_tokens` when missing: every npgpt tokenizer has it.
        """
        chunks = [text_or_iterable] if isinstance(text_or_iterable, str) else text_or_iterable
        if isinstance(chunks, (bytes, bytearray)):
            raise NpgptError("training text must be str, got bytes; decode it first or use train_from_files")
        seen: set[str] = set()
        try:
            for chunk in chunks:
                if not isinstance(chunk, str):
                    raise NpgptError(f"training text must be str (or an iterable of str), "
                                     f"got {type(chunk).__name__}")
                seen.update(chunk)
        except TypeError:
            raise NpgptError(f"training text must be str (or an iterable of str), "
                             f"got {type(text_or_iterable).__name__}") from None
        if not seen:
            raise NpgptError("the training corpus is empty; give some text to train the tokenizer on")
        names = check_special_names(special_tokens)
        if EOT not in names:
            names = (EOT,) + names
        chars = sorted(seen)
        return cls(chars, {name: len(chars) + i for i, name in enumerate(names)})

    @classmethod
    def train_from_files(cls, paths, special_tokens=DEFAULT_SPECIALS, errors: str = "strict",
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> CharTokenizer:
        """Train on one or more UTF-8 files, read chunk by chunk (memory stays bounded)."""
        if isinstance(paths, (str, Path)):
            paths = [paths]

        def chunks():
            for path in paths:
                yield from iter_text_chunks(path, chunk_bytes, errors)
        return cls.train(chunks(), special_tokens)

    # ------------------------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_text)

    def _encode_ordinary(self, text: str, offset: int) -> list[int]:
        char_to_id = self._char_to_id
        try:
            return [char_to_id[char] for char in text]
        except KeyError:
            pass
        for position, char in enumerate(text):
            if char not in char_to_id:
                raise NpgptError(f"character {char!r} at position {offset + position} is not in the "
                                 f"vocabulary; retrain the tokenizer on text that contains it")
        raise AssertionError("unreachable")

    def decode(self, ids) -> str:
        ids = self._id_list(ids)
        try:
            return "".join([self._id_to_text[i] for i in ids])
        except (IndexError, TypeError):
            raise self._bad_ids_error(ids) from None

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_to_text[self._check_id(token_id)].encode("utf-8")

    def _append_special(self, name: str, token_id: int) -> None:
        self._id_to_text.append(name)

    # ---------------------------------------------------------------------------- persistence

    def _canonical(self) -> dict:
        return {"kind": self.kind, "chars": self.chars, "special_tokens": self.special_tokens}

    def save(self, folder) -> None:
        """Write `tokenizer_npgpt.json` into `folder` (created if needed)."""
        meta = {"kind": self.kind, "version": FORMAT_VERSION, "chars": self.chars,
                "special_tokens": dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1]))}
        write_files_atomically(folder, {META_FILE: json.dumps(meta, ensure_ascii=False, indent=1) + "\n"})

    @classmethod
    def from_meta(cls, meta: dict, path) -> CharTokenizer:
        """Rebuild from the parsed `tokenizer_npgpt.json` at `path` (named in errors)."""
        chars, specials = meta.get("chars"), meta.get("special_tokens", {})
        if not isinstance(chars, list) or not isinstance(specials, dict):
            raise NpgptError(f"{path} lacks a 'chars' list or has a malformed 'special_tokens'; "
                             f"re-save the tokenizer")
        for text in [*chars, *specials]:
            if isinstance(text, str) and any("\ud800" <= c <= "\udfff" for c in text):
                raise NpgptError(f"{path} holds a lone surrogate ({text.encode('utf-8', 'backslashreplace')!r}), "
                                 f"which is not text; re-save the tokenizer")
        try:
            return cls(chars, specials)
        except NpgptError as e:
            raise NpgptError(f"{path}: {e}; re-save the tokenizer") from None
