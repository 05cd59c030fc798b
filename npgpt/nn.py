"""Modules: named parameters, train/eval, devices, state dicts; Linear, Embedding, LayerNorm.

A `Module` finds its parameters by walking its attributes in the order they were set: a
`Parameter` attribute `weight` of a module stored as `ln_1` of block `3` of the list `h` of
`transformer` is named `transformer.h.3.ln_1.weight`. Those dotted names are the checkpoint keys,
and they are GPT-2's own.
"""

from __future__ import annotations

import numpy as np

from npgpt.backend import asnumpy, get_xp, to_device
from npgpt.errors import NpgptError
from npgpt.ops.llama import rms_norm
from npgpt.ops.nn import embedding, layer_norm, linear
from npgpt.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (requires_grad by default)."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)


class Module:
    """Base class: subclasses set Parameters / Modules / ModuleLists as attributes in __init__."""

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def _children(self):
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, ModuleList):
                for i, m in enumerate(value):
                    yield f"{name}.{i}", m

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) pairs, each parameter once (tied weights keep the first name)."""
        seen = set()
        stack = [(prefix, self)]
        out = []
        while stack:
            pre, mod = stack.pop()
            kids = []
            for name, value in mod._children():
                full = f"{pre}{name}"
                if isinstance(value, Parameter):
                    if id(value) not in seen:
                        seen.add(id(value))
                        out.append((full, value))
                else:
                    kids.append((full + ".", value))
            stack.extend(reversed(kids))
        return out

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def modules(self):
        return [m for _, m in self.named_modules()]

    def named_modules(self, prefix=""):
        """(dotted name, Module) pairs of this module ("" names it) and every module below, in order."""
        stack, out = [(prefix, self)], []
        while stack:
            name, m = stack.pop()
            out.append((name, m))
            stack.extend(reversed([(f"{name}.{n}" if name else n, v) for n, v in m._children()
                                   if isinstance(v, Module)]))
        return out

    def train(self, mode=True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, device):
        """Move every parameter's data to `device` in place (tied parameters stay tied)."""
        for p in self.parameters():
            p.data = to_device(p.data, device)
            p.grad = None if p.grad is None else to_device(p.grad, device)
        return self

    def astype(self, dtype):
        """Convert every parameter to `dtype` in place (float64 for gradient checks)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def __repr__(self):
        """The module tree: one line per child with its parameters' shapes and counts (and totals)."""
        return "\n".join(self._repr_lines(type(self).__name__, ""))

    def _repr_lines(self, name, indent, repeat=1):
        own = [(n, v) for n, v in self._children() if isinstance(v, Tensor)]
        kids = [(n, v) for n, v in self._children() if isinstance(v, Module)]
        total = sum(p.size for p in self.parameters())
        shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in own)
        kind = type(self).__name__ if repeat == 1 else f"{repeat} x {type(self).__name__}"
        head = f"{indent}{name}: {kind}" if name != kind else f"{indent}{name}"
        count = f"{total:,} params" + (" each" if repeat > 1 else "")
        lines = [f"{head}  [{shapes}]  {count}" if shapes else f"{head}  {count}"]
        # runs of identically shaped children (the n_layer blocks) print once, then "x N"
        i = 0
        while i < len(kids):
            n, m = kids[i]
            j = i + 1
            sig = m._signature()
            while j < len(kids) and kids[j][1]._signature() == sig:
                j += 1
            if j - i > 1:
                lines += m._repr_lines(f"{n}..{kids[j - 1][0].rsplit('.', 1)[-1]}", indent + "  ", j - i)
            else:
                lines += m._repr_lines(n, indent + "  ")
            i = j
        return lines

    def _signature(self):
        return (type(self).__name__, tuple((n, tuple(p.shape)) for n, p in self.named_parameters()))

    def state_dict(self):
        """{name: array}: the parameters' data (the arrays themselves, not copies)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters, checking names and shapes; errors list every problem."""
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {p.shape}"
                     for k, p in params.items() if k in state and tuple(state[k].shape) != p.shape]
        problems = []
        if missing and strict:
            problems.append(f"missing keys: {', '.join(missing)}")
        if unexpected and strict:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        if misshaped:
            problems.append(f"mis-shaped: {'; '.join(misshaped)}")
        if problems:
            raise NpgptError("state dict does not fit the model: " + " | ".join(problems))
        for k, p in params.items():
            if k in state:
                xp = get_xp(p.data)
                p.data[...] = xp.asarray(state[k], dtype=p.dtype) if xp is not np else asnumpy(state[k])
        return self


class ModuleList(list):
    """A list of Modules whose parameters are named `<attr>.<index>.<...>`."""


class Linear(Module):
    """y = x @ weight + bias, weight stored (in, out) as GPT-2's Conv1D does."""

    def __init__(self, n_in, n_out, bias=True, rng=None, std=0.02, dtype=np.float32):
        rng = rng or np.random.default_rng()
        # copy=False: a float32 np.empty from a model built only to be loaded stays untouched (no RSS)
        self.weight = Parameter(rng.normal(0.0, std, size=(n_in, n_out)).astype(dtype, copy=False))
        self.bias = Parameter(np.zeros(n_out, dtype=dtype)) if bias else None

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class Embedding(Module):
    """A table of `num` vectors of size `dim`; forward(ids) picks rows."""

    def __init__(self, num, dim, rng=None, std=0.02, dtype=np.float32):
        rng = rng or np.random.default_rng()
        self.weight = Parameter(rng.normal(0.0, std, size=(num, dim)).astype(dtype, copy=False))

    def forward(self, ids):
        return embedding(self.weight, ids)

    def lookup(self, ids):
        """Rows of the table as a plain array (cached inference: no graph)."""
        return self.weight.data[ids]

    def logits(self, x):
        """x (..., dim) Tensor -> (..., num): the table as a tied output head."""
        return linear(x, self.weight.T)


class RMSNorm(Module):
    """RMSNorm over the last axis with a learned scale (1), no shift (Hugging Face's LlamaRMSNorm)."""

    def __init__(self, dim, eps=1e-6, dtype=np.float32):
        self.eps = eps
        self.weight = Parameter(np.ones(dim, dtype=dtype))

    def forward(self, x):
        return rms_norm(x, self.weight, eps=self.eps)


class LayerNorm(Module):
    """LayerNorm over the last axis with a learned scale (1) and shift (0; None without bias, as nanoGPT's)."""

    def __init__(self, dim, bias=True, eps=1e-5, dtype=np.float32):
        self.eps = eps
        self.weight = Parameter(np.ones(dim, dtype=dtype))
        self.bias = Parameter(np.zeros(dim, dtype=dtype)) if bias else None

    def forward(self, x):
        # the fused op always takes a shift: without a bias, a zero one made here in x's dtype and device
        b = self.bias if self.bias is not None else Tensor(get_xp(x.data).zeros(x.shape[-1], dtype=self.weight.dtype))
        return layer_norm(x, self.weight, b, eps=self.eps)
