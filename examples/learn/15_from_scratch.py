"""Lesson 15: from scratch: a 100-line engine grown into a tiny GPT, checked against npgpt at each step.

    python examples/learn/15_from_scratch.py [--engine my_engine.py] [--out DIR]

`scratch_engine.py` (beside this lesson) is an autograd engine over NumPy arrays in about 100 lines
of code: one class T, a dozen ops, each with its backward as a closure, and an iterative
topological sort. Type it in yourself, step by step (its docstring says which ops each step needs),
and run this lesson with `--engine your_engine.py`: every step builds something with your engine,
builds the same thing with npgpt, and checks that the values and every gradient agree (float64,
to 1e-9). A step that needs an op your engine does not have yet stops the run and says which.

    step 1  scalars: L = (a*b + c) * f                       (lesson 01's example)
    step 2  a linear layer y = x @ W + b, broadcasting b     (lesson 02)
    step 3  a bigram: logits = table[ids], cross-entropy     (lesson 04)
    step 4  LayerNorm, GELU, an MLP                          (lesson 05)
    step 5  causal multi-head attention from qkv             (lesson 06)
    step 6  the tiny GPT: embeddings, 2 blocks, ln_f, tied head, loss, loaded with the weights of an
            npgpt.GPT: the same loss and the same gradient for every one of its parameters
    step 7  five SGD steps with each: the same losses, step by step

Nothing here is fast (every op is a NumPy call, no fused kernels): the point is that the whole GPT
is these few ops and their derivatives, and that npgpt's tuned ops compute exactly the same thing.
Higher-order gradients (a backward of the backward) are not part of this engine.
"""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, parse, picture, title  # noqa: E402

from npgpt import GPT, GPTConfig, Tensor  # noqa: E402
from npgpt.ops import nn as F  # noqa: E402

TOL = 1e-9


def load_engine(path):
    if path is None:
        import scratch_engine
        return scratch_engine, "scratch_engine.py (the lesson's)"
    spec = importlib.util.spec_from_file_location("learner_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def close(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.allclose(a, b, rtol=TOL, atol=TOL)


def report(what, pairs):
    """pairs: {name: (mine, npgpt's)}; print the worst difference of each, return whether all agree."""
    ok = True
    for name, (a, b) in pairs.items():
        same = close(a, b)
        ok &= same
        diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() \
            if np.shape(a) == np.shape(b) else float("inf")
        print(f"  {what} {name:28s} max |scratch - npgpt| = {diff:.1e}{'' if same else '   <-- differs'}")
    return ok


# ---- the model, written with the engine's ops only ----------------------------------------------
def linear(x, w, b=None):
    y = x @ w
    return y + b if b is not None else y


def layer_norm(x, w, b, eps=1e-5):
    xc = x - x.mean(-1)
    var = (xc * xc).mean(-1)
    return xc * (var + eps) ** -0.5 * w + b


def gelu(x):
    k = math.sqrt(2.0 / math.pi)
    return x * 0.5 * ((x + x ** 3 * 0.044715) * k).tanh() + x * 0.5


def softmax(x):
    e = (x - x.max_const()).exp()
    return e / e.sum(-1, keepdims=True)


def cross_entropy(logits, targets):
    """logits (N, V), targets (N,) -> mean of -log softmax(logits)[n, targets[n]]."""
    z = logits - logits.max_const()
    logp = z - z.exp().sum(-1, keepdims=True).log()
    return -logp[np.arange(len(targets)), targets].mean(axis=0, keepdims=False)


def attention(qkv, n_head):
    B, Tn, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head

    def heads(a):                                            # (B, T, C) -> (B, nh, T, hs)
        return a.reshape(B, Tn, n_head, hs).transpose(0, 2, 1, 3)
    q, k, v = heads(qkv[..., :C]), heads(qkv[..., C:2 * C]), heads(qkv[..., 2 * C:])
    att = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))
    att = att.where(np.tril(np.ones((Tn, Tn), dtype=bool)), -np.inf)
    y = softmax(att) @ v                                     # (B, nh, T, hs)
    return y.transpose(0, 2, 1, 3).reshape(B, Tn, C)


