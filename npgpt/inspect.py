"""Look inside a model: where each token's attention goes.

`attention_maps(model, ids)` runs one prompt through the KV-cached forward and returns, per layer,
the softmax attention weights (nh, T, T): row i is the distribution of token i's attention over
tokens 0..i (causal, so the upper triangle is zero and every row sums to 1).

Two text views of one (T, T) map (one head, or the mean over heads):

    top_attended / format_top     per token, the k earlier tokens it attends to most, with weights
    shade_matrix                  the whole matrix, one character per weight from ' .:-=+*#%@'
                                  (' ' below 0.1, '.' below 0.2, ... '@' from 0.9)

and `save_heatmap_png` draws it with matplotlib (the optional extra `npgpt[plot]`).
"""

from __future__ import annotations

import io

import numpy as np

from npgpt.backend import asnumpy
from npgpt.errors import NpgptError
from npgpt.fileio import atomic_write_bytes

SHADES = " .:-=+*#%@"


def attention_maps(model, ids):
    """ids: 1-D token ids (1 <= T <= block_size) -> [per layer (nh, T, T) float NumPy arrays]."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    T = ids.size
    if T == 0:
        raise NpgptError("the prompt is empty: attention needs at least one token")
    if T > model.config.block_size:
        raise NpgptError(f"the prompt has {T} tokens, more than the model's block_size "
                         f"{model.config.block_size}; shorten it")
    cache = model.new_cache(1)                            # fresh: positions start at 0
    _, maps = model.forward_cached(ids[None, :], cache, return_attention=True)
    return [asnumpy(m[0]).astype(np.float32) for m in maps]


def select(maps, layer=None, head=None):
    """[(layer index, (T, T) map)]: one layer or all, one head or the mean over heads."""
    n_layer, nh = len(maps), maps[0].shape[0]
    if layer is not None and not 0 <= layer < n_layer:
        raise NpgptError(f"--layer {layer} is out of range; the model has layers 0..{n_layer - 1}")
    if head is not None and not 0 <= head < nh:
        raise NpgptError(f"--head {head} is out of range; the model has heads 0..{nh - 1}")
    layers = range(n_layer) if layer is None else [layer]
    return [(i, maps[i][head] if head is not None else maps[i].mean(axis=0)) for i in layers]


def top_attended(att, k=3):
    """For each row i of a (T, T) map, [(j, weight)] of its k largest weights, largest first."""
    out = []
    for i, row in enumerate(att):
        order = np.argsort(-row[:i + 1], kind="stable")[:k]
        out.append([(int(j), float(row[j])) for j in order])
    return out


def token_labels(tok, ids, width=10):
    """A short printable label per token: its text escaped (repr), quoted only when it is blank."""
    labels = []
    for t in ids:
        text = repr(tok.decode([int(t)]))
        text = text if not text[1:-1].strip() else text[1:-1]
        labels.append(text if len(text) <= width else text[:width - 1] + "~")
    return labels


def format_top(att, labels, k=3):
    """Lines 'i label -> label_j weight, ...' for each token (the compact text heat map)."""
    w = max(len(s) for s in labels)
    lines = []
    for i, tops in enumerate(top_attended(att, k)):
        pairs = "  ".join(f"{labels[j]!s:>{w}}[{j}] {p:.2f}" for j, p in tops)
        lines.append(f"{i:>4} {labels[i]:<{w}} -> {pairs}")
    return lines


def shade_matrix(att, labels=None):
    """Character-shaded (T, T) map: one row per query token, one column per key token."""
    # the small epsilon keeps 0.5 computed as 0.4999999 in the same bin as an exact 0.5
    idx = np.clip(np.floor(np.asarray(att) * len(SHADES) + 1e-4).astype(int), 0, len(SHADES) - 1)
    rows = ["".join(SHADES[v] for v in r) for r in idx]
    if labels is None:
        return rows
    w = max(len(s) for s in labels)
    return [f"{lab:>{w}} |{r}|" for lab, r in zip(labels, rows)]


def save_heatmap_png(selected, labels, path, title=""):
    """Draw [(layer, (T, T) map)] as heat maps, one panel per layer, into a PNG file."""
    try:
        import matplotlib
        matplotlib.use("Agg")                              # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise NpgptError("--png needs matplotlib: pip install 'npgpt[plot]'") from None
    n = len(selected)
    T = len(labels)
    size = max(3.0, 0.3 * T + 1.5)
    fig, axes = plt.subplots(1, n, figsize=(size * n, size), squeeze=False)
    for ax, (layer, att) in zip(axes[0], selected):
        im = ax.imshow(att, cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer}")
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels, fontsize=7)
        ax.set_xlabel("attended token (key)")
        ax.set_ylabel("token (query)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())               # creates a missing folder; errors are one line
