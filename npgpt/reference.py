"""Run the model on the readable reference ops instead of the fused ones (for study).

The fused ops in `npgpt/ops/nn.py` are tuned: row blocks, in-place passes, GPU kernels, a backward
written by hand. Beside each sits `*_reference`, the same maths composed from primitive ops
(`x @ w + b`, `mean`, `tanh`, `softmax`, ...), whose backward the autograd engine derives by
itself. Inside

    with npgpt.reference.reference_ops():
        logits, loss = model(idx, targets)
        loss.backward()

every fused op that the model and its layers call is swapped for its reference, so the graph you can draw (`npgpt.viz.graph(loss)`) holds only primitives, and the
gradients come from the chain rule on those primitives. `tests/test_study.py` checks that both
paths give the same logits, loss and gradients: the reference ops are the worked answer to "what
does this fused backward compute?".

What is swapped (names are looked up in every module that imported them, so the switch does not
depend on how a module spells its imports): linear, layer_norm, gelu, causal_self_attention,
cross_entropy, embedding. Not swapped: dropout (the references have none, so the switch refuses
a model in training mode with dropout > 0) and the KV-cached inference path, which works on plain
arrays without a graph.
"""

from __future__ import annotations

import contextlib
import sys

from npgpt.backend import asnumpy
from npgpt.errors import NpgptError
from npgpt.ops import nn as F


def _attention(qkv, n_head, dropout=0.0, rng=None):
    if dropout:
        raise NpgptError("reference_ops(): the reference attention has no dropout; call model.eval() "
                         "or use a config with dropout=0")
    return F.causal_self_attention_reference(qkv, n_head)


def _cross_entropy(logits, targets, ignore_index=-1):
    return F.cross_entropy_reference(logits, asnumpy(targets.data if hasattr(targets, "data") else targets),
                                     ignore_index)


def _embedding(weight, ids):
    return F.embedding_reference(weight, ids.data if hasattr(ids, "data") else ids)


# fused function -> its composed reference (same signature as the fused one)
SWAPS = {
    "linear": F.linear_reference,
    "layer_norm": F.layer_norm_reference,
    "gelu": F.gelu_reference,
    "causal_self_attention": _attention,
    "cross_entropy": _cross_entropy,
    "embedding": _embedding,
}

# The Function classes of the fused ops: none of them may appear in a graph built under the switch.
FUSED_FUNCTIONS = ("Linear", "LayerNorm", "GELU", "CausalSelfAttention", "CrossEntropy", "Embedding")


@contextlib.contextmanager
def reference_ops():
    """Within the block, every already-imported npgpt module calls the reference ops (see module doc).

    Yields the list of (module name, function name) pairs it swapped, and restores them on exit.
    """
    swapped = []
    fused = {name: getattr(F, name) for name in SWAPS}
    try:
        for mod_name, mod in list(sys.modules.items()):
            if not mod_name.startswith("npgpt") or mod is None or mod_name == __name__:
                continue
            for name, ref in SWAPS.items():
                if getattr(mod, name, None) is fused[name]:
                    setattr(mod, name, ref)
                    swapped.append((mod_name, name))
        yield swapped
    finally:
        for mod_name, name in swapped:
            setattr(sys.modules[mod_name], name, fused[name])