def gpt(P, idx, targets, n_head):
    """The GPT forward with the engine: P maps npgpt's parameter names to engine tensors."""
    B, Tn = idx.shape
    x = P["transformer.wte.weight"][idx] + P["transformer.wpe.weight"][np.arange(Tn)]
    n_layer = len({k.split(".")[2] for k in P if k.startswith("transformer.h.")})
    for i in range(n_layer):
        h = lambda name: P[f"transformer.h.{i}.{name}"]          # noqa: E731
        a = layer_norm(x, h("ln_1.weight"), h("ln_1.bias"))
        x = x + linear(attention(linear(a, h("attn.c_attn.weight"), h("attn.c_attn.bias")), n_head),
                       h("attn.c_proj.weight"), h("attn.c_proj.bias"))
        m = layer_norm(x, h("ln_2.weight"), h("ln_2.bias"))
        x = x + linear(gelu(linear(m, h("mlp.c_fc.weight"), h("mlp.c_fc.bias"))), h("mlp.c_proj.weight"),
                       h("mlp.c_proj.bias"))
    x = layer_norm(x, P["transformer.ln_f.weight"], P["transformer.ln_f.bias"])
    logits = x @ P["transformer.wte.weight"].transpose(1, 0)     # the tied head
    V = logits.shape[-1]
    return cross_entropy(logits.reshape(B * Tn, V), targets.reshape(-1))


# ---- the steps -----------------------------------------------------------------------------------
def step1(E, rng):
    vals = dict(a=2.0, b=-3.0, c=10.0, f=-2.0)
    mine = {k: E.T(v) for k, v in vals.items()}
    L = (mine["a"] * mine["b"] + mine["c"]) * mine["f"]
    L.backward()
    ref = {k: Tensor(np.array(v), requires_grad=True) for k, v in vals.items()}
    Lr = (ref["a"] * ref["b"] + ref["c"]) * ref["f"]
    Lr.backward()
    return report("step 1", {"L": (L.data, Lr.data), **{f"dL/d{k}": (mine[k].grad, ref[k].grad) for k in vals}})


def step2(E, rng):
    X, W, b, dY = rng.standard_normal((4, 3)), rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal((4, 5))
    x, w, bb = E.T(X), E.T(W), E.T(b)
    (linear(x, w, bb) * dY).sum().backward()
    xr, wr, br = (Tensor(a, requires_grad=True) for a in (X, W, b))
    F.linear(xr, wr, br).backward(dY)
    return report("step 2", {"dX": (x.grad, xr.grad), "dW": (w.grad, wr.grad), "db": (bb.grad, br.grad)})


def step3(E, rng):
    V = 7
    table = rng.standard_normal((V, V)) * 0.5
    ids, targets = rng.integers(0, V, 12), rng.integers(0, V, 12)
    t = E.T(table)
    loss = cross_entropy(t[ids], targets)
    loss.backward()
    tr = Tensor(table, requires_grad=True)
    lr_ = F.cross_entropy(F.embedding(tr, ids), targets)
    lr_.backward()
    return report("step 3", {"loss": (loss.data, lr_.data), "dtable": (t.grad, tr.grad)})


def step4(E, rng):
    C, H = 6, 24
    arrays = dict(x=rng.standard_normal((2, 3, C)), ln_w=1 + 0.1 * rng.standard_normal(C), ln_b=0.1 * rng.standard_normal(C),
                  w1=rng.standard_normal((C, H)) * 0.3, b1=rng.standard_normal(H) * 0.1,
                  w2=rng.standard_normal((H, C)) * 0.3, b2=rng.standard_normal(C) * 0.1)
    dY = rng.standard_normal((2, 3, C))
    m = {k: E.T(v) for k, v in arrays.items()}
    y = linear(gelu(linear(layer_norm(m["x"], m["ln_w"], m["ln_b"]), m["w1"], m["b1"])), m["w2"], m["b2"])
    (y * dY).sum().backward()
    r = {k: Tensor(v, requires_grad=True) for k, v in arrays.items()}
    yr = F.linear(F.gelu(F.linear(F.layer_norm(r["x"], r["ln_w"], r["ln_b"]), r["w1"], r["b1"])), r["w2"], r["b2"])
    yr.backward(dY)
    return report("step 4", {"y": (y.data, yr.data), **{f"d{k}": (m[k].grad, r[k].grad) for k in arrays}})


