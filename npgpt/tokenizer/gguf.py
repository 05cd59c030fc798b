"""A GGUF file's tokenizer: llama.cpp's `tokenizer.*` metadata as an HFTokenizer, and back.

llama.cpp keeps a byte-level BPE (`tokenizer.ggml.model` "gpt2") as parallel lists: `tokens` (the
id is the position; ordinary tokens spelled in GPT-2's byte alphabet), `token_type` (1 normal,
3 control, 4 user-defined, 5 unused, 6 byte), `merges` ("left right", rank order), the ids of
bos / eos / padding, `add_bos_token`, and the pre-tokenizer by name (`tokenizer.ggml.pre`). Control
tokens become special added tokens, user-defined ones added tokens; the pre-tokenizer name maps to
a tokenizer.json pre_tokenizer (npgpt.tokenizer.hf.PRE_TOKENIZERS, plus llama.cpp's own `default`
split). The chat template is `tokenizer.chat_template`. Everything is checked before it is built:
the GGUF reader (npgpt.gguf) has bounded every count and string; ids named here must exist.
"""

from __future__ import annotations

import numpy as np

from npgpt.errors import NpgptError
from npgpt.gguf import GGUFFile
from npgpt.tokenizer.base import EOT
from npgpt.tokenizer.bpe import GPT2_PATTERN, PATTERNS, BPETokenizer
from npgpt.tokenizer.files import bytes_to_gpt2_string, gpt2_string_to_bytes
from npgpt.tokenizer.hf import PRE_TOKENIZERS, AddedToken, HFTokenizer

# ggml token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _isolated(pattern):
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


