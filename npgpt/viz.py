"""Pictures for study: the autograd graph of a tensor, and training curves from metrics.jsonl.

    g = npgpt.viz.graph(loss, names=model)   # walk the graph behind `loss` (before backward frees it)
    print(g)                       # text: one line per node, inputs indented under their op
    loss.backward(); g.refresh()   # labels now carry every gradient backward left on the tensors
    g.to_dot()                     # Graphviz DOT source (render with `dot -Tpng`)
    g.save_png("graph.png")        # matplotlib drawing, layered from the inputs to the loss

A node is a tensor or the Function that made a tensor (its class name, as `Tensor.grad_fn` shows).
A tensor's label is micrograd's draw_dot level of detail: its name when known (pass `names`, a
{id(tensor): name} dict or a Module, whose parameter names are used), its shape, its value (a
scalar's value; an array's mean and std) and, once backward has run and `refresh()` is called, its
gradient the same way (leaves always keep theirs; intermediates when `retain_grad()` was called).
In the drawing each parameter or input sits in the column just left of the op that reads it.
Edges run from inputs to the op that reads them to the tensor it makes, the direction of the
forward pass; backward walks them in reverse.

`read_metrics(run)` / `plot_runs(runs, png)` / `text_chart(...)` serve `npgpt plot`: train and
val loss, learning rate, tokens/s and gradient norm over steps. matplotlib is optional
(`npgpt[plot]`); without it the text chart still works.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from npgpt.backend import asnumpy
from npgpt.errors import NpgptError
from npgpt.fileio import atomic_write_bytes
from npgpt.safeio import parse_json


# ---- the autograd graph ------------------------------------------------------------------------
@dataclass
class Graph:
    """Nodes {id: (kind, label)} (kind 'op', 'leaf', 'param' or 'out') and edges [(src, dst)]."""

    nodes: dict = field(default_factory=dict)
    edges: list = field(default_factory=list)
    root: int = 0
    tensors: dict = field(default_factory=dict, repr=False)   # {node id: Tensor} for refresh()
    names: dict = field(default_factory=dict, repr=False)

    def refresh(self):
        """Relabel the tensor nodes from the tensors as they are now (call after backward: the
        labels then show the gradients). Returns self."""
        for n, x in self.tensors.items():
            kind, _ = self.nodes[n]
            self.nodes[n] = (kind, tensor_label(x, self.names))
        return self

    def op_names(self):
        """The Function class names in the graph, with repeats (e.g. for counting op kinds)."""
        return [label for kind, label in self.nodes.values() if kind == "op"]

    def __str__(self):
        parents = {}
        for s, d in self.edges:
            parents.setdefault(d, []).append(s)
        lines, seen = [], set()
        stack = [(self.root, 0)]
        while stack:                                  # iterative: deep graphs do not recurse
            n, depth = stack.pop()
            kind, label = self.nodes[n]
            again = n in seen
            lines.append("  " * depth + label.replace("\n", "  ") + ("  (see above)" if again and parents.get(n) else ""))
            if again:
                continue
            seen.add(n)
            for p in reversed(parents.get(n, [])):
                stack.append((p, depth + 1))
        return "\n".join(lines)

    def to_dot(self):
        style = {"op": 'shape=box, style=filled, fillcolor="#dde8f8"', "leaf": "shape=ellipse",
                 "param": 'shape=ellipse, style=filled, fillcolor="#f8e8c8"',
                 "out": 'shape=ellipse, style=filled, fillcolor="#d8f0d8"'}
        lines = ["digraph autograd {", "  rankdir=LR;"]
        for n, (kind, label) in self.nodes.items():
            text = label.replace('"', "'").replace("\n", "\\n")
            lines.append(f'  n{n} [label="{text}", {style[kind]}];')
        for s, d in self.edges:
            lines.append(f"  n{s} -> n{d};")
        lines.append("}")
        return "\n".join(lines)

    def layers(self):
        """Each node's column: 0 for the inputs, the longest path from an input otherwise."""
        parents = {}
        for s, d in self.edges:
            parents.setdefault(d, []).append(s)
        children = {}
        for s, d in self.edges:
            children.setdefault(s, []).append(d)
        depth = {}
        for n in self._topological():
            depth[n] = 1 + max((depth[p] for p in parents.get(n, [])), default=-1)
        for n in depth:                               # an input sits just left of the op that reads it
            if n not in parents and children.get(n):
                depth[n] = max(0, min(depth[c] for c in children[n]) - 1)
        return depth

    def _topological(self):
        children = {}
        indeg = {n: 0 for n in self.nodes}
        for s, d in self.edges:
            children.setdefault(s, []).append(d)
            indeg[d] += 1
        order, ready = [], [n for n, k in indeg.items() if k == 0]
        while ready:
            n = ready.pop()
            order.append(n)
            for c in children.get(n, []):
                indeg[c] -= 1
                if indeg[c] == 0:
                    ready.append(c)
        return order

    def save_png(self, path, title=""):
        """Draw the graph left (inputs) to right (output) with matplotlib; needs npgpt[plot]."""
        plt = _pyplot("drawing the graph")
        lines = max(label.count("\n") + 1 for _, label in self.nodes.values())   # text lines per box
        depth = self.layers()
        columns = {}
        for n, d in sorted(depth.items(), key=lambda kv: kv[1]):
            columns.setdefault(d, []).append(n)
        pos = {}
        step = 0.6 + 0.35 * lines
        for d, ns in columns.items():
            for i, n in enumerate(ns):
                pos[n] = (d, -step * (i - (len(ns) - 1) / 2))
        width = max(4.0, 2.2 * (max(columns) + 1))
        height = max(2.5, (0.45 + 0.25 * lines) * max(len(v) for v in columns.values()) + 1)
        fig, ax = plt.subplots(figsize=(width, height))
        colours = {"op": "#dde8f8", "leaf": "white", "param": "#f8e8c8", "out": "#d8f0d8"}
        for s, d in self.edges:
            (x0, y0), (x1, y1) = pos[s], pos[d]
            ax.annotate("", xy=(x1 - 0.28, y1), xytext=(x0 + 0.28, y0),
                        arrowprops=dict(arrowstyle="->", color="grey", lw=0.8))
        for n, (kind, label) in self.nodes.items():
            x, y = pos[n]
            ax.text(x, y, label, ha="center", va="center", fontsize=6,
                    bbox=dict(boxstyle="round" if kind == "op" else "square", fc=colours[kind], ec="black", lw=0.5))
        ax.set_xlim(-0.8, max(columns) + 0.8)
        ax.set_ylim(min(p[1] for p in pos.values()) - step, max(p[1] for p in pos.values()) + step)
        ax.axis("off")
        ax.set_title(title or "autograd graph: inputs (left) -> ops (blue) -> output (green); "
                     "backward runs right to left", fontsize=8)
        save_figure(plt, fig, path, dpi=120)


