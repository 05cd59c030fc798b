"""Tokenizers: text to token ids and back.

    CharTokenizer   one id per character (tiny corpora, teaching)
    BPETokenizer    byte-level BPE as in GPT-2: train it on your text, or load GPT-2's own files
    HFTokenizer     a Hugging Face tokenizer.json (GPT-2, Llama 3, Qwen2, SmolLM2) with its chat template

Both share the interface of `Tokenizer` (encode, decode, vocab_size, eot_id, special tokens, save,
fingerprint); `load(folder)` reads either back, and also a plain GPT-2 / Hugging Face folder
(vocab.json + merges.txt) or a Hugging Face tokenizer.json. File formats are described in `char`, `bpe` and `files`.
"""

from npgpt.tokenizer.base import EOT, Tokenizer
from npgpt.tokenizer.bpe import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer
from npgpt.tokenizer.char import CharTokenizer
from npgpt.tokenizer.files import iter_text_chunks, read_text_checked
from npgpt.tokenizer.hf import HFTokenizer
from npgpt.tokenizer.loader import is_tokenizer_dir, load

__all__ = [
    "EOT", "GPT2_PATTERN", "GPT4_PATTERN", "BPETokenizer", "CharTokenizer", "HFTokenizer", "Tokenizer",
    "is_tokenizer_dir", "iter_text_chunks", "load", "read_text_checked",
]
