"""Byte-level BPE: GPT-2's tokenizer, trainable on your own text.

Text is cut into pre-tokens by a regex (GPT-2's pattern, or GPT-4's cl100k pattern), each pre-token is
turned into its UTF-8 bytes, and learned merges glue adjacent tokens together, lowest rank first. Any
string round-trips: `decode(encode(s)) == s`.

Token ids
    Trained tokenizers use ids 0..255 for the bytes 0..255, 256 + r for the token made by merge r, and
    the special tokens after those, so `vocab_size = 256 + merges + specials`. Loaded files keep their
    own ids: in GPT-2's vocab.json the byte tokens are not in byte order and `<|endoftext|>` is 50256.
    The tokenizer therefore keeps an explicit id -> bytes table and maps each merge by rank.

Encoding
    Each pre-token is encoded once and cached; within a pre-token, the adjacent pair with the lowest
    merge rank is merged (the leftmost one on a tie) until no pair has a merge. `_apply_merges` does
    this with a heap over a linked list, so a 10,000-space run costs n log n, not n^2;
    `_reference_merge` is the plain quadratic version the tests compare it against.

Training (`train`, `train_from_file`)
    Pre-tokens are counted once, then merges are learned on the unique pre-tokens, each weighted by its
    count. Pair counts and an index pair -> {words containing it} are kept up to date on every merge,
    touching only the words that contain the merged pair; a heap with lazy invalidation gives the most
    frequent pair. Ties go to the smallest pair of token ids `(left, right)` (for trained tokenizers
    this means older tokens first, and bytes in byte order), so training is deterministic. A pair
    whose merged bytes already exist as a token (`a`+`bc` after `ab`+`c`; merging every occurrence
    left to right should never produce one, so this is a guard) is skipped: every token comes from
    exactly one merge, which keeps `vocab_size = 256 + merges + specials` and lets the
    tokenizer be written as a tiktoken rank file without loss. Special-token strings in the corpus are
    cut out before counting, so they never become ordinary tokens.

Saved format (`save(folder)`)
    `vocab.json` and `merges.txt` in GPT-2 / Hugging Face format (see `npgpt.tokenizer.files`), plus
    `tokenizer_npgpt.json`:

        {"kind": "bpe", "version": 1,
         "pattern": "gpt2",                           # or "gpt4", or a custom regex
         "special_tokens": {"<|endoftext|>": 4095}}
"""

from __future__ import annotations

import heapq
import json
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import chain
from pathlib import Path

import regex

from npgpt.errors import NpgptError
from npgpt.fileio import write_files_atomically
from npgpt.tokenizer.base import (
    DEFAULT_SPECIALS, EOT, FORMAT_VERSION, META_FILE, Tokenizer, alternation, check_special_names,
    regroup_at_safe_cuts,
)
from npgpt.tokenizer.files import (
    DEFAULT_CHUNK_BYTES, bytes_to_gpt2_string, bytes_to_unicode, file_size, format_merges_txt,
    format_tiktoken_ranks, format_vocab_json, gpt2_string_to_bytes, iter_decoded_chunks, read_merges_txt,
    read_tiktoken_ranks, read_vocab_json,
)

# GPT-2's split: English contractions, letter runs, digit runs, punctuation runs (each with at most
# one leading space), and whitespace, where the last space before a word goes with the word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (cl100k), as tiktoken writes it today: case-insensitive contractions, numbers in groups of
# at most three digits, newlines kept apart from other whitespace, a letter run may take one leading
# punctuation character, and trailing whitespace at the end of the text stays one pre-token.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
                r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# Llama 3's and Qwen2's, exactly as their tokenizer.json files spell them: GPT-4's split written without
# possessive quantifiers; Llama 3 keeps numbers in groups of up to three digits, Qwen2 splits every digit.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}

# In all these patterns a letter followed by whitespace always ends a pre-token, and which pre-tokens come
# before it does not depend on the text after it: a stream can be cut there without changing a thing.
_LAST_SAFE_CUT = regex.compile(r"\p{L}(?=\s)", regex.REVERSE)