def _summary(a):
    a = asnumpy(a)
    if a.size == 1:
        return f"{float(a.reshape(-1)[0]):.4g}"
    return f"mean {float(a.mean()):.3g} std {float(a.std()):.3g}"


def tensor_label(x, names):
    """name (shape) = value, and its gradient when it has one (see the module docstring)."""
    shape = "x".join(map(str, x.shape)) or "scalar"
    grad = f"\ngrad {_summary(x.grad)}" if x.grad is not None else ""
    if id(x) in names:
        return f"{names[id(x)]} ({shape})\n= {_summary(x.data)}{grad}"
    if x.size == 1:
        return f"{_summary(x.data)}{grad}"
    return f"({shape})\n{_summary(x.data)}{grad}"


def graph(t, names=None) -> Graph:
    """The recorded graph behind tensor `t` (build it before `backward()`, which frees the graph).

    names: optional {id(tensor): name}, or a Module (its parameters are labelled by their names,
    e.g. `transformer.h.0.attn.c_attn.weight`), to label leaves by name instead of by shape.
    """
    if t._ctx is None and not t.requires_grad:
        raise NpgptError("this tensor has no graph: nothing that made it required grad")
    if hasattr(names, "named_parameters"):
        names = {id(p): n for n, p in names.named_parameters()}
    names = dict(names or {})
    g = Graph(root=id(t), names=names)

    stack = [t]
    while stack:
        x = stack.pop()
        if id(x) in g.nodes:
            continue
        fn = x._ctx
        kind = "out" if x is t else ("param" if x.requires_grad and fn is None else "leaf")
        g.nodes[id(x)] = (kind, tensor_label(x, names))
        g.tensors[id(x)] = x
        if fn is None:
            continue
        if fn.saved is None:
            raise NpgptError("the graph was freed by backward(); build the picture before calling "
                             "backward (or pass retain_graph=True)")
        g.nodes[id(fn)] = ("op", fn.name)
        g.edges.append((id(fn), id(x)))
        for p in fn.inputs or ():
            g.edges.append((id(p), id(fn)))
            stack.append(p)
    return g


# ---- training curves ---------------------------------------------------------------------------
CURVES = (("loss", "loss (train: per log step; val: per eval)"), ("lr", "learning rate"),
          ("tokens_per_s", "tokens / s"), ("grad_norm", "gradient norm (before clipping)"))


MAX_PLOT_VALUE = 1e100      # beyond it a chart's span (hi - lo) and matplotlib's ticks overflow
MAX_PLOT_STEP = 10 ** 15


