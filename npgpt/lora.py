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

An adapter folder may come from a stranger, so reading one trusts nothing: the weights must be finite;
r and the `rank_pattern` values are positive integers (2.0 is 2; 4.5 is refused, not truncated); every
name in `target_modules` must name a linear layer of the model. `rank_pattern` / `alpha_pattern` keys
are module-name suffixes matched literally (PEFT reads them as regular expressions, but the keys PEFT
writes are module names, and a literal match cannot hang); a `target_modules` regular expression is
accepted only within a safe subset (`check_safe_pattern`: bounded length, no nested or stacked
repetition, no backreferences), which cannot backtrack catastrophically on a module name.

The base's fingerprint (`base_fingerprint`: a hash of the targeted-layer weights, sampled) is taken when
adapters are applied and saved in the adapter's safetensors metadata (`npgpt_base_fingerprint`; PEFT
ignores metadata). Loading an adapter onto a base with another fingerprint is refused unless the caller
allows it (`npgpt merge/sample/eval --allow-other-base`); an adapter without one (made by PEFT) is taken
as it is, since there is nothing to check against, and so is an adapter made on a base held quantised
(a GGUF kept quantised) applied to that base held as floats, or the reverse: the two are not comparable.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npgpt.backend import asnumpy, get_xp, to_device
from npgpt.checkpoint import is_model_dir, save_tensors
from npgpt.errors import NpgptError
from npgpt.fileio import atomic_write_json, make_dir
from npgpt.layers import LoRALinear, MultiLoRALinear, QuantizedLinear, float_linear, linear_layers
from npgpt.safeio import check_finite_tensors, load_safetensors, read_json_object, read_safetensors_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")        # every linear layer of a GPT-2 block
# every linear layer of a Llama block, by PEFT's names for them
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILY_TARGETS = {"gpt": DEFAULT_TARGETS, "llama": LLAMA_TARGETS}
FINGERPRINT_KEY = "npgpt_base_fingerprint"        # in adapter_model.safetensors' metadata
MAX_PATTERN_CHARS = 256                           # a target_modules regular expression, a pattern key
MAX_PATTERN_KEYS = 4096                           # rank_pattern / alpha_pattern entries
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
            check_safe_pattern(self.targets, "lora target pattern")
        else:
            self.targets = tuple(self.targets)
            if not self.targets or not all(isinstance(t, str) and t.strip() for t in self.targets):
                raise NpgptError("--lora-targets needs at least one module name, e.g. c_attn,c_proj,c_fc")
        for key in ("rank_pattern", "alpha_pattern"):
            given = getattr(self, key)
            if given:
                setattr(self, key, {check_pattern_key(k, key): (positive_int(v, f"{key}[{k!r}]") if key == "rank_pattern"
                                                                else positive_float(v, f"{key}[{k!r}]"))
                                    for k, v in dict(given).items()})

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
    def from_peft(cls, cfg, where=CONFIG_FILE):  # noqa: C901 - one check per field, in PEFT's order
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
        if isinstance(targets, list) and not all(isinstance(t, str) and t.strip() for t in targets):
            raise NpgptError(f"{where}: target_modules must list module names (strings), got {short_repr(targets)}")
        if isinstance(targets, str):
            check_safe_pattern(targets, f"{where}: target_modules")
        if "r" not in cfg:
            raise NpgptError(f"{where}: the LoRA rank r is missing; expected r, lora_alpha, target_modules")
        r = positive_int(cfg["r"], f"{where}: r")
        pats = {}
        for key in ("rank_pattern", "alpha_pattern"):
            p = cfg.get(key) or {}
            if not isinstance(p, dict):
                raise NpgptError(f"{where}: {key} must be an object of module name -> value, got {short_repr(p)}")
            if len(p) > MAX_PATTERN_KEYS:
                raise NpgptError(f"{where}: {key} has {len(p):,} entries (at most {MAX_PATTERN_KEYS:,})")
            pats[key] = {check_pattern_key(k, f"{where}: {key}"):
                         positive_int(v, f"{where}: {key}[{k!r}]") if key == "rank_pattern"
                         else positive_float(v, f"{where}: {key}[{k!r}]") for k, v in p.items()}
        return cls(r=r, alpha=positive_float(cfg.get("lora_alpha", 8), f"{where}: lora_alpha"),
                   dropout=_dropout(cfg.get("lora_dropout", 0.0), where),
                   targets=DEFAULT_TARGETS if targets is None else targets if isinstance(targets, str)
                   else tuple(targets),
                   use_rslora=cfg.get("use_rslora", False) is True, **pats)


