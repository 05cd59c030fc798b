"""The Llama family: LlamaConfig, the decoder layer, Llama, cached inference, Hugging Face folders.

The second model family beside GPT-2 (npgpt.model). Every small model people use now (SmolLM2,
Qwen2.5, Llama 3.2, TinyLlama, Mistral) is this decoder; it differs from GPT-2 in four ops
(npgpt.ops.llama):

    GPT-2                               Llama
    LayerNorm (scale + shift)           RMSNorm (scale only)
    learned position table (wpe)        rotary embeddings on q and k (RoPE, no table)
    MLP: c_proj(gelu(c_fc(x)))          SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))
    nh key/value heads                  nkv <= nh key/value heads, shared by groups of queries (GQA)

Reading order: LlamaConfig -> LlamaAttention -> LlamaMLP -> LlamaDecoderLayer -> Llama.forward.
Parameter names are Hugging Face's own (`model.layers.0.self_attn.q_proj.weight`, `model.norm.weight`,
`lm_head.weight`), so PEFT's target names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj) name our layers too. Linear weights are kept (in, out) as all of npgpt's are (x @ w);
a Hugging Face folder stores them (out, in), so `from_pretrained` / `save_pretrained` transpose at
the boundary. Qwen2 is the same decoder with biases on q, k and v (`qkv_bias`).

The modern recipe's switches (npgpt.model's, issue 33) where they apply to this family: `qk_norm`
(RMSNorm on each head's q and k before the rotation, Qwen3's q_norm / k_norm), `mlp_act="relu2"`
(down_proj(relu(up_proj(x))^2): no gate_proj), `zero_init_proj` (o_proj, down_proj and an untied head
start at zero), `logit_softcap`; rotary positions are native, and GPT's `untie_head` is Llama's
tie_word_embeddings=false. A model with a switch LlamaForCausalLM cannot represent saves as an npgpt
folder (model_type "npgpt_llama", which transformers refuses and npgpt reads); exporting it to
transformers or GGUF is refused (`LlamaConfig.check_exportable`).

The KV cache (npgpt.model.KVCache) holds only the nkv key/value heads: (n_layer, B, nkv, T, hs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from npgpt.backend import asnumpy, check_fits, get_xp
from npgpt.errors import NpgptError
from npgpt.fileio import atomic_write_json, make_dir
from npgpt.model import PRESETS as GPT_PRESETS
from npgpt.model import GPT, CausalLM, GPTConfig, KVCache, read_hf_config
from npgpt.nn import Embedding, Linear, Module, ModuleList, Parameter, RMSNorm
from npgpt.ops.llama import gqa_attention, gqa_probs, rope, rope_inv_freq, rope_tables, swiglu, ungroup_heads
from npgpt.ops.nn import check_ops, dropout, linear, relu2, softcap
from npgpt.safeio import (FLOAT_DTYPES, Bool, Float, Int, Obj, Str, check, check_finite_tensors, check_value, inside,
                          load_safetensors, read_json_object, read_safetensors_header, write_safetensors)
from npgpt.tensor import Tensor, no_grad

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# the same families with recipe switches Hugging Face's classes lack: npgpt's own folders
NPGPT_ARCHITECTURES = {"NpgptLlamaForCausalLM": "llama", "NpgptQwen2ForCausalLM": "qwen2"}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    block_size: int = 2048            # the longest context (max_position_embeddings)
    n_layer: int = 22                 # num_hidden_layers
    n_head: int = 32                  # num_attention_heads
    n_kv_head: int = 4                # num_key_value_heads: 1 is multi-query, n_head is multi-head
    n_embd: int = 2048                # hidden_size
    n_inner: int = 5632               # intermediate_size, the SwiGLU width
    head_dim: int | None = None       # None: n_embd // n_head
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...} or None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False            # biases on q_proj, k_proj, v_proj (Qwen2 has them)
    dropout: float = 0.0              # on attention weights and on each residual branch (training only)
    model_type: str = "llama"         # "llama" or "qwen2": which Hugging Face class save_pretrained names
    # Recipe switches (npgpt.model.GPTConfig's where they apply); every default is Llama's own.
    qk_norm: bool = False             # RMSNorm (learned gain per head channel) on q and k, before RoPE
    mlp_act: str = "swiglu"           # Llama's SwiGLU, or "relu2": down_proj(relu(up_proj(x))^2), no gate_proj
    zero_init_proj: bool = False      # o_proj, down_proj (and an untied lm_head) start at zero
    logit_softcap: float = 0.0        # > 0: logits = cap * tanh(logits / cap); 0: off

    def __post_init__(self):
        # every field checked by type and range: a config may come from a stranger's config.json
        for name, spec in _CONFIG_SPECS.items():
            setattr(self, name, check_value(getattr(self, name), spec, f"model config: {name}"))
        if self.n_head % self.n_kv_head:
            raise NpgptError(f"model config: n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"(num_key_value_heads, {self.n_kv_head})")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise NpgptError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_size % 2:
            raise NpgptError(f"model config: the head size ({self.head_size}) must be even for rotary embeddings")
        self.rope_scaling = check_rope_scaling(self.rope_scaling, "model config: rope_scaling")

    def switches(self) -> dict:
        """The recipe switches set away from Llama's defaults, {name: value} ({} for a plain Llama)."""
        return {k: getattr(self, k) for k, v in LLAMA_RECIPE_DEFAULTS.items() if getattr(self, k) != v}

    def hf_incompatible(self) -> dict:
        """The switches a LlamaForCausalLM / Qwen2ForCausalLM folder cannot represent (zero_init_proj
        only changes the starting weights); {} when transformers can load the model."""
        return {k: v for k, v in self.switches().items() if k != "zero_init_proj"}

    def check_exportable(self, target: str) -> None:
        """NpgptError unless `target` ("transformers" or "GGUF") can hold this model: one with recipe
        switches Llama cannot represent stays an npgpt folder (save_pretrained writes one)."""
        bad = self.hf_incompatible()
        if bad:
            names = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise NpgptError(f"cannot export to {target}: this model uses npgpt's recipe switches ({names}), which "
                             f"{'Qwen2' if self.model_type == 'qwen2' else 'Llama'} cannot represent; it stays an "
                             f"npgpt folder (load it with npgpt)")

    arch = "llama"
    blocks_name = "model.layers"         # where the family keeps its blocks, and its token embedding
    embedding_name = "model.embed_tokens"

    @property
    def head_size(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def hidden(self):
        return self.n_inner

    def num_params(self, non_embedding=False):
        """The model's parameter count from the config alone. non_embedding=True leaves out the token
        embedding (Llama has no position table; an untied head still counts, as it is a matmul)."""
        C, H, hs = self.n_embd, self.n_inner, self.head_size
        q, kv = self.n_head * hs, self.n_kv_head * hs
        attn = C * q + 2 * C * kv + q * C + (q + 2 * kv) * int(self.qkv_bias)
        mlp = (2 if self.mlp_act == "relu2" else 3) * C * H          # relu2 has no gate_proj
        layer = attn + mlp + 2 * C + (2 * hs if self.qk_norm else 0)
        emb = self.vocab_size * C
        head = 0 if self.tie_word_embeddings else self.vocab_size * C
        n = emb + self.n_layer * layer + C + head
        return n - emb if non_embedding else n

    def param_shapes(self) -> dict[str, tuple]:
        """{parameter name: shape} of the Llama this config builds (npgpt's (in, out) layout), without
        building it. `hf_shapes()` gives the same in a Hugging Face file's (out, in) layout."""
        V, C, H, hs = self.vocab_size, self.n_embd, self.n_inner, self.head_size
        q, kv = self.n_head * hs, self.n_kv_head * hs
        shapes = {"model.embed_tokens.weight": (V, C)}
        for i in range(self.n_layer):
            b = f"model.layers.{i}."
            for name, (n_in, n_out) in (("self_attn.q_proj", (C, q)), ("self_attn.k_proj", (C, kv)),
                                        ("self_attn.v_proj", (C, kv)), ("self_attn.o_proj", (q, C)),
                                        ("mlp.gate_proj", (C, H)), ("mlp.up_proj", (C, H)),
                                        ("mlp.down_proj", (H, C))):
                if name == "mlp.gate_proj" and self.mlp_act == "relu2":
                    continue
                shapes[f"{b}{name}.weight"] = (n_in, n_out)
                if self.qkv_bias and name[-6:] in ("q_proj", "k_proj", "v_proj"):
                    shapes[f"{b}{name}.bias"] = (n_out,)
            if self.qk_norm:
                shapes[f"{b}self_attn.q_norm.weight"] = shapes[f"{b}self_attn.k_norm.weight"] = (hs,)
            shapes[f"{b}input_layernorm.weight"] = (C,)
            shapes[f"{b}post_attention_layernorm.weight"] = (C,)
        shapes["model.norm.weight"] = (C,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (V, C)
        return shapes

    def hf_shapes(self) -> dict[str, tuple]:
        """param_shapes as a Hugging Face file holds them: linear weights (out, in)."""
        return {k: (s[::-1] if _is_linear_weight(k) else s) for k, s in self.param_shapes().items()}

    @classmethod
    def from_gpt(cls, gpt: GPTConfig, **overrides):
        """The Llama of a GPT preset's sizes (`--set arch=llama`): same vocabulary, context, layers,
        heads and width; half as many key/value heads as query heads (when n_head is even); a SwiGLU
        width of 8/3 n_embd rounded up to a multiple of 32 (the parameters of a 4 n_embd GELU MLP,
        as the Llama paper chose); tied embeddings, as small models (SmolLM2) have them.

        The GPT config's recipe switches carry over (modern-baby's Llama): rotary positions are
        Llama's own, untie_head becomes tie_word_embeddings=false, and mlp_act=relu2 (two matrices,
        as GPT-2's MLP) keeps GPT-2's 4 n_embd width."""
        n_kv = gpt.n_head // 2 if gpt.n_head % 2 == 0 else gpt.n_head
        act = "relu2" if gpt.mlp_act == "relu2" else "swiglu"
        width = gpt.n_inner or (4 * gpt.n_embd if act == "relu2" else -(-8 * gpt.n_embd // 3 // 32) * 32)
        fields = dict(vocab_size=gpt.vocab_size, block_size=gpt.block_size, n_layer=gpt.n_layer, n_head=gpt.n_head,
                      n_kv_head=n_kv, n_embd=gpt.n_embd, n_inner=width, dropout=gpt.dropout,
                      tie_word_embeddings=not gpt.untie_head, rms_norm_eps=1e-5, qk_norm=gpt.qk_norm,
                      mlp_act=act, zero_init_proj=gpt.zero_init_proj, logit_softcap=gpt.logit_softcap)
        if gpt.pos == "rope":
            fields["rope_theta"] = gpt.rope_theta
        return cls(**{**fields, **overrides})

    # ---- Hugging Face config.json ------------------------------------------------------------
    def to_hf(self):
        """config.json: LlamaForCausalLM's / Qwen2ForCausalLM's (transformers loads it), or npgpt's own
        (model_type "npgpt_llama" / "npgpt_qwen2": transformers refuses it, npgpt reads it) when a
        recipe switch is one those classes cannot represent."""
        npgpt_only = bool(self.hf_incompatible())
        arch = {v: k for k, v in (NPGPT_ARCHITECTURES if npgpt_only else ARCHITECTURES).items()}[self.model_type]
        hf = {"architectures": [arch], "model_type": ("npgpt_" if npgpt_only else "") + self.model_type,
              "vocab_size": self.vocab_size, "hidden_size": self.n_embd, "intermediate_size": self.n_inner,
              "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
              "num_key_value_heads": self.n_kv_head, "max_position_embeddings": self.block_size,
              "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
              "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu" if self.mlp_act == "swiglu"
              else "relu2", "attention_dropout": self.dropout,
              "initializer_range": 0.02, "torch_dtype": "float32", "use_cache": True}
        if self.switches():
            hf["npgpt"] = {"recipe": self.switches()}
        if self.model_type == "llama":
            hf.update(attention_bias=False, mlp_bias=False, head_dim=self.head_size, pretraining_tp=1)
            if self.qkv_bias:
                raise NpgptError("a Llama folder cannot hold q/k/v biases without an o_proj bias; "
                                 "save this model with model_type 'qwen2'")
        else:
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layer)
            if self.head_dim is not None and self.head_dim != self.n_embd // self.n_head:
                raise NpgptError("a Qwen2 folder cannot record a head size other than hidden_size / num_attention_heads")
        return hf

    @classmethod
    def from_hf(cls, cfg: dict, where="config.json"):
        """A LlamaConfig from a LlamaForCausalLM or Qwen2ForCausalLM config.json dict; NpgptError
        naming the field when a value is wrong or asks for something npgpt does not implement."""
        kind = model_type_of(cfg, where)
        npgpt_only = is_npgpt_llama(cfg)
        size = Int(lo=1, hi=1 << 24)
        f = check(cfg, {"vocab_size": size, "hidden_size": size, "intermediate_size": size,
                        "num_hidden_layers": Int(lo=1, hi=4096), "num_attention_heads": Int(lo=1, hi=4096),
                        "num_key_value_heads": Int(lo=1, hi=4096, default=None, none_ok=True),
                        "head_dim": Int(lo=2, hi=1 << 16, default=None, none_ok=True),
                        "max_position_embeddings": Int(lo=1, hi=1 << 24, default=2048),
                        "rms_norm_eps": Float(0, 1, default=1e-6, lo_open=True),
                        "rope_theta": Float(0, default=10000.0, lo_open=True),
                        "rope_scaling": Obj(default=None), "rope_parameters": Obj(default=None),
                        "tie_word_embeddings": Bool(default=False),
                        "hidden_act": Str(default="silu", max_len=40),
                        "attention_bias": Bool(default=False), "mlp_bias": Bool(default=False),
                        "attention_dropout": Float(0, 1, default=0.0, hi_open=True),
                        "use_sliding_window": Bool(default=False),
                        "npgpt": Obj({"recipe": Obj(default={})}, default={"recipe": {}})}, where)
        recipe = f["npgpt"]["recipe"]
        unknown = sorted(set(recipe) - set(LLAMA_RECIPE_DEFAULTS))
        if unknown:
            raise NpgptError(f"{where}: field 'npgpt.recipe' has unknown switch {str(unknown[0])[:40]!r}; known: "
                             f"{', '.join(LLAMA_RECIPE_DEFAULTS)}")
        act = "relu2" if recipe.get("mlp_act") == "relu2" else "silu"
        if f["hidden_act"] != act:
            raise NpgptError(f"{where}: hidden_act {f['hidden_act']!r} is not supported; npgpt's Llama uses SwiGLU "
                             f"(silu), or relu2 when npgpt.recipe says mlp_act=relu2")
        if f["mlp_bias"]:
            raise NpgptError(f"{where}: mlp_bias true is not supported (Llama's MLP has no biases)")
        if kind == "llama" and f["attention_bias"]:
            raise NpgptError(f"{where}: attention_bias true (biases on q, k, v and o_proj) is not supported")
        if kind == "qwen2" and f["use_sliding_window"]:
            raise NpgptError(f"{where}: use_sliding_window true is not supported; npgpt attends over the whole context")
        theta, scaling, scaling_where = f["rope_theta"], f["rope_scaling"], f"{where}: rope_scaling"
        if f["rope_parameters"] is not None:      # transformers 5 writes theta and scaling as one object
            scaling, scaling_where = f["rope_parameters"], f"{where}: rope_parameters"
            theta = check(scaling, {"rope_theta": Float(0, default=theta, lo_open=True)}, where,
                          prefix="rope_parameters.")["rope_theta"]
        head_dim = f["head_dim"] if kind == "llama" else None
        if head_dim is not None and head_dim * f["num_attention_heads"] == f["hidden_size"]:
            head_dim = None                                  # the default: not recorded separately
        config = cls(vocab_size=f["vocab_size"], block_size=f["max_position_embeddings"],
                     n_layer=f["num_hidden_layers"], n_head=f["num_attention_heads"],
                     n_kv_head=f["num_key_value_heads"] or f["num_attention_heads"],
                     n_embd=f["hidden_size"], n_inner=f["intermediate_size"], head_dim=head_dim,
                     rms_norm_eps=f["rms_norm_eps"], rope_theta=theta,
                     rope_scaling=check_rope_scaling(scaling, scaling_where),
                     tie_word_embeddings=f["tie_word_embeddings"], qkv_bias=kind == "qwen2",
                     dropout=f["attention_dropout"], model_type=kind, **recipe)
        if npgpt_only != bool(config.hf_incompatible()):
            raise NpgptError(f"{where}: model_type {cfg.get('model_type')!r} does not match the recipe switches "
                             f"{config.hf_incompatible() or 'none'}; the file is damaged")
        return config


_CONFIG_SPECS = {"vocab_size": Int(lo=1), "block_size": Int(lo=1), "n_layer": Int(lo=1), "n_head": Int(lo=1),
                 "n_kv_head": Int(lo=1), "n_embd": Int(lo=1), "n_inner": Int(lo=1),
                 "head_dim": Int(lo=2, none_ok=True), "rms_norm_eps": Float(0, lo_open=True),
                 "rope_theta": Float(0, lo_open=True), "tie_word_embeddings": Bool(), "qkv_bias": Bool(),
                 "dropout": Float(0, 1, hi_open=True), "model_type": Str(choices=("llama", "qwen2")),
                 "qk_norm": Bool(), "mlp_act": Str(("swiglu", "relu2")), "zero_init_proj": Bool(),
                 "logit_softcap": Float(0, 1e4)}
LLAMA_RECIPE_DEFAULTS = {"qk_norm": False, "mlp_act": "swiglu", "zero_init_proj": False, "logit_softcap": 0.0}


def model_type_of(cfg: dict, where="config.json") -> str:
    """'llama' or 'qwen2' from a config.json dict's architectures (or model_type); a clear error
    naming any other architecture."""
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs):
        known = [{**ARCHITECTURES, **NPGPT_ARCHITECTURES}[a] for a in archs
                 if a in ARCHITECTURES or a in NPGPT_ARCHITECTURES]
        if known:
            return known[0]
        raise NpgptError(f"{where}: architecture {', '.join(archs)[:80]} is not supported; npgpt loads "
                         f"GPT2LMHeadModel, LlamaForCausalLM and Qwen2ForCausalLM")
    kind = cfg.get("model_type")
    if kind in ("llama", "qwen2", "npgpt_llama", "npgpt_qwen2"):
        return kind.removeprefix("npgpt_")
    raise NpgptError(f"{where}: model_type {str(kind)[:40]!r} is not a Llama-family model")


_ROPE_FIELDS = {
    "linear": {"factor": Float(1, 1e6)},
    "llama3": {"factor": Float(1, 1e6), "low_freq_factor": Float(0, 1e6, lo_open=True),
               "high_freq_factor": Float(0, 1e6, lo_open=True), "original_max_position_embeddings": Int(lo=1)},
}


def check_rope_scaling(value, where):
    """A rope_scaling dict reduced to what npgpt uses ({"rope_type", factors...}), or None for plain RoPE.
    Hugging Face writes the kind as "rope_type" (older files: "type")."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise NpgptError(f"{where} must be an object {{...}} or null")
    kind = value.get("rope_type", value.get("type", "default"))
    if kind == "default":
        return None
    if kind not in _ROPE_FIELDS:
        raise NpgptError(f"{where}: rope type {str(kind)[:40]!r} is not supported; npgpt implements "
                         f"'linear' and 'llama3' (and plain RoPE)")
    f = check(value, _ROPE_FIELDS[kind], where)
    if kind == "llama3" and not f["high_freq_factor"] > f["low_freq_factor"]:
        raise NpgptError(f"{where}: high_freq_factor must be greater than low_freq_factor")
    return {"rope_type": kind, **f}


def is_npgpt_llama(cfg: dict) -> bool:
    """True when a config.json dict names npgpt's own Llama-family class (a model with recipe switches)."""
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs:
        return any(a in NPGPT_ARCHITECTURES for a in archs if isinstance(a, str))
    return cfg.get("model_type") in ("npgpt_llama", "npgpt_qwen2")


def _is_linear_weight(name):
    return name.endswith("_proj.weight")


# llama-baby, llama-shakespeare-char, and llama-modern-baby / llama-modern-shakespeare (the recipe's switches)
PRESETS = {"llama-" + name: LlamaConfig.from_gpt(GPT_PRESETS[name])
           for name in ("baby", "shakespeare-char", "modern-baby", "modern-shakespeare")}


# ---- the blocks --------------------------------------------------------------------------------
class LlamaAttention(Module):
    """q, k, v projections (q/k/v biases for Qwen2), RoPE on q and k, grouped-query attention, o_proj."""

    def __init__(self, cfg: LlamaConfig, rng, resid_std):
        self.n_head, self.n_kv_head, self.head_size, self.dropout = cfg.n_head, cfg.n_kv_head, cfg.head_size, cfg.dropout
        q, kv = cfg.n_head * cfg.head_size, cfg.n_kv_head * cfg.head_size
        self.q_proj = Linear(cfg.n_embd, q, bias=cfg.qkv_bias, rng=rng)
        self.k_proj = Linear(cfg.n_embd, kv, bias=cfg.qkv_bias, rng=rng)
        self.v_proj = Linear(cfg.n_embd, kv, bias=cfg.qkv_bias, rng=rng)
        self.o_proj = Linear(q, cfg.n_embd, bias=False, rng=rng, std=resid_std)
        self.q_norm = RMSNorm(cfg.head_size, eps=cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_size, eps=cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rng = None                                      # the model's dropout generator, set by Llama

    def _rotated_qk(self, x, B, T, cos, sin):
        """q (B, T, nh, hs) and k (B, T, nkv, hs) of x: projected, QK-normed (qk_norm), rotated."""
        q = self.q_proj(x).reshape(B, T, self.n_head, self.head_size)
        k = self.k_proj(x).reshape(B, T, self.n_kv_head, self.head_size)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope(q, cos, sin), rope(k, cos, sin)

    def forward(self, x, cos, sin):                          # (B, T, C) -> (B, T, C)
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        p = self.dropout if self.training else 0.0
        q, k = self._rotated_qk(x, B, T, cos, sin)                        # (B, T, nh | nkv, hs)
        v = self.v_proj(x).reshape(B, T, nkv, hs)
        y = gqa_attention(q, k, v, dropout=p, rng=self.rng)               # (B, T, nh hs)
        return dropout(self.o_proj(y), p, self.rng, self.training)

    def forward_cached(self, x, k_cache, v_cache, p0, cos, sin, key_mask=None):
        """Inference on plain arrays: new positions x (B, Tn, C) attend to the cached keys/values.

        k_cache, v_cache: this layer's (B, nkv, block_size, hs) buffers; the new (rotated) keys and
        values are written at p0:p0+Tn. cos, sin: the new positions' tables. Returns (y (B, Tn, C),
        attention probabilities (B, nh, Tn, Tk))."""
        B, Tn, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        xt = Tensor(x)
        q, k = (t.data for t in self._rotated_qk(xt, B, Tn, cos, sin))
        v = self.v_proj(xt).data.reshape(B, Tn, nkv, hs)
        k_cache[:, :, p0:p0 + Tn] = k.transpose(0, 2, 1, 3)
        v_cache[:, :, p0:p0 + Tn] = v.transpose(0, 2, 1, 3)
        Tk = p0 + Tn
        att = gqa_probs(q.transpose(0, 2, 1, 3), k_cache[:, :, :Tk], key_mask)   # (B, nh, Tn, Tk)
        y = att.reshape(B, nkv, nh // nkv * Tn, Tk) @ v_cache[:, :, :Tk]        # (B, nkv, g Tn, hs)
        y = ungroup_heads(y, Tn).reshape(B, Tn, nh * hs)
        return self.o_proj(Tensor(y)).data, att


class LlamaMLP(Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)); with mlp_act=relu2, down_proj(relu(up_proj(x))^2)
    (the modded-nanogpt MLP: no gate, so gate_proj is None)."""

    def __init__(self, cfg: LlamaConfig, rng, resid_std):
        self.dropout = cfg.dropout
        self.gate_proj = Linear(cfg.n_embd, cfg.n_inner, bias=False, rng=rng) if cfg.mlp_act == "swiglu" else None
        self.up_proj = Linear(cfg.n_embd, cfg.n_inner, bias=False, rng=rng)
        self.down_proj = Linear(cfg.n_inner, cfg.n_embd, bias=False, rng=rng, std=resid_std)
        self.rng = None

    def forward(self, x):                                    # (B, T, C) -> (B, T, C)
        if self.gate_proj is None:
            y = self.down_proj(relu2(self.up_proj(x)))
        else:
            y = self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return dropout(y, self.dropout, self.rng, self.training)


class LlamaDecoderLayer(Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), with RMSNorms."""

    def __init__(self, cfg: LlamaConfig, rng, resid_std):
        self.self_attn = LlamaAttention(cfg, rng, resid_std)
        self.mlp = LlamaMLP(cfg, rng, resid_std)
        self.input_layernorm = RMSNorm(cfg.n_embd, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, eps=cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x, k_cache, v_cache, p0, cos, sin, key_mask=None):
        """forward on plain arrays with this layer's KV cache (see LlamaAttention.forward_cached)."""
        y, att = self.self_attn.forward_cached(self.input_layernorm(Tensor(x)).data, k_cache, v_cache, p0,
                                               cos, sin, key_mask)
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(Tensor(x))).data, att


class LlamaModel(Module):
    def __init__(self, cfg: LlamaConfig, rng):
        # N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 n_layer) (as GPT-2's init)
        # (zero_init_proj: those projections start at zero, each layer starting as the identity)
        resid_std = 0.0 if cfg.zero_init_proj else 0.02 / math.sqrt(2 * cfg.n_layer)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.n_embd, rng=rng)
        self.layers = ModuleList(LlamaDecoderLayer(cfg, rng, resid_std) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, eps=cfg.rms_norm_eps)


class LMHead(Module):
    """The output projection, (V, C) as Hugging Face's lm_head (logits = x @ weight.T)."""

    def __init__(self, vocab_size, dim, rng, std=0.02):
        self.weight = Parameter(rng.normal(0.0, std, size=(vocab_size, dim)).astype(np.float32, copy=False))


class _NoInit:
    """Stands in for a Generator while a model is built only to be loaded: np.empty, no draws."""

    def normal(self, loc, scale, size):
        return np.empty(size, dtype=np.float32)


# ---- the model ---------------------------------------------------------------------------------
class Llama(CausalLM):
    """A Llama-family decoder: token embedding, n_layer pre-norm decoder layers (RMSNorm, RoPE, GQA,
    SwiGLU), final RMSNorm, LM head (tied to the embedding or its own)."""

    def __init__(self, config: LlamaConfig, seed: int = 0, device="cpu", init=True, ops="fused"):
        if init:       # (init=False: np.empty, untouched until a loader fills it, maybe with quantised layers)
            n = config.num_params()              # weights are drawn in float32 on the host
            check_fits(4 * n, f"a model of {n:,} parameters", "cpu", "use a smaller model (n_layer, n_embd, vocab_size)")
        self.config = config
        self.ops = check_ops(ops)            # "reference": forward on the composed ops (npgpt.reference)
        self.rng = np.random.default_rng(seed)   # weights drawn on the host: CPU and GPU runs start equal
        init_rng = self.rng if init else _NoInit()
        self.model = LlamaModel(config, init_rng)
        head_std = 0.0 if config.zero_init_proj else 0.02
        self.lm_head = None if config.tie_word_embeddings else LMHead(config.vocab_size, config.n_embd, init_rng,
                                                                      std=head_std)
        for m in self.modules():
            if isinstance(m, (LlamaAttention, LlamaMLP)):
                m.rng = self.rng
        self._inv_freq = rope_inv_freq(config.head_size, config.rope_theta, config.rope_scaling)
        if str(device) != "cpu":
            self.to(device)

    @property
    def input_embedding(self):
        return self.model.embed_tokens.weight

    @property
    def anchor(self):
        # the final norm's scale: present even when the embedding is kept quantised (a GGUF loaded with
        # keep_quantized holds an npgpt.layers.QuantizedEmbedding, which has no float table)
        return self.model.norm.weight

    @property
    def output_weight(self):
        """The (V, C) LM head: lm_head.weight, or the embedding when tied."""
        return self.input_embedding if self.lm_head is None else self.lm_head.weight

    def head(self, x):
        """Logits of final-norm states x (..., C) Tensor -> (..., V): lm_head, or the tied embedding
        (through the embedding module, so a quantised table serves as the head without a float copy);
        then the soft-cap (logit_softcap > 0)."""
        if self.lm_head is None:
            logits = self.model.embed_tokens.logits(x)
        else:
            logits = linear(x, self.lm_head.weight.T)
        cap = self.config.logit_softcap
        return softcap(logits, cap) if cap > 0 else logits

    def rope_tables(self, positions):
        """cos, sin (..., hs/2) in the model's dtype for integer positions (...) on the model's device."""
        return rope_tables(positions, self._inv_freq, self.anchor.dtype)

    # ---- training forward -------------------------------------------------------------------
    def forward(self, idx, targets=None, ignore_index=-1):
        """idx: (B, T) int token ids -> (logits (B, T, V) Tensor, loss Tensor or None)."""
        idx = self._check_ids(idx)
        T = idx.shape[1]
        m = self.model
        x = m.embed_tokens(idx)                                      # (B, T, C)
        x = dropout(x, self.config.dropout, self.rng, self.training)
        cos, sin = self.rope_tables(get_xp(idx).arange(T))          # (T, hs/2)
        for layer in m.layers:
            x = layer(x, cos, sin)
        logits = self.head(m.norm(x))                                # (B, T, V)
        return logits, self.lm_loss(logits, targets, ignore_index)

    def hidden_states(self, idx):
        """The residual stream after the embedding and after each layer, [(B, T, C) Tensor] * (n_layer + 1),
        for interpretability (npgpt.interpret's logit lens reads each through model.norm and the head)."""
        idx = self._check_ids(idx)
        cos, sin = self.rope_tables(get_xp(idx).arange(idx.shape[1]))
        out = [self.model.embed_tokens(idx)]
        for layer in self.model.layers:
            out.append(layer(out[-1], cos, sin))
        return out

    def final_logits(self, x):
        """Logits of residual-stream states x (..., C): the final RMSNorm, then the head."""
        return self.head(self.model.norm(x))

    # ---- sizes ---------------------------------------------------------------------------------
    def num_params(self, non_embedding=False):
        """Parameter count (LlamaConfig.num_params); non_embedding=True leaves out the token embedding."""
        return self.config.num_params(non_embedding)

    def flops_per_token(self, T=None):
        """Training FLOPs per token, 6 N + 12 n_layer nh hs T (the PaLM paper's estimate, appendix B)."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T

    # ---- cached inference ----------------------------------------------------------------------
    def new_cache(self, batch_size):
        return KVCache(self.config, batch_size, self.anchor.data)

    @no_grad()
    def forward_cached(self, idx, cache, return_attention=False):
        """Run new tokens idx (B, Tn) through the model, reading and extending `cache` (only the nkv
        key/value heads are cached). Same contract as GPT.forward_cached: logits (B, Tn, V) as a plain
        array (and per-layer attention (B, nh, Tn, Tk) when asked)."""
        idx = self._check_ids(idx)
        B, Tn = idx.shape
        p0 = cache.length
        if p0 + Tn > self.config.block_size:
            raise NpgptError(f"KV cache overflow: {p0} cached + {Tn} new tokens > block_size "
                             f"{self.config.block_size}; rebuild the cache from the last tokens")
        xp = get_xp(cache.k)
        key_mask = None
        if cache.padded:   # left-padded rows: positions count from each row's first real token
            pos = xp.maximum(xp.arange(p0, p0 + Tn)[None, :] - cache.pad[:, None], 0)   # (B, Tn)
            key_mask = xp.arange(p0 + Tn)[None, :] >= cache.pad[:, None]               # (B, Tk)
        else:
            pos = xp.arange(p0, p0 + Tn)                                                 # (Tn,)
        cos, sin = self.rope_tables(pos)
        x = self.model.embed_tokens.lookup(idx)                                         # (B, Tn, C)
        maps = []
        for i, layer in enumerate(self.model.layers):
            x, att = layer.forward_cached(x, cache.k[i], cache.v[i], p0, cos, sin, key_mask)
            if return_attention:
                maps.append(att)
        cache.length = p0 + Tn
        logits = self.head(self.model.norm(Tensor(x))).data                             # (B, Tn, V)
        return (logits, maps) if return_attention else logits

    # ---- Hugging Face folders ------------------------------------------------------------------
    def hf_state_dict(self):
        """{Hugging Face name: host array} in a Hugging Face file's layout (linear weights (out, in))."""
        out = {}
        for name, p in self.named_parameters():
            a = asnumpy(p.data)
            out[name] = np.ascontiguousarray(a.T if _is_linear_weight(name) else a)
        return out

    def save_pretrained(self, path):
        """Write config.json + model.safetensors: a folder transformers loads as LlamaForCausalLM (or
        Qwen2ForCausalLM), with Hugging Face's names and (out, in) linear weights."""
        path = Path(path)
        make_dir(path)
        write_safetensors(path / "model.safetensors", self.hf_state_dict(), metadata={"format": "pt"})
        atomic_write_json(path / "config.json", self.config.to_hf())

    @classmethod
    def from_pretrained(cls, path, device="cpu", **overrides):
        """Load a LlamaForCausalLM / Qwen2ForCausalLM folder (model.safetensors, or shards listed in
        model.safetensors.index.json; float32, float16 or bfloat16, upcast to float32).

        config.json is checked against every safetensors header (names, shapes, dtypes) before any
        weight is allocated; NaN or infinite weights are an error. Eval mode, as transformers."""
        path = Path(path)
        if not path.is_dir():
            raise NpgptError(f"model folder {path} does not exist")
        hf = read_hf_config(path)
        config = LlamaConfig.from_hf(hf, str(path / "config.json"))
        state = load_llama_tensors(path, config)
        model = cls(replace(config, **overrides), init=False)
        model.load_state_dict(state)
        model.eval()
        return model.to(device) if str(device) != "cpu" else model


# ---- reading Hugging Face weights ----------------------------------------------------------------
INDEX_FILE = "model.safetensors.index.json"
IGNORED_KEYS = ("rotary_emb.inv_freq",)          # a buffer older transformers saved with the weights
MAX_SHARDS = 10000


def weight_files(path) -> list:
    """The checked headers of a folder's weights: model.safetensors, or the shards that
    model.safetensors.index.json names (each kept inside the folder), with {tensor: shard} checked
    against the shards' own headers."""
    path = Path(path)
    single, index = path / "model.safetensors", path / INDEX_FILE
    if single.is_file():
        return [read_safetensors_header(single)]
    if not index.is_file():
        extra = " (PyTorch .bin files are pickles and are not read: re-save with safe_serialization=True)" \
            if any(path.glob("pytorch_model*.bin")) else ""
        raise NpgptError(f"{path} holds neither model.safetensors nor {INDEX_FILE}{extra}")
    f = check(read_json_object(index, "safetensors index"), {"weight_map": Obj()}, str(index))
    weight_map = f["weight_map"]
    shards = sorted(set(weight_map.values()), key=str)
    if not weight_map or len(shards) > MAX_SHARDS or not all(isinstance(s, str) for s in shards):
        raise NpgptError(f"{index}: weight_map must map tensor names to at most {MAX_SHARDS} shard file names")
    headers = [read_safetensors_header(inside(path, s, "shard")) for s in shards]
    for s, h in zip(shards, headers):
        claimed = {k for k, v in weight_map.items() if v == s and not k.endswith(IGNORED_KEYS)}
        held = {k for k in h.tensors if not k.endswith(IGNORED_KEYS)}
        if claimed != held:
            odd = sorted(claimed ^ held)[:2]
            raise NpgptError(f"{index}: the weight_map disagrees with shard {s} (e.g. {', '.join(odd)}); "
                             f"the folder is damaged")
    return headers


def check_shapes(config: LlamaConfig, found: dict, expected: dict, where, f) -> None:
    """NpgptError unless the tensors `found` ({name: shape}, from headers) are exactly `expected`:
    the layer count first (naming config.json's field), then missing, unexpected and mis-shaped names."""
    n_layers = len({k.split(".")[2] for k in found if k.startswith("model.layers.")})
    if n_layers != config.n_layer:
        raise NpgptError(f"{where}: num_hidden_layers is {config.n_layer} but the weights hold {n_layers} layers; "
                         f"the folder does not match its config.json")
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [f"{k} {tuple(found[k])} (expected {tuple(v)})" for k, v in expected.items()
             if k in found and tuple(found[k]) != tuple(v)]
    problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(extra[:3])}"] if extra else []) + wrong[:3]
    if problems:
        raise NpgptError(f"{f}: {'; '.join(problems)}; the weights do not match config.json")


