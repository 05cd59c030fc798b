"""Reductions over axes (sum, mean, max, var) and the normalisers softmax / log_softmax.

Each reduction takes `axis` (None, an int or a tuple) and `keepdims`. Backward re-expands the
gradient over the reduced axes with `expand_to`, so the same helper serves them all.

`softmax_array` and `log_softmax_array` are the one place the numerically stable (max-shifted)
normalisation is written, on plain arrays: the Softmax / LogSoftmax Functions here, the fused
attention and cross-entropy (`ops/nn.py`), distillation (`ops/distill.py`) and sampling
(`generate.softmax`) all call them.
"""

from npgpt.backend import get_xp
from npgpt.tensor import Function


def normalize_axes(axis, ndim):
    """axis (None | int | tuple) -> a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for an array of {ndim} dimension(s)")
    return tuple(sorted(a % max(ndim, 1) for a in axes))


def expand_to(dout, shape, axes, keepdims):
    """Broadcast a reduced gradient back to `shape` (re-inserting the reduced axes if dropped)."""
    xp = get_xp(dout)
    if not keepdims:
        dout = dout.reshape([1 if i in axes else n for i, n in enumerate(shape)])
    return xp.broadcast_to(dout, shape)


class Sum(Function):
    """Sum over `axis` (keepdims option)."""
    def forward(self, x):
        self.shape, self.axes = x.shape, normalize_axes(self.axis, x.ndim)
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, dout):
        # forward: y = sum_i x_i  =>  dx_i = dy
        return expand_to(dout, self.shape, self.axes, self.keepdims)


class Mean(Function):
    """Mean over `axis` (keepdims option)."""
    def forward(self, x):
        self.shape, self.axes = x.shape, normalize_axes(self.axis, x.ndim)
        self.n = 1
        for a in self.axes:
            self.n *= x.shape[a]
        return x.mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, dout):
        # forward: y = sum_i x_i / n  =>  dx_i = dy / n
        return expand_to(dout / self.n, self.shape, self.axes, self.keepdims)


class Max(Function):
    """Maximum over `axis`; ties share the gradient equally."""
    def forward(self, x):
        self.axes = normalize_axes(self.axis, x.ndim)
        y = x.max(axis=self.axes, keepdims=True)
        self.save(x, y)
        return y if self.keepdims else y.reshape([n for i, n in enumerate(x.shape) if i not in self.axes])

    def backward(self, dout):
        x, y = self.saved
        mask = (x == y).astype(x.dtype)
        mask /= mask.sum(axis=self.axes, keepdims=True)
        # forward: y = max_i x_i  =>  dx_i = dy at the argmax (split among ties), 0 elsewhere
        return expand_to(dout, x.shape, self.axes, self.keepdims) * mask


class Var(Function):
    """Variance over `axis` with `ddof` (0: population variance, as np.var)."""
    def forward(self, x):
        self.axes = normalize_axes(self.axis, x.ndim)
        n = 1
        for a in self.axes:
            n *= x.shape[a]
        self.denom = n - self.ddof
        centered = x - x.mean(axis=self.axes, keepdims=True)
        self.save(centered)
        return (centered * centered).sum(axis=self.axes, keepdims=self.keepdims) / self.denom

    def backward(self, dout):
        (centered,) = self.saved
        # forward: v = sum_i (x_i - m)^2 / d  =>  dx_i = dv * 2 (x_i - m) / d  (the m terms cancel)
        return expand_to(dout, centered.shape, self.axes, self.keepdims) * (2 / self.denom) * centered


# ---- the stable normalisers, on plain arrays ----------------------------------------------------
def softmax_array(x, axis=-1, out=None, return_stats=False):
    """exp(x) / sum(exp(x)) along axis, stably, in four passes (max, shift, exp, normalise) over
    `out` (pass out=x to work in place). return_stats also returns (m, log_sum) (keepdims) with
    logsumexp(x) = m + log_sum: cross-entropy reads -log softmax(x)_i = log_sum - (x_i - m), which
    keeps its precision when the logits are large (m + log_sum would round log_sum away)."""
    xp = get_xp(x)
    m = x.max(axis=axis, keepdims=True)
    e = xp.subtract(x, m, out=out)                # <= 0: exp never overflows, each sum is >= 1
    xp.exp(e, out=e)
    total = e.sum(axis=axis, keepdims=True)
    e /= total
    return (e, m, xp.log(total)) if return_stats else e


def log_softmax_array(x, axis=-1, out=None):
    """x - logsumexp(x) along axis, stably (into out when given)."""
    xp = get_xp(x)
    y = xp.subtract(x, x.max(axis=axis, keepdims=True), out=out)   # <= 0, as in softmax_array
    y -= xp.log(xp.exp(y).sum(axis=axis, keepdims=True))
    return y


class Softmax(Function):
    """Softmax over `axis`."""
    def forward(self, x):
        y = softmax_array(x, axis=self.axis)
        self.save(y)
        return y

    def backward(self, dout):
        (y,) = self.saved
        # forward: y_i = e_i / sum_j e_j  =>  dx_i = y_i (dy_i - sum_j dy_j y_j)
        return y * (dout - (dout * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    """log(softmax(x)) over `axis`, computed as x - logsumexp(x)."""
    def forward(self, x):
        y = log_softmax_array(x, axis=self.axis)
        self.save(y)
        return y

    def backward(self, dout):
        (y,) = self.saved
        xp = get_xp(y)
        # forward: y_i = x_i - log sum_j e^x_j  =>  dx_i = dy_i - softmax_i * sum_j dy_j
        return dout - xp.exp(y) * dout.sum(axis=self.axis, keepdims=True)
