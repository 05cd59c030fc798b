"""Lesson 01: the chain rule on scalars, and the graph autograd records.

    python examples/learn/01_chain_rule.py [--out pictures/]

Take  L = (a * b + c) * f  with a = 2, b = -3, c = 10, f = -2.  Name the pieces:

    e = a * b        = -6
    d = e + c        =  4
    L = d * f        = -8

Backpropagation asks: by how much does L move when one input moves a little? Go backwards from L,
multiplying local derivatives (the chain rule):

    dL/dL = 1
    dL/dd = f = -2                 dL/df = d = 4            (L = d * f: each factor's partner)
    dL/de = dL/dd * dd/de = -2 * 1 = -2                      (d = e + c: a sum passes it through)
    dL/dc = dL/dd * dd/dc = -2 * 1 = -2
    dL/da = dL/de * de/da = -2 * b = 6
    dL/db = dL/de * de/db = -2 * a = -4

That is all autograd does: each operation (`Function` in npgpt/tensor.py) knows its own local
derivative (its `backward`), the forward pass records which op made which tensor (the graph), and
`loss.backward()` walks the graph from the end, multiplying and summing as above. Where a value
feeds two ops, the two contributions add (the multivariable chain rule); the last part of the
lesson shows that with  g = a * a.

Read next: npgpt/tensor.py (Tensor, Function, the backward loop), then npgpt/ops/elementwise.py.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, have_matplotlib, parse, title  # noqa: E402

from npgpt import Tensor  # noqa: E402
from npgpt.fileio import atomic_write_text  # noqa: E402
from npgpt.viz import graph  # noqa: E402


def main(argv=None):
    args = parse(argv, __doc__)
    title("forward")
    a, b, c, f = (Tensor(np.array(v), requires_grad=True) for v in (2.0, -3.0, 10.0, -2.0))
    e = a * b
    d = e + c
    L = d * f
    print(f"e = a*b = {e.item()},  d = e+c = {d.item()},  L = d*f = {L.item()}")
    print("each result remembers the op that made it:", repr(L), "<- made by", L.grad_fn.name)

    title("the graph (text): values now, gradients after backward; a PNG with --out")
    g = graph(L, names={id(a): "a", id(b): "b", id(c): "c", id(f): "f"})
    print(g)

    title("backward")
    for t in (d, e):
        t.retain_grad()               # keep gradients of intermediate results too, to print them
    L.backward()
    g.refresh()                       # the graph's labels now carry every gradient, as micrograd's draw_dot
    print(g)
    if args.out and have_matplotlib():
        g.save_png(Path(args.out) / "01_graph.png", title="L = (a*b + c) * f: values and gradients")
        atomic_write_text(Path(args.out) / "01_graph.dot", g.to_dot())
        print(f"wrote {args.out}/01_graph.png with the gradients")
    hand = {"a": -2.0 * -3.0, "b": -2.0 * 2.0, "c": -2.0, "f": 4.0, "d": -2.0, "e": -2.0}
    got = {"a": a.grad, "b": b.grad, "c": c.grad, "f": f.grad, "d": d.grad, "e": e.grad}
    for k in hand:
        print(f"dL/d{k}: by hand {hand[k]:5.1f}   autograd {float(got[k]):5.1f}")
    check(all(float(got[k]) == hand[k] for k in hand), "autograd equals the chain rule by hand")

    title("the same numbers from nudging the inputs (finite differences)")
    eps = 1e-6

    def Lf(a, b, c, f):
        return (a * b + c) * f

    base = dict(a=2.0, b=-3.0, c=10.0, f=-2.0)
    numeric = {}
    for k in base:
        up, down = dict(base), dict(base)
        up[k] += eps
        down[k] -= eps
        numeric[k] = (Lf(**up) - Lf(**down)) / (2 * eps)
        print(f"dL/d{k} ~ (L(+eps) - L(-eps)) / 2eps = {numeric[k]:.6f}")
    check(all(abs(numeric[k] - hand[k]) < 1e-6 for k in base), "finite differences agree")

    title("a value used twice: gradients add")
    x = Tensor(np.array(3.0), requires_grad=True)
    y = x * x                          # two paths from x to y: dy/dx = x + x = 6
    y.backward()
    print(f"y = x * x at x = 3: dy/dx = {x.grad.item()} (each path gives x = 3; they add)")
    check(x.grad.item() == 6.0, "two paths add up to 2x")

    title("a small model's graph, parameters by name beside the op that reads them")
    from npgpt.nn import Linear, Module
    from npgpt.ops.nn import cross_entropy, gelu

    class TwoLayers(Module):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.fc, self.out = Linear(3, 4, rng=rng, std=0.5), Linear(4, 2, rng=rng, std=0.5)

        def forward(self, x):
            return self.out(gelu(self.fc(x)))
    net = TwoLayers()
    loss = cross_entropy(net(Tensor(np.random.default_rng(1).standard_normal((5, 3)))), np.array([0, 1, 1, 0, 1]))
    g2 = graph(loss, names=net)
    loss.backward()
    g2.refresh()
    print(g2)
    check(any("fc.weight (3x4)" in label and "grad mean" in label for _, label in g2.nodes.values()),
          "parameters appear by name with their values and gradients")
    if args.out and have_matplotlib():
        g2.save_png(Path(args.out) / "01_graph_model.png", title="a two-layer network: names, values, gradients")
        print(f"wrote {args.out}/01_graph_model.png")
    return {"grads": {k: float(v) for k, v in got.items()}, "graph_ops": sorted(g.op_names())}


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