# llama.cpp's `default` BPE pre-tokenizer: four regexes, each cutting the pieces the one before left
LLAMA_CPP_DEFAULT = {"type": "Sequence", "pretokenizers": [
    _isolated(r"[\p{P}\$\+<=>\^~\|]+"),
    _isolated(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"),
    _isolated(r"\p{N}+"), _isolated(r"[0-9][0-9][0-9]"),
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> npgpt.tokenizer.hf's (or a spec)
PRE_SPECS = {"gpt-2": "gpt2", "llama-bpe": "llama3", "llama3": "llama3", "qwen2": "qwen2", "smollm": "smollm",
             "default": LLAMA_CPP_DEFAULT}
# and back, for writing
PRE_NAMES = {"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2", "smollm": "smollm"}


def tokenizer_from_gguf(g: GGUFFile) -> HFTokenizer:
    """The byte-level BPE tokenizer in a GGUF file's tokenizer.* metadata: tokens (ids are positions),
    token types (control -> special added tokens, user-defined -> added tokens), merges, the
    pre-tokenizer by name, bos/eos/padding ids, add_bos_token and the chat template."""
    where = f"{g.path}: tokenizer"
    model = g.require("tokenizer.ggml.model", str)
    if model != "gpt2":
        kind = {"llama": "a SentencePiece (llama) tokenizer", "bert": "a WordPiece (bert) tokenizer"}.get(
            model, f"tokenizer model {model!r}")
        raise NpgptError(f"{g.path} holds {kind}; npgpt reads byte-level BPE tokenizers (tokenizer.ggml.model "
                         f"'gpt2': GPT-2, Llama 3, Qwen2, SmolLM2) only")
    pre = g.get("tokenizer.ggml.pre", "default", str)
    spec = PRE_SPECS.get(pre)
    if spec is None:
        raise NpgptError(f"{g.path}: pre-tokenizer {pre!r} is not supported (npgpt knows "
                         f"{', '.join(sorted(PRE_SPECS))})")
    tokens = g.require("tokenizer.ggml.tokens", list)
    n = len(tokens)
    types = g.get("tokenizer.ggml.token_type", None, list)
    if types is not None and len(types) != n:
        raise NpgptError(f"{where}: {len(types)} token types for {n} tokens")
    vocab, extra, added = {}, {}, []
    for i, s in enumerate(tokens):
        kind = NORMAL if types is None else int(types[i])
        if kind in (CONTROL, USER_DEFINED):
            added.append(AddedToken(i, s, special=kind == CONTROL))
            continue
        b = gpt2_string_to_bytes(s)
        if b is None or b in vocab:
            extra[s] = i                      # decodable by its UTF-8, never produced by merges
        else:
            vocab[b] = i
    merges = []
    for rank, m in enumerate(g.get("tokenizer.ggml.merges", [], list)):
        parts = m.split(" ") if isinstance(m, str) else []
        pair = tuple(gpt2_string_to_bytes(p) for p in parts) if len(parts) == 2 and all(parts) else None
        if pair is None or None in pair:
            raise NpgptError(f"{where}: merge {rank} {m!r:.40} is not two tokens in GPT-2's byte alphabet")
        merges.append(pair)

    def name(key):
        i = g.get(key, None, int)
        if i is None:
            return None
        if not 0 <= i < n:
            raise NpgptError(f"{where}: {key} {i} is not a token id (0..{n - 1})")
        return tokens[i]

    bos = name("tokenizer.ggml.bos_token_id")
    post = None
    if g.get("tokenizer.ggml.add_bos_token", False, bool) and bos is not None:
        bos_id = g.get("tokenizer.ggml.bos_token_id", kind=int)
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    try:
        # the split regexes come from PRE_SPECS above, not from the file: they need no --trust-pattern
        return HFTokenizer(vocab, merges, added, pre_tokenizer=spec, post_processor=post, bos_token=bos,
                           eos_token=name("tokenizer.ggml.eos_token_id"),
                           pad_token=name("tokenizer.ggml.padding_token_id"),
                           chat_template=g.get("tokenizer.chat_template", None, str), trust_pattern=True,
                           where=str(g.path), extra_vocab=extra)
    except NpgptError as e:
        msg = str(e)
        raise NpgptError(msg if str(g.path) in msg else f"{where}: {msg}") from None


def load_gguf_tokenizer(path) -> HFTokenizer:
    return tokenizer_from_gguf(GGUFFile(path))


def _pre_name(tok):
    if isinstance(tok, HFTokenizer):
        spec = tok.pre_tokenizer_spec
        found = next((PRE_NAMES[k] for k, v in PRE_TOKENIZERS.items() if v == spec and k in PRE_NAMES), None)
        if found is None and spec == LLAMA_CPP_DEFAULT:
            found = "default"
        return found
    pattern = PATTERNS.get(tok.pattern, tok.pattern)
    return "gpt-2" if pattern == GPT2_PATTERN else None


def tokenizer_metadata(tok):
    """The tokenizer.* keys of a GGUF file for a byte-level BPE tokenizer (NpgptError for others)."""
    if not isinstance(tok, BPETokenizer):
        raise NpgptError(f"a {getattr(tok, 'kind', type(tok).__name__)} tokenizer has no GGUF form (llama.cpp reads "
                         f"byte-level BPE tokenizers); train the model with --tokenizer bpe to export it")
    pre = _pre_name(tok)
    if pre is None:
        raise NpgptError("this tokenizer's pre-tokenizer has no llama.cpp name (gpt-2, llama-bpe, qwen2 and "
                         "smollm are written); export a model with one of those")
    specials = {i: s for s, i in tok.special_tokens.items()}
    added = {t.id: t for t in getattr(tok, "added_tokens", ())}
    extra = {i: s for s, i in getattr(tok, "extra_vocab", {}).items()}
    tokens, types = [], []
    for i in range(tok.vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        elif i in specials:
            tokens.append(specials[i])
            types.append(CONTROL)
        elif i in extra:
            tokens.append(extra[i])
            types.append(NORMAL)
        elif tok._id_to_bytes[i] is None:                        # a gap in the ids
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(bytes_to_gpt2_string(tok._id_to_bytes[i]))
            types.append(NORMAL)
    merges = [f"{bytes_to_gpt2_string(tok._id_to_bytes[a])} {bytes_to_gpt2_string(tok._id_to_bytes[b])}"
              for a, b in tok.merges]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, np.int32), "tokenizer.ggml.merges": merges}
    ids = {"bos": getattr(tok, "bos_id", None), "eos": tok.eot_id if (EOT in tok.special_tokens or
                                                                      getattr(tok, "eos_token", None)) else None,
           "padding": None if getattr(tok, "pad_token", None) is None else tok.token_id(tok.pad_token)}
    if ids["bos"] is None and ids["eos"] is not None and not isinstance(tok, HFTokenizer):
        ids["bos"] = ids["eos"]                                  # GPT-2: <|endoftext|> both ways
    for key, value in ids.items():
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(value)
    meta["tokenizer.ggml.add_bos_token"] = bool(getattr(tok, "add_bos", False))
    template = getattr(tok, "chat_template", None)
    if template:
        meta["tokenizer.chat_template"] = template
    return meta
