"""Finding out what kind of tokenizer a folder holds, and loading it.

A tokenizer folder is one of:

    tokenizer_npgpt.json (kind "char")                  a CharTokenizer saved by npgpt
    tokenizer_npgpt.json (kind "bpe") + vocab.json      a BPETokenizer saved by npgpt
        + merges.txt
    tokenizer.json (+ tokenizer_config.json)            a Hugging Face tokenizer (npgpt.tokenizer.hf):
                                                        its own split, added tokens, BOS and chat
                                                        template; preferred over vocab.json + merges.txt
                                                        (Qwen2 folders hold both, and those two files do
                                                        not say how to split)
    vocab.json + merges.txt                             a GPT-2 / Hugging Face byte-level BPE folder:
                                                        GPT-2's split pattern is assumed, and vocab
                                                        entries that no merge makes (`<|endoftext|>`)
                                                        are its special tokens

Other files in the folder (special_tokens_map.json, ...) are ignored.
"""

from __future__ import annotations

from pathlib import Path

from npgpt.errors import NpgptError
from npgpt.safeio import read_json_object
from npgpt.tokenizer.base import FORMAT_VERSION, META_FILE, Tokenizer
from npgpt.tokenizer.bpe import BPETokenizer, check_pattern
from npgpt.tokenizer.char import CharTokenizer
from npgpt.tokenizer.gguf import load_gguf_tokenizer
from npgpt.tokenizer.hf import TOKENIZER_JSON, HFTokenizer


def is_tokenizer_dir(path) -> bool:
    """Whether `path` is a folder `load` can read (judged by which files are present)."""
    path = Path(path)
    return path.is_dir() and ((path / META_FILE).is_file() or (path / TOKENIZER_JSON).is_file()
                              or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()))


def _read_meta(meta_path: Path) -> dict:
    meta = read_json_object(meta_path, "tokenizer file")
    version = meta.get("version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise NpgptError(f"{meta_path} has format version {version!r}, newer than this npgpt reads "
                         f"({FORMAT_VERSION}); upgrade npgpt")
    return meta


def load(path, trust_pattern: bool = False) -> Tokenizer:
    """Load the tokenizer saved in folder `path` (npgpt char or BPE, a Hugging Face tokenizer.json, or a
    GPT-2 folder), or the one inside a GGUF file `path`.

    A BPE split pattern other than the named ones (gpt2, gpt4, llama3, qwen2) loads only with
    `trust_pattern=True` (what `npgpt --trust-pattern` passes)."""
    path = Path(path)
    if not path.exists():
        raise NpgptError(f"tokenizer folder {path} does not exist; check the path or train a tokenizer first")
    if path.is_file() and path.suffix.lower() == ".gguf":        # llama.cpp's file carries its tokenizer
        return load_gguf_tokenizer(path)
    if not path.is_dir():
        raise NpgptError(f"{path} is a file; give the folder that holds the tokenizer files")
    meta_path = path / META_FILE
    if meta_path.is_file():
        meta = _read_meta(meta_path)
        kind = meta.get("kind")
        if kind == "char":
            return CharTokenizer.from_meta(meta, meta_path)
        if kind == "bpe":
            pattern = check_pattern(meta.get("pattern", "gpt2"), meta_path, trust_pattern)
            specials = meta.get("special_tokens", {})
            if not isinstance(specials, dict) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in specials.values()):
                raise NpgptError(f"{meta_path} has a malformed 'special_tokens'; re-save the tokenizer")
            return BPETokenizer.from_gpt2_files(path, pattern=pattern, special_tokens=specials)
        raise NpgptError(f"{meta_path} names an unknown tokenizer kind {kind!r} (expected 'char' or 'bpe'); "
                         f"re-save the tokenizer")
    if (path / TOKENIZER_JSON).is_file():
        return HFTokenizer.from_folder(path, trust_pattern)
    if (path / "vocab.json").exists() or (path / "merges.txt").exists():
        return BPETokenizer.from_gpt2_files(path)
    raise NpgptError(f"{path} holds no tokenizer: expected {META_FILE}, {TOKENIZER_JSON}, or vocab.json + merges.txt; "
                     f"train one or copy a GPT-2 tokenizer folder there")