def short_repr(value, n=60):
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def positive_int(value, what):
    """An integer >= 1 from JSON: 4 and 4.0 are 4; 4.5, 0, -1, true, "4" are refused with one line."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > 1 << 20:
        raise NpgptError(f"{what} must be a positive integer rank (at most {1 << 20:,}), got {short_repr(value)}")
    return value


def positive_float(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise NpgptError(f"{what} must be a positive finite number, got {short_repr(value)}")
    return float(value)


def _dropout(value, where):
    value = 0.0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise NpgptError(f"{where}: lora_dropout must be a number in [0, 1), got {short_repr(value)}")
    return float(value)


_NAME_KEY = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


def check_pattern_key(key, what):
    """A rank_pattern / alpha_pattern key as the literal module-name suffix it is matched as.

    PEFT writes these keys as module names (`model.layers.0.self_attn.q_proj`, `c_attn`); PEFT reads them
    as regular expressions, npgpt does not: a name (with `\\.` read as `.`) or a one-line refusal."""
    name = key.replace("\\.", ".") if isinstance(key, str) else key
    if not isinstance(name, str) or len(name) > MAX_PATTERN_CHARS or not _NAME_KEY.fullmatch(name):
        raise NpgptError(f"{what}: key {short_repr(key)} is not a module name (letters, digits, _ and dots, at most "
                         f"{MAX_PATTERN_CHARS} characters); npgpt matches these keys as literal name suffixes, "
                         f"not as regular expressions")
    return name


def check_safe_pattern(pattern, what):
    """Compile `pattern` if it lies in a subset that cannot backtrack catastrophically, else NpgptError.

    The subset: at most MAX_PATTERN_CHARS characters; no repetition or alternation inside a repetition
    ((a+)+, (a|aa)*);
    at most 3 unbounded repetitions in all (each multiplies the work by the name's length, ~40 characters);
    no backreferences; no inline flags after the start. Module names are short, so a pattern in this subset
    costs microseconds on each."""
    import re._parser as sre_parse     # the standard library's own parser of re syntax
    from re import _constants as c
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
        raise NpgptError(f"{what}: a regular expression of at most {MAX_PATTERN_CHARS} characters is accepted, "
                         f"got {short_repr(pattern)}")
    try:
        tree = sre_parse.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise NpgptError(f"{what}: {short_repr(pattern)} is not a valid regular expression ({e})") from None
    unbounded = 0
    stack = [(tree, 0)]                  # (subpattern, how many repetitions enclose it)
    while stack:
        sub, depth = stack.pop()
        for op, av in sub:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
                lo, hi, body = av
                if depth:
                    raise NpgptError(f"{what}: {short_repr(pattern)} repeats a repetition (like (a+)+), which can "
                                     f"take exponential time; write it without nesting or list module names")
                if hi == c.MAXREPEAT or hi > 64:
                    unbounded += 1
                stack.append((body, depth + 1))
            elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
                raise NpgptError(f"{what}: {short_repr(pattern)} uses a backreference; not accepted in a module pattern")
            elif op == c.SUBPATTERN:
                stack.append((av[-1], depth))
            elif op == c.BRANCH:
                if depth:
                    raise NpgptError(f"{what}: {short_repr(pattern)} repeats an alternation (like (a|aa)*), which "
                                     f"can take exponential time; write it without nesting or list module names")
                stack.extend((alt, depth) for alt in av[1])
            elif op in (c.ASSERT, c.ASSERT_NOT, c.ATOMIC_GROUP):
                stack.append((av[-1], depth))
    if unbounded > 3:
        raise NpgptError(f"{what}: {short_repr(pattern)} has {unbounded} unbounded repetitions (at most 3); "
                         f"simplify it or list the module names")
    return compiled


def _pattern_value(patterns, name, default):
    """PEFT's rank/alpha patterns: the first key that is the module name or a dotted suffix of it (a
    literal match: see check_pattern_key)."""
    for key, value in (patterns or {}).items():
        if name == key or name.endswith("." + key):
            return value
    return default


# ---- a model's adapters ------------------------------------------------------------------------
def base_fingerprint(model) -> str:
    """A hash of the base's linear-layer weights (names, shapes, and up to 4096 evenly spaced values of
    each), the layers an adapter can sit on. Two trainings of one architecture differ everywhere, so the
    sample tells them apart; it is cheap on a 135M-parameter model and reads few values off a GPU."""
    h = hashlib.sha256()
    quantised = False
    for name, _, _, lin in linear_layers(model):
        lin = lin.base if isinstance(lin, LoRALinear) else lin
        quantised = quantised or isinstance(lin, QuantizedLinear)
        arrays = {"qweight": lin.qweight, "scales": lin.scales} if isinstance(lin, QuantizedLinear) \
            else {"weight": lin.weight.data}
        for part, a in arrays.items():
            flat = a.reshape(-1)
            sample = np.ascontiguousarray(asnumpy(flat[:: max(1, flat.size // 4096)][:4096]))
            h.update(f"{name}.{part}{tuple(a.shape)}{sample.dtype.str}".encode())
            h.update(sample.tobytes())
    # "q-" / "f-": the base as held (integers and scales, or floats); a GGUF base fine-tuned kept quantised
    # loads as floats elsewhere, and the two fingerprints cannot be compared (see _check_against)
    return ("q-" if quantised else "f-") + h.hexdigest()[:32]


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
    model.lora_base_fingerprint = base_fingerprint(model)      # saved with the adapter, checked on load
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
    model.lora_base_fingerprint = None
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
    make_dir(folder)
    base_model = base_model or model.lora_base            # set by the LoRA plugin and the loader
    metadata = {"format": "pt"}
    if model.lora_base_fingerprint:
        metadata[FINGERPRINT_KEY] = model.lora_base_fingerprint
    save_tensors(folder / WEIGHTS_FILE, adapter_tensors(model), metadata=metadata)
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
    header = read_safetensors_header(wpath)
    raw = load_safetensors(wpath, header=header, upcast=True)   # bf16 adapters (PEFT trained in bf16) widen to float32
    check_finite_tensors(raw, wpath)
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
    raw_cfg = dict(raw_cfg)
    raw_cfg[FINGERPRINT_KEY] = header.metadata.get(FINGERPRINT_KEY)   # None: an adapter made elsewhere
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


def load_adapter(model, folder, allow_other_base=False):
    """Apply a PEFT-layout LoRA adapter from `folder` to `model` (unmerged); returns the config.

    The adapter's recorded base fingerprint must be the model's (else NpgptError), unless
    `allow_other_base`; an adapter that records none (made by PEFT) is applied as it is."""
    config, weights, raw_cfg = read_adapter(folder)
    layers = {n: lin for n, _, _, lin in linear_layers(model)}
    recorded = _check_against(model, folder, weights, layers, config, raw_cfg, allow_other_base)
    apply_lora(model, config, names=sorted(weights, key=lambda n: list(layers).index(n)))
    if recorded is not None:
        model.lora_base_fingerprint = recorded     # a resumed run saves what its adapter was made on
    for name, lin in lora_layers(model):
        a, b = weights[name]
        xp = get_xp(lin.lora_A.data)
        lin.lora_A.data[...] = xp.asarray(a, dtype=lin.lora_A.dtype)
        lin.lora_B.data[...] = xp.asarray(b, dtype=lin.lora_B.dtype)
    return config


def _check_against(model, folder, weights, layers, config, raw_cfg, allow_other_base=False):
    """Every adapted layer exists in `model` with the adapter's (in, out) sizes; every target_modules
    name is a layer of the model and covers the weights; the recorded base fingerprint (if any) is the
    model's unless `allow_other_base`. Returns the recorded fingerprint (None: the adapter has none)."""
    if isinstance(config.targets, tuple):
        for t in config.targets:
            if not any(n == t or n.endswith("." + t) for n in layers):
                raise NpgptError(f"adapter {folder}: target_modules names {short_repr(t)}, which is no linear layer "
                                 f"of this model (its layers end in {', '.join(sorted({n.rsplit('.', 1)[-1] for n in layers}))})")
    untargeted = [n for n in weights if not config.matches(n)]
    if untargeted:
        raise NpgptError(f"adapter {folder} has weights for {untargeted[0]}, which its target_modules "
                         f"({short_repr(config.targets)}) do not name; the adapter is inconsistent")
    missing = [n for n in weights if n not in layers]
    if missing:
        raise NpgptError(f"adapter {folder} has weights for {missing[0]}, which this model lacks "
                         f"(it has {model.config.n_layer} layers); was it trained on another base?")
    for name, (a, b) in weights.items():
        base = layers[name]
        n_in, n_out = (base.n_in, base.n_out) if isinstance(base, (QuantizedLinear, LoRALinear)) \
            else base.weight.shape
        if a.shape[0] != n_in or b.shape[1] != n_out:
            raise NpgptError(f"adapter {folder}: {name} is ({a.shape[0]} -> {b.shape[1]}) but the model's layer "
                             f"is ({n_in} -> {n_out}); was it trained on another base?")
    recorded = raw_cfg.get(FINGERPRINT_KEY)
    if recorded is not None:
        mine = base_fingerprint(model)
        # comparable only when the base is held the same way (quantised or float) as when the adapter was made
        if recorded[:2] == mine[:2] and recorded != mine and not allow_other_base:
            raise NpgptError(f"adapter {folder} was made on another base (fingerprint {recorded[:12]}, this "
                             f"model's {mine[:12]}): its weights would be applied to the wrong model; give the "
                             f"base it was trained on, or pass --allow-other-base (merge, sample, eval, export) "
                             f"if you mean it")
    return recorded


