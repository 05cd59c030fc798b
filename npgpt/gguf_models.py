"""GGUF files as npgpt models and tokenizers, and npgpt models as GGUF files.

npgpt.gguf reads and writes the format; this module knows what llama.cpp puts in it for each
architecture (a table, `ARCHS`, one entry per `general.architecture`):

    gpt2    token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up,
            ffn_down}.{weight,bias}, output_norm, output (a copy of token_embd: GPT-2 ties them)

A linear weight is stored as PyTorch's nn.Linear keeps it, (out, in), with the 32-value quantisation
blocks running along `in`; GPT-2's Conv1D weights, (in, out) in npgpt, are transposed on the way.

Reading checks the hyper-parameters in the metadata, then that exactly the expected tensors are
present with exactly the expected shapes, before any tensor is dequantised (npgpt.gguf has already
checked the file's structure).

Tokenizers: `tokenizer_metadata(tok)` writes the `tokenizer.ggml.*` keys llama.cpp reads (model
"gpt2" = byte-level BPE: tokens spelled in GPT-2's byte alphabet, merges as "left right", token
types, bos/eos, the pre-tokenizer name) and the chat template. A character-level tokenizer has no
GGUF form and is refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from npgpt.errors import NpgptError
from npgpt.gguf import GGUFFile, quantize, write_gguf
from npgpt.model import GPT, GPTConfig
from npgpt.quant import QuantizedEmbedding, QuantizedLinear, linear_layers
from npgpt.tokenizer.bpe import BPETokenizer, PATTERNS
from npgpt.tensor import Tensor
from npgpt.tokenizer.files import bytes_to_gpt2_string, gpt2_string_to_bytes

EXPORT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")     # the CLI offers the first three
# llama.cpp's general.file_type (llama_ftype) of a file whose large weights are all of one type
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3}
# ggml token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def is_gguf(path) -> bool:
    """True for a path naming a .gguf file (the loaders dispatch on it)."""
    return str(path).lower().endswith(".gguf")


# ---- GPT-2 ---------------------------------------------------------------------------------------
GPT2_LINEAR = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up",
               "mlp.c_proj": "ffn_down"}
GPT2_NORMS = {"ln_1": "attn_norm", "ln_2": "ffn_norm"}


def gpt2_names(config: GPTConfig):
    """[(npgpt parameter name, GGUF tensor name, transpose?)] of every parameter of a GPT."""
    out = [("transformer.wte.weight", "token_embd.weight", False),
           ("transformer.wpe.weight", "position_embd.weight", False)]
    for i in range(config.n_layer):
        for ours, theirs in GPT2_NORMS.items():
            out.append((f"transformer.h.{i}.{ours}.weight", f"blk.{i}.{theirs}.weight", False))
            if config.bias:
                out.append((f"transformer.h.{i}.{ours}.bias", f"blk.{i}.{theirs}.bias", False))
        for ours, theirs in GPT2_LINEAR.items():
            out.append((f"transformer.h.{i}.{ours}.weight", f"blk.{i}.{theirs}.weight", True))
            if config.bias:
                out.append((f"transformer.h.{i}.{ours}.bias", f"blk.{i}.{theirs}.bias", False))
    out.append(("transformer.ln_f.weight", "output_norm.weight", False))
    if config.bias:
        out.append(("transformer.ln_f.bias", "output_norm.bias", False))
    return out


def gpt2_config(g: GGUFFile) -> GPTConfig:
    a = "gpt2"
    n_embd = g.require(f"{a}.embedding_length", int)
    hidden = g.get(f"{a}.feed_forward_length", 4 * n_embd, int)
    emb = g.tensor("token_embd.weight")
    if len(emb.shape) != 2 or emb.shape[1] != n_embd:
        raise NpgptError(f"{g.path}: token_embd.weight has shape {emb.shape}, expected (vocab, {n_embd})")
    try:
        return GPTConfig(vocab_size=emb.shape[0], block_size=g.require(f"{a}.context_length", int),
                         n_layer=g.require(f"{a}.block_count", int), n_head=g.require(f"{a}.attention.head_count", int),
                         n_embd=n_embd, bias="blk.0.attn_qkv.bias" in g.tensors,
                         n_inner=None if hidden == 4 * n_embd else hidden,
                         layer_norm_epsilon=float(g.get(f"{a}.attention.layer_norm_epsilon", 1e-5, float)))
    except NpgptError as e:
        raise NpgptError(f"{g.path}: {e}") from None


def gpt2_from_gguf(g: GGUFFile, device="cpu", keep_quantized=False, **overrides):
    config = gpt2_config(g)
    names = gpt2_names(config)
    shapes = config.param_shapes()
    expected = {theirs: (shapes[ours][::-1] if t else shapes[ours]) for ours, theirs, t in names}
    head = g.tensors.get("output.weight")
    if head is not None:
        expected["output.weight"] = shapes["transformer.wte.weight"]
    check_tensors(g, expected)
    kept = {}                                     # layer name -> QuantizedLinear
    if keep_quantized:
        for ours, theirs, t in names:
            q = kept_linear(g, theirs) if t else None
            if q is not None:
                kept[ours[:-len(".weight")]] = q
    state = {}
    for ours, theirs, t in names:
        if ours[:-len(".weight")] not in kept:
            w = g.dequantize(theirs)
            state[ours] = np.ascontiguousarray(w.T) if t else w
    if head is not None and not np.array_equal(g.dequantize("output.weight"), g.dequantize("token_embd.weight")):
        raise NpgptError(f"{g.path}: output.weight differs from token_embd.weight; npgpt's GPT-2 ties them")
    model = GPT(replace(config, **overrides), device="cpu")
    for name, owner, attr, _ in linear_layers(model):
        q = kept.get(name)
        if q is not None:
            bias = state.pop(f"{name}.bias", None)
            q.bias = None if bias is None else Tensor(bias)
            setattr(owner, attr, q)
    model.load_state_dict(state)
    if kept:
        model.quantization = {"bits": 8 if all(q.bits == 8 for q in kept.values()) else 4, "group_size": 32,
                              "embedding": False, "source": "gguf"}
    model.eval()
    return model.to(device) if str(device) != "cpu" else model


def gpt2_metadata(config: GPTConfig):
    a = "gpt2"
    return {f"{a}.context_length": config.block_size, f"{a}.embedding_length": config.n_embd,
            f"{a}.feed_forward_length": config.hidden, f"{a}.block_count": config.n_layer,
            f"{a}.attention.head_count": config.n_head,
            f"{a}.attention.layer_norm_epsilon": float(config.layer_norm_epsilon)}


def gpt2_tensors(model):
    """[(GGUF name, float32 array in GGUF's NumPy layout)] of a GPT (zero biases when it has none:
    llama.cpp's gpt2 graph requires them)."""
    cfg = model.config
    params = {name: np.asarray(p.data, dtype=np.float32) for name, p in model.named_parameters()}
    out = []
    for ours, theirs, t in gpt2_names(replace(cfg, bias=True)):
        w = params.get(ours)
        if w is None:                                            # bias=False: llama.cpp wants zeros
            w = np.zeros(params[ours.replace(".bias", ".weight")].shape[-1], np.float32)
        out.append((theirs, np.ascontiguousarray(w.T) if t else w))
    out.append(("output.weight", params["transformer.wte.weight"]))
    return out


ARCHS = {"gpt2": (gpt2_from_gguf, gpt2_metadata, gpt2_tensors)}


# ---- weights kept quantised ------------------------------------------------------------------------
KEEP_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def _f16_field(blocks, start):
    """(rows, n_blocks, bytes) blocks -> (rows, n_blocks) float32 of the float16 at byte `start`."""
    return np.ascontiguousarray(blocks[:, :, start:start + 2]).view("<f2")[..., 0].astype(np.float32)


def quantized_linear_from_blocks(blocks, type_name, bias=None, where="tensor"):
    """A QuantizedLinear (npgpt's (in, out) layout, one scale per 32 input rows) holding exactly the
    values of ggml blocks (rows = out, n_blocks, bytes) of Q8_0, Q4_0 or Q4_1: the integers are moved,
    not re-rounded, and the float16 scales (and Q4_1's minimums) widen to float32 exactly."""
    n_out, nb = blocks.shape[:2]
    n_in = nb * 32
    d = _f16_field(blocks, 0)                                        # (out, nb)
    if type_name == "Q8_0":
        q = blocks[:, :, 2:34].view(np.int8).reshape(n_out, n_in)
        stored, bits, mins = np.ascontiguousarray(q.T), 8, None
    else:
        off = 2 if type_name == "Q4_0" else 4
        qs = blocks[:, :, off:off + 16]                              # value j low nibble, j + 16 high
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n_out, n_in).T   # (in, out) 0..15
        # npgpt packs rows 2i / 2i+1 into one byte's low / high nibble and reads a nibble n as n - 8:
        # Q4_0's (n - 8) * d exactly; Q4_1 keeps n and adds its minimum (QuantizedLinear's mins)
        stored, bits = np.ascontiguousarray(q[0::2] | (q[1::2] << 4)), 4
        mins = np.ascontiguousarray(_f16_field(blocks, 2).T) if type_name == "Q4_1" else None
    scales = np.ascontiguousarray(d.T)                               # (nb, out)
    for a in (scales, mins):
        if a is not None and not np.isfinite(a).all():
            raise NpgptError(f"{where} holds NaN or infinite scales; refusing a broken model")
    return QuantizedLinear(stored, scales, n_in, bits, bias, mins=mins)


def kept_linear(g: GGUFFile, name, bias=None, rows=None):
    """A QuantizedLinear from GGUF tensor `name` when its type can be kept quantised, else None.
    `rows`: an optional permutation of the output rows (llama.cpp's Q/K order undone)."""
    t = g.tensor(name)
    if t.type not in KEEP_TYPES or len(t.shape) != 2:
        return None
    blocks = g.blocks(name)
    if rows is not None:
        blocks = blocks[rows]
    return quantized_linear_from_blocks(blocks, t.type, bias, where=f"{g.path}: tensor {name}")


def kept_embedding(g: GGUFFile, name):
    """A QuantizedEmbedding from a Q8_0 (V, C) token table (other types: None)."""
    t = g.tensor(name)
    if t.type != "Q8_0":
        return None
    return QuantizedEmbedding(kept_linear(g, name))


# ---- shared checks -------------------------------------------------------------------------------
def check_tensors(g: GGUFFile, expected: dict):
    """NpgptError unless the file holds exactly the tensors `expected` ({GGUF name: NumPy shape})."""
    missing = [k for k in expected if k not in g.tensors]
    extra = [k for k in g.tensors if k not in expected]
    wrong = [f"{k} {g.tensors[k].shape} (expected {tuple(v)})" for k, v in expected.items()
             if k in g.tensors and g.tensors[k].shape != tuple(v)]
    problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(extra[:3])}"] if extra else []) + wrong[:3]
    if problems:
        raise NpgptError(f"{g.path}: {'; '.join(problems)}; the tensors do not match the model its metadata "
                         f"describes")


