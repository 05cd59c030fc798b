"""Look inside a model: where each token's attention goes.

`attention_maps(model, ids)` runs one prompt through the KV-cached forward and returns, per layer,
the softmax attention weights (nh, T, T): row i is the distribution of token i's attention over
tokens 0..i (causal, so the upper triangle is zero and every row sums to 1).

Two text views of one (T, T) map (one head, or the mean over heads):

    top_attended / format_top     per token, the k earlier tokens it attends to most, with weights
    shade_matrix                  the whole matrix, one character per weight from ' .:-=+*#%@'
                                  (' ' below 0.1, '.' below 0.2, ... '@' from 0.9)

and `save_heatmap_png` draws it with matplotlib (the optional extra `npgpt[plot]`);
`save_attention_grid_png` draws every layer x head map (masked cells grey, a linear, log or
per-row scale, a caption). `logit_lens` applies the final LayerNorm and unembedding to the
residual stream after each layer: what the model would predict if it stopped there.
"""

from __future__ import annotations

import numpy as np

from npgpt.backend import asnumpy
from npgpt.errors import NpgptError
from npgpt.tensor import no_grad
from npgpt.viz import save_figure

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
    save_figure(plt, fig, path, dpi=120)                   # atomic; creates a missing folder


# ---- a layer x head grid of attention maps ----------------------------------------------------
SCALES = ("linear", "log", "row")
CAPTION = ("rows: queries (the token doing the looking); columns: keys (the tokens it reads). "
           "Grey: masked future positions, which a causal model cannot see.")
SCALE_NOTES = {"linear": "Colour: the attention weight; each row's weights sum to 1.",
               "log": "Colour: log10 of the weight (floor 1e-3); each row's weights sum to 1.",
               "row": "Colour: each weight divided by its row's largest, so every row has one bright "
                      "cell; the weights themselves sum to 1 per row, the colours do not."}


def scaled_maps(att, scale="linear"):
    """att (..., T, T) -> (values to colour, colour-bar label) for scale linear, log or row.

    linear: the weights as they are (one sharp head hides the spread-out rows of the others);
    log:    log10 of the weights, floored at 1e-3, so 0.01 and 0.1 look different;
    row:    each row divided by its own maximum, so every query's favourite key is bright.
    """
    att = np.asarray(att, dtype=np.float64)
    if scale == "linear":
        return att, "attention weight"
    if scale == "log":
        return np.log10(np.maximum(att, 1e-3)), "log10 attention weight (floor 1e-3)"
    if scale == "row":
        return att / np.maximum(att.max(axis=-1, keepdims=True), 1e-12), "weight / row maximum"
    raise NpgptError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")


