"""Evaluation and inspection of a saved model: loss, perplexity, bits per byte; checkpoint info.

Loss here is exact, not sampled: the text is cut into consecutive windows of block_size tokens
and every token after the first is predicted once. Bits per byte = total loss in nats / ln 2 /
the text's UTF-8 byte count, which compares models with different tokenizers fairly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from npgpt import tokenizer as tk
from npgpt.backend import asnumpy
from npgpt.checkpoint import find_checkpoint
from npgpt.data import TokenData
from npgpt.errors import NpgptError
from npgpt.gguf_models import load_options
from npgpt.loading import load_run
from npgpt.lora import adapter_summary
from npgpt.llama import config_from_hf
from npgpt.model import read_hf_config
from npgpt.tensor import no_grad
from npgpt.tokenizer import read_text_checked
from npgpt.train import read_state


def token_loss(model, tokens, batch_size=8, device="cpu"):
    """Summed next-token loss (nats) and count over consecutive block_size windows of `tokens`."""
    T = model.config.block_size
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < 2:
        raise NpgptError("need at least 2 tokens to evaluate")
    n_full = (len(tokens) - 1) // T                            # windows of exactly T predictions
    batches = [(s, min(s + batch_size, n_full), T) for s in range(0, n_full, batch_size)]
    if (len(tokens) - 1) % T:
        batches.append((n_full, n_full + 1, (len(tokens) - 1) % T))   # the shorter tail window
    total, count = 0.0, 0
    model.eval()
    with no_grad():
        for first, stop, L in batches:
            x = np.stack([tokens[w * T:w * T + L] for w in range(first, stop)])
            y = np.stack([tokens[w * T + 1:w * T + 1 + L] for w in range(first, stop)])
            _, loss = model(x, y)
            total += float(asnumpy(loss.data)) * y.size
            count += y.size
    return total, count


def evaluate(checkpoint, input=None, data=None, device="cpu", split="val", stride=None, adapter=None,
             keep_quantized=False, trust_pattern=False, allow_other_base=False):
    """Loss / perplexity / bits per byte of a model on a text file or a prepared data split.

    stride: score with sliding windows (see sliding_token_loss) instead of consecutive ones.
    trust_pattern: the tokenizers may use a split regex that is not a named one (`npgpt --trust-pattern`).
    allow_other_base: apply an adapter made on another base (npgpt.lora's fingerprint check)."""
    model, tok, ckpt = load_run(checkpoint, adapter=adapter, device=device, trust_pattern=trust_pattern,
                                allow_other_base=allow_other_base,
                                **load_options(checkpoint, keep_quantized))[:3]
    if (input is None) == (data is None):
        raise NpgptError("give exactly one of --input FILE or --data DIR")
    if input is not None:
        text = read_text_checked(input)
        if not text:
            raise NpgptError(f"{input} is empty")
        tokens = tok.encode_plain(text)
        source = str(input)
    else:
        td = TokenData(data, trust_pattern=trust_pattern)
        if td.tokenizer().fingerprint() != tok.fingerprint():
            raise NpgptError(f"the data in {data} was tokenized with a different tokenizer than the model in {ckpt}; "
                             f"prepare it with the model's own: `npgpt prepare --tokenizer-from {ckpt}`")
        tokens = np.asarray(td.split(split))
        if len(tokens) < 2:
            raise NpgptError(f"the {split} split of {data} holds {len(tokens)} tokens, nothing to evaluate; prepare "
                             f"it with a --val-fraction above 0, or pass --split train")
        td.check_token_ids(split)
        text = tok.decode([int(t) for t in tokens])
        source = f"{data} ({split})"
    if int(np.max(tokens)) >= model.config.vocab_size:
        raise NpgptError("the text has tokens outside the model's vocabulary")
    if stride is None:
        total, count = token_loss(model, tokens, device=device)
    else:
        total, count = sliding_token_loss(model, tokens, stride)
    n_bytes = len(text[1:].encode("utf-8")) if count else 0   # the first token is never predicted
    loss = total / count
    return {"source": source, "tokens": count, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": total / math.log(2) / max(n_bytes, 1), "checkpoint": str(ckpt)}


def sliding_token_loss(model, tokens, stride, batch_size=8):
    """Summed next-token loss (nats) and count with windows of block_size tokens every `stride`.

    Window k reads tokens [k S, k S + T) and scores only the targets no earlier window scored, so
    every token is predicted once, from up to T tokens of context (at least T - S once the first
    window is past) instead of from a window boundary. Hugging Face's perplexity recipe; S = T is
    exactly `token_loss`, smaller S costs about T / S times the compute for a lower, fairer loss.
    """
    T = model.config.block_size
    if isinstance(stride, bool) or not isinstance(stride, int) or not 0 < stride <= T:
        raise NpgptError(f"--stride must be between 1 and the model's block_size {T}, got {stride}")
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    if n < 2:
        raise NpgptError("need at least 2 tokens to evaluate")
    windows, done, s = [], 0, 0             # done: targets tokens[1..done] are scored
    while True:
        e = min(s + T, n - 1)               # inputs tokens[s:e], targets tokens[s+1:e+1]
        windows.append((s, e, done + 1 - (s + 1)))   # (start, end, first target index to score)
        done = e
        if e == n - 1:
            break
        s += stride
    total, count = 0.0, 0
    model.eval()
    with no_grad():
        for length in sorted({e - s for s, e, _ in windows}):
            same = [w for w in windows if w[1] - w[0] == length]
            for b in range(0, len(same), batch_size):
                group = same[b:b + batch_size]
                x = np.stack([tokens[s:e] for s, e, _ in group])
                y = np.stack([tokens[s + 1:e + 1] for s, e, _ in group])
                for row, (_, _, skip) in enumerate(group):
                    y[row, :skip] = -1                      # scored by an earlier window
                k = int((y >= 0).sum())
                if k:
                    _, loss = model(x, y)
                    total += float(asnumpy(loss.data)) * k
                    count += k
    return total, count


def info(path, trust_pattern=False):
    """A dict describing a checkpoint: config, parameters, step, best val loss, tokenizer, files."""
    ckpt = find_checkpoint(path)
    lora = adapter_summary(ckpt)                       # a LoRA run: its config.json is the base's
    cfg_dir = Path(lora["base"]) if lora else ckpt
    hf = read_hf_config(cfg_dir)
    cfg = config_from_hf(hf, str(cfg_dir / "config.json"))
    state = read_state(ckpt) if (ckpt / "state.json").exists() else {}
    tok = None
    if tk.is_tokenizer_dir(ckpt):
        try:
            t = tk.load(ckpt, trust_pattern=trust_pattern)
            tok = {"kind": t.kind, "vocab_size": t.vocab_size, "special_tokens": dict(t.special_tokens)}
        except NpgptError as e:
            tok = {"error": str(e)}
    files = {f.name: f.stat().st_size for f in sorted(ckpt.iterdir()) if f.is_file()}
    keys = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "n_inner") if cfg.arch == "gpt" else \
        ("model_type", "vocab_size", "max_position_embeddings", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "hidden_size", "intermediate_size")
    return {"checkpoint": str(ckpt), "config": {k: hf.get(k) for k in keys},
            "parameters": cfg.num_params(), "step": state.get("iter"),
            "best_val_loss": state["best_val_loss"] if math.isfinite(state.get("best_val_loss", math.inf)) else None,
            "tokenizer": tok, "files": files, "total_bytes": sum(files.values()),
            "quantization": hf.get("npgpt", {}).get("quantization"), "lora": lora}