def open_gguf(path) -> GGUFFile:
    g = GGUFFile(path)
    arch = g.architecture
    if arch not in ARCHS:
        raise NpgptError(f"{path}: architecture {arch!r} is not supported (npgpt reads {', '.join(sorted(ARCHS))})")
    return g


def load_gguf_model(path, device="cpu", keep_quantized=False, **overrides):
    """The model in a GGUF file, in eval mode. By default every weight is dequantised to float32;
    keep_quantized=True keeps Q8_0 / Q4_0 / Q4_1 linear weights (and a Q8_0 tied embedding, for the
    Llama family) in npgpt's quantised layers instead."""
    g = open_gguf(path)
    return ARCHS[g.architecture][0](g, device=device, keep_quantized=keep_quantized, **overrides)


# ---- tokenizers ----------------------------------------------------------------------------------
# npgpt's split patterns -> llama.cpp's pre-tokenizer names
PRE_NAMES = {"gpt2": "gpt-2"}


def tokenizer_metadata(tok):
    """The tokenizer.* keys of a GGUF file for a byte-level BPE tokenizer (NpgptError for others)."""
    if not isinstance(tok, BPETokenizer):
        raise NpgptError(f"a {getattr(tok, 'kind', type(tok).__name__)} tokenizer has no GGUF form (llama.cpp reads "
                         f"byte-level BPE tokenizers); train the model with --tokenizer bpe to export it")
    pattern = PATTERNS.get(tok.pattern, tok.pattern)
    pre = next((PRE_NAMES[k] for k, v in PATTERNS.items() if v == pattern and k in PRE_NAMES), None)
    if pre is None:
        raise NpgptError("this tokenizer's split pattern has no llama.cpp pre-tokenizer name (gpt-2 is "
                         "supported); export a model with GPT-2's pattern")
    specials = {i: s for s, i in tok.special_tokens.items()}
    tokens, types = [], []
    for i in range(tok.vocab_size):
        if i in specials:
            tokens.append(specials[i])
            types.append(CONTROL)
        elif tok._id_to_bytes[i] is None:                        # a gap in the ids
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(bytes_to_gpt2_string(tok._id_to_bytes[i]))
            types.append(NORMAL)
    merges = [f"{bytes_to_gpt2_string(tok._id_to_bytes[a])} {bytes_to_gpt2_string(tok._id_to_bytes[b])}"
              for a, b in tok.merges]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, np.int32), "tokenizer.ggml.merges": merges}
    eot = tok.special_tokens.get("<|endoftext|>")
    if eot is not None:
        meta.update({"tokenizer.ggml.bos_token_id": eot, "tokenizer.ggml.eos_token_id": eot})
    meta["tokenizer.ggml.add_bos_token"] = False
    template = getattr(tok, "chat_template", None)
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