def save_attention_grid_png(maps, labels, path, layers=None, heads=None, scale="linear", title=""):
    """Draw attention as a grid: one row per layer, one column per head, each a (T, T) map.

    maps: per layer (nh, T, T) arrays (attention_maps); layers / heads: the indices to draw
    (default all). Masked (future) cells are grey, not dark: 'cannot see' is not 'chose not to
    look'. The caption says what rows and columns are.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NpgptError("--png needs matplotlib: pip install 'npgpt[plot]'") from None
    layers = list(range(len(maps))) if layers is None else list(layers)
    heads = list(range(maps[0].shape[0])) if heads is None else list(heads)
    T = len(labels)
    masked = np.triu(np.ones((T, T), dtype=bool), k=1)
    values, bar = scaled_maps(np.stack([maps[i][heads] for i in layers]), scale)   # (L, H, T, T)
    lo, hi = (-3.0, 0.0) if scale == "log" else (0.0, 1.0)
    cell = max(1.6, min(0.22 * T + 0.8, 5.0))
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(cell * len(heads) + 1.2, cell * len(layers) + 1.0),
                             squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#c8c8c8")   # masked cells: grey
    show_ticks = T <= 24
    im = None
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r, c]
            im = ax.imshow(np.ma.masked_array(values[r, c], masked), cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            if show_ticks and r == len(layers) - 1:
                ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
            else:
                ax.set_xticks([])
            if show_ticks and c == 0:
                ax.set_yticks(range(T), labels, fontsize=6)
            else:
                ax.set_yticks([])
    axes[-1, 0].set_xlabel("key (attended token)", fontsize=8)
    axes[-1, 0].set_ylabel("query (token)", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=bar)
    fig.suptitle(title or f"attention, {scale} scale", fontsize=10)
    fig.text(0.5, 0.0, CAPTION + " " + SCALE_NOTES[scale], ha="center", va="top", fontsize=7, wrap=True)
    save_figure(plt, fig, path)


# ---- the logit lens ----------------------------------------------------------------------------
def logit_lens(model, ids):
    """What the model would predict if it stopped after each layer (nostalgebraist's 'logit lens').

    The residual stream after the embeddings and after every block goes through the final
    norm (GPT-2's LayerNorm, Llama's RMSNorm) and the unembedding, exactly as the last block's
    output does (`model.hidden_states`, `model.final_logits`). Returns
    probs (n_layer + 1, T, V): row 0 is the embeddings alone, row L the full model (whose
    distribution is the model's own prediction, bit for bit the forward's softmax).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    if ids.size == 0:
        raise NpgptError("the prompt is empty: the logit lens needs at least one token")
    if ids.shape[1] > model.config.block_size:
        raise NpgptError(f"the prompt has {ids.shape[1]} tokens, more than the model's block_size "
                         f"{model.config.block_size}; shorten it")
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            out = []
            for x in model.hidden_states(ids):                               # (1, T, C) each
                logits = asnumpy(model.final_logits(x).data)[0].astype(np.float64)              # (T, V)
                e = np.exp(logits - logits.max(axis=-1, keepdims=True))
                out.append(e / e.sum(axis=-1, keepdims=True))
    finally:
        model.train(was_training)
    return np.stack(out)


def format_logit_lens(probs, labels, tok, width=8):
    """Table lines: one row per layer, one column per position: the top token and its probability."""
    def short(t):
        s = repr(tok.decode([int(t)]))
        s = s if not s[1:-1].strip() else s[1:-1]            # blank tokens keep their quotes
        return s if len(s) <= width - 1 else s[:width - 2] + "~"

    L, T, _ = probs.shape
    head = f"{'layer':>6} | " + " ".join(f"{lab[:width]:<{width}}" for lab in labels)
    lines = [head, "-" * len(head)]
    for layer in range(L):
        name = "emb" if layer == 0 else str(layer - 1)
        top = probs[layer].argmax(axis=-1)
        cells = [f"{short(top[t]):<{width}}" for t in range(T)]
        conf = [f"{probs[layer, t, top[t]]:<{width}.2f}" for t in range(T)]
        lines.append(f"{name:>6} | " + " ".join(cells))
        lines.append(f"{'':>6} | " + " ".join(conf))
    return lines


def save_logit_lens_png(probs, labels, tok, path, title=""):
    """Heat map: layers (rows) x positions (columns), coloured by the top token's probability,
    each cell labelled with that token."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NpgptError("--png needs matplotlib: pip install 'npgpt[plot]'") from None
    L, T, _ = probs.shape
    top = probs.argmax(axis=-1)                                   # (L, T)
    conf = np.take_along_axis(probs, top[..., None], axis=-1)[..., 0]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * T + 1.5), max(2.5, 0.5 * L + 1.5)))
    im = ax.imshow(conf, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
    for layer in range(L):
        for t in range(T):
            text = repr(tok.decode([int(top[layer, t])]))
            text = (text if not text[1:-1].strip() else text[1:-1])[:6]     # a blank token keeps its quotes
            ax.text(t, layer, text, ha="center", va="center",
                    fontsize=7, color="white" if conf[layer, t] < 0.6 else "black")
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(L), ["emb"] + [f"after block {i}" for i in range(L - 1)], fontsize=7)
    ax.set_xlabel("input position (the prediction is for the NEXT token)")
    fig.colorbar(im, ax=ax, label="probability of the top token")
    ax.set_title(title or "logit lens: ln_f + unembedding applied to each layer's residual stream", fontsize=9)
    save_figure(plt, fig, path)