# ---- several adapters at once, chosen per row (serving) -----------------------------------------
def load_adapters(model, folders, allow_other_base=False):
    """Serve several PEFT-layout adapters over one base at once: every layer any of them adapts
    becomes a MultiLoRALinear, and `npgpt.layers.adapter_rows([k, ...])` picks adapter k (its
    position in `folders`, -1 for the base) for each row of a batch. Inference only.

    `folders`: [(name, folder)]. Each adapter is checked against the base (layer names and sizes, and
    the base fingerprint npgpt records when it makes an adapter, unless `allow_other_base`) before
    anything is changed; an adapter made elsewhere records none (its recorded base is returned).
    Returns [{"name", "folder", "r", "alpha", "layers", "base"}] in the order of `folders`.
    """
    if any(isinstance(lin, MultiLoRALinear) for _, _, _, lin in linear_layers(model)):
        raise NpgptError("the model already serves several adapters")
    layers = {n: lin for n, _, _, lin in linear_layers(model)}
    read = []
    for name, folder in folders:
        config, weights, raw = read_adapter(folder)
        _check_against(model, folder, weights, layers, config, raw, allow_other_base)
        read.append((config, weights, raw))
    device = model.device
    for lname, owner, attr, lin in linear_layers(model):
        if not any(lname in w for _, w, _ in read):
            continue
        like = lin.scales if isinstance(lin, QuantizedLinear) else lin.lora_A.data if isinstance(lin, LoRALinear) \
            else lin.weight.data
        dtype = np.float32 if isinstance(lin, QuantizedLinear) else like.dtype
        slots = []
        for config, weights, _ in read:
            if lname in weights:
                a, b = weights[lname]
                slots.append((to_device(a.astype(dtype), device), to_device(b.astype(dtype), device),
                              config.scaling_for(lname)))
            else:
                slots.append(None)
        setattr(owner, attr, MultiLoRALinear(lin, slots))
    out = []
    for (name, folder), (config, weights, raw) in zip(folders, read):
        base = raw.get("base_model_name_or_path")
        out.append({"name": name, "folder": str(folder), "r": config.r, "alpha": config.alpha, "layers": len(weights),
                    "base": base if isinstance(base, str) else None})
    return out
