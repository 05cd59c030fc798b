"""Multiple-choice task evaluation in HellaSwag's layout: which ending does the model find likeliest?

A task file is JSONL, one item per line (extra keys are ignored):

    {"ctx": "A man is sitting on a roof. He", "endings": ["starts pulling up roofing.", ...], "label": 0}

`label` is the index of the right ending (an int, or a string of digits as the Hugging Face copy of
HellaSwag stores it). Each ending is scored by the log-likelihood of its tokens given the context,
the way lm-evaluation-harness and llm.c score HellaSwag: the context and the continuation are
tokenised separately, the continuation being the ending after one joining space (none when the
context ends in whitespace or the ending starts with it). Two scores, two accuracies:

    sum   = sum over the ending's tokens of log p(token | everything before it)     -> acc
    norm  = sum / number of the ending's tokens  (mean log-likelihood per token)      -> acc_norm

The summed score favours short endings; the normalised one removes most of that bias. An item
longer than block_size + 1 tokens keeps its last block_size + 1 (the context is cut from the left;
the ending itself must fit). An empty context is replaced by end-of-text, so the first ending token
still has something to be predicted from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from npgpt.backend import asnumpy, get_xp
from npgpt.errors import NpgptError
from npgpt.loading import load_run
from npgpt.fileio import atomic_write_text
from npgpt.safeio import read_jsonl
from npgpt.tensor import no_grad

MAX_TASK_BYTES = 1 << 30      # a task file is data the user brings: generous, but bounded


def read_task(path):
    """[{"ctx", "endings", "label"}] from a JSONL task file; errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise NpgptError(f"task file {p} does not exist")
    items = []
    for where, rec in read_jsonl(p, "task file", max_bytes=MAX_TASK_BYTES):
        if not isinstance(rec, dict):
            raise NpgptError(f"{where}: expected a JSON object with ctx, endings and label")
        ctx, endings, label = rec.get("ctx"), rec.get("endings"), rec.get("label")
        if not isinstance(ctx, str):
            raise NpgptError(f"{where}: 'ctx' must be a string")
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
            raise NpgptError(f"{where}: 'endings' must be a list of at least 2 non-empty strings")
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            raise NpgptError(f"{where}: 'label' must be the index (0..{len(endings) - 1}) of the right ending, "
                             f"got {rec.get('label')!r}")
        items.append({"ctx": ctx, "endings": endings, "label": label})
    if not items:
        raise NpgptError(f"task file {p} holds no items")
    return items


def continuation(ctx, ending):
    """The ending as it follows the context: one joining space unless whitespace is already there."""
    if not ctx or ctx[-1:].isspace() or ending[:1].isspace():
        return ending
    return " " + ending


def encode_item(tok, item, block_size):
    """[(token ids, number of ending tokens at the end)] for each ending of an item."""
    ctx_ids = tok.encode_plain(item["ctx"]) or [tok.eot_id]
    rows = []
    for k, ending in enumerate(item["endings"]):
        end_ids = tok.encode_plain(continuation(item["ctx"], ending))
        if not end_ids:
            raise NpgptError(f"ending {k} of an item encodes to no tokens")
        if len(end_ids) > block_size:
            raise NpgptError(f"ending {k} is {len(end_ids)} tokens, longer than the model's block_size "
                             f"{block_size}; it cannot be scored")
        rows.append(((ctx_ids + end_ids)[-(block_size + 1):], len(end_ids)))
    return rows


@no_grad()
def score_endings(model, rows):
    """Summed log-likelihood and token count of each row's ending.  rows: [(ids, n_end)] -> ([f], [n])."""
    L = max(len(ids) for ids, _ in rows) - 1
    x = np.zeros((len(rows), L), dtype=np.int64)                     # right-padded inputs
    for i, (ids, _) in enumerate(rows):
        x[i, :len(ids) - 1] = ids[:-1]
    model.eval()
    logits, _ = model(x)
    z = logits.data.astype(np.float64)                               # (E, L, V)
    xp = get_xp(z)
    m = z.max(axis=-1, keepdims=True)
    logp = z - (m + xp.log(xp.exp(z - m).sum(axis=-1, keepdims=True)))   # log-softmax
    logp = asnumpy(logp)
    sums, counts = [], []
    for i, (ids, n_end) in enumerate(rows):
        pos = np.arange(len(ids) - 1 - n_end, len(ids) - 1)         # inputs that predict ending tokens
        tgt = np.asarray(ids[len(ids) - n_end:])
        sums.append(float(logp[i, pos, tgt].sum()))
        counts.append(n_end)
    return sums, counts


def evaluate_task(model, tok, items, progress=None):
    """{"items", "acc", "acc_norm", "results": [per-item dicts]} of a model on a task's items."""
    T = model.config.block_size
    results, right, right_norm = [], 0, 0
    for i, item in enumerate(items):
        sums, counts = score_endings(model, encode_item(tok, item, T))
        norms = [s / n for s, n in zip(sums, counts)]
        pred, pred_norm = int(np.argmax(sums)), int(np.argmax(norms))
        right += pred == item["label"]
        right_norm += pred_norm == item["label"]
        results.append({"index": i, "label": item["label"], "pred": pred, "pred_norm": pred_norm,
                        "correct": pred == item["label"], "correct_norm": pred_norm == item["label"],
                        "loglik": sums, "loglik_norm": norms, "tokens": counts})
        if progress:
            progress(i + 1, len(items))
    n = len(items)
    return {"items": n, "acc": right / n, "acc_norm": right_norm / n, "results": results}


def run_task(checkpoint, task, out=None, device="cpu", adapter=None, trust_pattern=False, allow_other_base=False):
    """Load a model (with an optional LoRA adapter), score a task file, write per-item JSONL to `out`.
    trust_pattern: the tokenizer may use a split regex that is not a named one (`npgpt --trust-pattern`)."""
    items = read_task(task)
    model, tok, ckpt = load_run(checkpoint, adapter=adapter, device=device, trust_pattern=trust_pattern,
                                allow_other_base=allow_other_base)[:3]
    r = evaluate_task(model, tok, items)
    if out:
        atomic_write_text(out, "".join(json.dumps(rec) + "\n" for rec in r["results"]))
    return {"task": str(task), "checkpoint": str(ckpt), "items": r["items"], "acc": r["acc"],
            "acc_norm": r["acc_norm"], **({"out": str(out)} if out else {})}
