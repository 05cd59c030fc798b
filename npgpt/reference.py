"""Run the model on the readable reference ops instead of the fused ones (for study).

The fused ops in `npgpt/ops/nn.py` are tuned: row blocks, in-place passes, GPU kernels, a backward
written by hand. Beside each sits `*_reference`, the same maths composed from primitive ops
(`x @ w + b`, `mean`, `tanh`, `softmax`, ...), whose backward the autograd engine derives by
itself. Inside

    with npgpt.reference.reference_ops():
        logits, loss = model(idx, targets)
        loss.backward()

every fused op the model and its layers call runs as its reference, so the graph you can draw
(`npgpt.viz.graph(loss)`) holds only primitives, and the gradients come from the chain rule on
those primitives. `GPT(cfg, ops="reference")` and `Llama(cfg, ops="reference")` build a model that
always runs this way.
`tests/test_study.py` checks that both paths give the same logits, loss and gradients: the
reference ops are the worked answer to "what does this fused backward compute?".

How it switches: each public fused op (linear, layer_norm, gelu, causal_self_attention,
cross_entropy, embedding; the Llama family's rms_norm, rope, swiglu, gqa_attention) reads one context variable, `npgpt.ops.nn.REFERENCE_OPS`, and calls its
reference twin when it is set; `reference_ops()` only sets it for the block. Nothing is patched, so
a module imported later is covered, and another thread (a server's engine, a training replica
started elsewhere) keeps the fused ops. Not switched: dropout (the reference attention has none, so
it refuses a model in training mode with dropout > 0) and the KV-cached inference path, which works
on plain arrays without a graph.
"""

from __future__ import annotations

from npgpt.ops.nn import REFERENCE_OPS, reference_ops  # noqa: F401 (the study entry point)

# The Function classes of the fused ops: none of them may appear in a graph built under the switch.
GPT_FUSED = ("Linear", "LayerNorm", "GELU", "CausalSelfAttention", "CrossEntropy", "Embedding")
LLAMA_FUSED = ("Linear", "RMSNorm", "Rope", "SwiGLU", "GroupedQueryAttention", "CrossEntropy", "Embedding")
FUSED_FUNCTIONS = tuple(dict.fromkeys(GPT_FUSED + LLAMA_FUSED))