def read_metrics(run) -> dict:
    """A run folder's (or a metrics.jsonl file's) records as {series: [(iter, value)]}.

    Series: train_loss (train log lines), eval_train_loss, val_loss (eval lines), lr, tokens_per_s,
    grad_norm (when the run logged it). Lines that are not JSON objects are skipped and counted in
    'skipped' (a run killed mid-write leaves half a line); a file with no usable line is an error.
    A value that is not a finite number within +-MAX_PLOT_VALUE (a diverged run logs inf or NaN; a
    stranger's file anything) is left out and counted in 'dropped', so no chart meets an overflow.
    """
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise NpgptError(f"{path} not found: `npgpt plot` reads the metrics.jsonl a training run writes")
    out = {k: [] for k in ("train_loss", "eval_train_loss", "val_loss", "lr", "tokens_per_s", "grad_norm")}
    skipped = dropped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = parse_json(line, f"{path}")  # npgpt's JSON limits: a stranger's file too
                it = rec["iter"]                   # also fails for a line that is not a JSON object
                if isinstance(it, bool) or not isinstance(it, int) or not 0 <= it <= MAX_PLOT_STEP:
                    raise ValueError(it)
            except (NpgptError, ValueError, KeyError, TypeError, IndexError):
                skipped += 1
                continue

            def put(series, key):
                nonlocal dropped
                v = rec.get(key)
                if v is None:
                    return
                if (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        and abs(v) <= MAX_PLOT_VALUE):
                    out[series].append((it, float(v)))
                else:
                    dropped += 1

            if rec.get("kind") == "eval":
                put("eval_train_loss", "train_loss")
                put("val_loss", "val_loss")
            else:
                put("train_loss", "loss")
                put("lr", "lr")
                put("tokens_per_s", "tokens_per_s")
                put("grad_norm", "grad_norm")
    if not any(out.values()):
        raise NpgptError(f"{path} holds no training records")
    out["skipped"] = skipped
    out["dropped"] = dropped
    return out


def _panels(metrics):
    """[(panel title, [(label, [(iter, value)])])] for the panels that have data."""
    panels = []
    for key, title in CURVES:
        lines = []
        for run, m in metrics.items():
            tag = f"{run}: " if len(metrics) > 1 else ""
            if key == "loss":
                lines += [(f"{tag}train", m["train_loss"]), (f"{tag}val", m["val_loss"])]
            else:
                lines.append((tag.rstrip(": ") or key, m[key]))
        lines = [(label, pts) for label, pts in lines if pts]
        if lines:
            panels.append((title, lines))
    return panels


def plot_runs(metrics: dict, png):
    """Draw {run name: read_metrics(...)} as up to four panels into a PNG (needs npgpt[plot])."""
    plt = _pyplot("--png")
    panels = _panels(metrics)
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), squeeze=False, sharex=True)
    for ax, (title, lines) in zip(axes[:, 0], panels):
        for label, pts in lines:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label, marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(title, fontsize=9)
        if title.startswith("loss"):
            ax.set_ylabel("cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    save_figure(plt, fig, png)


def text_chart(pts, width=60, height=10, label=""):
    """A plain-text line chart of [(x, y)] points: `height` rows, min and max marked on the left."""
    if not pts:
        return [f"{label}: no data"]
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    x0, x1 = min(xs), max(xs)
    grid = [[" "] * width for _ in range(height)]
    for x, y in pts:
        col = 0 if x1 == x0 else round((x - x0) / (x1 - x0) * (width - 1))
        row = height - 1 - round((y - lo) / span * (height - 1))
        grid[row][col] = "*"
    out = [f"{label}  (last {ys[-1]:.4g} at step {xs[-1]})"]
    for r, cells in enumerate(grid):
        tick = f"{hi:>10.4g} |" if r == 0 else f"{lo:>10.4g} |" if r == height - 1 else " " * 10 + " |"
        out.append(tick + "".join(cells))
    out.append(" " * 11 + "+" + "-" * width)
    out.append(" " * 12 + f"{x0:<{width // 2}}{x1:>{width - width // 2}}")
    return out


def text_report(metrics: dict, width=60, height=8):
    """Text charts of every panel (one chart per run and series)."""
    lines = []
    for title, series in _panels(metrics):
        lines.append(f"== {title} ==")
        for label, pts in series:
            lines += text_chart(pts, width, height, label)
    return lines


def save_figure(plt, fig, path, dpi=110):
    """Render `fig` as PNG bytes and write them atomically (a missing folder is created; errors
    are one line); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _pyplot(what):
    try:
        import matplotlib
        matplotlib.use("Agg")                       # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise NpgptError(f"{what} needs matplotlib: pip install 'npgpt[plot]'") from None
    return plt