def tokenizer_from_gguf(g: GGUFFile):
    """The byte-level BPE tokenizer in a GGUF file's tokenizer.ggml.* metadata."""
    model = g.require("tokenizer.ggml.model", str)
    if model != "gpt2":
        raise NpgptError(f"{g.path}: tokenizer model {model!r} is not read (npgpt reads byte-level BPE, 'gpt2')")
    pre = g.get("tokenizer.ggml.pre", "default", str)
    pattern = {v: k for k, v in PRE_NAMES.items()}.get(pre)
    if pattern is None:
        raise NpgptError(f"{g.path}: pre-tokenizer {pre!r} is not supported")
    tokens = g.require("tokenizer.ggml.tokens", list)
    types = g.get("tokenizer.ggml.token_type", None, list)
    if types is not None and len(types) != len(tokens):
        raise NpgptError(f"{g.path}: {len(types)} token types for {len(tokens)} tokens")
    vocab, specials = {}, {}
    for i, s in enumerate(tokens):
        kind = NORMAL if types is None else int(types[i])
        b = gpt2_string_to_bytes(s) if kind in (NORMAL, BYTE) else None
        if kind in (CONTROL, USER_DEFINED):
            specials[s] = i
        elif b is not None:
            vocab[b] = i
    merges = []
    for m in g.get("tokenizer.ggml.merges", [], list):
        parts = m.split(" ") if isinstance(m, str) else None
        pair = None if parts is None or len(parts) != 2 else tuple(gpt2_string_to_bytes(p) for p in parts)
        if pair is None or None in pair:
            raise NpgptError(f"{g.path}: merge {m!r:.40} is not two tokens in GPT-2's byte alphabet")
        merges.append(pair)
    try:
        tok = BPETokenizer(vocab, merges, specials, pattern=pattern)
    except NpgptError as e:
        raise NpgptError(f"{g.path}: {e}") from None
    tok.chat_template = g.get("tokenizer.chat_template", None, str)
    return tok


