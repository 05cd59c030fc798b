"""The GPT-2 model: configuration, blocks, the full forward, KV-cached inference, HF folders.

Reading order: GPTConfig -> CausalSelfAttention -> MLP -> Block -> GPT.forward. Parameter names
are GPT-2's own (`transformer.h.0.attn.c_attn.weight`, weights stored (in, out) as GPT-2's
Conv1D), so `model.save_pretrained(dir)` writes a folder that Hugging Face transformers loads as a
`GPT2LMHeadModel`, and `GPT.from_pretrained(dir)` reads one that transformers wrote. A quantised
folder is refused here: `npgpt.from_pretrained(dir)` (npgpt/loading.py) is the one loader that decides.
`GPTConfig.num_params` is the one parameter count. Cached inference is one `forward_cached` per
class (attention, block), so `GPT.forward_cached` is a loop like `GPT.forward`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from npgpt.backend import asnumpy, check_fits, get_xp, to_device
from npgpt.errors import NpgptError
from npgpt.fileio import atomic_write_json, make_dir
from npgpt.nn import Embedding, LayerNorm, Linear, Module, ModuleList, RMSNorm
from npgpt.ops.llama import gqa_attention, rope, rope_inv_freq, rope_tables
from npgpt.ops.nn import (REFERENCE_OPS, attention_probs, causal_self_attention, check_ops, cross_entropy,
                          dropout, gelu, linear, reference_ops, relu2, softcap, split_heads)
from npgpt.safeio import (FLOAT_DTYPES, Bool, Float, Int, Obj, Str, check, check_finite_tensors, check_value,
                          load_safetensors, read_json_object, read_safetensors_header, write_safetensors)
from npgpt.tensor import Tensor, no_grad


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024        # the longest context (GPT-2's n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True             # biases in Linear and LayerNorm layers (GPT-2 has them)
    n_inner: int | None = None    # MLP hidden width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    # Recipe switches (the modded-nanogpt speedrun's changes); every default is GPT-2's own.
    pos: str = "learned"          # positions: GPT-2's learned table wpe, or "rope" (rotary q and k, no table)
    qk_norm: bool = False         # RMSNorm (learned gain per head channel) on queries and keys
    mlp_act: str = "gelu"         # GPT-2's tanh GELU, or "relu2" (ReLU squared)
    zero_init_proj: bool = False  # attn.c_proj and mlp.c_proj (and an untied head) start at zero
    untie_head: bool = False      # a separate lm_head.weight (V, C) instead of wte's transpose
    logit_softcap: float = 0.0    # > 0: logits = cap * tanh(logits / cap); 0: off
    rope_theta: float = 10000.0   # with pos=rope: the base of the rotation speeds

    def __post_init__(self):
        # every field checked by type and range: a config may come from a stranger's config.json
        for name, spec in _CONFIG_SPECS.items():
            setattr(self, name, check_value(getattr(self, name), spec, f"model config: {name}"))
        if self.n_embd % self.n_head:
            raise NpgptError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise NpgptError(f"model config: pos=rope needs an even head size, n_embd / n_head is "
                             f"{self.n_embd // self.n_head}")

    def switches(self) -> dict:
        """The recipe switches set away from GPT-2's defaults, {name: value} ({} for a GPT-2 model)."""
        return {k: getattr(self, k) for k, v in RECIPE_DEFAULTS.items() if getattr(self, k) != v}

    def check_exportable(self, target: str) -> None:
        """NpgptError unless `target` ("transformers" or "GGUF") can hold this model: a model with
        recipe switches GPT-2 cannot represent stays an npgpt folder (save_pretrained writes one)."""
        allowed = ("zero_init_proj", "untie_head") if target == "transformers" else ("zero_init_proj",)
        bad = {k: v for k, v in self.switches().items() if k not in allowed}
        if bad:
            names = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise NpgptError(f"cannot export to {target}: this model uses npgpt's recipe switches ({names}), which "
                             f"GPT-2 cannot represent; it stays an npgpt folder (load it with npgpt)")

    def gpt2_incompatible(self) -> dict:
        """The switches a GPT-2 checkpoint cannot represent (zero_init_proj only changes the start,
        and an untied head is GPT-2's tie_word_embeddings=false); {} when transformers can load it."""
        return {k: v for k, v in self.switches().items() if k not in ("zero_init_proj", "untie_head")}

    arch = "gpt"
    blocks_name = "transformer.h"        # where the family keeps its blocks, and its token embedding
    embedding_name = "transformer.wte"

    @property
    def hidden(self):
        return self.n_inner or 4 * self.n_embd

    @property
    def n_kv_head(self):
        """Key/value heads (the KV cache's); GPT-2 has one per query head."""
        return self.n_head

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    def num_params(self, non_embedding=False):
        """The model's parameter count, from the config alone (the one count: GPT.num_params, `npgpt
        info` and compress use it). Weights, plus biases when `bias`; the LM head is tied to wte.
        non_embedding=True leaves out the position embeddings (as nanoGPT)."""
        C, H, b = self.n_embd, self.hidden, int(self.bias)
        ln = C + b * C                                           # scale (+ shift)
        attn = C * 3 * C + b * 3 * C + C * C + b * C             # c_attn, c_proj
        attn += 2 * (C // self.n_head) if self.qk_norm else 0    # q_norm, k_norm gains
        mlp = C * H + b * H + H * C + b * C                      # c_fc, c_proj
        wpe = self.block_size * C if self.pos == "learned" else 0
        head = self.vocab_size * C if self.untie_head else 0
        n = self.vocab_size * C + wpe + head + self.n_layer * (2 * ln + attn + mlp) + ln
        return n - wpe if non_embedding else n

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise NpgptError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    # ---- Hugging Face config.json ------------------------------------------------------------
    def to_hf(self):
        """config.json: GPT-2's (transformers loads it), or npgpt's own when a switch is one GPT-2
        cannot represent (model_type "npgpt_gpt": transformers refuses it, npgpt reads it)."""
        npgpt_only = self.gpt2_incompatible()
        return {
            "model_type": "npgpt_gpt" if npgpt_only else "gpt2",
            "architectures": ["NpgptGPTForCausalLM" if npgpt_only else "GPT2LMHeadModel"],
            "vocab_size": self.vocab_size, "n_positions": self.block_size, "n_ctx": self.block_size,
            "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head, "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon, "activation_function": "gelu_new",
            "resid_pdrop": self.dropout, "embd_pdrop": self.dropout, "attn_pdrop": self.dropout,
            "initializer_range": 0.02, "tie_word_embeddings": not self.untie_head, "torch_dtype": "float32",
            "npgpt": {"bias": self.bias, **({"recipe": self.switches()} if self.switches() else {}),
                      **({"rope_theta": self.rope_theta} if self.pos == "rope" else {})},
        }

    @classmethod
    def from_hf(cls, cfg: dict, where="config.json"):
        """A GPTConfig from a config.json dict; NpgptError naming the field when a value is wrong."""
        model_type = cfg.get("model_type", "gpt2")
        if model_type not in ("gpt2", "npgpt_gpt"):
            raise NpgptError(f"{where}: unsupported model_type {model_type!r}; npgpt loads GPT-2 models only")
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise NpgptError(f"{where}: unsupported activation_function {act!r}; npgpt implements GPT-2's gelu_new")
        if "n_positions" not in cfg and "n_ctx" in cfg:
            cfg = {**cfg, "n_positions": cfg["n_ctx"]}
        size = Int(lo=1)
        f = check(cfg, {"vocab_size": size, "n_positions": size, "n_layer": size, "n_head": size, "n_embd": size,
                        "n_inner": Int(lo=1, default=None, none_ok=True),
                        "resid_pdrop": Float(0, 1, default=0.0, hi_open=True),
                        "layer_norm_epsilon": Float(0, default=1e-5, lo_open=True),
                        "tie_word_embeddings": Bool(default=True),
                        "npgpt": Obj({"bias": Bool(default=True), "recipe": Obj(default={}),
                                      "rope_theta": Float(0, default=10000.0, lo_open=True)},
                                     default={"bias": True, "recipe": {}, "rope_theta": 10000.0})}, where)
        recipe = f["npgpt"]["recipe"]
        unknown = sorted(set(recipe) - set(RECIPE_DEFAULTS))
        if unknown:
            raise NpgptError(f"{where}: field 'npgpt.recipe' has unknown switch {unknown[0]!r}; known: "
                             f"{', '.join(RECIPE_DEFAULTS)}")
        config = cls(vocab_size=f["vocab_size"], block_size=f["n_positions"], n_layer=f["n_layer"],
                     n_head=f["n_head"], n_embd=f["n_embd"], dropout=f["resid_pdrop"], bias=f["npgpt"]["bias"],
                     n_inner=f["n_inner"], layer_norm_epsilon=f["layer_norm_epsilon"],
                     untie_head=not f["tie_word_embeddings"], rope_theta=f["npgpt"]["rope_theta"],
                     **{k: v for k, v in recipe.items() if k != "untie_head"})
        if (model_type == "gpt2") != (not config.gpt2_incompatible()):
            raise NpgptError(f"{where}: model_type {model_type!r} does not match the recipe switches "
                             f"{config.gpt2_incompatible() or 'none'}; the file is damaged")
        return config

    def param_shapes(self) -> dict[str, tuple]:
        """{parameter name: shape} of the GPT this config builds, without building it (nothing allocated)."""
        V, T, C, H = self.vocab_size, self.block_size, self.n_embd, self.hidden
        shapes = {"transformer.wte.weight": (V, C)}
        if self.pos == "learned":
            shapes["transformer.wpe.weight"] = (T, C)
        for i in range(self.n_layer):
            b = f"transformer.h.{i}."
            for name, (n_in, n_out) in (("attn.c_attn", (C, 3 * C)), ("attn.c_proj", (C, C)),
                                        ("mlp.c_fc", (C, H)), ("mlp.c_proj", (H, C))):
                shapes[f"{b}{name}.weight"] = (n_in, n_out)
                if self.bias:
                    shapes[f"{b}{name}.bias"] = (n_out,)
            if self.qk_norm:
                shapes[f"{b}attn.q_norm.weight"] = shapes[f"{b}attn.k_norm.weight"] = (C // self.n_head,)
            for ln in ("ln_1", "ln_2"):
                shapes[f"{b}{ln}.weight"] = (C,)
                if self.bias:
                    shapes[f"{b}{ln}.bias"] = (C,)
        shapes["transformer.ln_f.weight"] = (C,)
        if self.bias:
            shapes["transformer.ln_f.bias"] = (C,)
        if self.untie_head:
            shapes["lm_head.weight"] = (V, C)
        return shapes


_CONFIG_SPECS = {"vocab_size": Int(lo=1), "block_size": Int(lo=1), "n_layer": Int(lo=1), "n_head": Int(lo=1),
                 "n_embd": Int(lo=1), "dropout": Float(0, 1, hi_open=True), "bias": Bool(),
                 "n_inner": Int(lo=1, none_ok=True), "layer_norm_epsilon": Float(0, lo_open=True),
                 "pos": Str(("learned", "rope")), "qk_norm": Bool(), "mlp_act": Str(("gelu", "relu2")),
                 "zero_init_proj": Bool(), "untie_head": Bool(), "logit_softcap": Float(0, 1e4),
                 "rope_theta": Float(0, lo_open=True)}
RECIPE_DEFAULTS = {"pos": "learned", "qk_norm": False, "mlp_act": "gelu", "zero_init_proj": False,
                   "untie_head": False, "logit_softcap": 0.0}
# The modern recipe (modded-nanogpt / nanochat): every switch on. Soft-cap 15 as modded-nanogpt's.
MODERN = dict(pos="rope", qk_norm=True, mlp_act="relu2", zero_init_proj=True, untie_head=True, logit_softcap=15.0)


PRESETS = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    "baby": GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
    "shakespeare-char": GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    # the same shapes with the modern recipe's switches (train presets add Muon: npgpt.train.TRAIN_PRESETS)
    "modern-baby": GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False, **MODERN),
    "modern-shakespeare": GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2,
                                    bias=False, **MODERN),
}