def check_pattern(pattern, where, trust_pattern=False) -> str:
    """`pattern` if it is a named one (gpt2, gpt4, llama3, qwen2, or their regex spelled out); any other
    regex read from a file needs the user's opt-in, since a catastrophic one would hang every encode.
    The opt-in is an argument all the way down (`npgpt --trust-pattern` hands it to the loader the
    command calls, e.g. npgpt.load_run(path, trust_pattern=True)): no global, no environment variable."""
    if not isinstance(pattern, str):
        raise NpgptError(f"{where}: field 'pattern' must be a string, got {type(pattern).__name__}")
    if pattern in PATTERNS or pattern in PATTERNS.values():
        return pattern
    if not trust_pattern:
        raise NpgptError(f"{where} asks for its own split pattern {pattern[:40]!r}; a regex from a file can hang "
                         f"npgpt, so only the named ones ({', '.join(PATTERNS)}) load by default. If you trained this tokenizer with "
                         f"that pattern, run `npgpt --trust-pattern ...` (or load(path, trust_pattern=True))")
    return pattern


_CACHE_LIMIT = 1_000_000   # cached pre-tokens; past this the cache starts over (memory stays bounded)

Progress = Callable[[str, int, "int | None"], None]


def _compile_pattern(pattern: str) -> regex.Pattern:
    if not isinstance(pattern, str):
        raise NpgptError(f"pattern must be 'gpt2', 'gpt4' or a regex string, got {pattern!r}")
    try:
        return regex.compile(PATTERNS.get(pattern, pattern))
    except regex.error as e:
        raise NpgptError(f"pattern {pattern!r} is not 'gpt2', 'gpt4' or a valid regex ({e})") from None


def safe_cut(text: str) -> int:
    """Largest index where a stream of text may be cut without changing its BPE pre-tokens (0 if none)."""
    found = _LAST_SAFE_CUT.search(text)
    return found.end() if found else 0


# ------------------------------------------------------------------------------- merging a word

def _apply_merges(ids: list[int], merges: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """Merge the tokens of one pre-token: lowest-rank pair first, leftmost on a tie, until none is left.

    `merges` maps a pair of ids to (rank, merged id). Tokens sit in a linked list over their original
    positions (positions keep their order, so the smallest position is the leftmost); the heap holds
    (rank, position of the left token) for every adjacent pair that has a merge. Merging rewrites the
    pair's neighbours, so entries that no longer describe a live pair are skipped when popped.
    """
    n = len(ids)
    if n < 2:
        return ids
    heap = []
    for i in range(n - 1):
        found = merges.get((ids[i], ids[i + 1]))
        if found is not None:
            heap.append((found[0], i))
    if not heap:
        return ids
    heapq.heapify(heap)
    ids = list(ids)
    next_pos = list(range(1, n + 1))
    next_pos[-1] = -1
    prev_pos = list(range(-1, n - 1))
    while heap:
        rank, i = heapq.heappop(heap)
        left = ids[i]
        j = next_pos[i]
        if left < 0 or j < 0:          # token merged into its left neighbour, or now last
            continue
        found = merges.get((left, ids[j]))
        if found is None or found[0] != rank:   # the pair at i changed since this entry was pushed
            continue
        merged = ids[i] = found[1]
        ids[j] = -1
        k = next_pos[i] = next_pos[j]
        if k >= 0:
            prev_pos[k] = i
            found = merges.get((merged, ids[k]))
            if found is not None:
                heapq.heappush(heap, (found[0], i))
        p = prev_pos[i]
        if p >= 0:
            found = merges.get((ids[p], merged))
            if found is not None:
                heapq.heappush(heap, (found[0], p))
    return [token for token in ids if token >= 0]


def _reference_merge(ids: list[int], merges: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """The definition `_apply_merges` implements, written plainly (quadratic; for tests)."""
    ids = list(ids)
    while len(ids) >= 2:
        best = None   # (rank, position, merged id)
        for i in range(len(ids) - 1):
            found = merges.get((ids[i], ids[i + 1]))
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], i, found[1])
        if best is None:
            break
        _, i, merged = best
        ids[i:i + 2] = [merged]
    return ids


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int] | None:
    """`word` with each occurrence of `pair` (left to right) replaced by `new_id`; None if absent."""
    left, right = pair
    out = []
    i, n = 0, len(word)
    while i < n:
        if word[i] == left and i + 1 < n and word[i + 1] == right:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out if len(out) < n else None


