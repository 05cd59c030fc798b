"""Reading corpora and tokenizer files from disk.

Text files
    `iter_text_chunks(path)` decodes a file as UTF-8 a chunk at a time, so a 1 GB corpus never sits in
    memory whole, and `read_text_checked(path)` joins those chunks. Bytes are read raw (no newline
    translation: CRLF stays CRLF). A byte that is not valid UTF-8 raises `NpgptError` naming its byte
    offset, unless the caller asks for `errors="replace"` (U+FFFD in its place). A NUL byte means the
    file is binary (or UTF-16) and is refused either way.

GPT-2 / Hugging Face files (byte-level BPE)
    `vocab.json`  one JSON object `{token: id}`. Each token is its bytes spelled in GPT-2's
                  byte-to-unicode alphabet (`bytes_to_unicode()`): printable Latin-1 bytes stand for
                  themselves, the other 68 bytes are shifted to U+0100..U+0143, so a space is `Ġ` and a
                  newline `Ċ`. Special tokens are stored as their plain text (`"<|endoftext|>": 50256`).
    `merges.txt`  a `#version: 0.2` line, then one merge per line, `left right` in the same alphabet,
                  in rank order (line 2 is rank 0, the merge applied first).

tiktoken rank files
    One token per line: `base64(token bytes) rank`, where the rank is also the token's id. Special
    tokens are not in the file; they are passed in code.

Writing is atomic per file and all-or-nothing per call: `write_files_atomically` (npgpt.fileio, the
one atomic writer) writes every file to a temporary name in the target folder, fsyncs it, and only
then renames them all into place, so a failure halfway leaves the old files untouched.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from npgpt.errors import NpgptError
from npgpt.safeio import read_json

DEFAULT_CHUNK_BYTES = 1 << 20
MERGES_HEADER = "#version: 0.2"


# --------------------------------------------------------------------------------------------- text

def _check_errors_mode(errors: str) -> None:
    if errors not in ("strict", "replace"):
        raise NpgptError(f"errors={errors!r} is not supported; use 'strict' or 'replace'")


def _open_for_reading(path: Path, what: str):
    if not path.exists():
        raise NpgptError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise NpgptError(f"{what} {path} is a folder; give the path of a file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise NpgptError(f"cannot open {what} {path} ({e.strerror}); check its permissions") from None


def iter_decoded_chunks(path, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        errors: str = "strict") -> Iterator[tuple[str, int]]:
    """Yield `(text, bytes_read_so_far)` pairs decoding the file at `path` as UTF-8, chunk by chunk.

    The incremental decoder holds back a multi-byte character cut by a chunk boundary until its last
    byte arrives, so chunks always end on whole characters.
    """
    _check_errors_mode(errors)
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise NpgptError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset = 0   # bytes of the file handed to the decoder so far
    with _open_for_reading(path, "text file") as f:
        while True:
            data = f.read(chunk_bytes)
            final = not data
            nul = data.find(b"\x00")
            if nul >= 0:
                raise NpgptError(f"{path} looks binary or UTF-16 (NUL byte at byte offset {offset + nul}); "
                                 f"give a UTF-8 text file")
            # Bytes of a character cut at the previous chunk's end still wait inside the decoder; error
            # positions count from the first of them.
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                byte = e.object[e.start]
                raise NpgptError(f"{path} is not valid UTF-8 (byte 0x{byte:02x} at byte offset {bad}); "
                                 f"convert it to UTF-8, or accept replacement characters (--errors replace)") from None
            offset += len(data)
            if text:
                yield text, offset
            if final:
                return


def iter_text_chunks(path, chunk_bytes: int = DEFAULT_CHUNK_BYTES, errors: str = "strict") -> Iterator[str]:
    """Yield the UTF-8 text of the file at `path` in chunks of about `chunk_bytes` bytes.

    Raises NpgptError naming the byte offset of the first invalid byte (with `errors="strict"`) or of
    the first NUL byte (binary file). Chunk boundaries fall anywhere between characters.
    """
    for text, _ in iter_decoded_chunks(path, chunk_bytes, errors):
        yield text


def read_text_checked(path, errors: str = "strict") -> str:
    """The whole UTF-8 text of the file at `path`, checked as `iter_text_chunks` does."""
    return "".join(iter_text_chunks(path, errors=errors))


def file_size(path) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


# ------------------------------------------------------------------------------ GPT-2 / HF files

@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's alphabet: a printable character for each of the 256 byte values.

    Printable Latin-1 bytes keep their own character; the rest, in byte order, take the characters
    from U+0100 on. vocab.json and merges.txt spell tokens in this alphabet so that every token is a
    visible, whitespace-free string (merges.txt separates the two halves of a merge by a space).
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    table = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def bytes_to_gpt2_string(token: bytes) -> str:
    alphabet = bytes_to_unicode()
    return "".join(alphabet[b] for b in token)


def gpt2_string_to_bytes(token: str) -> bytes | None:
    """The bytes a vocab.json token spells, or None if it uses characters outside the alphabet."""
    alphabet = unicode_to_bytes()
    try:
        return bytes(alphabet[c] for c in token)
    except KeyError:
        return None


def read_vocab_json(path) -> dict[str, int]:
    """vocab.json as `{token string: id}` (npgpt.safeio's JSON limits); ids must be distinct and below the
    number of entries, so no id read from the file can size an allocation."""
    path = Path(path)
    vocab = read_json(path, "vocabulary file")
    restore = "restore the file from the tokenizer you downloaded or saved"
    if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()):
        raise NpgptError(f"{path} must be a JSON object mapping token strings to integer ids; {restore}")
    if not vocab:
        raise NpgptError(f"{path} holds no tokens; {restore}")
    return _check_dense_ids(path, vocab, "id", restore)


def read_merges_txt(path) -> list[tuple[str, str]]:
    path = Path(path)
    with _open_for_reading(path, "merges file") as f:
        raw = f.read()
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise NpgptError(f"{path} is not valid UTF-8; restore the file from the tokenizer you "
                         f"downloaded or saved") from None
    merges = []
    for line_no, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line or (line_no == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise NpgptError(f"{path} line {line_no} is not a merge `left right`: {line[:60]!r}; restore "
                             f"the file from the tokenizer you downloaded or saved")
        merges.append((parts[0], parts[1]))
    return merges


def format_vocab_json(vocab: dict[str, int]) -> str:
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    return json.dumps(ordered, ensure_ascii=False, indent=0) + "\n"


def format_merges_txt(merges: list[tuple[str, str]]) -> str:
    return "\n".join([MERGES_HEADER] + [f"{left} {right}" for left, right in merges]) + "\n"


# ------------------------------------------------------------------------------ tiktoken files

def read_tiktoken_ranks(path) -> dict[bytes, int]:
    path = Path(path)
    with _open_for_reading(path, "tiktoken file") as f:
        raw = f.read()
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            # Not validate=True: real files (Whisper's) hold a lone "=" for an empty token, which
            # tiktoken reads as b"".
            token, rank = base64.b64decode(parts[0]), int(parts[1])
        except (ValueError, binascii.Error):
            raise NpgptError(f"{path} line {line_no} is not `base64-token rank`; give a tiktoken rank "
                             f"file (like cl100k_base.tiktoken)") from None
        if token in ranks:
            raise NpgptError(f"{path} line {line_no} repeats the token {token!r}; the file is corrupt")
        ranks[token] = rank
    if not ranks:
        raise NpgptError(f"{path} holds no tokens; give a tiktoken rank file (like cl100k_base.tiktoken)")
    return _check_dense_ids(path, ranks, "rank", "the file is corrupt")


def _check_dense_ids(path, table: dict, what: str, fix: str) -> dict:
    """token -> id (vocab.json) or rank (tiktoken): every number below the entry count and none
    shared, so the ids are exactly 0..n-1 and an embedding of n rows covers them (a stranger's file
    naming id 10**9 must not size an allocation)."""
    bad = next((t for t, i in table.items() if not 0 <= i < len(table)), None)
    if bad is not None:
        raise NpgptError(f"{path}: token {bad[:40]!r} has {what} {table[bad]}, outside 0..{len(table) - 1} "
                         f"({what}s must be below the number of entries); {fix}")
    if len(set(table.values())) != len(table):
        raise NpgptError(f"{path}: two tokens share a{'n' if what == 'id' else ''} {what}; {fix}")
    return table


def format_tiktoken_ranks(tokens: list[tuple[bytes, int]]) -> str:
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in tokens)
