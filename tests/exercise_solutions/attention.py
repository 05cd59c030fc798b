"""A solution of exercise attention."""
import math

import numpy as np


def forward(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = (a.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, axis=-1))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)                      # (B, nh, T, T)
    mask = np.tril(np.ones((T, T), dtype=bool))
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return y, (q, k, v, p, n_head)


def backward(dy, cache):
    q, k, v, p, n_head = cache
    B, nh, T, hs = q.shape
    dyh = dy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)                # (B, nh, T, hs)
    dp = dyh @ v.transpose(0, 1, 3, 2)
    dv = p.transpose(0, 1, 3, 2) @ dyh
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    ds /= math.sqrt(hs)                                                   # MUTATE: ds /= math.sqrt(hs) -> pass
    dq = ds @ k
    dk = ds.transpose(0, 1, 3, 2) @ q
    back = [a.transpose(0, 2, 1, 3).reshape(B, T, nh * hs) for a in (dq, dk, dv)]
    return np.concatenate(back, axis=-1)
