"""The ops: primitive Functions, and the one table that binds them onto Tensor.

`a + b`, `a @ b`, `a.sum(axis=1)`, `a.reshape(2, 3)`, `a[idx]` ... all land here as calls of a
Function's `apply`. Plain functions (`concatenate`, `stack`, `split`, `where`, `masked_fill`,
`softmax`, `log_softmax`, ...) are exported for operations that take several tensors or read
better as functions. Fused neural-network ops (LayerNorm, GELU, attention, cross-entropy) live in
`npgpt.ops.nn`.
"""

from npgpt.backend import get_xp
from npgpt.ops.elementwise import (Add, Clip, Div, Exp, Log, Mul, Neg, Pow, Relu, Sigmoid, Sqrt, Sub,
                                   Tanh, Where, unbroadcast)
from npgpt.ops.linalg import MatMul
from npgpt.ops.reduce import LogSoftmax, Max, Mean, Softmax, Sum, Var
from npgpt.ops.shape import Concatenate, GetItem, Reshape, Stack, Transpose
from npgpt.tensor import Tensor, as_tensor

__all__ = ["unbroadcast", "concatenate", "stack", "split", "where", "masked_fill", "softmax",
           "log_softmax", "matmul", "exp", "log", "sqrt", "tanh", "relu", "sigmoid", "clip"]


# ---- functions of several tensors -------------------------------------------------------------
def concatenate(tensors, axis=0):
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors, axis=0):
    return Stack.apply(*tensors, axis=axis)


def split(x, indices_or_sections, axis=0):
    """Like np.split, built from slices (each piece's backward fills its own slice)."""
    n = x.shape[axis]
    if isinstance(indices_or_sections, int):
        if n % indices_or_sections:
            raise ValueError(f"split: axis {axis} of size {n} does not divide into {indices_or_sections} equal parts")
        step = n // indices_or_sections
        cuts = list(range(step, n, step))
    else:
        cuts = list(indices_or_sections)
    bounds = [0] + cuts + [n]
    prefix = (slice(None),) * (axis % x.ndim)
    return [x[prefix + (slice(lo, hi),)] for lo, hi in zip(bounds[:-1], bounds[1:])]


def where(cond, a, b):
    """cond ? a : b; `cond` is a boolean array (or Tensor, not differentiated)."""
    cond = cond.data if isinstance(cond, Tensor) else cond
    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
    return Where.apply(as_tensor(a, like), as_tensor(b, like), cond=get_xp(cond).asarray(cond, dtype=bool))


def masked_fill(x, mask, value):
    """x with `value` wherever the boolean `mask` is True (the gradient there is 0)."""
    return where(mask, as_tensor(value, x), x)


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)


def matmul(a, b):
    return MatMul.apply(a, b)


def exp(x):
    return Exp.apply(x)


def log(x):
    return Log.apply(x)


def sqrt(x):
    return Sqrt.apply(x)


def tanh(x):
    return Tanh.apply(x)


def relu(x):
    return Relu.apply(x)


def sigmoid(x):
    return Sigmoid.apply(x)


def clip(x, lo=None, hi=None):
    return Clip.apply(x, lo=lo, hi=hi)


# ---- the Tensor method table ------------------------------------------------------------------
def _binary(fn, reflected=False):
    def method(self, other):
        other = as_tensor(other, self)
        return fn.apply(other, self) if reflected else fn.apply(self, other)
    return method


def _shape_args(args):
    """Accept both t.reshape(2, 3) and t.reshape((2, 3)), as NumPy does."""
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args


def _getitem(self, index):
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return GetItem.apply(self, index=index)


def _pow(self, p):
    if isinstance(p, Tensor):
        return exp(log(self) * p)           # tensor exponent: x^p = e^(p log x), for x > 0
    return Pow.apply(self, p=p)


_METHODS = {
    "__add__": _binary(Add), "__radd__": _binary(Add, reflected=True),
    "__sub__": _binary(Sub), "__rsub__": _binary(Sub, reflected=True),
    "__mul__": _binary(Mul), "__rmul__": _binary(Mul, reflected=True),
    "__truediv__": _binary(Div), "__rtruediv__": _binary(Div, reflected=True),
    "__matmul__": _binary(MatMul), "__rmatmul__": _binary(MatMul, reflected=True),
    "__neg__": lambda self: Neg.apply(self),
    "__pow__": _pow,
    "__getitem__": _getitem,
    "sum": lambda self, axis=None, keepdims=False: Sum.apply(self, axis=axis, keepdims=keepdims),
    "mean": lambda self, axis=None, keepdims=False: Mean.apply(self, axis=axis, keepdims=keepdims),
    "max": lambda self, axis=None, keepdims=False: Max.apply(self, axis=axis, keepdims=keepdims),
    "var": lambda self, axis=None, keepdims=False, ddof=0: Var.apply(self, axis=axis, keepdims=keepdims, ddof=ddof),
    "reshape": lambda self, *shape: Reshape.apply(self, shape=_shape_args(shape)),
    "transpose": lambda self, *axes: Transpose.apply(self, axes=_shape_args(axes) or None),
    "permute": lambda self, *axes: Transpose.apply(self, axes=_shape_args(axes)),
    "T": property(lambda self: Transpose.apply(self, axes=None)),
    "exp": exp, "log": log, "sqrt": sqrt, "tanh": tanh, "relu": relu, "sigmoid": sigmoid,
    "clip": clip,
    "softmax": softmax, "log_softmax": log_softmax,
    "masked_fill": masked_fill,
    "matmul": matmul,
}

for _name, _impl in _METHODS.items():
    setattr(Tensor, _name, _impl)
