"""Exercise gelu: GPT-2's GELU, forward and backward.

    npgpt exercise check gelu gelu.py

GPT-2 uses the tanh approximation of GELU:

    y = 0.5 x (1 + tanh(u)),    u = k (x + 0.044715 x^3),    k = sqrt(2 / pi)

Contract
    forward(x)          x: (...) float64  -> (y, cache)
    backward(dy, cache)                   -> dx, x's shape

To derive: dy/dx by the product rule and the chain rule through tanh and u (write down du/dx
first). Keep what backward needs in the cache (x, or x and tanh(u)). The check compares y and dx
with npgpt's fused GELU, and gradchecks your pair.
"""

import math

import numpy as np

K = math.sqrt(2.0 / math.pi)


def forward(x):
    raise NotImplementedError


def backward(dy, cache):
    raise NotImplementedError