# ---- the blocks --------------------------------------------------------------------------------
class CausalSelfAttention(Module):
    """Multi-head causal self-attention. GPT-2's: one fused op on c_attn's output. With the recipe's
    qk_norm (RMSNorm on each head's q and k) or pos=rope (q and k rotated by their position), q, k
    and v are split first and attention runs as npgpt.ops.llama's (nkv = nh: plain multi-head)."""

    def __init__(self, cfg, rng, resid_std):
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias, rng=rng)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias, rng=rng, std=resid_std)
        hs = cfg.n_embd // cfg.n_head
        self.q_norm = RMSNorm(hs, eps=cfg.layer_norm_epsilon) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hs, eps=cfg.layer_norm_epsilon) if cfg.qk_norm else None
        self.rope = cfg.pos == "rope"
        self.rng = rng

    def forward(self, x, rope_cs=None):                          # (B, T, C) -> (B, T, C)
        p = self.dropout if self.training else 0.0
        if self.q_norm is None and not self.rope:
            y = causal_self_attention(self.c_attn(x), self.n_head, dropout=p, rng=self.rng)
        else:
            B, T, C = x.shape
            qkv = self.c_attn(x).reshape(B, T, 3, self.n_head, C // self.n_head)   # (B, T, 3, nh, hs)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                     # (B, T, nh, hs)
            q, k = self._position_and_norm(q, k, rope_cs)
            y = gqa_attention(q, k, v, dropout=p, rng=self.rng)                   # (B, T, C)
        return dropout(self.c_proj(y), p, self.rng, self.training)

    def _position_and_norm(self, q, k, rope_cs):
        """QK-norm, then the rotation (q, k: (B, T, nh, hs) Tensors; rope_cs: (cos, sin) tables)."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = rope(q, *rope_cs), rope(k, *rope_cs)
        return q, k

    def forward_cached(self, x, k_cache, v_cache, p0, key_mask=None, rope_cs=None):
        """Inference on plain arrays: new positions x (B, Tn, C) attend to the cached keys/values.

        k_cache, v_cache: this layer's (B, nh, block_size, hs) buffers; the new keys and values are
        written at p0:p0+Tn. rope_cs: with pos=rope, the (cos, sin) tables of the new positions.
        Returns (y (B, Tn, C), attention probabilities (B, nh, Tn, Tk))."""
        B, Tn, C = x.shape
        q, k, v = split_heads(self.c_attn(Tensor(x)).data, self.n_head)   # (B, nh, Tn, hs)
        if self.q_norm is not None or self.rope:
            q, k = self._position_and_norm(Tensor(q.transpose(0, 2, 1, 3)), Tensor(k.transpose(0, 2, 1, 3)), rope_cs)
            q, k = q.data.transpose(0, 2, 1, 3), k.data.transpose(0, 2, 1, 3)   # (B, nh, Tn, hs)
        k_cache[:, :, p0:p0 + Tn] = k
        v_cache[:, :, p0:p0 + Tn] = v
        att = attention_probs(q, k_cache[:, :, :p0 + Tn], key_mask)       # (B, nh, Tn, Tk)
        y = att @ v_cache[:, :, :p0 + Tn]                                 # (B, nh, Tn, hs)
        y = y.transpose(0, 2, 1, 3).reshape(B, Tn, C)
        return self.c_proj(Tensor(y)).data, att


class MLP(Module):
    def __init__(self, cfg, rng, resid_std):
        self.dropout = cfg.dropout
        self.c_fc = Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias, rng=rng)
        self.c_proj = Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias, rng=rng, std=resid_std)
        self.act = relu2 if cfg.mlp_act == "relu2" else gelu
        self.rng = rng

    def forward(self, x):                                        # (B, T, C) -> (B, T, C)
        return dropout(self.c_proj(self.act(self.c_fc(x))), self.dropout, self.rng, self.training)


class Block(Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg, rng, resid_std):
        eps = cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias, eps=eps)
        self.attn = CausalSelfAttention(cfg, rng, resid_std)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias, eps=eps)
        self.mlp = MLP(cfg, rng, resid_std)

    def forward(self, x, rope_cs=None):
        x = x + self.attn(self.ln_1(x), rope_cs)
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x, k_cache, v_cache, p0, key_mask=None, rope_cs=None):
        """forward on plain arrays with this layer's KV cache (see CausalSelfAttention.forward_cached)."""
        y, att = self.attn.forward_cached(self.ln_1(Tensor(x)).data, k_cache, v_cache, p0, key_mask, rope_cs)
        x = x + y
        return x + self.mlp(self.ln_2(Tensor(x))).data, att


class Transformer(Module):
    def __init__(self, cfg, rng):
        # GPT-2 init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 n_layer)
        # (zero_init_proj: those projections start at zero, each block starting as the identity)
        resid_std = 0.0 if cfg.zero_init_proj else 0.02 / math.sqrt(2 * cfg.n_layer)
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd, rng=rng)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd, rng=rng) if cfg.pos == "learned" else None
        self.h = ModuleList(Block(cfg, rng, resid_std) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, bias=cfg.bias, eps=cfg.layer_norm_epsilon)