def step5(E, rng):
    qkv, dY = rng.standard_normal((2, 5, 24)), rng.standard_normal((2, 5, 8))
    t = E.T(qkv)
    y = attention(t, 2)
    (y * dY).sum().backward()
    tr = Tensor(qkv, requires_grad=True)
    yr = F.causal_self_attention(tr, 2)
    yr.backward(dY)
    return report("step 5", {"y": (y.data, yr.data), "dqkv": (t.grad, tr.grad)})


def tiny_gpt(seed=0):
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    return GPT(cfg, seed=seed).astype(np.float64), cfg


def step6(E, rng):
    model, cfg = tiny_gpt()
    idx, targets = rng.integers(0, cfg.vocab_size, (2, 8)), rng.integers(0, cfg.vocab_size, (2, 8))
    P = {n: E.T(p.data.copy()) for n, p in model.named_parameters()}
    loss = gpt(P, idx, targets, cfg.n_head)
    loss.backward()
    model.zero_grad()
    _, lr_ = model(idx, targets)
    lr_.backward()
    pairs = {"loss": (loss.data, lr_.data)}
    pairs.update({f"d {n}": (P[n].grad, p.grad) for n, p in model.named_parameters()})
    return report("step 6", pairs)


def step7(E, rng, steps=5, lr=0.5):
    model, cfg = tiny_gpt(seed=1)
    P = {n: E.T(p.data.copy()) for n, p in model.named_parameters()}
    mine, ref = [], []
    for _ in range(steps):
        idx = rng.integers(0, cfg.vocab_size, (4, 8))
        targets = np.roll(idx, -1, 1)
        for p in P.values():
            p.grad = np.zeros_like(p.data)
        loss = gpt(P, idx, targets, cfg.n_head)
        loss.backward()
        P = {n: E.T(p.data - lr * p.grad) for n, p in P.items()}      # SGD: a fresh leaf for the next graph
        model.zero_grad()
        _, lr_ = model(idx, targets)
        lr_.backward()
        for p in model.parameters():
            p.data -= lr * p.grad
        mine.append(float(loss.data))
        ref.append(float(lr_.data))
    for i, (a, b) in enumerate(zip(mine, ref)):
        print(f"  step 7 SGD step {i}: loss scratch {a:.10f}  npgpt {b:.10f}")
    return close(mine, ref) and mine[-1] < mine[0], mine, ref


def main(argv=None):
    import argparse
    from npgpt.programs import existing_file   # the CLI's checks and one-line errors
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--engine", default=None, type=existing_file)
    known, rest = pre.parse_known_args(argv)
    args = parse(rest, __doc__)
    E, where = load_engine(known.engine)
    print(f"engine: {where}")
    rng = np.random.default_rng(0)
    steps = [("scalars", step1), ("a linear layer", step2), ("a bigram and cross-entropy", step3),
             ("LayerNorm, GELU, an MLP", step4), ("causal multi-head attention", step5),
             ("the tiny GPT against npgpt.GPT", step6)]
    done = 0
    for i, (name, fn) in enumerate(steps, 1):
        title(f"step {i}: {name}")
        try:
            ok = fn(E, rng)
        except (AttributeError, TypeError, NotImplementedError) as e:
            print(f"step {i} needs something your engine does not have yet ({type(e).__name__}: {e}); "
                  f"it passes steps 1-{i - 1}. Add the ops of step {i} (see scratch_engine.py's docstring).")
            break
        check(ok, f"step {i}: the engine's values and gradients equal npgpt's (to {TOL:.0e})")
        done = i
    curves = None
    if done == len(steps):
        title("step 7: training both for five SGD steps")
        ok, mine, ref = step7(E, rng)
        check(ok, "the same loss at every step, and it falls")
        done, curves = 7, (mine, ref)
    if known.engine is None:
        check(done == 7, "the lesson's engine passes all seven steps")

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(curves[0], "o-", label="scratch engine")
        ax.plot(curves[1], "x--", label="npgpt")
        ax.set(xlabel="SGD step", ylabel="loss", title="the same tiny GPT, two engines: the same losses")
        ax.legend(fontsize=7)
    if curves:
        picture(args.out, "15_scratch_vs_npgpt.png", draw)
    return {"steps_passed": done}


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
