"""Grading a learner's file: load it, compare what it returns with a hidden reference, say which
entry is wrong.

A report is a list of findings, one per thing checked ("forward", "backward: dx", "gradcheck of
your own forward and backward", "merge 3", ...), each ok or wrong with the first thing a learner
needs to fix: the shape that differs, or the worst entry with its index, its value and the expected
value, and how many entries are off.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npgpt.errors import NpgptError
from npgpt.gradcheck import gradcheck
from npgpt.tensor import Function, Tensor


@dataclass
class Finding:
    ok: bool
    what: str
    detail: str = ""


@dataclass
class Report:
    """What `check` found: truthy when every finding is ok."""

    name: str
    findings: list = field(default_factory=list)

    @property
    def ok(self):
        return bool(self.findings) and all(f.ok for f in self.findings)

    def __bool__(self):
        return self.ok

    def add(self, ok, what, detail=""):
        self.findings.append(Finding(bool(ok), what, detail))
        return ok

    def wrong(self):
        return [f for f in self.findings if not f.ok]

    def __str__(self):
        head = f"exercise {self.name}: " + ("all checks passed" if self.ok else
                                            f"{len(self.wrong())} of {len(self.findings)} checks failed")
        rows = [f"  {'ok   ' if f.ok else 'WRONG'} {f.what}" + (f": {f.detail}" if f.detail else "")
                for f in self.findings]
        return "\n".join([head] + rows)


class NotWritten(Exception):
    """The learner's function still raises NotImplementedError."""


def load_solution(path, names):
    """Import the learner's file as a fresh module; returns it, or raises NpgptError with one line."""
    path = Path(path)
    if not path.is_file():
        raise NpgptError(f"{path} is not a file: pass the exercise file you edited "
                         f"(`npgpt exercise start NAME DIR` writes one)")
    module_name = f"npgpt_exercise_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:                       # the learner's code: report it, do not crash
        raise NpgptError(f"{path.name} did not run: {_last_frame(e)}") from None
    finally:
        sys.modules.pop(module_name, None)
    missing = [n for n in names if not callable(getattr(module, n, None))]
    if missing:
        raise NpgptError(f"{path.name} has no function {', '.join(missing)}: keep the names of the stub")
    return module


def _last_frame(e):
    """'ValueError: ... (line 12)' for an exception raised inside the learner's file."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (line {tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def call(fn, *args, **kwargs):
    """Run one of the learner's functions; NotImplementedError becomes NotWritten, other errors
    become NpgptError naming the function and the line."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise NotWritten(fn.__name__) from None
    except Exception as e:
        raise NpgptError(f"{fn.__name__} raised {_last_frame(e)}") from None


def compare(report, what, got, want, rtol=1e-6, atol=1e-9):
    """Add a finding: `got` against `want`, entry by entry; on a mismatch name the worst entry."""
    want = np.asarray(want, dtype=np.float64)
    try:
        got = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        return report.add(False, what, f"got {type(got).__name__}, expected an array of shape {want.shape}")
    if got.shape != want.shape:
        return report.add(False, what, f"shape {got.shape}, expected {want.shape}")
    if not np.isfinite(got).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(got))[0])
        return report.add(False, what, f"entry {list(bad)} is {got[bad]} (not finite)")
    err = np.abs(got - want)
    off = err > atol + rtol * np.abs(want)
    if not off.any():
        return report.add(True, what, f"matches (max error {err.max(initial=0.0):.1e})")
    worst = np.unravel_index(int(np.argmax(np.where(off, err, -1.0))), want.shape)
    idx = list(int(i) for i in worst)
    return report.add(False, what, f"entry {idx} is {got[worst]:.6g}, expected {want[worst]:.6g} "
                                   f"({int(off.sum())} of {off.size} entries off)")


def pair(result):
    """forward's (out, cache), or an NpgptError saying what came back instead."""
    if not (isinstance(result, tuple) and len(result) == 2):
        raise NpgptError(f"forward must return (out, cache), a pair; it returned {type(result).__name__}"
                         + (f" of length {len(result)}" if isinstance(result, tuple) else ""))
    return result


def learner_function(forward, backward, float_inputs, options):
    """The learner's forward/backward pair as an npgpt Function, for npgpt.gradcheck."""

    class Learner(Function):
        def forward(self, *arrays):
            out, cache = pair(call(forward, *arrays, **options))
            self.cache = cache
            return np.asarray(out, dtype=np.float64)

        def backward(self, dout):
            grads = call(backward, dout, self.cache)
            grads = grads if isinstance(grads, tuple) else (grads,)
            it = iter(grads)
            return tuple(next(it, None) if i in float_inputs else None for i in range(self.n_inputs))

    return Learner


def grade_function(report, module, inputs, names, reference, options=None, tol=1e-6):
    """Grade `forward(*inputs, **options) -> (out, cache)` and `backward(dout, cache) -> grads`.

    inputs: arrays (float ones are differentiated; integer ones such as ids pass through);
    names: the gradients' names, one per float input ("dx", "dw", ...); reference(*tensors) -> Tensor,
    the hidden answer built from npgpt's ops (autograd gives its gradients)."""
    options = options or {}
    floats = [i for i, a in enumerate(inputs) if np.issubdtype(np.asarray(a).dtype, np.floating)]
    inputs = [np.asarray(a, dtype=np.float64) if i in floats else np.asarray(a) for i, a in enumerate(inputs)]
    tensors = [Tensor(a.copy(), requires_grad=i in floats) for i, a in enumerate(inputs)]
    want = reference(*tensors)
    dout = np.random.default_rng(7).standard_normal(want.shape)   # a random upstream gradient, never .sum()
    want.backward(dout)
    try:
        out, cache = pair(call(module.forward, *[a.copy() for a in inputs], **options))
        compare(report, "forward", out, want.data, rtol=tol, atol=tol * 1e-3)
        grads = call(module.backward, dout.copy(), cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        if len(grads) != len(floats):
            report.add(False, "backward", f"returned {len(grads)} gradient(s), expected {len(floats)} "
                                          f"({', '.join(names)})")
        else:
            for name, g, i in zip(names, grads, floats):
                compare(report, f"backward: {name}", g, tensors[i].grad, rtol=tol, atol=tol * 1e-3)
        fn = learner_function(module.forward, module.backward, floats, options)
        fn.n_inputs = len(inputs)
        what = "gradcheck: your backward against finite differences of your forward"
        try:
            r = gradcheck(lambda *ts: fn.apply(*ts), *inputs, tol=1e-5)
        except (NotWritten, NpgptError):
            raise
        except Exception as e:                     # e.g. a gradient of the wrong shape reaching the engine
            report.add(False, what, f"could not run: {type(e).__name__}: {e}")
        else:
            report.add(r.ok, what, "; ".join(f"{names[k]} rel. error {r.errors[i]:.1e}" for k, i in enumerate(floats)))
    except NotWritten as e:
        report.add(False, f"{e}", "not written yet (it raises NotImplementedError)")
    except NpgptError as e:
        report.add(False, "your code raised an error", str(e))
    return report