# ---- the model ---------------------------------------------------------------------------------
class CausalLM(Module):
    """What every model family shares: token-id checks at the boundary and the language-model loss.

    A family (GPT here, npgpt.llama.Llama) sets `config` and `rng`, names its token embedding
    (`input_embedding`), and offers forward(idx, targets) -> (logits, loss), forward_cached,
    new_cache, num_params, flops_per_token, resize_token_embeddings, save_pretrained and
    from_pretrained, so the trainer, generate, serve and the tools take either."""

    # What quantising or adapting a model records on it (declared, so every reader finds them set):
    quantization: dict | None = None     # {"bits", "group_size", "embedding"} (npgpt.quant, npgpt.loading)
    lora = None                          # the LoRAConfig of its adapters (npgpt.lora.apply_lora); None: none
    lora_base: str | None = None         # the base folder a LoRA model was trained from (adapter_config.json)
    lora_base_fingerprint: str | None = None   # npgpt.lora.base_fingerprint of that base (checked on load)

    lm_head = None  # an untied LM head (a module with a (V, C) weight); None: tied to the input embedding
    ops = "fused"   # "reference": forward runs on the composed reference ops (npgpt.reference)

    def __call__(self, *args, **kwargs):
        if self.ops == "reference" and not REFERENCE_OPS.get():
            with reference_ops():
                return super().__call__(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    @property
    def input_embedding(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def resize_token_embeddings(self, vocab_size):
        """Grow the token embedding (config.embedding_name) to vocab_size rows; new tokens start at the
        mean row, so they begin as an 'average' token instead of noise. A tied LM head grows with the
        embedding, an untied one (lm_head) the same way."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise NpgptError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
        emb = functools.reduce(getattr, self.config.embedding_name.split("."), self)
        if not isinstance(emb, Embedding):
            raise NpgptError("this model's embedding is kept quantised; load it without --keep-quantized to grow "
                             "its vocabulary")
        for p in [emb.weight] + ([self.lm_head.weight] if self.lm_head is not None else []):
            xp = get_xp(p.data)
            extra = xp.broadcast_to(p.data.mean(axis=0, keepdims=True), (vocab_size - old, p.shape[1]))
            p.data = xp.concatenate([p.data, extra]).astype(p.dtype)
            p.grad = None
        self.config = replace(self.config, vocab_size=vocab_size)
        return self

    @property
    def anchor(self):
        """A float parameter every model of the family has, on the model's device in its dtype: what
        device, dtype and array module are read from (the embedding, unless it is kept quantised)."""
        return self.input_embedding

    @property
    def device(self):
        return self.anchor.device

    def lm_loss(self, logits, targets, ignore_index=-1):
        """Mean cross-entropy of logits (B, T, V) against targets (B, T) (None: no loss)."""
        if targets is None:
            return None
        targets = self._as_device_ints(targets)
        if targets.shape != logits.shape[:2]:
            raise NpgptError(f"targets shape {targets.shape} must equal idx shape {logits.shape[:2]}")
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= self.config.vocab_size))
        if bad.any():                 # a negative id would wrap around and index from the end
            raise NpgptError(f"target id {int(targets[bad].ravel()[0])} is out of range for vocab_size "
                             f"{self.config.vocab_size} (only {ignore_index} marks a position to ignore)")
        return cross_entropy(logits, targets, ignore_index=ignore_index)

    def _as_device_ints(self, a):
        a = a.data if isinstance(a, Tensor) else a
        xp = get_xp(self.anchor.data)
        if get_xp(a) is not xp:
            a = to_device(np.asarray(a), self.device)
        return xp.asarray(a)

    def _check_ids(self, idx):
        """Validate token ids at the boundary: CuPy would silently wrap an out-of-range id."""
        idx = self._as_device_ints(idx)
        if idx.ndim != 2:
            raise NpgptError(f"idx must have shape (B, T), got {idx.shape}")
        if idx.dtype.kind not in "iu":
            raise NpgptError(f"token ids must be integers, got dtype {idx.dtype}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise NpgptError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if idx.size:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise NpgptError(f"token id {bad} is out of range for vocab_size {self.config.vocab_size}")
        return idx


class GPT(CausalLM):
    """GPT-2: token + position embeddings, n_layer pre-LN blocks, final LN, tied LM head.

    The recipe switches of GPTConfig change four places: positions (wpe, or rotary q/k in each
    attention), attention (qk_norm), the MLP's activation, and the head (untied lm_head.weight,
    soft-capped logits); zero_init_proj changes only the starting weights."""

    def __init__(self, config: GPTConfig, seed: int = 0, device="cpu", ops="fused"):
        n = config.num_params()                  # weights are drawn in float32 on the host, whatever the device
        check_fits(4 * n, f"a model of {n:,} parameters", "cpu", "use a smaller model (n_layer, n_embd, vocab_size)")
        self.config = config
        self.ops = check_ops(ops)
        self.rng = np.random.default_rng(seed)   # weights drawn on the host: CPU and GPU runs start equal
        self.transformer = Transformer(config, self.rng)
        self.lm_head = None
        if config.untie_head:                     # (V, C) like wte, so the head is linear(x, lm_head.T)
            std = 0.0 if config.zero_init_proj else 0.02
            self.lm_head = Embedding(config.vocab_size, config.n_embd, rng=self.rng, std=std)
        self._inv_freq = rope_inv_freq(config.head_size, config.rope_theta) if config.pos == "rope" else None
        if str(device) != "cpu":
            self.to(device)

    # ---- training forward -------------------------------------------------------------------
    def forward(self, idx, targets=None, ignore_index=-1):
        """idx: (B, T) int token ids -> (logits (B, T, V) Tensor, loss Tensor or None)."""
        idx = self._check_ids(idx)
        tr = self.transformer
        x, rope_cs = self.embed(idx)                                 # (B, T, C)
        x = dropout(x, self.config.dropout, self.rng, self.training)
        for block in tr.h:
            x = block(x, rope_cs)
        logits = self.head(tr.ln_f(x))                               # (B, T, V)
        return logits, self.lm_loss(logits, targets, ignore_index)

    def embed(self, idx):
        """Token ids (B, T) -> (the residual stream's start (B, T, C) Tensor, rope tables or None):
        wte plus wpe (GPT-2), or wte alone and the (cos, sin) tables the blocks rotate q, k by."""
        T = idx.shape[1]
        tr = self.transformer
        x = tr.wte(idx)
        if tr.wpe is not None:
            return x + tr.wpe.weight[:T], None
        return x, self._rope_tables(get_xp(x.data).arange(T))          # (T, hs/2) each

    def head(self, x):
        """Final hidden states (B, T, C) Tensor -> logits (B, T, V): tied (wte^T) or lm_head, then the soft-cap."""
        w = self.lm_head.weight if self.lm_head is not None else self.transformer.wte.weight
        logits = linear(x, w.T)
        return softcap(logits, self.config.logit_softcap) if self.config.logit_softcap > 0 else logits

    def _rope_tables(self, positions):
        """(cos, sin) of the rotation at `positions` (int array (T,) or (B, T)) in the weights' dtype."""
        return rope_tables(positions, self._inv_freq, dtype=self.transformer.wte.weight.dtype)

    @property
    def input_embedding(self):
        return self.transformer.wte.weight

    def hidden_states(self, idx):
        """The residual stream after the embeddings and after each block, [(B, T, C) Tensor] * (n_layer + 1),
        for interpretability (npgpt.inspect's logit lens reads each through `final_logits`)."""
        idx = self._check_ids(idx)
        x, rope_cs = self.embed(idx)
        out = [x]
        for block in self.transformer.h:
            out.append(block(out[-1], rope_cs))
        return out

    def final_logits(self, x):
        """Logits of residual-stream states x (..., C): the final LayerNorm, then the head (self.head)."""
        return self.head(self.transformer.ln_f(x))

    # ---- sizes ---------------------------------------------------------------------------------
    def num_params(self, non_embedding=False):
        """Parameter count (GPTConfig.num_params); non_embedding=True leaves out the position embeddings."""
        return self.config.num_params(non_embedding)

    def flops_per_token(self, T=None):
        """Training FLOPs per token (forward + backward), the PaLM-paper estimate (appendix B):
        6 N + 12 n_layer n_embd T, where N is the non-embedding parameter count and the second term
        counts the attention score and value matmuls over a context of T."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    # ---- cached inference ----------------------------------------------------------------------
    def new_cache(self, batch_size):
        return KVCache(self.config, batch_size, self.transformer.wte.weight.data)

    @no_grad()
    def forward_cached(self, idx, cache, return_attention=False):
        """Run new tokens idx (B, Tn) through the model, reading and extending `cache`.

        Returns logits (B, Tn, V) as a plain array (and per-layer attention (B, nh, Tn, Tk) arrays
        when asked). A prefill is the first call; each decode step then passes one token. The
        caller keeps within block_size (see `generate`, which rebuilds the cache past it).
        """
        idx = self._check_ids(idx)
        B, Tn = idx.shape
        p0 = cache.length
        if p0 + Tn > self.config.block_size:
            raise NpgptError(f"KV cache overflow: {p0} cached + {Tn} new tokens > block_size "
                             f"{self.config.block_size}; rebuild the cache from the last tokens")
        xp = get_xp(cache.k)
        tr = self.transformer
        pos = xp.arange(p0, p0 + Tn)[None, :] - cache.pad[:, None]          # (B, Tn) position ids
        pos = xp.maximum(pos, 0)
        x = tr.wte.weight.data[idx]                                        # (B, Tn, C)
        rope_cs = None
        if tr.wpe is not None:
            x = x + tr.wpe.weight.data[pos]
        else:
            rope_cs = self._rope_tables(pos)                               # (B, Tn, hs/2) each
        key_mask = None
        if cache.padded:
            key_mask = xp.arange(p0 + Tn)[None, :] >= cache.pad[:, None]  # (B, Tk) real tokens
        maps = []
        for i, block in enumerate(tr.h):
            x, att = block.forward_cached(x, cache.k[i], cache.v[i], p0, key_mask, rope_cs)
            if return_attention:
                maps.append(att)
        cache.length = p0 + Tn
        logits = self.head(tr.ln_f(Tensor(x))).data                       # (B, Tn, V)
        return (logits, maps) if return_attention else logits

    # ---- Hugging Face folders ------------------------------------------------------------------
    def save_pretrained(self, path):
        """Write config.json + model.safetensors (GPT-2 names and layout) into folder `path`."""
        path = Path(path)
        make_dir(path)
        tensors = {name: np.ascontiguousarray(asnumpy(p.data)) for name, p in self.named_parameters()}
        write_safetensors(path / "model.safetensors", tensors, metadata={"format": "pt"})
        atomic_write_json(path / "config.json", self.config.to_hf())

    @classmethod
    def from_pretrained(cls, path, device="cpu", **overrides):
        """Load a folder written by save_pretrained or by transformers' GPT2LMHeadModel.

        config.json is checked against model.safetensors' header (names, shapes) before anything is
        allocated; float16 and bfloat16 weights are upcast to float32; NaN or infinite weights are an
        error. The model comes back in eval mode (dropout off), as transformers does; call .train()."""
        path = Path(path)
        if not path.is_dir():
            raise NpgptError(f"model folder {path} does not exist")
        hf = read_hf_config(path)
        cfg_path = path / "config.json"
        if records_quantization(hf):
            raise NpgptError(f"{path} holds a quantised model; load it with npgpt.from_pretrained")
        config = GPTConfig.from_hf(hf, str(cfg_path))
        state = load_gpt2_tensors(path, config)
        model = cls(replace(config, **overrides), device="cpu")
        model.load_state_dict(state)
        model.eval()
        return model.to(device) if str(device) != "cpu" else model


def records_quantization(hf: dict) -> bool:
    """True when a config.json dict records a quantised folder (loaded by npgpt.loading.load_quantized)."""
    section = hf.get("npgpt") or {}
    if not isinstance(section, dict):
        raise NpgptError(f"config.json: field 'npgpt' must be an object {{...}}, got {type(section).__name__}")
    return bool(section.get("quantization"))


def read_hf_config(folder) -> dict:
    """A model folder's config.json as a dict (npgpt.safeio's limits), or a clear NpgptError."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise NpgptError(f"{cfg_path} is missing: a model folder needs config.json and model.safetensors")
    return read_json_object(cfg_path, "model config")


IGNORED_HF_KEYS = (".attn.bias", ".attn.masked_bias")    # causal-mask buffers of old transformers


def weights_header(path):
    """The checked safetensors header of a folder's model.safetensors (NpgptError when absent or corrupt)."""
    f = Path(path) / "model.safetensors"
    if not f.is_file():
        extra = " (PyTorch .bin files are pickles and are not read: re-save with safe_serialization=True)" \
            if (Path(path) / "pytorch_model.bin").exists() else ""
        raise NpgptError(f"{f} is missing{extra}")
    return read_safetensors_header(f)


def _npgpt_name(key):
    return key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"


def check_config_matches(config: GPTConfig, shapes: dict, where, f, expected=None) -> None:
    """NpgptError unless the tensors `shapes` ({npgpt name: shape}, from a header) are the ones `config`
    builds (`expected`, default config.param_shapes()). The sizes that decide allocations are compared
    first, naming the config.json field, so a wrong n_layer never builds a million-entry table
    (`expected` may be a function, called only after those checks)."""
    layers = {k.split(".")[2] for k in shapes if k.startswith("transformer.h.")}
    if config.n_layer != len(layers):
        raise NpgptError(f"{where}: n_layer is {config.n_layer} but {f} holds {len(layers)} layers; the "
                         f"folder does not match its config.json")
    probes = [("vocab_size", "transformer.wte", 0, 1), ("n_embd", "transformer.wte", 1, None),
              ("n_positions", "transformer.wpe", 0, None), ("n_inner", "transformer.h.0.mlp.c_fc", 1, 1)]
    values = {"vocab_size": config.vocab_size, "n_embd": config.n_embd, "n_positions": config.block_size,
              "n_inner": config.hidden}
    for field_name, stem, axis, q_axis in probes:
        for key, ax in ((f"{stem}.weight", axis), (f"{stem}.qweight", q_axis)):
            shape = shapes.get(key)
            if shape is not None and ax is not None and len(shape) == 2 and shape[ax] != values[field_name]:
                raise NpgptError(f"{where}: {field_name} is {values[field_name]} but {f} holds {key} of shape "
                                 f"{tuple(shape)}; the folder does not match its config.json")
    expected = config.param_shapes() if expected is None else expected() if callable(expected) else expected
    missing = [k for k in expected if k not in shapes]
    extra = [k for k in shapes if k not in expected]
    wrong = [f"{k} {tuple(shapes[k])} (expected {tuple(v)})" for k, v in expected.items()
             if k in shapes and tuple(shapes[k]) != tuple(v)]
    problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(extra[:3])}"] if extra else []) + (wrong[:3])
    if problems:
        raise NpgptError(f"{f}: {'; '.join(problems)}; the folder does not match its config.json")


