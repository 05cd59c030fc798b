"""Supervised fine-tuning data: JSONL records -> token rows with loss only on the answers.

Two record shapes are accepted, one JSON object per line:

    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

Prompt/completion records become plain text: prompt tokens, completion tokens, end-of-text.
Chat records use the model's own chat template when its tokenizer has one (a Hugging Face or GGUF
model: Jinja, see npgpt.tokenizer.chat_template); the assistant tokens are what each assistant
message adds to the rendered text ({% generation %} blocks when the template has them), which
includes the template's end-of-turn marker. npgpt-trained models use npgpt's own template, built
from special tokens that are added to the tokenizer (and rows added to the embedding) when missing:

    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|><|endoftext|>

The loss counts only completion / assistant tokens, including the closing <|end|> (or
end-of-text, or the model template's end-of-turn token) so the model learns to stop; every other
target is -1, the model's ignore_index.
Each record is its own row, right-padded to block_size (no packing, so records never attend to
each other). Records longer than block_size + 1 tokens are truncated and counted, or rejected
under `strict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npgpt import tokenizer as tk
from npgpt.backend import to_device
from npgpt.checkpoint import find_checkpoint
from npgpt.errors import NpgptError
from npgpt.gguf_models import gguf_context_length, is_gguf
from npgpt.llama import config_from_hf
from npgpt.model import read_hf_config
from npgpt.safeio import read_jsonl
from npgpt.tokenizer.chat_template import CHAT_TOKENS   # npgpt's own chat format: one token per role

ROLES = ("system", "user", "assistant")
MAX_SFT_BYTES = 1 << 30


def read_checked_records(path, what, validate, max_bytes):
    """[validate(record, where)] of a JSONL file (npgpt.safeio's JSON limits per line); errors name
    the file as `what` and the line. Shared by SFT records and preference pairs (npgpt.dpo)."""
    p = Path(path)
    if not p.exists():
        raise NpgptError(f"{what} {p} does not exist")
    records = [validate(rec, where) for where, rec in read_jsonl(p, what, max_bytes=max_bytes)]
    if not records:
        raise NpgptError(f"{what} {p} holds no records")
    return records


def read_records(path):
    """Parse a JSONL file of SFT records; errors name the line."""
    return read_checked_records(path, "SFT file", validate_record, MAX_SFT_BYTES)


def validate_record(rec, where):
    if not isinstance(rec, dict):
        raise NpgptError(f"{where}: expected a JSON object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise NpgptError(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise NpgptError(f"{where}: each message needs a 'role' and a string 'content'")
            if not isinstance(m.get("role"), str) or m["role"] not in ROLES:
                raise NpgptError(f"{where}: unknown role {m.get('role')!r}; use system, user or assistant")
        if not any(m["role"] == "assistant" for m in msgs):
            raise NpgptError(f"{where}: a chat record needs at least one assistant message to learn from")
        return rec
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        return rec
    raise NpgptError(f"{where}: a record needs 'prompt' and 'completion' strings, or 'messages'")


def ensure_chat_tokens(tok):
    """Add the chat template's special tokens to `tok` if missing; returns their ids."""
    missing = [t for t in CHAT_TOKENS if t not in tok.special_tokens]
    if missing:
        tok.add_special_tokens(missing)
    return {t: tok.special_tokens[t] for t in CHAT_TOKENS}


def has_model_template(tok) -> bool:
    """Whether `tok` came with the model's own chat template (else npgpt's format is used)."""
    return tok.chat_template is not None


def is_chat_model(tok) -> bool:
    """Whether the model can chat: its own template, or npgpt's chat tokens from `finetune --sft`."""
    return has_model_template(tok) or all(t in tok.special_tokens for t in CHAT_TOKENS)


def render_chat(tok, messages, add_generation_prompt=False):
    """(ids, loss_mask) for a conversation: the model's own chat template when it has one, else npgpt's;
    mask marks assistant tokens."""
    if has_model_template(tok):
        if add_generation_prompt:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True)
            return ids, [False] * len(ids)
        return tok.chat_ids_and_mask(messages)
    sp = ensure_chat_tokens(tok)
    ids, mask = [], []
    for m in messages:
        body = tok.encode_plain(m["content"])
        learn = m["role"] == "assistant"
        ids += [sp[f"<|{m['role']}|>"]] + body + [sp["<|end|>"]]
        mask += [False] + [learn] * len(body) + [learn]
    if add_generation_prompt:
        ids.append(sp["<|assistant|>"])
        mask.append(False)
    else:
        ids.append(tok.eot_id)
        mask.append(False)
    return ids, mask


