"""GGUF files as npgpt models and tokenizers, and npgpt models as GGUF files.

npgpt.gguf reads and writes the format; this module knows what llama.cpp puts in it for each
architecture (a table, `ARCHS`, one entry per `general.architecture`):

    gpt2    token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up,
            ffn_down}.{weight,bias}, output_norm, output (a copy of token_embd: GPT-2 ties them)
    llama   token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
    qwen2   ffn_up, ffn_down}.weight (qwen2: attn_{q,k,v}.bias too), output_norm, output (absent
            when tied); {arch}.* hyper-parameters (heads, kv heads, RoPE base, RMSNorm epsilon)

A linear weight is stored as PyTorch's nn.Linear keeps it, (out, in), with the 32-value quantisation
blocks running along `in`; npgpt keeps (in, out), so it is transposed on the way. llama.cpp's Llama
graph applies RoPE to neighbouring pairs (2i, 2i+1), Hugging Face's to (i, i + hs/2): its converter
reorders the rows of each head of attn_q / attn_k, and this module undoes that on reading and redoes
it on writing (Qwen2 keeps Hugging Face's order: llama.cpp runs it with the other RoPE layout).

Reading checks the hyper-parameters in the metadata, then that exactly the expected tensors are
present with exactly the expected shapes, before any tensor is dequantised (npgpt.gguf has already
checked the file's structure). By default every weight is dequantised to float32 (the fastest
decoding in NumPy); `keep_quantized=True` moves Q8_0 / Q4_0 / Q4_1 blocks into npgpt's quantised
layers unchanged (npgpt.layers: int8 or packed 4-bit with one float32 scale, and for Q4_1 a minimum,
per 32 values) and keeps a tied Q8_0 embedding as a QuantizedEmbedding.

The tokenizer (npgpt.tokenizer.gguf) and the chat template travel in the same file; `export_gguf`
writes a model and its tokenizer for llama.cpp, ollama and transformers' GGUF loader.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from npgpt.errors import NpgptError
from npgpt.gguf import GGUFFile, quantize, write_gguf
from npgpt.llama import Llama, LlamaConfig
from npgpt.model import GPT, GPTConfig
from npgpt.layers import QuantizedEmbedding, QuantizedLinear, linear_layers
from npgpt.tokenizer.gguf import load_gguf_tokenizer, tokenizer_from_gguf, tokenizer_metadata  # noqa: F401
from npgpt.tensor import Tensor

EXPORT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")     # the CLI offers the first three
# llama.cpp's general.file_type (llama_ftype) of a file whose large weights are all of one type
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3}


def is_gguf(path) -> bool:
    """True for a path naming a .gguf file (the loaders dispatch on it)."""
    return str(path).lower().endswith(".gguf")


def load_options(path, keep_quantized=False) -> dict:
    """The loader options (npgpt.from_pretrained / load_run overrides) of a --keep-quantized flag."""
    if not keep_quantized:
        return {}
    if not is_gguf(path):
        raise NpgptError(f"--keep-quantized applies to .gguf files, and {path} is not one; a model folder keeps "
                         f"quantised weights after `npgpt quantize`")
    return {"keep_quantized": True}


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



# ---- Llama family (llama, qwen2) ---------------------------------------------------------------
LLAMA_LINEAR = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
LLAMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_names(config):
    """[(npgpt parameter name, GGUF tensor name, transpose?)] of every parameter of a Llama."""
    out = [("model.embed_tokens.weight", "token_embd.weight", False)]
    for i in range(config.n_layer):
        for ours, theirs in LLAMA_NORMS.items():
            out.append((f"model.layers.{i}.{ours}.weight", f"blk.{i}.{theirs}.weight", False))
        for ours, theirs in LLAMA_LINEAR.items():
            out.append((f"model.layers.{i}.{ours}.weight", f"blk.{i}.{theirs}.weight", True))
            if config.qkv_bias and theirs in ("attn_q", "attn_k", "attn_v"):
                out.append((f"model.layers.{i}.{ours}.bias", f"blk.{i}.{theirs}.bias", False))
    out.append(("model.norm.weight", "output_norm.weight", False))
    if not config.tie_word_embeddings:
        out.append(("lm_head.weight", "output.weight", False))
    return out


def rope_rows(n_rows, n_head):
    """llama.cpp's row order of a Llama q/k weight: within each head, the rotary pairs (i, i + hs/2) of
    Hugging Face's rotate-half layout become neighbours (2i, 2i+1), the interleaved layout ggml's RoPE
    reads. Returns `perm` with gguf_rows = hf_rows[perm]; hf_rows = gguf_rows[argsort(perm)]."""
    hs = n_rows // n_head
    return np.arange(n_rows).reshape(n_head, 2, hs // 2).swapaxes(1, 2).reshape(-1)


def llama_config(g: GGUFFile):
    a = g.architecture
    n_embd = g.require(f"{a}.embedding_length", int)
    n_head = g.require(f"{a}.attention.head_count", int)
    emb = g.tensor("token_embd.weight")
    if len(emb.shape) != 2 or emb.shape[1] != n_embd:
        raise NpgptError(f"{g.path}: token_embd.weight has shape {emb.shape}, expected (vocab, {n_embd})")
    if "rope_freqs.weight" in g.tensors:
        raise NpgptError(f"{g.path}: per-frequency RoPE factors (rope_freqs, Llama 3.1 style) are not supported yet")
    scaling = g.get(f"{a}.rope.scaling.type", "none", str)
    if scaling not in ("none", "linear"):
        raise NpgptError(f"{g.path}: RoPE scaling {scaling!r} is not supported (none or linear)")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(g.require(f"{a}.rope.scaling.factor", float))}
    head_dim = g.get(f"{a}.attention.key_length", None, int)
    if head_dim is not None and head_dim * n_head == n_embd:
        head_dim = None
    try:
        cfg = LlamaConfig(vocab_size=emb.shape[0], block_size=g.require(f"{a}.context_length", int),
                          n_layer=g.require(f"{a}.block_count", int), n_head=n_head,
                          n_kv_head=g.get(f"{a}.attention.head_count_kv", n_head, int), n_embd=n_embd,
                          n_inner=g.require(f"{a}.feed_forward_length", int), head_dim=head_dim,
                          rms_norm_eps=float(g.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5, float)),
                          rope_theta=float(g.get(f"{a}.rope.freq_base", 10000.0, float)), rope_scaling=rope_scaling,
                          tie_word_embeddings="output.weight" not in g.tensors, qkv_bias=a == "qwen2",
                          model_type="qwen2" if a == "qwen2" else "llama")
    except NpgptError as e:
        raise NpgptError(f"{g.path}: {e}") from None
    rope_dim = g.get(f"{a}.rope.dimension_count", cfg.head_size, int)
    if rope_dim != cfg.head_size:
        raise NpgptError(f"{g.path}: partial rotary embeddings (rope.dimension_count {rope_dim} of head size "
                         f"{cfg.head_size}) are not supported")
    return cfg


def _llama_rows(config, arch, theirs):
    """The permutation that undoes llama.cpp's q/k row order (Llama only: Qwen2 keeps Hugging Face's)."""
    if arch != "llama":
        return None
    if theirs.endswith("attn_q.weight"):
        return np.argsort(rope_rows(config.n_head * config.head_size, config.n_head))
    if theirs.endswith("attn_k.weight"):
        return np.argsort(rope_rows(config.n_kv_head * config.head_size, config.n_kv_head))
    return None


def llama_from_gguf(g: GGUFFile, device="cpu", keep_quantized=False, **overrides):
    config = llama_config(g)
    arch = g.architecture
    names = llama_names(config)
    shapes = config.param_shapes()
    check_tensors(g, {theirs: (shapes[ours][::-1] if t else shapes[ours]) for ours, theirs, t in names})
    model = Llama(replace(config, **overrides), init=False)
    kept = {}
    if keep_quantized:
        for ours, theirs, t in names:
            q = kept_linear(g, theirs, rows=_llama_rows(config, arch, theirs)) if t else None
            if q is not None:
                kept[ours[:-len(".weight")]] = q
    state = {}
    for ours, theirs, t in names:
        if ours[:-len(".weight")] in kept:
            continue
        w = g.dequantize(theirs)
        rows = _llama_rows(config, arch, theirs)
        if rows is not None:
            w = w[rows]
        state[ours] = np.ascontiguousarray(w.T) if t else w
    for layer, q in kept.items():
        owner_name, attr = layer.rsplit(".", 1)
        owner = model.get_submodule(owner_name) if hasattr(model, "get_submodule") else _submodule(model, owner_name)
        bias = state.pop(f"{layer}.bias", None)
        q.bias = None if bias is None else Tensor(bias)
        setattr(owner, attr, q)
    emb = kept_embedding(g, "token_embd.weight") if keep_quantized and config.tie_word_embeddings else None
    if emb is not None:
        state.pop("model.embed_tokens.weight")
        model.model.embed_tokens = emb
    model.load_state_dict(state)
    if kept:
        model.quantization = {"bits": 8 if all(q.bits == 8 for q in kept.values()) else 4, "group_size": 32,
                              "embedding": emb is not None, "source": "gguf"}
    model.eval()
    return model.to(device) if str(device) != "cpu" else model


def _submodule(model, dotted):
    m = model
    for part in dotted.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def llama_metadata(config):
    a = "qwen2" if config.model_type == "qwen2" else "llama"
    meta = {f"{a}.context_length": config.block_size, f"{a}.embedding_length": config.n_embd,
            f"{a}.feed_forward_length": config.n_inner, f"{a}.block_count": config.n_layer,
            f"{a}.attention.head_count": config.n_head, f"{a}.attention.head_count_kv": config.n_kv_head,
            f"{a}.rope.freq_base": float(config.rope_theta), f"{a}.rope.dimension_count": config.head_size,
            f"{a}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
            f"{a}.attention.key_length": config.head_size, f"{a}.attention.value_length": config.head_size,
            f"{a}.vocab_size": config.vocab_size}
    rs = config.rope_scaling
    if rs is not None:
        if rs["rope_type"] != "linear":
            raise NpgptError(f"RoPE scaling {rs['rope_type']!r} has no GGUF form here (linear scaling exports)")
        meta[f"{a}.rope.scaling.type"] = "linear"
        meta[f"{a}.rope.scaling.factor"] = float(rs["factor"])
    return meta


def llama_tensors(model):
    cfg = model.config
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    params = {name: np.asarray(p.data, dtype=np.float32) for name, p in model.named_parameters()}
    out = []
    for ours, theirs, t in llama_names(cfg):
        w = params[ours]
        if t:
            w = w.T                                                  # (out, in)
            rows = _llama_rows(cfg, arch, theirs)
            if rows is not None:                                     # Hugging Face -> llama.cpp order
                w = w[np.argsort(rows)]
        out.append((theirs, np.ascontiguousarray(w)))
    return out


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


# general.architecture -> (read, metadata to write, tensors to write)
ARCHS = {"gpt2": (gpt2_from_gguf, gpt2_metadata, gpt2_tensors), "llama": (llama_from_gguf, llama_metadata, llama_tensors),
         "qwen2": (llama_from_gguf, llama_metadata, llama_tensors)}


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


def gguf_context_length(path) -> int:
    """The context length a GGUF file's metadata gives its model ({arch}.context_length)."""
    g = open_gguf(path)
    n = g.require(f"{g.architecture}.context_length", int)
    if n < 1:
        raise NpgptError(f"{path}: {g.architecture}.context_length must be positive, got {n}")
    return n


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


# ---- writing -------------------------------------------------------------------------------------
def model_architecture(model):
    if isinstance(model, GPT):
        return "gpt2"
    if isinstance(model, Llama):
        return "qwen2" if model.config.model_type == "qwen2" else "llama"
    raise NpgptError(f"cannot export a {type(model).__name__} to GGUF")


def export_gguf(model, tok, path, type_name="f32", name=None):
    """Write `model` (GPT-2 or Llama family, merged: no LoRA layers) and its tokenizer to a GGUF file.

    type_name: f32, f16 or q8_0 for the 2-D weights; norms, biases (and rows that do not divide into
    32-value blocks, under q8_0) stay float32, as llama.cpp's converter keeps them."""
    if type_name not in EXPORT_TYPES:
        raise NpgptError(f"--type must be one of {', '.join(EXPORT_TYPES)}, got {type_name!r}")
    if model.lora or model.quantization:
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
