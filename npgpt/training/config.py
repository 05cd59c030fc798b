"""The training run's settings: one flat TrainConfig, grouped in sections, each section checked once.

Keys stay flat everywhere a user or a file sees them: on the command line (`--set lora_rank=8`,
`--set arch=llama`, `--set optimizer=muon`), in config files and in a checkpoint's state.json, so every
run ever saved still resumes. In the code they come in sections, one class each, which owns its keys
and the one check of them:

    RunSettings       data, out, init_from, resume, force, device, precision, seed; eval, log, checkpoints
    ModelSettings     a new model's family and size: preset, arch, n_layer, n_head, n_embd, block_size,
                      dropout, bias; the recipe switches (pos, qk_norm, mlp_act, zero_init_proj,
                      untie_head, logit_softcap; None: the preset's)
    OptimSettings     batch and schedule, AdamW's and Muon's hyper-parameters, clipping
    ParallelSettings  replicas (threads), zero_stage (mpiexec ranks)
    SFTSettings       sft, sft_strict, sft_val_fraction, sft_new_token_lr
    DistillSettings   teacher, distill_alpha, distill_temperature
    LoRASettings      lora_rank, lora_alpha, lora_dropout, lora_targets (checked by npgpt.lora.LoRAConfig,
                      the one place LoRA's settings are checked)
    PreferenceSettings  dpo, dpo_beta, dpo_loss, dpo_label_smoothing, dpo_val_fraction (npgpt.dpo)
    RLSettings        rl, rl_group_size, rl_kl, rl_temperature, rl_max_new_tokens, rl_eval_prompts (npgpt.rl)

`TrainConfig` is all of them at once (a dataclass that inherits every section's fields);
`cfg.section(LoRASettings)` gives one section's values on their own. `--set key=value` and config
files are parsed here too (`parse_set_options`, `load_config_file`, `apply_overrides`), shared by
train, finetune and bench.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from npgpt.backend import parse_device
from npgpt.errors import NpgptError
from npgpt.llama import ARCHS
from npgpt.lora import LoRAConfig
from npgpt.ops.distill import check_distill_args
from npgpt.ops.preference import check_dpo_args
from npgpt.precision import Precision
from npgpt.safeio import read_json, read_toml

OPTIMIZERS = ("adamw", "muon")

# Training settings that come with a model preset (over the command's defaults; --config, --set and
# flags still win). The modern presets train with Muon, as the modded-nanogpt speedrun does.
TRAIN_PRESETS = {
    "modern-baby": {"optimizer": "muon", "muon_lr": 0.02, "learning_rate": 2e-3, "warmup_iters": 50,
                    "max_iters": 1200},
    "modern-shakespeare": {"optimizer": "muon", "muon_lr": 0.02, "learning_rate": 1e-3, "dropout": 0.2},
}


def preset_defaults(preset) -> dict:
    """The training settings a preset brings ({} for most: only the modern-* presets have some, and
    their Llama twins llama-modern-* the same)."""
    return dict(TRAIN_PRESETS.get(str(preset).removeprefix("llama-"), {}))


def _positive(cfg, names, optional=False):
    for name in names:
        v = getattr(cfg, name)
        if (v is None and not optional) or (v is not None and v <= 0):
            raise NpgptError(f"{name} must be positive, got {v}")


@dataclass
class RunSettings:
    """Where the run reads and writes, on what, and how often it evaluates, logs and saves."""
    data: str | None = None              # a folder made by `npgpt prepare` (None: built-in pydoc corpus)
    out: str = "out"                     # run folder: checkpoint in OUT/ckpt, metrics in OUT/metrics.jsonl
    init_from: str | None = None         # start from a model folder (npgpt checkpoint or HF GPT-2) or a .gguf file
    keep_quantized: bool = False         # init_from a .gguf file: keep Q8_0 / Q4_0 / Q4_1 weights quantised (LoRA)
    resume: bool = False                 # continue the run in `out` exactly where it stopped
    force: bool = False                  # overwrite a checkpoint already in `out`
    device: str = "cpu"
    precision: str = "fp32"              # matmuls: fp32, tf32 or fp16 (fp16 adds dynamic loss scaling)
    seed: int = 1337
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    always_save_checkpoint: bool = True
    quiet: bool = False

    def check(self):
        for name in ("data", "out", "init_from"):
            v = getattr(self, name)
            if v is not None and (not v or "\x00" in v):
                raise NpgptError(f"{name} must be a path, got {v!r}")
        if self.seed < 0:
            raise NpgptError(f"seed must be >= 0, got {self.seed}")
        _positive(self, ("eval_interval", "eval_iters", "log_interval"))
        parse_device(self.device)
        Precision(self.precision)                       # a clear error for an unknown name


@dataclass
class ModelSettings:
    """A new model's family and size (ignored with init_from / resume, which bring their own)."""
    preset: str = "baby"                 # a size (baby, shakespeare-char, gpt2...; llama-baby, llama-modern-baby...)
    arch: str = "gpt"                    # model family of a new model: gpt (GPT-2) or llama (npgpt.llama)
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None        # context length; defaults to the preset's
    dropout: float = 0.0
    bias: bool | None = None             # biases in Linear / LayerNorm; None: the preset's (true for GPT-2's sizes)
    # recipe switches of a new model (npgpt.model.GPTConfig; a Llama takes those that apply, see
    # npgpt.llama.preset_config); None: the preset's (modern-* turn them all on)
    pos: str | None = None               # learned (GPT-2's table) or rope
    qk_norm: bool | None = None          # RMSNorm on each head's queries and keys
    mlp_act: str | None = None           # gelu (GPT) or swiglu (Llama): the family's own; or relu2
    zero_init_proj: bool | None = None   # residual projections (and an untied head) start at zero
    untie_head: bool | None = None       # a separate output head instead of wte's transpose
    logit_softcap: float | None = None   # > 0: logits = cap tanh(logits / cap); 0: off

    def check(self):
        _positive(self, ("n_layer", "n_head", "n_embd", "block_size"), optional=True)
        if self.preset.startswith("llama-"):
            self.arch = "llama"                         # llama-baby is baby with arch=llama
        if self.arch not in ARCHS:
            raise NpgptError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if not 0 <= self.dropout < 1:
            raise NpgptError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos not in (None, "learned", "rope") or self.mlp_act not in (None, "gelu", "swiglu", "relu2"):
            raise NpgptError(f"pos must be learned or rope and mlp_act gelu, swiglu or relu2 (got {self.pos}, "
                             f"{self.mlp_act})")
        if self.logit_softcap is not None and not 0 <= self.logit_softcap <= 1e4:
            raise NpgptError(f"logit_softcap must be in [0, 10000] (0: off), got {self.logit_softcap}")


