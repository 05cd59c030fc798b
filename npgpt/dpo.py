"""Preference tuning: `npgpt finetune --dpo prefs.jsonl` (DPO, conservative DPO, IPO; npgpt.ops.preference).

A preference file is JSONL, one pair per line, in either of the two shapes TRL writes:

    {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
    {"prompt": [{"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello."}],
     "rejected": [{"role": "assistant", "content": "Go away."}]}

Strings are plain text: prompt tokens, then the response's tokens and end-of-text (as SFT's
prompt/completion records). The chat form is rendered with the model's chat template (npgpt's own
after `finetune --sft`), the response being what the chosen / rejected messages add after the
prompt's generation prompt. Only response tokens count: each pair's score is the summed
log-probability of its response tokens, log pi(y|x).

How it plugs into the trainer (npgpt.train, nothing forked):

    PreferenceData   the batch source: a batch is x (B, 4, T) = each pair's chosen ids, chosen
                     targets, rejected ids, rejected targets (-1 off the response), and y (B,) the
                     pairs' numbers. y keys the reference cache, and the data-parallel and thread-
                     replica weighting counts its entries: one per pair, so a step's loss is the
                     mean over the global batch's pairs.
    dpo_plugin       the loss (hooks.loss_fn and eval_loss), the reference log-probabilities
                     computed once before the first step and cached (a LoRA model's reference is its
                     own base with the adapters disabled, so no second copy is held; a full fine-tune
                     saves the cache with each checkpoint, so --resume uses the same reference),
                     and at each evaluation, on the held-out pairs: the preference accuracy (the
                     implicit reward of chosen above rejected; 0 at step 0, where every margin
                     is 0), the mean reward margin and rewards, and the log-probability accuracy
                     (log pi(chosen) > log pi(rejected): the model's own preference, before
                     and after).
    finetune_dpo     the whole run: data + plugin + npgpt.train.train (what the CLI calls).

Gradient accumulation, data parallelism (mpiexec), LoRA on float and quantised bases and --resume
are the trainer's own and work unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npgpt import tokenizer as tk
from npgpt.backend import asnumpy, get_xp, to_device
from npgpt.checkpoint import find_checkpoint, load_tensors, save_tensors
from npgpt.errors import NpgptError
from npgpt.gguf_models import gguf_context_length, is_gguf
from npgpt.layers import adapters_disabled
from npgpt.llama import config_from_hf
from npgpt.lora import has_lora
from npgpt.model import read_hf_config
from npgpt.ops.preference import dpo_loss, preference_stats, token_logprobs
from npgpt.safeio.tensors import read_safetensors_header
from npgpt.sft import ROLES, TokenRows, read_checked_records, render_chat
from npgpt.tensor import no_grad
from npgpt.train import train

MAX_DPO_BYTES = 1 << 30            # a preference file is data the user brings: generous, but bounded
MAX_TEXT_CHARS = 1 << 20           # one prompt or response (1M characters); a longer one is not a pair
MAX_MESSAGES = 1024
REFERENCE_FILE = "dpo_reference.safetensors"


# ---- reading the file ------------------------------------------------------------------------------
def _text(v, where, key):
    if not isinstance(v, str):
        raise NpgptError(f"{where}: '{key}' must be a string or a list of messages, got {type(v).__name__}")
    if len(v) > MAX_TEXT_CHARS:
        raise NpgptError(f"{where}: '{key}' is {len(v):,} characters, more than {MAX_TEXT_CHARS:,}")
    return v


def _messages(v, where, key, roles=ROLES):
    if not isinstance(v, list) or not v:
        raise NpgptError(f"{where}: '{key}' must be a non-empty list of messages")
    if len(v) > MAX_MESSAGES:
        raise NpgptError(f"{where}: '{key}' holds {len(v):,} messages, more than {MAX_MESSAGES:,}")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise NpgptError(f"{where}: '{key}' message {i} needs a 'role' and a 'content'")
        if m["role"] not in roles:
            raise NpgptError(f"{where}: '{key}' message {i} has role {m['role']!r}; use {', '.join(roles)}")
        out.append({"role": m["role"], "content": _text(m["content"], where, f"{key}[{i}].content")})
    return out


def validate_pair(rec, where):
    """A checked record: {"prompt": str, "chosen": str, "rejected": str} or the chat form
    {"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}. NpgptError naming the line."""
    if not isinstance(rec, dict):
        raise NpgptError(f"{where}: expected a JSON object with prompt, chosen and rejected")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
    if missing:
        raise NpgptError(f"{where}: missing {', '.join(repr(k) for k in missing)}; a record is "
                         f'{{"prompt": ..., "chosen": ..., "rejected": ...}}')
    if isinstance(rec["prompt"], list):
        out = {"prompt": _messages(rec["prompt"], where, "prompt")}
        for k in ("chosen", "rejected"):
            v = rec[k]
            out[k] = ([{"role": "assistant", "content": _text(v, where, k)}] if isinstance(v, str)
                      else _messages(v, where, k, roles=("assistant",)))
        return out
    # an empty response is a response: its end-of-text token is what counts
    return {k: _text(rec[k], where, k) for k in ("prompt", "chosen", "rejected")}


def read_pairs(path):
    """[checked record] of a preference JSONL file (npgpt.safeio's JSON limits on every line)."""
    return read_checked_records(path, "preference file", validate_pair, MAX_DPO_BYTES)


# ---- tokens ------------------------------------------------------------------------------------------
def render_pair(tok, rec):
    """((chosen ids, mask), (rejected ids, mask)): prompt + response token ids, mask True on the
    response tokens (and its end-of-text / end-of-turn token)."""
    if isinstance(rec["prompt"], str):
        p = tok.encode_plain(rec["prompt"])
        out = []
        for k in ("chosen", "rejected"):
            r = tok.encode_plain(rec[k]) + [tok.eot_id]
            out.append((p + r, [False] * len(p) + [True] * len(r)))
        return tuple(out)
    start, _ = render_chat(tok, rec["prompt"], add_generation_prompt=True)
    out = []
    for k in ("chosen", "rejected"):
        reply = rec[k] if isinstance(rec[k], list) else [{"role": "assistant", "content": rec[k]}]
        ids, mask = render_chat(tok, rec["prompt"] + reply)
        n = len(start) if ids[:len(start)] == start else 0    # the prompt's tokens never count
        out.append((ids, [False] * n + [bool(m) for m in mask[n:]]))
    return tuple(out)


def _row(ids, mask, T, pad_id):
    """(x (T,), y (T,)) int32: inputs and the next-token targets, -1 off the response."""
    x = np.full(T, pad_id, dtype=np.int32)
    y = np.full(T, -1, dtype=np.int32)
    n = len(ids) - 1
    x[:n] = ids[:-1]
    y[:n] = np.where(mask[1:], ids[1:], -1)
    return x, y


@dataclass
class PreferenceData(TokenRows):
    """Preference pairs as a batch source for npgpt.train (see the module docstring for a batch's layout)."""
    kind = "preference"
    tok: object
    block_size: int
    rows: np.ndarray = None                        # (N, 4, T) int32: chosen x, y, rejected x, y
    splits: dict = field(default_factory=dict)     # "train" / "val" -> pair numbers
    truncated: int = 0
    identical: int = 0                             # pairs whose chosen and rejected are the same text
    path: str = ""
    grow_vocab: bool = True                        # npgpt's chat template may add its special tokens

    @classmethod
    def build(cls, tok, pairs, block_size, strict=False, val_fraction=0.1, seed=0, path=""):
        T = block_size
        rows, truncated, identical = np.empty((len(pairs), 4, T), dtype=np.int32), 0, 0
        for i, rec in enumerate(pairs):
            (ci, cm), (ri, rm) = render_pair(tok, rec)
            identical += ci == ri
            for j, (ids, mask) in enumerate(((ci, cm), (ri, rm))):
                if len(ids) > T + 1:
                    if strict:
                        raise NpgptError(f"pair {i + 1} is {len(ids)} tokens, longer than block_size + 1 = {T + 1} "
                                         f"(--strict); shorten it or drop --strict to truncate its response")
                    ids, mask = ids[:T + 1], mask[:T + 1]
                    truncated += 1
                rows[i, 2 * j], rows[i, 2 * j + 1] = _row(ids, mask, T, tok.eot_id)
        counted = (rows[:, 1] >= 0).any(axis=1) & (rows[:, 3] >= 0).any(axis=1)
        if not counted.all():
            bad = int(np.flatnonzero(~counted)[0]) + 1
            raise NpgptError(f"pair {bad}: a response has no tokens left inside block_size {T} (the prompt fills "
                             f"it); give a larger --block-size or a shorter prompt")
        order = np.random.default_rng(seed).permutation(len(pairs))
        n_val = max(1, int(round(len(pairs) * val_fraction))) if val_fraction > 0 and len(pairs) > 1 else 0
        splits = {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}
        if not n_val:
            splits["val"] = splits["train"]
        return cls(tok, T, rows, splits, truncated, identical, str(path))

    @classmethod
    def for_training(cls, cfg, stream=None):
        """Build from a TrainConfig (dpo, init_from / out, block_size, sft_strict, dpo_val_fraction)."""
        tok, n_pos = model_tokenizer(find_checkpoint(cfg.init_from or cfg.out))
        pairs = read_pairs(cfg.dpo)
        longest = max(len(ids) for rec in pairs for ids, _ in render_pair(tok, rec))
        T = max(1, cfg.block_size or min(n_pos, longest - 1))
        data = cls.build(tok, pairs, T, strict=cfg.sft_strict, val_fraction=cfg.dpo_val_fraction, seed=cfg.seed,
                         path=cfg.dpo)
        if not cfg.quiet:
            print(f"DPO: {len(pairs)} pairs ({len(data.splits['train'])} train, {len(data.splits['val'])} held out) "
                  f"in rows of {T} tokens (the model's context is {n_pos}); {data.truncated} responses truncated"
                  + (f"; {data.identical} pairs have chosen == rejected (they teach nothing)" if data.identical
                     else ""), file=stream)
        return data

    def get_batch(self, split, batch_size, block_size, rng, device=None):
        """x (B, 4, T) int64 pair rows, y (B,) int64 pair numbers."""
        pick = self.splits[split][rng.integers(0, len(self.splits[split]), size=batch_size)]
        x, y = self.rows[pick].astype(np.int64), pick.astype(np.int64)
        return (to_device(x, device), to_device(y, device)) if device and str(device) != "cpu" else (x, y)

    def digest(self):
        """sha256 of the rows: a cached reference belongs to exactly these pairs."""
        return hashlib.sha256(np.ascontiguousarray(self.rows).tobytes()).hexdigest()


def model_tokenizer(src):
    """(tokenizer, context length) of a model folder or .gguf file."""
    if is_gguf(src):
        return tk.load(src), gguf_context_length(src)
    if not tk.is_tokenizer_dir(src):
        raise NpgptError(f"{src} has no tokenizer files; preference tuning uses the model's own tokenizer")
    return tk.load(src), config_from_hf(read_hf_config(src)).block_size


# ---- the loss ------------------------------------------------------------------------------------------
def pair_logprobs(model, x):
    """x (B, 4, T) pair rows -> (chosen (B,), rejected (B,)) Tensors: summed response log-probabilities,
    both responses of every pair in one forward pass."""
    B = x.shape[0]
    ids = concatenate_rows(x[:, 0], x[:, 2])                  # (2B, T)
    targets = concatenate_rows(x[:, 1], x[:, 3])
    logits, _ = model(ids)                                   # (2B, T, V)
    lp = token_logprobs(logits, targets).sum(axis=1)         # (2B,)
    return lp[:B], lp[B:]


def concatenate_rows(a, b):
    return get_xp(a).concatenate([a, b], axis=0)


def split_logprobs(model, data, split, batch_size):
    """(chosen, rejected) float64 arrays: log-probabilities of the pairs of `split`, in order, in
    chunks of batch_size (eval mode, no graph)."""
    pick = data.splits[split]
    c, r = np.zeros(len(pick)), np.zeros(len(pick))
    was = model.training
    model.eval()
    try:
        with no_grad():
            for lo in range(0, len(pick), batch_size):
                x = data.rows[pick[lo:lo + batch_size]].astype(np.int64)
                lc, lr = pair_logprobs(model, to_device(x, model.device) if str(model.device) != "cpu" else x)
                c[lo:lo + len(x)], r[lo:lo + len(x)] = asnumpy(lc.data), asnumpy(lr.data)
    finally:
        model.train(was)
    return c, r


def reference_logprobs(model, data, batch_size):
    """(chosen (N,), rejected (N,)) float64: every pair's log-probabilities under the model as it is
    now (a LoRA model: its base, adapters disabled). Held-out pairs are scored in the same chunks as
    the evaluation scores them, so at step 0 their reward margins are exactly 0."""
    ref = np.zeros((2, len(data.rows)))
    with adapters_disabled():
        for split in ("val", "train"):
            ref[:, data.splits[split]] = split_logprobs(model, data, split, batch_size)
    return ref[0], ref[1]


def dpo_plugin(data: PreferenceData, stream=None):
    """The trainer plugin for a DPO run over `data` (see the module docstring)."""
    def plugin(model, src, cfg, hooks):
        log = (lambda msg: None) if cfg.quiet else (lambda msg: print(msg, file=stream))
        lora = has_lora(model)
        cached = Path(src) / REFERENCE_FILE if src else None
        if cfg.resume and not lora:
            ref_c, ref_r = _load_reference(cached, data)
            log(f"DPO: reference log-probabilities from {cached}")
        else:
            ref_c, ref_r = reference_logprobs(model, data, cfg.batch_size)
            log(f"DPO: reference log-probabilities of {len(ref_c)} pairs computed once ("
                + ("the LoRA base, adapters disabled" if lora else "the starting model") + ")")
        hooks.save_files.append(lambda folder: save_tensors(
            Path(folder) / REFERENCE_FILE, {"chosen": ref_c, "rejected": ref_r}, metadata={"rows_sha256": data.digest()}))
        beta, eps, kind = cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_loss

        def loss_fn(model, x, y):
            pick = asnumpy(y)
            c, r = pair_logprobs(model, x)
            return dpo_loss(c, r, ref_c[pick], ref_r[pick], beta=beta, label_smoothing=eps, loss=kind)

        def held_out(model, it):
            pick = data.splits["val"]
            c, r = split_logprobs(model, data, "val", cfg.batch_size)
            s = preference_stats(c, r, ref_c[pick], ref_r[pick], beta)
            return {"val_pref_accuracy": s["accuracy"], "val_reward_margin": s["margin"],
                    "val_reward_chosen": s["reward_chosen"], "val_reward_rejected": s["reward_rejected"],
                    "val_logp_accuracy": float(np.mean(c > r))}   # the model itself finds chosen likelier

        hooks.loss_fn = hooks.eval_loss = loss_fn
        hooks.eval_metrics.append(held_out)
        log(f"DPO: loss {kind}, beta {beta:g}" + (f", label smoothing {eps:g}" if eps else ""))
    return plugin


def _load_reference(path, data):
    if path is None or not path.is_file():
        raise NpgptError(f"--resume of a full DPO fine-tune needs its cached reference {path}; it is missing, so "
                         f"the reference model is gone: start the run again from its --init-from")
    if read_safetensors_header(path).metadata.get("rows_sha256") != data.digest():
        raise NpgptError(f"{path} was computed for other preference pairs than {data.path} now holds (the file "
                         f"changed?); resume with the same file, or start the run again")
    t = load_tensors(path)
    n = len(data.rows)
    for k in ("chosen", "rejected"):
        if k not in t or t[k].shape != (n,) or not np.isfinite(t[k]).all():
            raise NpgptError(f"{path}: '{k}' must be {n} finite log-probabilities (one per pair); the file does not "
                             f"belong to this preference data")
    return t["chosen"].astype(np.float64), t["rejected"].astype(np.float64)


def finetune_dpo(cfg, stream=None, comm=None, plugins=()):
    """Run a DPO fine-tune as `cfg` says (cfg.dpo: the preference file; init_from or resume); returns
    npgpt.train's TrainResult."""
    if not cfg.dpo:
        raise NpgptError("finetune_dpo needs cfg.dpo, the preference JSONL file")
    cfg = dataclasses.replace(cfg, dpo=str(Path(cfg.dpo).resolve()))
    data = PreferenceData.for_training(cfg, stream)
    return train(cfg, stream=stream, batch_source=data, plugins=(dpo_plugin(data, stream), *plugins), comm=comm)