def load_llama_tensors(path, config: LlamaConfig) -> dict:
    """{npgpt name: float32 array (npgpt's (in, out) layout)} from a Llama/Qwen2 folder; every header
    is checked against `config` (names, shapes, floating dtypes) before a tensor is read."""
    headers = weight_files(path)
    where, cfg_file = Path(path) / "config.json", Path(path)
    found = {}
    for h in headers:
        for key, info in h.tensors.items():
            if key.endswith(IGNORED_KEYS):
                continue
            if key in found:
                raise NpgptError(f"{h.path}: tensor {key} appears in two shards; the folder is damaged")
            if info.dtype not in FLOAT_DTYPES:
                raise NpgptError(f"{h.path}: tensor {key} has dtype {info.dtype}; expected floating point weights")
            found[key] = (h, info.shape)
    tied_extra = config.tie_word_embeddings and "lm_head.weight" in found
    if tied_extra:                                  # tied: transformers ignores a stored head, and so do we
        del found["lm_head.weight"]
    expected = config.hf_shapes()
    check_shapes(config, {k: shape for k, (_, shape) in found.items()}, expected, where, cfg_file)
    state = {}
    for h in headers:
        names = {k for k in h.tensors if k in expected}
        if not names:
            continue
        for key, a in load_safetensors(h.path, h, names=names).items():
            a = a.astype(np.float32, copy=False)
            state[key] = np.ascontiguousarray(a.T) if _is_linear_weight(key) else a
        check_finite_tensors({k: state[k] for k in names}, h.path)
    return state