def render_record(tok, rec):
    """(ids, loss_mask) of one record; see the module docstring."""
    if "messages" in rec:
        return render_chat(tok, rec["messages"])
    p, c = tok.encode_plain(rec["prompt"]), tok.encode_plain(rec["completion"])
    ids = p + c + [tok.eot_id]
    return ids, [False] * len(p) + [True] * (len(c) + 1)


class TokenRows:
    """What a batch source of tokenized rows shares (SFT here, preference pairs in npgpt.dpo): its
    tokenizer, the vocabulary size, and rows built for one block size."""
    kind = "token"

    @property
    def vocab_size(self):
        return self.tok.vocab_size

    def tokenizer(self):
        return self.tok

    def check_split_sizes(self, block_size):
        if block_size != self.block_size:
            raise NpgptError(f"{self.kind} rows were built for block_size {self.block_size}, not {block_size}")


@dataclass
class SFTData(TokenRows):
    """SFT rows as a batch source for npgpt.train: get_batch / tokenizer / vocab_size."""
    kind = "SFT"
    tok: object
    block_size: int
    rows: dict = field(default_factory=dict)       # split -> (x (N, T), y (N, T)) int64 arrays
    truncated: int = 0
    path: str = ""
    grow_vocab: bool = True                        # the model may need embedding rows for new specials

    @classmethod
    def build(cls, tok, records, block_size, strict=False, val_fraction=0.1, seed=0, path=""):
        T = block_size
        xs, ys, truncated = [], [], 0
        for i, rec in enumerate(records):
            ids, mask = render_record(tok, rec)
            if len(ids) > T + 1:
                if strict:
                    raise NpgptError(f"record {i + 1} is {len(ids)} tokens, longer than block_size + 1 = {T + 1} "
                                     f"(--strict); shorten it or drop --strict to truncate")
                ids, mask = ids[:T + 1], mask[:T + 1]
                truncated += 1
            x = np.full(T, tok.eot_id, dtype=np.int64)
            y = np.full(T, -1, dtype=np.int64)
            n = len(ids) - 1
            x[:n] = ids[:-1]
            y[:n] = np.where(mask[1:], ids[1:], -1)   # the target of position t is token t+1
            xs.append(x)
            ys.append(y)
        order = np.random.default_rng(seed).permutation(len(xs))
        n_val = int(round(len(xs) * val_fraction)) if len(xs) > 1 else 0
        if val_fraction > 0 and len(xs) > 1:
            n_val = max(1, n_val)
        val_ids, train_ids = order[:n_val], order[n_val:]
        if len(train_ids) == 0:
            raise NpgptError("no SFT records left for training after the validation split; add records")
        X, Y = np.stack(xs), np.stack(ys)
        if not (Y[train_ids] >= 0).any():
            raise NpgptError("no completion tokens to learn from (all were truncated away?)")
        rows = {"train": (X[train_ids], Y[train_ids])}
        rows["val"] = (X[val_ids], Y[val_ids]) if n_val else rows["train"]
        return cls(tok, T, rows, truncated, str(path))

    @classmethod
    def for_training(cls, cfg, stream=None, trust_pattern=False):
        """Build from a TrainConfig with sft / init_from / block_size; reports truncation. trust_pattern:
        the model's tokenizer may use a split regex that is not a named one (`npgpt --trust-pattern`)."""

        src = find_checkpoint(cfg.init_from or cfg.out)
        if is_gguf(src):                      # one file: the tokenizer and the context length are inside
            tok, n_pos = tk.load(src), gguf_context_length(src)
        else:
            if not tk.is_tokenizer_dir(src):
                raise NpgptError(f"{src} has no tokenizer files; SFT uses the model's own tokenizer")
            tok = tk.load(src, trust_pattern=trust_pattern)
            n_pos = config_from_hf(read_hf_config(src)).block_size
        records = read_records(cfg.sft)
        # default context: just long enough for the longest record (padding costs compute)
        T = cfg.block_size or min(n_pos, max(len(render_record(tok, r)[0]) for r in records) - 1)
        T = max(T, 1)
        data = cls.build(tok, records, T, strict=cfg.sft_strict, val_fraction=cfg.sft_val_fraction,
                         seed=cfg.seed, path=cfg.sft)
        if not cfg.quiet:
            n_tr, n_va = len(data.rows["train"][0]), len(data.rows["val"][0])
            print(f"SFT: {len(records)} records ({n_tr} train, {n_va} val) in rows of {T} tokens"
                  + ("" if cfg.block_size else ", the longest record's length")
                  + f" (the model's context is {n_pos}); {data.truncated} truncated", file=stream)
        return data

    def get_batch(self, split, batch_size, block_size, rng, device=None):
        X, Y = self.rows[split]
        pick = rng.integers(0, len(X), size=batch_size)
        x, y = X[pick], Y[pick]
        return (to_device(x, device), to_device(y, device)) if device and str(device) != "cpu" else (x, y)
