"""Finding out what kind of tokenizer a folder holds, and loading it.

A tokenizer folder is one of:

    tokenizer_npgpt.json (kind "char")                  a CharTokenizer saved by npgpt
    tokenizer_npgpt.json (kind "bpe") + vocab.json      a BPETokenizer saved by npgpt
        + merges.txt
    vocab.json + merges.txt                             a GPT-2 / Hugging Face byte-level BPE folder:
                                                        GPT-2's split pattern is assumed, and vocab
                                                        entries that no merge makes (`<|endoftext|>`)
                                                        are its special tokens

Other files in the folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from npgpt.errors import NpgptError
from npgpt.tokenizer.base import FORMAT_VERSION, META_FILE, Tokenizer
from npgpt.tokenizer.bpe import BPETokenizer
from npgpt.tokenizer.char import CharTokenizer


def is_tokenizer_dir(path) -> bool:
    """Whether `path` is a folder `load` can read (judged by which files are present)."""
    path = Path(path)
    return path.is_dir() and ((path / META_FILE).is_file()
                              or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()))


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NpgptError(f"{meta_path} cannot be read as JSON ({e}); re-save the tokenizer") from None
    if not isinstance(meta, dict):
        raise NpgptError(f"{meta_path} must hold a JSON object; re-save the tokenizer")
    version = meta.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NpgptError(f"{meta_path} has format version {version!r}, newer than this npgpt reads "
                         f"({FORMAT_VERSION}); upgrade npgpt")
    return meta


def load(path) -> Tokenizer:
    """Load the tokenizer saved in folder `path` (npgpt char or BPE, or a GPT-2 / HF folder)."""
    path = Path(path)
    if not path.exists():
        raise NpgptError(f"tokenizer folder {path} does not exist; check the path or train a tokenizer first")
    if not path.is_dir():
        raise NpgptError(f"{path} is a file; give the folder that holds the tokenizer files")
    meta_path = path / META_FILE
    if meta_path.is_file():
        meta = _read_meta(meta_path)
        kind = meta.get("kind")
        if kind == "char":
            return CharTokenizer.from_meta(meta, meta_path)
        if kind == "bpe":
            pattern, specials = meta.get("pattern", "gpt2"), meta.get("special_tokens", {})
            if not isinstance(pattern, str) or not isinstance(specials, dict) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in specials.values()):
                raise NpgptError(f"{meta_path} has a malformed 'pattern' or 'special_tokens'; re-save the tokenizer")
            return BPETokenizer.from_gpt2_files(path, pattern=pattern, special_tokens=specials)
        raise NpgptError(f"{meta_path} names an unknown tokenizer kind {kind!r} (expected 'char' or 'bpe'); "
                         f"re-save the tokenizer")
    if (path / "vocab.json").exists() or (path / "merges.txt").exists():
        return BPETokenizer.from_gpt2_files(path)
    raise NpgptError(f"{path} holds no tokenizer: expected {META_FILE}, or vocab.json + merges.txt; "
                     f"train one or copy a GPT-2 tokenizer folder there")
