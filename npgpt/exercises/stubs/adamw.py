"""Exercise adamw: one AdamW step on one weight matrix.

    npgpt exercise check adamw adamw.py

Given the parameter p, its gradient g, the moments m and v from the previous steps, and the step
number t (1 for the first step):

    p <- p * (1 - lr * weight_decay)                      decoupled weight decay, applied first
    m <- beta1 m + (1 - beta1) g                          a running mean of the gradient
    v <- beta2 v + (1 - beta2) g^2                        a running mean of its square
    p <- p - lr * m_hat / (sqrt(v_hat) + eps),   m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)

Contract
    adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (p, m, v), the new arrays
    (all (rows, cols) float64; you may update in place and return them, or return new ones)

The check runs npgpt.optim.adamw_update (the one AdamW formula npgpt's optimizers call) on the
same matrix for step t = 1 and for a later step and compares p, m and v entry by entry. Think about what the bias corrections do at t = 1.
"""

import numpy as np


def adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    raise NotImplementedError
