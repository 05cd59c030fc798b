"""A solution of exercise muon."""
import math

import numpy as np

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps):
    a, b, c = NS_COEFFS
    X = G / (np.linalg.norm(G) + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def muon_step(p, g, buf, lr, momentum, ns_steps):
    buf = momentum * buf + (1 - momentum) * g
    u = (1 - momentum) * g + momentum * buf
    scale = math.sqrt(max(1.0, p.shape[1] / p.shape[0]))    # MUTATE: p.shape[1] / p.shape[0] -> p.shape[0] / p.shape[1]
    return p - lr * scale * newton_schulz(u, ns_steps), buf
