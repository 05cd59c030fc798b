"""A from-scratch autograd engine over NumPy arrays, about 100 lines: type it in yourself, in steps.

Lesson 15 grows it into a tiny GPT and checks it against npgpt at every step (same values, same
gradients); run the lesson with `--engine your_engine.py` to check your own copy as you type it.

    step 1  T, __add__, __mul__, backward           (lesson 15, step 1: scalars)
    step 2  unbroadcast, __matmul__, sum, __neg__, __sub__   (step 2: a linear layer)
    step 3  __getitem__, exp, log, max_const, mean  (step 3: a bigram with cross-entropy)
    step 4  __pow__, __truediv__, tanh, reshape, transpose   (step 4: LayerNorm, GELU, an MLP)
    step 5  where                                   (step 5: causal attention; step 6: the GPT)

Each op computes its output and hands it a closure `_backward` that adds the op's local
derivative times out.grad into its inputs' grads (micrograd's design, on arrays). `backward()`
orders the graph with an iterative depth-first search (no recursion limit) and runs the closures
from the output back.
"""

import numpy as np


def unbroadcast(g, shape):
    """Sum g over the axes broadcasting stretched, back to `shape` (lesson 02)."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for i, n in enumerate(shape):
        if n == 1 and g.shape[i] != 1:
            g = g.sum(axis=i, keepdims=True)
    return g


class T:
    def __init__(self, data, parents=()):
        self.data = np.asarray(data, dtype=np.float64)
        self.grad = np.zeros_like(self.data)
        self._parents = parents
        self._backward = lambda: None

    shape = property(lambda self: self.data.shape)

    @staticmethod
    def lift(x):
        return x if isinstance(x, T) else T(x)

    # ---- step 1 ----
    def __add__(self, other):
        other = T.lift(other)
        out = T(self.data + other.data, (self, other))

        def _backward():
            self.grad += unbroadcast(out.grad, self.shape)
            other.grad += unbroadcast(out.grad, other.shape)
        out._backward = _backward
        return out

    def __mul__(self, other):
        other = T.lift(other)
        out = T(self.data * other.data, (self, other))

        def _backward():
            self.grad += unbroadcast(out.grad * other.data, self.shape)
            other.grad += unbroadcast(out.grad * self.data, other.shape)
        out._backward = _backward
        return out

    __radd__, __rmul__ = __add__, __mul__

    def backward(self):
        order, seen, stack = [], set(), [(self, False)]
        while stack:                                   # iterative DFS: parents before children
            node, done = stack.pop()
            if done:
                order.append(node)
            elif id(node) not in seen:
                seen.add(id(node))
                stack.append((node, True))
                stack.extend((p, False) for p in node._parents)
        self.grad = np.ones_like(self.data)
        for node in reversed(order):
            node._backward()

    # ---- step 2 ----
    def __matmul__(self, other):                       # (..., n, k) @ (..., k, m)
        out = T(self.data @ other.data, (self, other))

        def _backward():
            self.grad += unbroadcast(out.grad @ np.swapaxes(other.data, -1, -2), self.shape)
            other.grad += unbroadcast(np.swapaxes(self.data, -1, -2) @ out.grad, other.shape)
        out._backward = _backward
        return out

    def sum(self, axis=None, keepdims=False):
        out = T(self.data.sum(axis=axis, keepdims=keepdims), (self,))

        def _backward():
            g = out.grad if keepdims or axis is None else np.expand_dims(out.grad, axis)
            self.grad += np.broadcast_to(g, self.shape)
        out._backward = _backward
        return out

    def __neg__(self):
        return self * -1.0

    def __sub__(self, other):
        return self + (-T.lift(other))

    def __rsub__(self, other):
        return T.lift(other) + (-self)

    # ---- step 3 ----
    def __getitem__(self, idx):                        # an embedding lookup is x[ids]
        out = T(self.data[idx], (self,))

        def _backward():
            np.add.at(self.grad, idx, out.grad)        # repeated ids add up (`+=` would drop them)
        out._backward = _backward
        return out

    def _unary(self, value, local):                    # y = f(x), dx = dy * f'(x)
        out = T(value, (self,))

        def _backward():
            self.grad += out.grad * local(out.data)
        out._backward = _backward
        return out

    def exp(self):
        return self._unary(np.exp(self.data), lambda y: y)

    def log(self):
        return self._unary(np.log(self.data), lambda y: 1.0 / self.data)

    def max_const(self, axis=-1):
        """max over `axis` as a constant: subtracting it (softmax's stability shift) needs no gradient."""
        return T(self.data.max(axis=axis, keepdims=True))

    def mean(self, axis=-1, keepdims=True):
        return self.sum(axis=axis, keepdims=keepdims) * (1.0 / self.data.shape[axis])

    # ---- step 4 ----
    def __pow__(self, k):                              # k a plain number
        return self._unary(self.data ** k, lambda y: k * self.data ** (k - 1))

    def __truediv__(self, other):
        return self * T.lift(other) ** -1.0

    def tanh(self):
        return self._unary(np.tanh(self.data), lambda y: 1.0 - y * y)

    def reshape(self, *shape):
        out = T(self.data.reshape(*shape), (self,))

        def _backward():
            self.grad += out.grad.reshape(self.shape)
        out._backward = _backward
        return out

    def transpose(self, *axes):
        out = T(self.data.transpose(*axes), (self,))

        def _backward():
            self.grad += out.grad.transpose(np.argsort(axes))
        out._backward = _backward
        return out

    # ---- step 5 ----
    def where(self, keep, fill):
        """Entries where `keep` is False become `fill` (attention's causal mask); they get no gradient."""
        out = T(np.where(keep, self.data, fill), (self,))

        def _backward():
            self.grad += np.where(keep, out.grad, 0.0)
        out._backward = _backward
        return out
