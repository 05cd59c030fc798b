"""Exercise attention: causal multi-head self-attention, forward and backward, in NumPy.

    npgpt exercise check attention attention.py

The input is GPT-2's fused projection qkv = x @ c_attn: (B, T, 3C), q, k and v side by side along
the last axis (q = qkv[..., :C], k = the next C, v = the last C). With nh heads of size
hs = C / nh, each head h uses channels h*hs .. (h+1)*hs of q, k and v:

    S = q_h k_h^T / sqrt(hs)          (B, nh, T, T) scores
    S[i, j] = -inf for j > i          (a token sees only itself and the past)
    P = softmax(S) over the last axis
    Y_h = P v_h                       (B, nh, T, hs), then heads concatenated back to (B, T, C)

Contract
    forward(qkv, n_head)  qkv: (B, T, 3C) float64, n_head: int  -> (y (B, T, C), cache)
    backward(dy, cache)   dy: (B, T, C)                         -> dqkv, (B, T, 3C)

To derive, backwards through each line: dP and dv_h from Y = P v (two matmul backwards, lesson 02);
dS from dP through the softmax's Jacobian, row by row (lesson 04 derives the Jacobian); the
masked entries get no gradient; dq and dk from S = q k^T / sqrt(hs); finally put
dq, dk, dv back side by side in qkv's layout. The check compares y and dqkv with npgpt's fused
causal_self_attention.
"""

import math

import numpy as np


def forward(qkv, n_head):
    raise NotImplementedError


def backward(dy, cache):
    raise NotImplementedError
