"""Exercise softmax_cross_entropy: the fused softmax + cross-entropy, forward and backward.

    npgpt exercise check softmax_cross_entropy softmax_cross_entropy.py

For N positions with V logits each and the true next token t_n of each:

    p_n = softmax(z_n)                    L = mean over the valid n of  -log p_n[t_n]

A target of -1 marks a position to ignore (a prompt in fine-tuning, padding): it adds nothing to
the loss, gets a zero gradient, and the mean is over the other positions only.

Contract
    forward(logits, targets)  logits: (N, V) float64, targets: (N,) int  -> (loss, cache), loss a 0-d array
    backward(dloss, cache)    dloss: the upstream gradient (0-d)          -> dlogits, (N, V)

To derive: write -log p_t as logsumexp(z) - z_t and differentiate it; no Jacobian of the softmax is
needed. Stability: subtract each row's max before exp. The check compares with npgpt's fused
cross_entropy (lesson 04 walks the derivation if you get stuck).
"""

import numpy as np


def forward(logits, targets):
    raise NotImplementedError


def backward(dloss, cache):
    raise NotImplementedError
