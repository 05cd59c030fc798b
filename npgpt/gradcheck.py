"""Numeric gradient checking, for the test suite and for learners.

`gradcheck(fn, *inputs)` compares the gradients npgpt's autograd computes with central finite
differences in float64:

    dL/dx_i  ~  (L(x + eps e_i) - L(x - eps e_i)) / (2 eps),    L(x) = sum(fn(x) * dout)

`dout` is a random upstream gradient, so every output element matters (a plain `.sum()` would
miss mistakes: sum(softmax(x)) is constant whatever backward returns). For each input it reports
the worst relative error  max_i |analytic_i - numeric_i| / max_i |numeric_i|.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from npgpt.backend import asnumpy
from npgpt.errors import NpgptError
from npgpt.tensor import Tensor


@dataclass
class GradcheckResult:
    """Per-input relative errors; truthy when all are within `tol`."""

    errors: list = field(default_factory=list)   # worst relative error per input (None: not checked)
    tol: float = 1e-6

    @property
    def ok(self):
        return all(e is None or e <= self.tol for e in self.errors)

    def __bool__(self):
        return self.ok

    def __str__(self):
        rows = [f"  input {i}: " + ("not differentiable" if e is None else f"rel. error {e:.2e}")
                for i, e in enumerate(self.errors)]
        return f"gradcheck {'passed' if self.ok else 'FAILED'} (tol {self.tol:.0e})\n" + "\n".join(rows)


def gradcheck(fn, *inputs, eps=1e-6, tol=1e-6, seed=0, wrt=None) -> GradcheckResult:
    """Check fn's analytic gradients against central differences; see the module docstring.

    fn:     takes Tensors (float64) and returns one Tensor.
    inputs: arrays or Tensors; float ones are differentiated (or those listed in `wrt`),
            integer ones (ids, targets) are passed through unchanged.
    """
    arrays = [asnumpy(x.data if isinstance(x, Tensor) else np.asarray(x)) for x in inputs]
    if wrt is None:
        wrt = [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating)]
    arrays = [a.astype(np.float64) if i in wrt else a for i, a in enumerate(arrays)]

    def run(arrs, requires_grad=False):
        ts = [Tensor(a.copy(), requires_grad=requires_grad and i in wrt) for i, a in enumerate(arrs)]
        return ts, fn(*ts)

    tensors, out = run(arrays, requires_grad=True)
    dout = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(dout)

    errors = []
    for i, a in enumerate(arrays):
        if i not in wrt:
            errors.append(None)
            continue
        numeric = np.zeros_like(a)
        for j in np.ndindex(a.shape):
            orig = a[j]
            a[j] = orig + eps
            plus = float((asnumpy(run(arrays)[1].data) * dout).sum())
            a[j] = orig - eps
            minus = float((asnumpy(run(arrays)[1].data) * dout).sum())
            a[j] = orig
            numeric[j] = (plus - minus) / (2 * eps)
        g = tensors[i].grad
        analytic = np.zeros_like(a) if g is None else asnumpy(g)
        scale = max(np.abs(numeric).max(initial=0.0), 1e-12)
        errors.append(float(np.abs(analytic - numeric).max(initial=0.0) / scale))
    return GradcheckResult(errors, tol)


@dataclass
class ModuleGradcheckResult:
    """Worst relative error per parameter name; truthy when all are within `tol`.

    Reads like the dict `gradcheck_module` used to return (`result[name]`, `.items()`), and says
    whether it checked a float64 copy of a lower-precision model (`converted_from`).
    """

    errors: dict = field(default_factory=dict)
    tol: float = 1e-5
    converted_from: str | None = None

    @property
    def ok(self):
        return all(e <= self.tol for e in self.errors.values())

    def __bool__(self):
        return self.ok

    def __getitem__(self, name):
        return self.errors[name]

    def __iter__(self):
        return iter(self.errors)

    def __len__(self):
        return len(self.errors)

    def items(self):
        return self.errors.items()

    def values(self):
        return self.errors.values()

    def __str__(self):
        note = f" on a float64 copy of a {self.converted_from} model" if self.converted_from else ""
        w = max((len(n) for n in self.errors), default=0)
        rows = [f"  {n:<{w}}  rel. error {e:.2e}{'' if e <= self.tol else '  <-- FAILED'}"
                for n, e in self.errors.items()]
        return f"gradcheck_module {'passed' if self.ok else 'FAILED'} (tol {self.tol:.0e}){note}\n" + "\n".join(rows)


def gradcheck_module(module, loss_fn, eps=1e-6, seed=0, max_entries=None, tol=1e-5,
                     convert=True) -> ModuleGradcheckResult:
    """Check every parameter's gradient of `loss_fn(module)` (a scalar Tensor) numerically.

    Finite differences need float64: in float32 a step of 1e-6 is below the rounding of a loss near
    4 (float32 keeps ~7 digits), so the numeric "gradient" is noise and errors reach 1e10. A model
    whose parameters are not all float64 is therefore checked on a float64 deep copy (the module
    itself is left untouched, and `result.converted_from` names the original dtype); with
    `convert=False` such a model is refused with an NpgptError instead.

    Returns a ModuleGradcheckResult: {parameter name: worst relative error} as `gradcheck`
    defines it, truthy when every error is within `tol`. `max_entries` checks a random subset of
    each parameter's entries (all of them by default).
    """
    dtypes = sorted({str(p.dtype) for p in module.parameters()})
    converted = None
    if dtypes != ["float64"]:
        if not convert:
            raise NpgptError(f"gradcheck_module needs float64 parameters, the model has {', '.join(dtypes)}: "
                             f"finite differences in float32 are rounding noise. Call "
                             f"module.astype(np.float64) first, or pass convert=True")
        import copy   # stdlib, only needed for the float64 copy
        module = copy.deepcopy(module).astype(np.float64)
        converted = "/".join(dtypes)
    params = module.named_parameters()
    module.zero_grad()
    loss_fn(module).backward()
    analytic = {name: asnumpy(p.grad).copy() for name, p in params}
    r = np.random.default_rng(seed)
    errors = {}
    for name, p in params:
        flat = p.data.reshape(-1)
        picks = np.arange(flat.size)
        if max_entries is not None and flat.size > max_entries:
            picks = r.choice(flat.size, size=max_entries, replace=False)
        numeric = np.empty(len(picks))
        for n, j in enumerate(picks):
            orig = flat[j]
            flat[j] = orig + eps
            plus = float(loss_fn(module).data)
            flat[j] = orig - eps
            minus = float(loss_fn(module).data)
            flat[j] = orig
            numeric[n] = (plus - minus) / (2 * eps)
        a = analytic[name].reshape(-1)[picks]
        # Floor the scale at 1e-4. Central differences in float64 carry rounding noise of about
        # 1e-16 |L| / eps ~ 1e-10 for a loss near 1; some entries' true gradient is exactly 0 (the
        # key bias of attention: softmax ignores a shift shared by all keys) or ~1e-5 at init, and
        # a sample of only such entries would otherwise divide noise by noise. A 10% error in a
        # gradient of 1e-5 still shows as 1e-2.
        scale = max(np.abs(numeric).max(initial=0.0), np.abs(a).max(initial=0.0), 1e-4)
        errors[name] = float(np.abs(a - numeric).max(initial=0.0) / scale)
    return ModuleGradcheckResult(errors, tol, converted)
