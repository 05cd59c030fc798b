"""A solution of exercise gelu."""
import math

import numpy as np

K = math.sqrt(2.0 / math.pi)


def forward(x):
    u = K * (x + 0.044715 * x ** 3)
    t = np.tanh(u)
    return 0.5 * x * (1.0 + t), (x, t)


def backward(dy, cache):
    x, t = cache
    du = K * (1.0 + 3 * 0.044715 * x * x)           # MUTATE: 3 * 0.044715 -> 0.044715
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
