"""Exercise layernorm: LayerNorm's forward and backward over the last axis.

    npgpt exercise check layernorm layernorm.py

    mean = x.mean(-1),  var = ((x - mean)^2).mean(-1)   (the biased variance, as PyTorch)
    rstd = 1 / sqrt(var + eps),  xhat = (x - mean) * rstd,  y = xhat * w + b,   eps = 1e-5

Contract
    forward(x, w, b)     x: (..., C), w and b: (C,) float64  -> (y, cache)
    backward(dy, cache)                                      -> (dx, dw, db)

To derive: dw and db sum over every axis but the last (w and b are shared by all rows). For dx,
differentiate through mean and rstd as well as directly: every entry of a row moves that row's
mean and variance. A compact form exists (it uses only rstd, xhat and g = dy * w); llm.c's
doc/layernorm walks one route. Cache what backward needs (as llm.c does: mean and rstd, not the
normalised tensor, is enough). The check compares y, dx, dw and db with npgpt's fused LayerNorm.
"""

import numpy as np

EPS = 1e-5


def forward(x, w, b):
    raise NotImplementedError


def backward(dy, cache):
    raise NotImplementedError
