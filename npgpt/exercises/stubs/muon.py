"""Exercise muon: one Muon step on one weight matrix, Newton-Schulz orthogonalisation included.

    npgpt exercise check muon muon.py

Muon (Keller Jordan, 2024) replaces a matrix's update by the nearest "orthogonal" matrix: with
the SVD u = U S V^T of the momentum, it steps along about U V^T (every singular value set near 1),
computed without an SVD by a few Newton-Schulz iterations of an odd quintic:

    newton_schulz(G, steps):
        X = G / (||G||_F + 1e-7)                   every singular value now in [0, 1]
        if X has more rows than columns: work on X.T (and transpose back at the end), so that
            A = X X^T is the small Gram matrix
        repeat steps times:
            A = X X^T
            B = b A + c A A
            X = a X + B X
        with (a, b, c) = (3.4445, -4.7750, 2.0315)

    muon_step(p, g, buf, lr, momentum, ns_steps):   (Nesterov momentum, no weight decay)
        buf <- momentum buf + (1 - momentum) g
        u   <- (1 - momentum) g + momentum buf
        p   <- p - lr * sqrt(max(1, cols / rows)) * newton_schulz(u, ns_steps)

p is stored (in, out) as npgpt's Linear stores it, so cols / rows is out / in.

Contract
    newton_schulz(G, steps) -> X, G's shape
    muon_step(p, g, buf, lr, momentum, ns_steps) -> (p, buf), the new arrays

Why a quintic in X X^T and not the SVD: each step maps every singular value s to
a s + b s^3 + c s^5 and leaves U and V alone; try it on a diagonal matrix. The check compares
with npgpt.optim.newton_schulz and muon_update on a wide and a tall matrix.
"""

import math

import numpy as np

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps):
    raise NotImplementedError


def muon_step(p, g, buf, lr, momentum, ns_steps):
    raise NotImplementedError