def load_gpt2_tensors(path, config: GPTConfig | None = None):
    """model.safetensors of a GPT-2 folder as {npgpt name: float32 array}, keys normalised.

    With `config`, the header is checked against it before any tensor is read (check_config_matches)."""
    header = weights_header(path)
    f = header.path
    keys = {}
    for key, info in header.tensors.items():
        if key.endswith(IGNORED_HF_KEYS):
            continue
        if info.dtype not in FLOAT_DTYPES:
            raise NpgptError(f"{f}: tensor {key} has dtype {info.dtype}; expected floating point weights")
        keys[_npgpt_name(key)] = key
    shapes = {name: header.tensors[key].shape for name, key in keys.items()}
    untied = config is not None and config.untie_head       # lm_head.weight is a parameter of its own
    head = None if untied else shapes.pop("lm_head.weight", None)
    if head is not None and head != shapes.get("transformer.wte.weight"):
        raise NpgptError(f"{f}: lm_head.weight differs from transformer.wte.weight; npgpt ties them as GPT-2 does")
    if config is not None:
        check_config_matches(config, shapes, Path(path) / "config.json", f)
    raw = load_safetensors(f, header, names=set(keys.values()))
    state = {name: raw.pop(key).astype(np.float32, copy=False) for name, key in keys.items()}
    check_finite_tensors(state, f)
    head = None if untied else state.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, state.get("transformer.wte.weight")):
        raise NpgptError(f"{f}: lm_head.weight differs from transformer.wte.weight; npgpt ties them as GPT-2 does")
    return state


@dataclass
class KVCache:
    """Per-layer keys and values for cached decoding.

    k, v: (n_layer, B, nkv, block_size, hs), filled up to `length` (nkv: the config's key/value
    heads, n_head for GPT-2, fewer under grouped-query attention). `pad` (B,) counts left-padding
    tokens per row (batched prompts of different lengths): padded keys are masked out and
    positions count from each row's first real token.
    """
    config: GPTConfig
    batch_size: int
    like: object = field(repr=False)
    length: int = 0

    def __post_init__(self):
        xp = get_xp(self.like)
        c = self.config
        shape = (c.n_layer, self.batch_size, c.n_kv_head, c.block_size, c.head_size)
        self.k = xp.zeros(shape, dtype=self.like.dtype)
        self.v = xp.zeros(shape, dtype=self.like.dtype)
        self.pad = xp.zeros(self.batch_size, dtype=np.int64)
        self.like = None

    @property
    def padded(self):
        return bool((self.pad > 0).any())

    def reset(self, pad=None):
        self.length = 0
        xp = get_xp(self.k)
        self.pad = xp.zeros(self.batch_size, dtype=np.int64) if pad is None else xp.asarray(pad, dtype=np.int64)


