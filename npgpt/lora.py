"""LoRA: low-rank adapters on a frozen GPT-2 or Llama, stored the way Hugging Face PEFT stores them.

A targeted linear layer y = x W + b (W: (in, out), GPT-2's Conv1D layout) becomes

    y = x W + b + s * dropout(x) A B        A: (in, r) random, B: (r, out) zeros, s = alpha / r

(Hu et al. 2021, "LoRA"). B starts at zero, so at step 0 the adapted model computes exactly what
the base does; only A and B train, the base weights get no gradient and no optimizer state. A is
drawn as PEFT draws it, kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)). Merging
folds the update into the weight, W' = W + s A B, and leaves a plain model of the base's family.

The layer itself, `LoRALinear`, lives on the layer floor (npgpt/layers.py); this module applies,
merges, saves and reads a model's adapters. The base may be an npgpt int8/int4 `QuantizedLinear`:
it stays quantised in memory and `npgpt.layers.QuantBaseLinear` dequantises one layer's weight in the forward and again in the
backward, so the graph never holds a float copy of every layer (the QLoRA recipe, with npgpt's
own quantisation).

PEFT's folder (`adapter_config.json` + `adapter_model.safetensors`). PEFT wraps GPT-2's Conv1D with
`fan_in_fan_out: true` and stores its adapters as torch Linear weights, (out_features, in_features):

    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight    (r, in)   = our A transposed
    base_model.model.transformer.h.0.attn.c_attn.lora_B.weight    (out, r)  = our B transposed

and its delta weight is (B_peft A_peft)^T = A B in the (in, out) layout. A Llama's layers are torch
Linear layers in PEFT (`fan_in_fan_out: false`), keyed `base_model.model.model.layers.0.self_attn.q_proj.
lora_A.weight`, and stored the same way: lora_A (r, in), lora_B (out, r). `target_modules` is a
list of module-name suffixes (`c_proj` matches attn.c_proj and mlp.c_proj; `mlp.c_proj` only the
MLP's) or one regular expression matched against the whole module name, as in PEFT.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npgpt.backend import asnumpy, get_xp, to_device
from npgpt.checkpoint import is_model_dir, save_tensors
from npgpt.errors import NpgptError
from npgpt.fileio import atomic_write_json
from npgpt.layers import LoRALinear, QuantizedLinear, float_linear, linear_layers
from npgpt.safeio import load_safetensors, read_json_object

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")        # every linear layer of a GPT-2 block
# every linear layer of a Llama block, by PEFT's names for them
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILY_TARGETS = {"gpt": DEFAULT_TARGETS, "llama": LLAMA_TARGETS}
_KEY = re.compile(r"^(transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                  r"|model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj))\.lora_([AB])\.weight$")


# ---- the settings ------------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    """r, alpha, dropout and targets of an adapter (PEFT's LoraConfig fields that npgpt uses)."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple | str = DEFAULT_TARGETS   # suffixes, or one regular expression (a str)
    use_rslora: bool = False                 # s = alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r
    rank_pattern: dict | None = None         # per-module r / alpha overrides, PEFT's patterns
    alpha_pattern: dict | None = None
    fan_in_fan_out: bool = True              # PEFT's flag: True for GPT-2's Conv1D, False for Llama's Linear

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise NpgptError(f"--lora-rank must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise NpgptError(f"--lora-alpha must be positive, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise NpgptError(f"--lora-dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            try:
                re.compile(self.targets)
            except re.error as e:
                raise NpgptError(f"lora target pattern {self.targets!r} is not a valid regular expression ({e})") from None
        else:
            self.targets = tuple(self.targets)
            if not self.targets or not all(isinstance(t, str) and t.strip() for t in self.targets):
                raise NpgptError("--lora-targets needs at least one module name, e.g. c_attn,c_proj,c_fc")

    def rank_for(self, name):
        return int(_pattern_value(self.rank_pattern, name, self.r))

    def scaling_for(self, name):
        r, alpha = self.rank_for(name), float(_pattern_value(self.alpha_pattern, name, self.alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def matches(self, name):
        """Whether module `name` (e.g. transformer.h.0.attn.c_attn) is a target, by PEFT's rule."""
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.targets)

    @classmethod
    def from_targets_option(cls, r, alpha=None, dropout=0.0, targets=None, arch="gpt"):
        """From CLI options: alpha defaults to 2 r; targets is 'c_attn,c_proj,...' (GPT-2) or
        'q_proj,k_proj,...' (Llama), or None for every linear layer of the `arch` family's blocks."""
        names = FAMILY_TARGETS[arch] if not targets else tuple(t.strip() for t in targets.split(",") if t.strip())
        return cls(r=r, alpha=float(2 * r if alpha is None else alpha), dropout=float(dropout), targets=names,
                   fan_in_fan_out=arch == "gpt")

    # ---- PEFT's adapter_config.json -----------------------------------------------------------
    def to_peft(self, base_model=None):
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": self.targets if isinstance(self.targets, str) else list(self.targets),
            "fan_in_fan_out": self.fan_in_fan_out, "bias": "none", "modules_to_save": None, "init_lora_weights": True,
            "use_rslora": self.use_rslora, "use_dora": False, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": dict(self.rank_pattern or {}),
            "alpha_pattern": dict(self.alpha_pattern or {}), "inference_mode": True, "revision": None,
        }

    @classmethod
    def from_peft(cls, cfg, where=CONFIG_FILE):
        """Validate a parsed adapter_config.json; what npgpt cannot apply is a one-line error."""
        if not isinstance(cfg, dict):
            raise NpgptError(f"{where} must hold a JSON object")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise NpgptError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA; npgpt loads LoRA adapters only")
        if cfg.get("use_dora"):
            raise NpgptError(f"{where}: DoRA adapters (use_dora) are not supported")
        if cfg.get("modules_to_save"):
            raise NpgptError(f"{where}: modules_to_save {cfg['modules_to_save']!r} is not supported (only LoRA weights)")
        if cfg.get("bias", "none") != "none":
            raise NpgptError(f"{where}: bias {cfg['bias']!r} is not supported; npgpt adapters train no biases")
        # fan_in_fan_out is not read: PEFT forces it to true on GPT-2's Conv1D whatever the file says,
        # and the stored lora_A (r, in) / lora_B (out, r) are laid out the same either way
        targets = cfg.get("target_modules") or None
        if targets is not None and not isinstance(targets, (str, list)):
            raise NpgptError(f"{where}: target_modules must be a list of names or a regular expression")
        try:
            pats = {}
            for key in ("rank_pattern", "alpha_pattern"):
                p = cfg.get(key) or {}
                if not isinstance(p, dict):
                    raise TypeError
                pats[key] = {str(k): (int(v) if key == "rank_pattern" else float(v)) for k, v in p.items()}
                for k in pats[key]:
                    re.compile(k)
            return cls(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 8)),
                       dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                       targets=DEFAULT_TARGETS if targets is None else targets if isinstance(targets, str)
                       else tuple(targets),
                       use_rslora=bool(cfg.get("use_rslora", False)), **pats)
        except (KeyError, TypeError, ValueError, re.error) as e:
            raise NpgptError(f"{where}: missing or bad LoRA setting ({e}); expected r, lora_alpha, "
                             f"target_modules") from None


def _pattern_value(patterns, name, default):
    """PEFT's rank/alpha patterns: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(^|.*\.){key}$", name):
            return value
    return default


# ---- a model's adapters ------------------------------------------------------------------------
def lora_layers(model):
    """[(module name, LoRALinear)] of a model, in block order."""
    return [(name, lin) for name, _, _, lin in linear_layers(model) if isinstance(lin, LoRALinear)]


def present_targets(model, targets):
    """The suffixes of `targets` that name a linear layer of `model` (a family's default list, minus
    what this model lacks: a Llama with mlp_act=relu2 has no gate_proj)."""
    names = [n for n, _, _, _ in linear_layers(model)]
    return tuple(t for t in targets if any(n == t or n.endswith("." + t) for n in names))


def has_lora(model):
    return bool(lora_layers(model))


def apply_lora(model, config: LoRAConfig, seed=0, names=None):
    """Wrap the targeted linear layers of `model` in LoRALinear and freeze every base parameter.

    `names` (module names) overrides the config's targets (loading an adapter whose weights say
    which layers it has). Returns the wrapped module names. Raises if a target matches nothing.
    """
    if has_lora(model):
        raise NpgptError("the model already has LoRA adapters; merge them (npgpt merge) before adding new ones")
    layers = linear_layers(model)
    config.fan_in_fan_out = model.config.arch == "gpt"
    if names is None:
        chosen = [n for n, _, _, _ in layers if config.matches(n)]
        if isinstance(config.targets, tuple):
            for t in config.targets:
                if not any(n == t or n.endswith("." + t) for n, _, _, _ in layers):
                    hint = ("GPT-2's linear layers are c_attn, c_proj, c_fc (attn.c_proj / mlp.c_proj for one of "
                            "the two)") if model.config.arch == "gpt" else f"Llama's linear layers are {', '.join(LLAMA_TARGETS)}"
                    raise NpgptError(f"lora target {t!r} matches no layer; {hint}")
        if not chosen:
            raise NpgptError(f"lora target pattern {config.targets!r} matches no layer of the model")
    else:
        chosen = list(names)
    rng = np.random.default_rng(seed)
    wanted = set(chosen)
    device = model.device
    for name, owner, attr, lin in layers:
        if name in wanted:
            new = LoRALinear(lin, config.rank_for(name), config.scaling_for(name), config.dropout, rng)
            if str(device) != "cpu":                   # a quantised base's scales may still be on the host
                new.lora_A.data, new.lora_B.data = to_device(new.lora_A.data, device), to_device(new.lora_B.data, device)
            setattr(owner, attr, new)
    adapters = {id(p) for _, lin in lora_layers(model) for p in (lin.lora_A, lin.lora_B)}
    for p in model.parameters():
        p.requires_grad = id(p) in adapters
    model.lora = config
    return chosen


def trainable_parameters(model):
    """(name, parameter) pairs that train: the adapters of a LoRA model, else every parameter."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(model):
    """Fold every adapter into its layer (W + s A B) in place; returns the model, now plain GPT-2.

    On a quantised base every linear layer comes back as float (the merged update does not lie on
    the integer grid), so the result saves as an ordinary GPT-2 folder; quantise it again if wanted.
    """
    for name, owner, attr, lin in linear_layers(model):
        if isinstance(lin, LoRALinear):
            setattr(owner, attr, lin.merged())
        elif isinstance(lin, QuantizedLinear):
            setattr(owner, attr, float_linear(lin.dequantized(), None if lin.bias is None else lin.bias.data))
    for p in model.parameters():
        p.requires_grad = True
    model.lora = None
    model.quantization = None
    return model


