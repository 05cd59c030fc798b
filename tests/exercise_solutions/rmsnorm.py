"""A solution of exercise rmsnorm."""
import numpy as np

EPS = 1e-6


def forward(x, w):
    rrms = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
    return x * rrms * w, (x, w, rrms)


def backward(dy, cache):
    x, w, rrms = cache
    xhat = x * rrms
    g = dy * w
    dx = rrms * (g - xhat * (g * xhat).mean(-1, keepdims=True))   # MUTATE: (g * xhat).mean -> (g * xhat).sum
    rows = tuple(range(dy.ndim - 1))
    return dx, (dy * xhat).sum(rows)
