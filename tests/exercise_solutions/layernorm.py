"""A solution of exercise layernorm."""
import numpy as np

EPS = 1e-5


def forward(x, w, b):
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)
    xhat = (x - mean) * rstd
    return xhat * w + b, (x, w, mean, rstd)


def backward(dy, cache):
    x, w, mean, rstd = cache
    xhat = (x - mean) * rstd
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))   # MUTATE: - g.mean(-1, keepdims=True) ->
    rows = tuple(range(dy.ndim - 1))
    return dx, (dy * xhat).sum(rows), dy.sum(rows)
