"""Exercise tanh: write the forward and the backward of y = tanh(x), elementwise.

    npgpt exercise check tanh tanh.py

Contract
    forward(x)          x: (...) float64           -> (y, cache), y the same shape as x
    backward(dy, cache) dy: the gradient of the loss with respect to y (y's shape)
                                                   -> dx, x's shape

To derive: d tanh(x) / dx in terms of y = tanh(x) itself (then `cache` needs only y, the pattern
npgpt's ops follow: save the output, not the input). The check compares your y and dx with npgpt's
Tanh op on random inputs and a random dy, and runs gradcheck on your pair.
"""

import numpy as np


def forward(x):
    raise NotImplementedError("compute y = tanh(x) and choose what to cache")


def backward(dy, cache):
    raise NotImplementedError("return dx: the chain rule, dy times the local derivative")
