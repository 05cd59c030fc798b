"""A solution of exercise tanh (the test suite grades it; learners: try first)."""
import numpy as np


def forward(x):
    y = np.tanh(x)
    return y, y


def backward(dy, cache):
    y = cache
    return dy * (1.0 - y * y)      # MUTATE: (1.0 - y * y) -> (1.0 - y)
