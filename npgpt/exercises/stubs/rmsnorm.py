"""Exercise rmsnorm: RMSNorm (Llama's norm), forward and backward over the last axis.

    npgpt exercise check rmsnorm rmsnorm.py

    r = sqrt(mean(x^2, over the last axis) + eps),   y = x / r * w,   eps = 1e-6

No mean is subtracted and there is no bias: it rescales each row to unit root-mean-square.

Contract
    forward(x, w)        x: (..., C), w: (C,) float64  -> (y, cache)
    backward(dy, cache)                                -> (dx, dw)

To derive: compare with LayerNorm's backward (exercise layernorm): one term fewer, because there is
no mean. Every entry of a row moves r. The check compares with npgpt's fused RMSNorm (the Llama
family's, npgpt/ops/llama.py).
"""

import numpy as np

EPS = 1e-6


def forward(x, w):
    raise NotImplementedError


def backward(dy, cache):
    raise NotImplementedError