def load_gguf_tokenizer(path):
    return tokenizer_from_gguf(GGUFFile(path))


# ---- writing -------------------------------------------------------------------------------------
def model_architecture(model):
    if isinstance(model, GPT):
        return "gpt2"
    raise NpgptError(f"cannot export a {type(model).__name__} to GGUF")


def export_gguf(model, tok, path, type_name="f32", name=None):
    """Write `model` (GPT-2 or Llama family, merged: no LoRA layers) and its tokenizer to a GGUF file.

    type_name: f32, f16 or q8_0 for the 2-D weights; norms, biases (and rows that do not divide into
    32-value blocks, under q8_0) stay float32, as llama.cpp's converter keeps them."""
    if type_name not in EXPORT_TYPES:
        raise NpgptError(f"--type must be one of {', '.join(EXPORT_TYPES)}, got {type_name!r}")
    if getattr(model, "lora", None) or getattr(model, "quantization", None):
        raise NpgptError("export a merged float model: merge the LoRA adapter first (npgpt merge), and load "
                         "quantised models in float")
    arch = model_architecture(model)
    if hasattr(model.config, "check_exportable"):
        model.config.check_exportable("GGUF")                 # recipe switches llama.cpp's gpt2 lacks
    _, metadata_fn, tensors_fn = ARCHS[arch]
    meta = {"general.architecture": arch, "general.name": name or Path(path).stem,
            "general.file_type": FILE_TYPES[type_name], "general.quantization_version": 2}
    meta.update(metadata_fn(model.config))
    meta.update(tokenizer_metadata(tok))
    tensors = []
    for gname, w in tensors_fn(model):
        t = type_name.upper()
        if w.ndim < 2 or (t.startswith("Q") and w.shape[-1] % 32):
            t = "F32"
        tensors.append((gname, w.shape, t, quantize(w, t)))
    write_gguf(path, meta, tensors)
    return path
