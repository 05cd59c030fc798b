"""Weight-only quantisation of a model: int8 or packed int4 weights with float32 scales, saved as a folder.

Scheme (symmetric, no zero point). A weight w of shape (in, out), GPT-2's Conv1D layout, is cut into
groups of `group_size` consecutive input rows (one group of all rows when `group_size` is None, i.e.
per output channel). Each (group, output column) gets its own scale

    scale = max |w[group, j]| / qmax          qmax = 127 for 8 bits, 7 for 4 bits
    q     = round(w / scale)  in [-qmax, qmax]
    w'    = q * scale                         (the dequantised weight)

so the rounding error of every entry is at most scale / 2 = max|w[group, j]| / (2 qmax): 0.4% of the
channel's largest weight at 8 bits, 7% at 4 bits. Smaller groups track local ranges more closely and
cost one float32 scale per group.

Storage (model.safetensors of a quantised folder): for a linear layer `transformer.h.0.attn.c_attn`

    transformer.h.0.attn.c_attn.qweight   int8 (in, out), or uint8 (ceil(in/2), out) at 4 bits
    transformer.h.0.attn.c_attn.scales    float32 (n_groups, out)
    transformer.h.0.attn.c_attn.bias      float32 (out,), unchanged

At 4 bits two values share a byte: row 2i in the low nibble, row 2i+1 in the high nibble, each stored
as q + 8 (0..15). The token embedding, when quantised too (`embedding=True`), is stored as the LM head
reads it, transposed to (n_embd, vocab), so each token's vector is one output channel with its own scale:
`transformer.wte.qweight` / `transformer.wte.scales`. Everything else (position embedding, LayerNorms,
biases) stays float32. config.json records the scheme under
`"npgpt": {"quantization": {"bits": 8, "group_size": null, "embedding": false}}`.

The layers and the maths (quantize, encode_weight, QuantizedLinear) live on the layer floor, in
npgpt/layers.py; this module turns a model into a quantised folder. `npgpt.from_pretrained(folder)`
(npgpt/loading.py) reads one back.

At run time a `QuantizedLinear` keeps the integers and scales and dequantises its weight for each call,
so only one layer's float weight exists at a time. The quantised embedding is dequantised once at load
(the model reads `wte.weight` directly in several places), so it shrinks the file but not the memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from npgpt.backend import asnumpy, get_xp
from npgpt.checkpoint import atomic_write_json, save_tensors
from npgpt.errors import NpgptError
from npgpt.fileio import make_dir
from npgpt.layers import QuantizedLinear, check_scheme, decode_weight, encode_weight, linear_layers
from npgpt.loading import QUANT_FILE


# ---- folders -----------------------------------------------------------------------------------
def _check_plain(model):
    """Quantised folders are GPT-2's layout (or Llama's): a model with recipe switches is refused."""
    switches = getattr(model.config, "switches", dict)()
    if {k: v for k, v in switches.items() if k != "zero_init_proj"}:
        raise NpgptError(f"quantising a model with recipe switches ({', '.join(switches)}) is not supported; "
                         f"keep it in float (npgpt folders of such models load with npgpt)")


def quantize_model(model, bits=8, group_size=None, embedding=False):
    """Replace every linear layer of `model` with a QuantizedLinear, in place; returns the model.

    With embedding=True the token embedding is rounded to the same grid (quantised, then dequantised
    back into its Parameter), so the model computes exactly what a reloaded quantised folder does.
    """
    check_scheme(bits, group_size)
    _check_plain(model)
    for _, owner, attr, lin in linear_layers(model):
        if not isinstance(lin, QuantizedLinear):
            setattr(owner, attr, QuantizedLinear.from_linear(lin, bits, group_size))
    if embedding:
        wte = model.input_embedding
        stored, scales = encode_weight(asnumpy(wte.data).T, bits, group_size)
        w = decode_weight(stored, scales, wte.shape[1], bits).T
        wte.data[...] = get_xp(wte.data).asarray(w)
    model.quantization = {"bits": bits, "group_size": group_size, "embedding": bool(embedding)}
    return model


def quantized_tensors(model, bits=8, group_size=None, embedding=False):
    """{key: array} for model.safetensors of a quantised folder (see the module docstring)."""
    check_scheme(bits, group_size)
    _check_plain(model)
    tensors = {}
    quantized = {}
    for name, _, _, lin in linear_layers(model):
        q = lin if isinstance(lin, QuantizedLinear) else QuantizedLinear.from_linear(lin, bits, group_size)
        if q.bits != bits:
            raise NpgptError(f"{name} is already quantised to {q.bits} bits; quantise the original model instead")
        quantized[f"{name}.weight"] = q
        tensors[f"{name}.qweight"] = np.ascontiguousarray(asnumpy(q.qweight))
        tensors[f"{name}.scales"] = np.ascontiguousarray(asnumpy(q.scales))
        if q.bias is not None:
            tensors[f"{name}.bias"] = np.ascontiguousarray(asnumpy(q.bias.data))
    emb = model.config.embedding_name                  # transformer.wte, model.embed_tokens
    for name, p in model.named_parameters():
        if name == f"{emb}.weight" and embedding:
            stored, scales = encode_weight(asnumpy(p.data).T, bits, group_size)
            tensors[f"{emb}.qweight"] = np.ascontiguousarray(stored)
            tensors[f"{emb}.scales"] = scales
        elif name not in quantized and name not in tensors:
            tensors[name] = np.ascontiguousarray(asnumpy(p.data))
    return tensors


def save_quantized(model, path, bits=8, group_size=None, embedding=False):
    """Write a quantised model folder: config.json (with the scheme) + model.safetensors."""
    path = make_dir(path)
    tensors = quantized_tensors(model, bits, group_size, embedding)
    hf = model.config.to_hf()
    hf.setdefault("npgpt", {})["quantization"] = {"bits": bits, "group_size": group_size,
                                                 "embedding": bool(embedding)}
    save_tensors(path / QUANT_FILE, tensors, metadata={"format": "npgpt-quant"})
    atomic_write_json(path / "config.json", hf)