@dataclass
class OptimSettings:
    """The batch, the schedule and the optimizer's hyper-parameters."""
    batch_size: int = 12
    gradient_accumulation_steps: int = 1
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None    # defaults to max_iters
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    optimizer: str = "adamw"             # adamw, or muon: Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02                # Muon's peak lr (follows the same schedule as learning_rate)
    muon_momentum: float = 0.95
    nesterov: bool = True                # Muon's Nesterov momentum
    ns_steps: int = 5                    # Newton-Schulz iterations per Muon update
    muon_weight_decay: float = 0.0       # decoupled weight decay of the Muon matrices

    def check(self):
        _positive(self, ("max_iters", "batch_size", "learning_rate", "gradient_accumulation_steps"))
        _positive(self, ("lr_decay_iters",), optional=True)
        if self.min_lr < 0 or self.warmup_iters < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise NpgptError("min_lr, warmup_iters, weight_decay and grad_clip must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise NpgptError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (self.muon_lr > 0 and 0 <= self.muon_momentum < 1 and self.muon_weight_decay >= 0):
            raise NpgptError("need muon_lr > 0, muon_momentum in [0, 1) and muon_weight_decay >= 0")
        if not 1 <= self.ns_steps <= 20:
            raise NpgptError(f"ns_steps must be in [1, 20], got {self.ns_steps}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise NpgptError("beta1 and beta2 must be in [0, 1)")


@dataclass
class ParallelSettings:
    """Splitting the work: threads in this process, and ZeRO over mpiexec's ranks."""
    replicas: int = 1                    # CPU: split each micro-batch over this many threads (npgpt.replicas)
    zero_stage: int = 0                  # 1: shard AdamW's moments over the ranks (mpiexec -n N; ZeRO-1)

    def check(self):
        _positive(self, ("replicas",))
        if self.zero_stage not in (0, 1):
            raise NpgptError(f"zero_stage must be 0 or 1, got {self.zero_stage}")


@dataclass
class SFTSettings:
    """Supervised fine-tuning records (npgpt finetune --sft)."""
    sft: str | None = None               # JSONL file of prompt/completion or chat records
    sft_strict: bool = False             # error (not truncate) when a record is longer than block_size
    sft_val_fraction: float = 0.1
    sft_new_token_lr: float = 10.0       # new special tokens' embedding rows learn this many times faster

    def check(self):
        if self.sft is not None and (not self.sft or "\x00" in self.sft):
            raise NpgptError(f"sft must be a path, got {self.sft!r}")
        if not (math.isfinite(self.sft_new_token_lr) and self.sft_new_token_lr > 0):
            raise NpgptError(f"sft_new_token_lr must be a positive number, got {self.sft_new_token_lr}")
        if not 0 <= self.sft_val_fraction < 1:
            raise NpgptError(f"sft_val_fraction must be in [0, 1), got {self.sft_val_fraction}")


@dataclass
class DistillSettings:
    """Distillation from a teacher model (npgpt finetune --teacher)."""
    teacher: str | None = None           # distil from this model folder (npgpt finetune --teacher)
    distill_alpha: float = 0.5           # loss = alpha * KD + (1 - alpha) * cross-entropy
    distill_temperature: float = 2.0

    def check(self):
        if self.teacher is not None and (not self.teacher or "\x00" in self.teacher):
            raise NpgptError(f"teacher must be a path, got {self.teacher!r}")
        if self.teacher:
            check_distill_args(self.distill_alpha, self.distill_temperature)


@dataclass
class LoRASettings:
    """LoRA adapters on a frozen base (npgpt finetune --lora-rank R)."""
    lora_rank: int | None = None         # train only LoRA adapters of this rank (npgpt.training.plugins)
    lora_alpha: float | None = None      # LoRA scale alpha / rank; default 2 * rank
    lora_dropout: float = 0.0            # dropout on the adapters' input
    lora_targets: str | None = None      # comma-separated layer names; default every linear layer of a block

    def lora_config(self, arch="gpt") -> LoRAConfig | None:
        """The adapters' LoRAConfig (checked there), or None without lora_rank; without lora_targets
        every linear layer of the `arch` family's blocks (GPT-2's c_attn, c_proj, c_fc; Llama's
        q_proj ... down_proj)."""
        if self.lora_rank is None:
            return None
        return LoRAConfig.from_targets_option(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets,
                                              arch)

    def check(self):
        # LoRAConfig checks every setting; without a rank the others are still checked (rank 1 stands in)
        LoRAConfig.from_targets_option(1 if self.lora_rank is None else self.lora_rank, self.lora_alpha,
                                       self.lora_dropout, self.lora_targets)


@dataclass
class PreferenceSettings:
    """Learning from preference pairs (npgpt finetune --dpo; npgpt.dpo)."""
    dpo: str | None = None               # JSONL of {prompt, chosen, rejected} records (strings or TRL's chat form)
    dpo_beta: float = 0.1                # the strength of the pull towards the reference model
    dpo_loss: str = "sigmoid"            # sigmoid (DPO) or ipo
    dpo_label_smoothing: float = 0.0     # conservative DPO: each label is wrong with this probability
    dpo_val_fraction: float = 0.1        # held-out pairs for the preference accuracy and reward margins

    def check(self):
        if self.dpo is not None and (not self.dpo or "\x00" in self.dpo):
            raise NpgptError(f"dpo must be a path, got {self.dpo!r}")
        try:
            check_dpo_args(self.dpo_beta, self.dpo_label_smoothing, self.dpo_loss)
        except ValueError as e:
            raise NpgptError(str(e)) from None
        if not 0 <= self.dpo_val_fraction < 1:
            raise NpgptError(f"dpo_val_fraction must be in [0, 1), got {self.dpo_val_fraction}")


@dataclass
class RLSettings:
    """Reinforcement learning on a task with checkable answers (npgpt finetune --rl TASK; npgpt.rl)."""
    rl: str | None = None                # the task: arithmetic, number-words, summary-facts (npgpt.verifiable)
    rl_group_size: int = 8               # G answers sampled per prompt; advantages are relative to the group
    rl_kl: float = 0.04                  # weight of the KL penalty to the reference model
    rl_temperature: float = 1.0          # sampling temperature of the answers
    rl_max_new_tokens: int | None = None # longest answer; None: the task's own bound
    rl_eval_prompts: int = 64            # held-out prompts answered greedily at each evaluation

    def check(self):
        if self.rl is not None and (not self.rl or "\x00" in self.rl):
            raise NpgptError(f"rl must be a task name, got {self.rl!r}")
        if not 2 <= self.rl_group_size <= 256:
            raise NpgptError(f"rl_group_size must be in [2, 256] (advantages compare a group's answers), "
                             f"got {self.rl_group_size}")
        if not 0 <= self.rl_kl <= 100:
            raise NpgptError(f"rl_kl must be in [0, 100], got {self.rl_kl}")
        if not 0 < self.rl_temperature <= 10:
            raise NpgptError(f"rl_temperature must be in (0, 10], got {self.rl_temperature}")
        if self.rl_max_new_tokens is not None and not 1 <= self.rl_max_new_tokens <= 4096:
            raise NpgptError(f"rl_max_new_tokens must be in [1, 4096], got {self.rl_max_new_tokens}")
        if not 1 <= self.rl_eval_prompts <= 100_000:
            raise NpgptError(f"rl_eval_prompts must be in [1, 100000], got {self.rl_eval_prompts}")


SECTIONS = (RunSettings, ModelSettings, OptimSettings, ParallelSettings, SFTSettings, DistillSettings, LoRASettings,
            PreferenceSettings, RLSettings)


@dataclass
class TrainConfig(RLSettings, PreferenceSettings, LoRASettings, DistillSettings, SFTSettings, ParallelSettings,
                  OptimSettings, ModelSettings, RunSettings):
    """Every knob of a training run: the fields of all sections (RunSettings' first). Names follow
    nanoGPT's where one exists."""

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> "TrainConfig":
        """The config `npgpt train --preset PRESET` builds: the preset's training settings
        (TRAIN_PRESETS: the modern ones bring Muon), then `overrides`."""
        return apply_overrides(cls(), {**preset_defaults(preset), "preset": preset, **overrides}).validate()

    def validate(self):
        """Check every section once (NaN / inf first, so none reaches a comparison); returns self."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise NpgptError(f"{f.name} must be a finite number, got {v}")
        for section in SECTIONS:
            section.check(self)
        if sum(bool(k) for k in (self.sft, self.dpo, self.rl)) > 1:
            raise NpgptError("--sft, --dpo and --rl are different fine-tunes; run one, then the next from its result")
        return self

    def section(self, cls):
        """One section's values as an instance of its class, e.g. cfg.section(LoRASettings)."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})


# ---- config from files and key=value overrides --------------------------------------------------
def field_types() -> dict:
    """{key: type name} of every TrainConfig field (what --set and config files are checked against)."""
    hints = {}
    for f in dataclasses.fields(TrainConfig):
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        hints[f.name] = t
    return hints


def coerce(key, value, type_name):
    """Turn a string (from --set) or a JSON/TOML value into the field's type, or raise."""
    base = type_name.replace(" | None", "").strip()
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in type_name):
        if "None" in type_name:
            return None
        raise NpgptError(f"config key {key}: a value is required ({base})")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            if not math.isfinite(float(value)):
                raise NpgptError(f"config key {key}: {value!r} is not a finite number")
            return float(value)
        if base == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise NpgptError(f"config key {key}: {value!r} is not a valid {base}")


def apply_overrides(config: TrainConfig, overrides: dict) -> TrainConfig:
    """A copy of config with keys replaced, each checked against the field's type."""
    types = field_types()
    unknown = [k for k in overrides if k not in types]
    if unknown:
        raise NpgptError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(types)}")
    return dataclasses.replace(config, **{k: coerce(k, v, types[k]) for k, v in overrides.items()})


def parse_set_options(pairs) -> dict:
    """['key=value', ...] -> {key: 'value'}."""
    out = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise NpgptError(f"--set {pair!r}: expected key=value")
        k, v = pair.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def load_config_file(path) -> dict:
    """A JSON or TOML file of config keys (a [train] table in TOML is also accepted)."""
    p = Path(path)
    if not p.is_file():
        raise NpgptError(f"config file {p} does not exist")
    if p.suffix.lower() == ".toml":
        data = read_toml(p)
        data = data.get("train", data)
    else:
        data = read_json(p, "config file", max_bytes=1 << 20)
    if not isinstance(data, dict):
        raise NpgptError(f"config file {p} must hold an object of key: value pairs")
    return data
