"""A solution of exercise top_p."""
import numpy as np


def top_p_probs(logits, top_p, temperature):
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(p)
    for r in range(len(p)):
        order = np.argsort(-p[r], kind="stable")
        before = np.cumsum(p[r, order]) - p[r, order]
        keep = order[before < top_p]                         # MUTATE: before < top_p -> before <= top_p - 0.2
        out[r, keep] = p[r, keep]
    return out / out.sum(-1, keepdims=True)