# ---- PEFT folders ------------------------------------------------------------------------------
def adapter_tensors(model):
    """{PEFT key: array} of a model's adapters, in PEFT's (out, in) layout."""
    out = {}
    for name, lin in lora_layers(model):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(asnumpy(lin.lora_A.data).T)   # (r, in)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(asnumpy(lin.lora_B.data).T)   # (out, r)
    return out


def save_adapter(model, folder, base_model=None):
    """Write adapter_config.json + adapter_model.safetensors (PEFT's layout) into `folder`."""
    cfg = model.lora
    if cfg is None or not has_lora(model):
        raise NpgptError("the model has no LoRA adapters to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_model = base_model or model.lora_base            # set by the LoRA plugin and the loader
    save_tensors(folder / WEIGHTS_FILE, adapter_tensors(model), metadata={"format": "pt"})
    atomic_write_json(folder / CONFIG_FILE, cfg.to_peft(None if base_model is None else str(base_model)))


def is_adapter_dir(path):
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def read_adapter(folder):
    """(LoRAConfig, {module name: (A (in, r), B (r, out)) float32}, config dict) from a PEFT folder.

    Every key must be a LoRA weight of a GPT-2 block linear layer; A and B must come in pairs whose
    shapes agree. Sizes against a model are checked in `load_adapter`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NpgptError(f"adapter folder {folder} does not exist")
    if not is_adapter_dir(folder) and is_adapter_dir(folder / "ckpt"):
        folder = folder / "ckpt"                         # a LoRA run folder: its checkpoint holds the adapter
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise NpgptError(f"{cfg_path} is missing: an adapter folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    raw_cfg = read_json_object(cfg_path, "adapter config")
    config = LoRAConfig.from_peft(raw_cfg, str(cfg_path))
    wpath = folder / WEIGHTS_FILE
    if not wpath.is_file():
        extra = " (adapter_model.bin, PyTorch's own format, is not read: save with safe_serialization=True)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise NpgptError(f"{wpath} is missing{extra}")
    raw = load_safetensors(wpath, upcast=True)        # bf16 adapters (PEFT trained in bf16) widen to float32
    pairs, bad = {}, []
    for key, arr in raw.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if name.startswith("layers."):
            name = "model." + name                       # an adapter saved on LlamaModel, not LlamaForCausalLM
        elif not name.startswith(("transformer.", "model.")):
            name = "transformer." + name                 # an adapter saved on GPT2Model, not GPT2LMHeadModel
        name = name.replace(".default.weight", ".weight")
        m = _KEY.match(name)
        if m is None or arr.ndim != 2 or arr.dtype.kind != "f":
            bad.append(key)
            continue
        module = name[: -len(".lora_A.weight")]
        pairs.setdefault(module, {})[m.group(5)] = arr.astype(np.float32)
    if bad:
        raise NpgptError(f"{wpath}: {len(bad)} tensor(s) are not LoRA weights of block linear layers "
                         f"(first: {bad[0]}); npgpt loads lora_A / lora_B of GPT-2's c_attn, c_proj, c_fc and "
                         f"Llama's {', '.join(LLAMA_TARGETS)} only")
    if not pairs:
        raise NpgptError(f"{wpath} holds no LoRA weights")
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise NpgptError(f"{wpath}: {module} has lora_{next(iter(ab))} but not its partner")
        a_peft, b_peft = ab["A"], ab["B"]                              # (r, in), (out, r)
        r = config.rank_for(module)
        if a_peft.shape[0] != r or b_peft.shape[1] != r:
            raise NpgptError(f"{wpath}: {module} has rank {a_peft.shape[0]}/{b_peft.shape[1]} "
                             f"but {CONFIG_FILE} says r = {r}")
        weights[module] = (a_peft.T.copy(), b_peft.T.copy())          # (in, r), (r, out)
    return config, weights, raw_cfg


def adapter_summary(folder):
    """{"r", "alpha", "targets", "layers", "base"} of a LoRA run's adapter folder, or None for a model folder."""
    if is_model_dir(folder) or not is_adapter_dir(folder):
        return None
    config, weights, raw = read_adapter(folder)
    base = raw.get("base_model_name_or_path")
    if not isinstance(base, str) or not Path(base).is_dir():
        raise NpgptError(f"{folder} is a LoRA adapter whose base model ({base!r}) is not a folder here")
    return {"r": config.r, "alpha": config.alpha, "targets": config.targets if isinstance(config.targets, str)
            else list(config.targets), "layers": len(weights), "base": base}


def load_adapter(model, folder):
    """Apply a PEFT-layout LoRA adapter from `folder` to `model` (unmerged); returns the config."""
    config, weights, _ = read_adapter(folder)
    layers = {n: lin for n, _, _, lin in linear_layers(model)}
    missing = [n for n in weights if n not in layers]
    if missing:
        raise NpgptError(f"adapter {folder} has weights for {missing[0]}, which this model lacks "
                         f"(it has {model.config.n_layer} layers); was it trained on another base?")
    for name, (a, b) in weights.items():
        base = layers[name]
        n_in, n_out = (base.n_in, base.n_out) if isinstance(base, QuantizedLinear) else base.weight.shape
        if a.shape[0] != n_in or b.shape[1] != n_out:
            raise NpgptError(f"adapter {folder}: {name} is ({a.shape[0]} -> {b.shape[1]}) but the model's layer "
                             f"is ({n_in} -> {n_out}); was it trained on another base?")
    apply_lora(model, config, names=sorted(weights, key=lambda n: list(layers).index(n)))
    for name, lin in lora_layers(model):
        a, b = weights[name]
        xp = get_xp(lin.lora_A.data)
        lin.lora_A.data[...] = xp.asarray(a, dtype=lin.lora_A.dtype)
        lin.lora_B.data[...] = xp.asarray(b, dtype=lin.lora_B.dtype)
    return config
