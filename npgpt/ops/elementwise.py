"""Elementwise primitives: arithmetic with broadcasting, and unary math functions.

Binary ops broadcast like NumPy; their backward sums the gradient back down to each input's
shape with `unbroadcast`. Unary ops save whichever of input or output their derivative is
cheapest to write in (e.g. tanh saves y since d tanh = 1 - y^2).
"""

from npgpt.backend import get_xp
from npgpt.tensor import Function


def unbroadcast(grad, shape):
    """Sum `grad` over the axes that broadcasting added or stretched, giving an array of `shape`."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


def check_broadcast(op, a, b):
    """Raise a ValueError naming the op and both shapes when a and b cannot broadcast."""
    try:
        get_xp(a).broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together") from None


class Add(Function):
    """a + b (broadcasting)."""
    def forward(self, a, b):
        check_broadcast("add", a, b)
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, dout):
        # forward: out = a + b  =>  da = dout, db = dout (summed over broadcast axes)
        sa, sb = self.shapes
        return unbroadcast(dout, sa), unbroadcast(dout, sb)


class Sub(Function):
    """a - b (broadcasting)."""
    def forward(self, a, b):
        check_broadcast("sub", a, b)
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, dout):
        # forward: out = a - b  =>  da = dout, db = -dout
        sa, sb = self.shapes
        return unbroadcast(dout, sa), unbroadcast(-dout, sb)


class Mul(Function):
    """a * b (broadcasting)."""
    def forward(self, a, b):
        check_broadcast("mul", a, b)
        self.save(a, b)
        return a * b

    def backward(self, dout):
        a, b = self.saved
        # forward: out = a * b  =>  da = dout * b, db = dout * a
        return unbroadcast(dout * b, a.shape), unbroadcast(dout * a, b.shape)


class Div(Function):
    """a / b (broadcasting)."""
    def forward(self, a, b):
        check_broadcast("div", a, b)
        self.save(a, b)
        return a / b

    def backward(self, dout):
        a, b = self.saved
        # forward: out = a / b  =>  da = dout / b, db = -dout * a / b^2
        da = dout / b
        return unbroadcast(da, a.shape), unbroadcast(-da * a / b, b.shape)


class Neg(Function):
    """-x."""
    def forward(self, x):
        return -x

    def backward(self, dout):
        return -dout


class Pow(Function):
    """x ** p for a Python-number exponent p (option `p`)."""
    def forward(self, x):
        self.save(x)
        return x ** self.p

    def backward(self, dout):
        (x,) = self.saved
        # forward: out = x^p  =>  dx = dout * p * x^(p-1)
        return dout * (self.p * x ** (self.p - 1))


class Exp(Function):
    """e^x."""
    def forward(self, x):
        y = get_xp(x).exp(x)
        self.save(y)
        return y

    def backward(self, dout):
        (y,) = self.saved
        return dout * y          # forward: y = e^x  =>  dx = dout * y


class Log(Function):
    """Natural log."""
    def forward(self, x):
        self.save(x)
        return get_xp(x).log(x)

    def backward(self, dout):
        (x,) = self.saved
        return dout / x          # forward: y = log x  =>  dx = dout / x


class Sqrt(Function):
    """Square root."""
    def forward(self, x):
        y = get_xp(x).sqrt(x)
        self.save(y)
        return y

    def backward(self, dout):
        (y,) = self.saved
        return dout / (2 * y)    # forward: y = sqrt x  =>  dx = dout / (2 y)


class Tanh(Function):
    """Hyperbolic tangent."""
    def forward(self, x):
        y = get_xp(x).tanh(x)
        self.save(y)
        return y

    def backward(self, dout):
        (y,) = self.saved
        return dout * (1 - y * y)   # forward: y = tanh x  =>  dx = dout (1 - y^2)


class Sigmoid(Function):
    """Logistic sigmoid 1 / (1 + e^-x), computed without overflow."""
    def forward(self, x):
        xp = get_xp(x)
        y = 0.5 * (xp.tanh(0.5 * x) + 1)     # same function, no exp overflow for large |x|
        self.save(y)
        return y.astype(x.dtype, copy=False)

    def backward(self, dout):
        (y,) = self.saved
        return dout * y * (1 - y)   # forward: y = sigmoid x  =>  dx = dout y (1 - y)


class Relu(Function):
    """max(x, 0)."""
    def forward(self, x):
        mask = x > 0
        self.save(mask)
        return x * mask

    def backward(self, dout):
        (mask,) = self.saved
        return dout * mask          # forward: y = x [x > 0]  =>  dx = dout [x > 0]


class Clip(Function):
    """Clamp x to [lo, hi] (options `lo`, `hi`; either may be None)."""
    def forward(self, x):
        xp = get_xp(x)
        inside = xp.ones(x.shape, dtype=bool)
        if self.lo is not None:
            inside &= x >= self.lo
        if self.hi is not None:
            inside &= x <= self.hi
        self.save(inside)
        return xp.clip(x, self.lo, self.hi).astype(x.dtype, copy=False)

    def backward(self, dout):
        (inside,) = self.saved
        return dout * inside        # the gradient flows only where x was not clamped


class Where(Function):
    """cond ? a : b, with `cond` a boolean array option (not differentiable)."""
    def forward(self, a, b):
        xp = get_xp(a, b)
        try:
            shape = xp.broadcast_shapes(self.cond.shape, a.shape, b.shape)
        except ValueError:
            raise ValueError(f"where: condition {self.cond.shape}, a {a.shape} and b {b.shape} "
                             f"cannot be broadcast together") from None
        self.shapes = a.shape, b.shape, shape
        return xp.where(self.cond, a, b)

    def backward(self, dout):
        sa, sb, shape = self.shapes
        xp = get_xp(dout)
        zero = xp.zeros((), dtype=dout.dtype)
        cond = xp.broadcast_to(self.cond, shape)
        return (unbroadcast(xp.where(cond, dout, zero), sa),
                unbroadcast(xp.where(cond, zero, dout), sb))