# ------------------------------------------------------------------------------------- training

def _count_pretokens(docs: Iterable[str], pattern: regex.Pattern, specials: tuple[str, ...],
                     after_doc: Callable[[str], None] | None = None) -> Counter:
    """How often each pre-token occurs in `docs`; special-token strings are cut out first."""
    counts: Counter = Counter()
    special_regex = alternation(specials) if specials else None
    for doc in docs:
        if not isinstance(doc, str):
            raise NpgptError(f"training text must be str (or an iterable of str), got {type(doc).__name__}")
        for part in (special_regex.split(doc) if special_regex else (doc,)):
            counts.update(pattern.findall(part))
        if after_doc is not None:
            after_doc(doc)
    return counts


def _learn_merges(counts: Counter, n_tokens: int,
                  progress: Progress | None) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Learn merges until there are `n_tokens` ordinary tokens (or no pair is left).

    Returns the token table (id -> bytes, bytes first) and the merges as id pairs in rank order.
    """
    token_bytes = [bytes([b]) for b in range(256)]
    known = set(token_bytes)
    # Words of one byte have no pairs and never change: leave them out.
    words = [list(piece.encode("utf-8")) for piece in counts]
    freqs = list(counts.values())
    keep = [i for i, word in enumerate(words) if len(word) > 1]
    words, freqs = [words[i] for i in keep], [freqs[i] for i in keep]

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for index, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + freq
            where.setdefault(pair, set()).add(index)
    # Min-heap on (-count, pair): most frequent first, then the smallest pair of ids.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    skipped: set[tuple[int, int]] = set()   # pairs whose merge would repeat an existing token

    merges: list[tuple[int, int]] = []
    n_merges = n_tokens - 256
    report_every = max(1, n_merges // 100)
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count or pair in skipped:
            continue   # stale entry: the count changed and a fresh entry was pushed
        merged_bytes = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged_bytes in known:
            skipped.add(pair)
            continue
        new_id = len(token_bytes)
        token_bytes.append(merged_bytes)
        known.add(merged_bytes)
        merges.append(pair)

        # Re-count only the words that contain the pair: subtract each word's old pairs, add its new
        # ones. `before` remembers each touched pair's count so unchanged ones need no heap entry.
        before: dict[tuple[int, int], int] = {}
        for index in where.pop(pair):
            word = words[index]
            new_word = _merge_word(word, pair, new_id)
            if new_word is None:
                continue   # the index is lazy: this word lost the pair to an earlier merge
            freq = freqs[index]
            for old in zip(word, word[1:]):
                if old not in before:
                    before[old] = pair_counts[old]
                pair_counts[old] -= freq
            for new in zip(new_word, new_word[1:]):
                if new not in before:
                    before[new] = pair_counts.get(new, 0)
                pair_counts[new] = pair_counts.get(new, 0) + freq
                where.setdefault(new, set()).add(index)
            words[index] = new_word
        for touched, old_count in before.items():
            count = pair_counts[touched]
            if count <= 0:
                del pair_counts[touched]
                where.pop(touched, None)
            elif count != old_count and touched not in skipped:
                heapq.heappush(heap, (-count, touched))

        if progress is not None and (len(merges) % report_every == 0 or len(merges) == n_merges):
            progress("merge", len(merges), n_merges)
    return token_bytes, merges


# ------------------------------------------------------------------------------------ tokenizer

class BPETokenizer(Tokenizer):
    """Byte-level BPE tokenizer; see the module docstring."""

    kind = "bpe"
    # A trained or GPT-2 vocabulary holds all 256 byte tokens. Real models' may not: SmolLM2's lacks 21
    # bytes that never occur in its UTF-8 training text (0xC0, 0xC1, 0xF5-0xFF, a few controls);
    # the tokenizers library and llama.cpp then drop such a byte, and so does a tokenizer that sets this.
    partial_bytes = False

    def __init__(self, vocab: dict[bytes, int], merges: list[tuple[bytes, bytes]],
                 special_tokens: dict[str, int] | None = None, pattern: str = "gpt2"):
        """Build from ordinary tokens `{bytes: id}`, merges as byte-string pairs in rank order, and
        `{special string: id}`. Ids may leave gaps (tiktoken's cl100k does); `vocab_size` is then
        the largest id + 1."""
        special_tokens = dict(special_tokens or {})
        check_special_names(special_tokens)
        self._pattern = _compile_pattern(pattern)
        self.pattern = pattern
        super().__init__(special_tokens)

        all_ids = list(vocab.values()) + list(special_tokens.values())
        for token_id in all_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise NpgptError(f"token ids must be non-negative integers, got {token_id!r}")
        if len(set(all_ids)) != len(all_ids):
            repeated = sorted(i for i, n in Counter(all_ids).items() if n > 1)[:5]
            raise NpgptError(f"token ids {repeated} are used by more than one token")
        self._id_to_bytes: list[bytes | None] = [None] * (max(all_ids) + 1)
        for token, token_id in vocab.items():
            self._id_to_bytes[token_id] = token
        for name, token_id in special_tokens.items():
            self._id_to_bytes[token_id] = name.encode("utf-8")

        missing = [b for b in range(256) if bytes([b]) not in vocab]
        if missing and not self.partial_bytes:
            raise NpgptError(f"the vocabulary lacks the byte token for 0x{missing[0]:02x} (and "
                             f"{len(missing) - 1} more); a byte-level BPE needs all 256")
        self._byte_ids = [vocab.get(bytes([b])) for b in range(256)]

        self._merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(merges):
            for part in (left, right, left + right):
                if part not in vocab:
                    raise NpgptError(f"merge {rank} ({left!r}, {right!r}) uses {part!r}, which is not "
                                     f"in the vocabulary")
            pair = (vocab[left], vocab[right])
            if pair in self._merges:
                raise NpgptError(f"merge {rank} ({left!r}, {right!r}) repeats an earlier merge")
            self._merges[pair] = (rank, vocab[left + right])
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------------------- training

    @classmethod
    def train(cls, text_or_iterable, vocab_size: int, pattern: str = "gpt2",
              special_tokens=DEFAULT_SPECIALS, progress: Progress | None = None) -> BPETokenizer:
        """Learn a vocabulary of `vocab_size` tokens from a str or an iterable of str documents.

        Pre-tokens never span two documents, so an iterable can stream a corpus of any size (see
        `train_from_file`). `<|endoftext|>` is added to `special_tokens` when missing. `progress`, if
        given, is called as `progress(stage, done, total)`: stage "count" after each document (done =
        characters read, total None), stage "merge" about every 1% of merges (done, total merges).
        A corpus too small for `vocab_size` gives a smaller vocabulary, with a warning.
        """
        compiled = _compile_pattern(pattern)
        names = cls._check_training_args(vocab_size, special_tokens)
        docs = [text_or_iterable] if isinstance(text_or_iterable, str) else text_or_iterable
        if isinstance(docs, (bytes, bytearray)) or not isinstance(docs, Iterable):
            raise NpgptError(f"training text must be str (or an iterable of str), "
                             f"got {type(text_or_iterable).__name__}")
        chars_read = 0

        def after_doc(doc: str) -> None:
            nonlocal chars_read
            chars_read += len(doc)
            progress("count", chars_read, None)
        counts = _count_pretokens(docs, compiled, names, after_doc if progress else None)
        return cls._from_counts(counts, vocab_size, pattern, names, progress)

    @classmethod
    def train_from_file(cls, path, vocab_size: int, pattern: str = "gpt2", special_tokens=DEFAULT_SPECIALS,
                        progress: Progress | None = None, errors: str = "strict",
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BPETokenizer:
        """`train` on a UTF-8 file, streamed in chunks of `chunk_bytes` (memory stays bounded).

        Chunks are cut only after a letter followed by whitespace, where a cut cannot change the
        pre-tokens, so the result equals `train(read_text_checked(path), ...)` (a custom `pattern` must
        also end its pre-tokens between a letter and whitespace for that to hold). Stage "count" progress
        reports bytes read out of the file size. `errors="replace"` accepts invalid UTF-8.
        """
        compiled = _compile_pattern(pattern)
        names = cls._check_training_args(vocab_size, special_tokens)
        total = file_size(path)

        def chunks():
            for text, bytes_read in iter_decoded_chunks(path, chunk_bytes, errors):
                yield text
                if progress is not None:
                    progress("count", bytes_read, total)
        counts = _count_pretokens(regroup_at_safe_cuts(chunks(), safe_cut, names), compiled, names)
        return cls._from_counts(counts, vocab_size, pattern, names, progress)

    @staticmethod
    def _check_training_args(vocab_size, special_tokens) -> tuple[str, ...]:
        names = check_special_names(special_tokens)
        if EOT not in names:
            names = (EOT,) + names
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise NpgptError(f"vocab_size must be an integer, got {vocab_size!r}")
        if vocab_size < 256 + len(names):
            raise NpgptError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                             f"+ {len(names)} special tokens; use at least {256 + len(names)}")
        return names

    @classmethod
    def _from_counts(cls, counts: Counter, vocab_size: int, pattern: str, names: tuple[str, ...],
                     progress: Progress | None) -> BPETokenizer:
        if not counts:
            raise NpgptError("the training corpus is empty; give some text to train the tokenizer on")
        n_tokens = vocab_size - len(names)
        token_bytes, merges = _learn_merges(counts, n_tokens, progress)
        if len(token_bytes) < n_tokens:
            warnings.warn(f"the corpus only supports {len(token_bytes) - 256} merges, so the vocabulary "
                          f"has {len(token_bytes) + len(names)} tokens instead of {vocab_size}",
                          stacklevel=3)
        vocab = {token: token_id for token_id, token in enumerate(token_bytes)}
        merge_bytes = [(token_bytes[left], token_bytes[right]) for left, right in merges]
        specials = {name: len(token_bytes) + i for i, name in enumerate(names)}
        return cls(vocab, merge_bytes, specials, pattern)

    # ------------------------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_bytes)

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The merges as pairs of token ids, in rank order."""
        return sorted(self._merges, key=lambda pair: self._merges[pair][0])

    def _byte_tokens(self, piece: str) -> list[int]:
        """The byte tokens of a pre-token; bytes the vocabulary lacks are dropped (see partial_bytes)."""
        byte_ids = self._byte_ids
        ids = [byte_ids[b] for b in piece.encode("utf-8")]
        return [i for i in ids if i is not None] if self.partial_bytes else ids

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        return tuple(_apply_merges(self._byte_tokens(piece), self._merges))

    def _split(self, text: str) -> list[str]:
        """Pre-tokens of `text` (the Hugging Face tokenizer.json reader splits in several steps)."""
        return self._pattern.findall(text)

    def _encode_ordinary(self, text: str, offset: int) -> list[int]:
        pieces = self._split(text)
        cache = self._cache
        # Once a long text is under way nearly every pre-token is cached: try one pass of lookups
        # first. It saves the pass that collects new pre-tokens, 14% of encoding 4.5 MB of Shakespeare
        # on a 2-core EPYC (800 of 5,700 ms; the regex split itself is 3,800 ms of it).
        try:
            return list(chain.from_iterable(map(cache.__getitem__, pieces)))
        except KeyError:
            pass
        # Most pre-tokens of real text repeat: encode each new one once, then only look them up.
        for piece in {piece for piece in pieces if piece not in cache}:
            cache[piece] = self._encode_piece(piece)
        if len(cache) > _CACHE_LIMIT:
            self._cache = {}
        return list(chain.from_iterable(map(cache.__getitem__, pieces)))

    def _reference_encode(self, text: str) -> list[int]:
        """Encode ordinary text without the cache or the heap (for tests)."""
        return [token for piece in self._split(text)
                for token in _reference_merge(self._byte_tokens(piece), self._merges)]

    def _safe_cut(self, text: str) -> int:
        return safe_cut(text)

    def encode_plain(self, text: str) -> list[int]:
        return self.encode(text, disallowed_special=())

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        """Text of `ids`; a slice that cuts a character in two shows U+FFFD for the broken part."""
        ids = self._id_list(ids)
        table = self._id_to_bytes
        try:
            data = b"".join([table[i] for i in ids])
        except (IndexError, TypeError):   # an id past the end, a gap in the ids, or not an integer
            raise self._bad_ids_error(ids) from None
        return data.decode("utf-8", errors="replace")

    def _check_id(self, token_id) -> int:
        token_id = super()._check_id(token_id)
        if self._id_to_bytes[token_id] is None:
            raise NpgptError(f"token id {token_id} is unused in this vocabulary (a gap between ids); "
                             f"was the data made with another tokenizer?")
        return token_id

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_to_bytes[self._check_id(token_id)]

    def _append_special(self, name: str, token_id: int) -> None:
        self._id_to_bytes.append(name.encode("utf-8"))

    # ---------------------------------------------------------------------------- persistence

    def _canonical(self) -> dict:
        specials = set(self.special_tokens.values())
        tokens = [None if token is None or i in specials else token.hex()
                  for i, token in enumerate(self._id_to_bytes)]
        return {"kind": self.kind, "pattern": PATTERNS.get(self.pattern, self.pattern), "tokens": tokens,
                "merges": [list(pair) for pair in self.merges], "special_tokens": self.special_tokens}

    def _ordinary_items(self):
        """(id, bytes) of every ordinary token, in id order."""
        specials = set(self.special_tokens.values())
        return [(i, token) for i, token in enumerate(self._id_to_bytes)
                if token is not None and i not in specials]

    def save(self, folder) -> None:
        """Write vocab.json, merges.txt and tokenizer_npgpt.json into `folder` (created if needed)."""
        vocab: dict[str, int] = {bytes_to_gpt2_string(token): i for i, token in self._ordinary_items()}
        for name, token_id in self.special_tokens.items():
            if name in vocab:
                raise NpgptError(f"special token {name!r} is spelled like an ordinary token in vocab.json; "
                                 f"rename the special token")
            vocab[name] = token_id
        table = self._id_to_bytes
        merges = [(bytes_to_gpt2_string(table[left]), bytes_to_gpt2_string(table[right]))
                  for left, right in self.merges]
        meta = {"kind": self.kind, "version": FORMAT_VERSION, "pattern": self.pattern,
                "special_tokens": dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1]))}
        write_files_atomically(folder, {
            "vocab.json": format_vocab_json(vocab),
            "merges.txt": format_merges_txt(merges),
            META_FILE: json.dumps(meta, ensure_ascii=False, indent=1) + "\n",
        })

    @classmethod
    def from_gpt2_files(cls, folder, pattern: str = "gpt2",
                        special_tokens: dict[str, int] | None = None) -> BPETokenizer:
        """Load `vocab.json` + `merges.txt` from `folder` (GPT-2 / Hugging Face format).

        Ordinary tokens are the 256 byte tokens and the results of merges. Without `special_tokens`,
        every other vocab.json entry (GPT-2's `<|endoftext|>`, RoBERTa's `<s>` ...) is a special token
        with its vocab.json id.
        """
        folder = Path(folder)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for needed in (vocab_path, merges_path):
            if not needed.is_file():
                raise NpgptError(f"{folder} has no {needed.name}; a GPT-2 style tokenizer folder needs "
                                 f"vocab.json and merges.txt (save one with tok.save(folder))")
        by_string = read_vocab_json(vocab_path)
        merge_strings = read_merges_txt(merges_path)

        vocab: dict[bytes, int] = {}
        for byte, char in bytes_to_unicode().items():
            if char not in by_string:
                raise NpgptError(f"{vocab_path} has no token for the byte 0x{byte:02x} ({char!r}); it is "
                                 f"not a byte-level BPE vocabulary")
            vocab[bytes([byte])] = by_string[char]
        ordinary_strings = set(bytes_to_unicode().values())
        merges = []
        for rank, (left, right) in enumerate(merge_strings):
            for part in (left, right, left + right):
                if part not in by_string:
                    raise NpgptError(f"{merges_path} merge {rank + 1} `{left} {right}` needs {part!r}, which "
                                     f"is not in vocab.json; the two files do not belong together")
            left_bytes, right_bytes = gpt2_string_to_bytes(left), gpt2_string_to_bytes(right)
            if left_bytes is None or right_bytes is None:
                raise NpgptError(f"{merges_path} merge {rank + 1} `{left} {right}` uses characters outside "
                                 f"GPT-2's byte alphabet; it is not a byte-level BPE merges file")
            merges.append((left_bytes, right_bytes))
            vocab[left_bytes + right_bytes] = by_string[left + right]
            ordinary_strings.add(left + right)

        leftovers = {s: i for s, i in by_string.items() if s not in ordinary_strings}
        if special_tokens is None:
            special_tokens = leftovers
        else:
            for name, token_id in special_tokens.items():
                if name in by_string and by_string[name] != token_id:
                    raise NpgptError(f"special token {name!r} has id {token_id} in {META_FILE} but "
                                     f"{by_string[name]} in {vocab_path}; re-save the tokenizer")
            for string, token_id in leftovers.items():
                if string in special_tokens:
                    continue
                token = gpt2_string_to_bytes(string)
                if token is None:
                    raise NpgptError(f"{vocab_path} entry {string!r} is neither a byte token, a merge result "
                                     f"nor a special token; re-save the tokenizer")
                vocab[token] = token_id   # reachable by no merge, but decodable
        try:
            return cls(vocab, merges, special_tokens, pattern)
        except NpgptError as e:
            raise NpgptError(f"{folder}: {e}; the tokenizer files are inconsistent") from None

    @classmethod
    def from_tiktoken_file(cls, path, pattern: str, special_tokens=None) -> BPETokenizer:
        """Load a tiktoken rank file (`base64(token) rank` per line; rank = id).

        The merges are rebuilt: each token's merge is the pair that BPE with the lower-ranked tokens
        leaves when run on its bytes. `special_tokens` is a `{string: id}` dict, or a list of strings
        given ids after the largest rank (default: `<|endoftext|>` there, as in GPT-2).

        tiktoken itself merges any adjacent pair whose concatenation is a token; this tokenizer merges
        only the rebuilt pairs. The two agree on tokenizers trained by BPE (npgpt's, GPT-2's).
        """
        _compile_pattern(pattern)   # fail on a bad pattern before reading a big file
        ranks = read_tiktoken_ranks(path)
        next_id = max(ranks.values()) + 1
        if special_tokens is None:
            special_tokens = {EOT: next_id}
        elif not isinstance(special_tokens, dict):
            special_tokens = {name: next_id + i for i, name in enumerate(check_special_names(special_tokens))}
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise NpgptError(f"{path} lacks the byte token 0x{missing[0]:02x}; it is not a byte-level BPE "
                             f"rank file")
        byte_ids = [ranks[bytes([b])] for b in range(256)]
        by_id = {rank: token for token, rank in ranks.items()}
        merges_by_ids: dict[tuple[int, int], tuple[int, int]] = {}
        merges = []
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            if len(token) < 2:
                continue
            parts = _apply_merges([byte_ids[b] for b in token], merges_by_ids)
            if len(parts) != 2:
                raise NpgptError(f"{path}: token {token!r} (rank {rank}) is not the merge of two "
                                 f"lower-ranked tokens; it is not a BPE rank file")
            merges_by_ids[(parts[0], parts[1])] = (len(merges), rank)
            merges.append((by_id[parts[0]], by_id[parts[1]]))
        try:
            return cls(ranks, merges, special_tokens, pattern)
        except NpgptError as e:
            raise NpgptError(f"{path}: {e}") from None

    def save_tiktoken(self, path) -> None:
        """Write the ordinary tokens as a tiktoken rank file (`base64(token) rank`, rank = id).

        Special tokens and the pattern are not part of that format: pass them to `from_tiktoken_file`.
        """
        table = self._id_to_bytes
        if sum(len(token) > 1 for _, token in self._ordinary_items()) != len(self._merges):
            raise NpgptError("this vocabulary has tokens no merge makes, which tiktoken's format cannot "
                             "express; save with tok.save(folder) instead")
        last_id = -1
        for left, right in self.merges:
            merged_id = self._merges[(left, right)][1]
            # tiktoken rebuilds merges from ranks, so each merge must make a newer token from older ones.
            if not (left < merged_id and right < merged_id and merged_id > last_id):
                raise NpgptError(f"merge {table[left]!r} + {table[right]!r} does not fit tiktoken's format "
                                 f"(rank = id, made from lower ranks); save with tok.save(folder) instead")
            last_id = merged_id
        path = Path(path)
        write_files_atomically(path.parent, {path.name: format_tiktoken_ranks(
            [(token, i) for i, token in self._ordinary_items()])})
