"""Exercise embedding_tied: an embedding table used twice, as the input lookup and as the output
head (GPT-2's weight tying), and the gradient that adds both uses.

    npgpt exercise check embedding_tied embedding_tied.py

    x = wte[ids]          (B, T, C)   the lookup: row ids[b, t] of the table
    logits = x @ wte.T    (B, T, V)   the head: the score of token v is x . wte[v]

Contract
    forward(ids, wte)        ids: (B, T) int, wte: (V, C) float64  -> (logits, cache)
    backward(dlogits, cache) dlogits: (B, T, V)                    -> dwte, (V, C)

To derive: the table gets one gradient from each use, and they add (lesson 01: a value used twice).
From the head: a matmul backward (lesson 02) with the table in the role of the weight. From the
lookup: the gradient of x goes back to the rows that were read, and a token that appears several
times in ids collects ALL of its positions' gradients (careful: `dw[ids] += g` in NumPy drops
repeats; `np.add.at` does not). The check compares with npgpt's embedding + linear, tied.
"""

import numpy as np


def forward(ids, wte):
    raise NotImplementedError


def backward(dlogits, cache):
    raise NotImplementedError