def config_from_hf(hf: dict, where="config.json"):
    """The model config of a config.json dict, of either family (GPTConfig or LlamaConfig)."""
    return LlamaConfig.from_hf(hf, where) if is_llama_config(hf) else GPTConfig.from_hf(hf, where)


def is_llama_config(hf: dict) -> bool:
    """True when a config.json dict describes a Llama-family model (architectures or model_type; npgpt's
    own NpgptLlamaForCausalLM / NpgptQwen2ForCausalLM, a Llama with recipe switches, too)."""
    archs = hf.get("architectures")
    if isinstance(archs, list) and any(a in ARCHITECTURES or a in NPGPT_ARCHITECTURES
                                       for a in archs if isinstance(a, str)):
        return True
    return hf.get("model_type") in ("llama", "qwen2", "npgpt_llama", "npgpt_qwen2")


# ---- choosing the family --------------------------------------------------------------------------
ARCHS = ("gpt", "llama")


def preset_config(preset, arch="gpt", **overrides):
    """The model config of a preset name ("baby", "llama-baby", "modern-baby", ...) and an architecture,
    with `overrides` (n_layer, n_head, n_embd, block_size, vocab_size, dropout, bias, and the recipe
    switches pos, qk_norm, mlp_act, zero_init_proj, untie_head, logit_softcap) applied to the GPT
    sizes first: `preset_config("baby", "llama")` is `preset_config("llama-baby")`, and a Llama takes
    the switches that apply to it (LlamaConfig.from_gpt)."""
    if arch not in ARCHS:
        raise NpgptError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if preset.startswith("llama-") and preset[6:] in GPT_PRESETS:
        preset, arch = preset[6:], "llama"
    elif preset not in GPT_PRESETS:
        raise NpgptError(f"unknown preset {preset!r}: choose one of {', '.join(list(GPT_PRESETS) + list(PRESETS))}")
    bias = overrides.pop("bias", None)
    act = overrides.get("mlp_act")
    if arch == "gpt" and act == "swiglu":
        raise NpgptError("mlp_act=swiglu is the llama family's MLP (--set arch=llama); a GPT takes gelu or relu2")
    if arch == "llama":
        if overrides.get("pos") == "learned":
            raise NpgptError("pos=learned is a GPT option: the llama family has rotary positions only")
        if act == "gelu":
            raise NpgptError("mlp_act=gelu is a GPT option: the llama family's MLP is swiglu (its own) or relu2")
        if act == "swiglu":
            overrides["mlp_act"] = "gelu"                  # a GPT without relu2: from_gpt gives SwiGLU
    gpt = replace(GPT_PRESETS[preset], **overrides)
    if arch == "gpt":
        return gpt if bias is None else replace(gpt, bias=bias)
    return LlamaConfig.from_gpt(gpt)


def build_model(config, seed=0, device="cpu", init=True):
    """A new model of `config`'s family (GPT for a GPTConfig, Llama for a LlamaConfig). init=False
    leaves a Llama's weights unset (np.empty), for a model about to be loaded."""
    if isinstance(config, LlamaConfig):
        return Llama(config, seed=seed, device=device, init=init)
    return GPT(config, seed=seed, device=device)


__all__ = ["LlamaConfig", "Llama", "PRESETS", "preset_config", "build_model", "config_from_hf", "is_llama_config",
           "load_llama_tensors", "model_type_of"]
