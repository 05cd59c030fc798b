"""Exercise top_p: the distribution that top-p (nucleus) sampling draws from.

    npgpt exercise check top_p top_p.py

For each row of logits:
  1. divide by the temperature and take the softmax: p;
  2. sort the tokens from most to least likely and keep the smallest set whose probability mass
     reaches top_p: a token is kept when the mass of the tokens strictly more likely than it is
     below top_p (so the most likely token is always kept);
  3. zero the rest and renormalise the kept ones to sum to 1.

Contract
    top_p_probs(logits, top_p, temperature) -> probs
    logits: (N, V) float64, top_p in (0, 1], temperature > 0; probs: (N, V) float64, rows sum to 1

The check compares with npgpt.generate.sampling_probs for a few settings, including a confident
row where a single token survives (lesson 10 draws the distributions).
"""

import numpy as np


def top_p_probs(logits, top_p, temperature):
    raise NotImplementedError
