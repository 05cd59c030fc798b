"""Training: the typed config, the loop, evaluation, checkpoints and exact resume.

`train(config)` is the whole job `npgpt train` runs, importable and free of side effects at
import time:

    data (memmapped token files) -> batches -> model forward/backward (accumulated over micro-steps)
    -> clip -> AdamW step with the scheduled lr -> log / eval / checkpoint

The loop (`_Run.loop`) reads as nanoGPT's: eval/checkpoint -> micro-steps -> clip -> step -> log,
one small named helper each. What varies plugs in through `Hooks` (see there), filled by plugins:

    hooks.loss_fn(model, x, y) -> loss         the loss of a micro-batch (distillation replaces it)
    hooks.reduce_grads(flat_grad, n_tokens)    between backward and clipping: the data-parallel seam
    hooks.after_step: [fn(model, it)]          after each optimizer step (pruning re-applies masks)
    hooks.save_files: [fn(folder)]             extra files in each checkpoint (pruning's masks)

    def my_plugin(model, src, cfg, hooks):     # src: the folder the model came from, or None
        hooks.after_step.append(lambda model, it: ...)
    train(cfg, plugins=[my_plugin])

`npgpt train` / `finetune` pass npgpt.compress.TRAINING_PLUGINS (distillation, pruning masks); the
trainer itself imports nothing above its floor. Config keys and `--set key=value` parsing live here
too (`parse_set_options`, `apply_overrides`), shared by train, finetune and bench.

Under `mpiexec -n N` (npgpt.distributed.comm.current() has N ranks) the trainer fills the loss and
gradient hooks with npgpt.distributed.data_parallel.DataParallel (count-weighted loss, one gradient reduction
per step), shares evaluation, agrees on Ctrl-C, and lets rank 0 alone write (README "Data-parallel
training").

Reproducibility by construction: the batch of step `it` is drawn from a generator seeded with
(seed, it) (and the rank, for data-parallel ranks other than 0), and so is that step's dropout;
eval batches likewise from (seed, it, "eval"). Nothing random carries over from one step to the
next, so a resumed run needs only the weights, the optimizer moments and the step number to
continue bit-identically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npgpt import tokenizer as tk
from npgpt.backend import asnumpy, parse_device, synchronize, xp_for
from npgpt.checkpoint import (atomic_write_json, checkpoint_writer, find_checkpoint, has_checkpoint, load_tensors,
                              save_tensors, verify_checkpoint)
from npgpt.data import TokenData, ensure_builtin_dataset
from npgpt.distributed.comm import current, for_device, local_rank0_first
from npgpt.distributed.data_parallel import DataParallel
from npgpt.distributed.zero import make_muon, make_optimizer
from npgpt.errors import NpgptError
from npgpt.fileio import write_error
from npgpt.llama import build_model as new_model
from npgpt.llama import ARCHS, from_pretrained, preset_config
from npgpt.model import read_hf_config, records_quantization
from npgpt.ops.distill import check_distill_args
from npgpt.model import RECIPE_DEFAULTS
from npgpt.optim import Muon, get_lr
from npgpt.perf import gemm_peak_gflops, tune_malloc
from npgpt.precision import Precision, use_precision
from npgpt.replicas import training_plugin as replicas_plugin
from npgpt.safeio import Float, Int, Obj, check, read_json, read_json_object, read_toml, run_lock
from npgpt.tensor import no_grad
from npgpt.training.scaler import DynamicLossScaler

EVAL_STREAM, DROPOUT_STREAM = 1, 2   # sub-streams of the per-step generator seeds
OPTIMIZERS = ("adamw", "muon")

# Training settings that come with a model preset (below the command's defaults' users: --config, --set
# and flags still win). The modern presets train with Muon, as the modded-nanogpt speedrun does.
TRAIN_PRESETS = {
    "modern-baby": {"optimizer": "muon", "muon_lr": 0.02, "learning_rate": 2e-3, "warmup_iters": 50,
                    "max_iters": 1200},
    "modern-shakespeare": {"optimizer": "muon", "muon_lr": 0.02, "learning_rate": 1e-3, "dropout": 0.2},
}


def preset_defaults(preset) -> dict:
    """The training settings a preset brings ({} for most: only the modern-* presets have some)."""
    return dict(TRAIN_PRESETS.get(str(preset), {}))


@dataclass
class TrainConfig:
    """Every knob of a training run. Names follow nanoGPT's where one exists."""
    # data and output
    data: str | None = None              # a folder made by `npgpt prepare` (None: built-in pydoc corpus)
    out: str = "out"                     # run folder: checkpoint in OUT/ckpt, metrics in OUT/metrics.jsonl
    init_from: str | None = None         # start from a model folder (npgpt checkpoint or HF GPT-2)
    resume: bool = False                 # continue the run in `out` exactly where it stopped
    force: bool = False                  # overwrite a checkpoint already in `out`
    device: str = "cpu"
    precision: str = "fp32"              # matmuls: fp32, tf32 or fp16 (fp16 adds dynamic loss scaling)
    seed: int = 1337
    # model (ignored with init_from / resume, which bring their own)
    preset: str = "baby"                 # a size (baby, shakespeare-char, gpt2...; llama-baby, llama-shakespeare-char)
    arch: str = "gpt"                    # model family of a new model: gpt (GPT-2) or llama (npgpt.llama)
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None        # context length; defaults to the preset's
    dropout: float = 0.0
    bias: bool | None = None             # biases in Linear / LayerNorm; None: the preset's (true for GPT-2's sizes)
    # recipe switches of a new GPT (npgpt.model.GPTConfig); None: the preset's (modern-* turn them all on)
    pos: str | None = None               # learned (GPT-2's table) or rope
    qk_norm: bool | None = None          # RMSNorm on each head's queries and keys
    mlp_act: str | None = None           # gelu or relu2
    zero_init_proj: bool | None = None   # residual projections (and an untied head) start at zero
    untie_head: bool | None = None       # a separate output head instead of wte's transpose
    logit_softcap: float | None = None   # > 0: logits = cap tanh(logits / cap); 0: off
    # optimisation
    batch_size: int = 12
    gradient_accumulation_steps: int = 1
    replicas: int = 1                    # CPU: split each micro-batch over this many threads (npgpt.replicas)
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
    zero_stage: int = 0                  # 1: shard AdamW's moments over the ranks (mpiexec -n N; ZeRO-1)
    optimizer: str = "adamw"             # adamw, or muon: Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02                # Muon's peak lr (follows the same schedule as learning_rate)
    muon_momentum: float = 0.95
    nesterov: bool = True                # Muon's Nesterov momentum
    ns_steps: int = 5                    # Newton-Schulz iterations per Muon update
    muon_weight_decay: float = 0.0       # decoupled weight decay of the Muon matrices
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    always_save_checkpoint: bool = True
    quiet: bool = False
    # fine-tuning (npgpt finetune)
    sft: str | None = None               # JSONL file of prompt/completion or chat records
    sft_strict: bool = False             # error (not truncate) when a record is longer than block_size
    sft_val_fraction: float = 0.1
    teacher: str | None = None           # distil from this model folder (npgpt finetune --teacher)
    distill_alpha: float = 0.5           # loss = alpha * KD + (1 - alpha) * cross-entropy
    distill_temperature: float = 2.0
    lora_rank: int | None = None         # train only LoRA adapters of this rank (npgpt.lora's plugin)
    lora_alpha: float | None = None      # LoRA scale alpha / rank; default 2 * rank
    lora_dropout: float = 0.0            # dropout on the adapters' input
    lora_targets: str | None = None      # comma-separated layer names; default c_attn,c_proj,c_fc

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> "TrainConfig":
        """The config `npgpt train --preset PRESET` builds: the preset's training settings
        (TRAIN_PRESETS: the modern ones bring Muon), then `overrides`."""
        return apply_overrides(cls(), {**preset_defaults(preset), "preset": preset, **overrides}).validate()

    def validate(self):
        for f in dataclasses.fields(self):                 # NaN / inf never reach a comparison below
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise NpgptError(f"{f.name} must be a finite number, got {v}")
        for name in ("data", "out", "init_from", "sft", "teacher"):
            v = getattr(self, name)
            if v is not None and (not v or "\x00" in v):
                raise NpgptError(f"{name} must be a path, got {v!r}")
        if self.seed < 0:
            raise NpgptError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.sft_val_fraction < 1:
            raise NpgptError(f"sft_val_fraction must be in [0, 1), got {self.sft_val_fraction}")
        positive = ["max_iters", "batch_size", "learning_rate", "eval_interval", "eval_iters", "log_interval",
                    "gradient_accumulation_steps", "replicas"]
        for name in positive:
            v = getattr(self, name)
            if v is None or v <= 0:
                raise NpgptError(f"{name} must be positive, got {v}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "lr_decay_iters"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise NpgptError(f"{name} must be positive, got {v}")
        if self.min_lr < 0 or self.warmup_iters < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise NpgptError("min_lr, warmup_iters, weight_decay and grad_clip must be >= 0")
        if self.arch not in ARCHS:
            raise NpgptError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.zero_stage not in (0, 1):
            raise NpgptError(f"zero_stage must be 0 or 1, got {self.zero_stage}")
        if self.pos not in (None, "learned", "rope") or self.mlp_act not in (None, "gelu", "relu2"):
            raise NpgptError(f"pos must be learned or rope and mlp_act gelu or relu2 (got {self.pos}, {self.mlp_act})")
        if self.logit_softcap is not None and not 0 <= self.logit_softcap <= 1e4:
            raise NpgptError(f"logit_softcap must be in [0, 10000] (0: off), got {self.logit_softcap}")
        if self.optimizer not in OPTIMIZERS:
            raise NpgptError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (self.muon_lr > 0 and 0 <= self.muon_momentum < 1 and self.muon_weight_decay >= 0):
            raise NpgptError("need muon_lr > 0, muon_momentum in [0, 1) and muon_weight_decay >= 0")
        if not 1 <= self.ns_steps <= 20:
            raise NpgptError(f"ns_steps must be in [1, 20], got {self.ns_steps}")
        if not 0 <= self.dropout < 1:
            raise NpgptError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise NpgptError("beta1 and beta2 must be in [0, 1)")
        if self.teacher:
            check_distill_args(self.distill_alpha, self.distill_temperature)
        if self.lora_rank is not None and self.lora_rank <= 0:
            raise NpgptError(f"--lora-rank must be a positive integer, got {self.lora_rank}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise NpgptError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise NpgptError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        parse_device(self.device)
        Precision(self.precision)                       # a clear error for an unknown name
        return self


# ---- config from files and key=value overrides --------------------------------------------------
def _field_types():
    hints = {}
    for f in dataclasses.fields(TrainConfig):
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        hints[f.name] = t
    return hints


def _coerce(key, value, type_name):
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
    types = _field_types()
    unknown = [k for k in overrides if k not in types]
    if unknown:
        raise NpgptError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(types)}")
    return dataclasses.replace(config, **{k: _coerce(k, v, types[k]) for k, v in overrides.items()})


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


# ---- learning-rate schedule ----------------------------------------------------------------------
def lr_at(it, cfg: TrainConfig):
    if not cfg.decay_lr:
        return cfg.learning_rate
    return get_lr(it, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters, cfg.min_lr)


# ---- the run ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out: Path
    iters: int
    best_val_loss: float
    last_train_loss: float | None
    history: list = field(default_factory=list)   # the eval records
    interrupted: bool = False


class Interrupted(Exception):
    """Raised after Ctrl-C once a checkpoint is saved; the CLI exits with status 130."""

    def __init__(self, out):
        super().__init__(f"interrupted: checkpoint saved in {out}; continue with --resume")
        self.out = out


def step_rng(seed, it, stream=0, rank=0):
    """The generator for step `it` (and sub-stream) of data-parallel rank `rank`: a pure function of
    (seed, it, stream, rank). Rank 0's stream is the one-process stream."""
    return np.random.default_rng([seed, it, stream, rank] if rank else [seed, it, stream])


def _prepare_out(cfg: TrainConfig):
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NpgptError(f"--out {out} is a file; choose a folder for the run")
    if cfg.resume:
        if not has_checkpoint(out):
            raise NpgptError(f"--resume: no checkpoint in {out}; start a run with `npgpt train --out {out}`")
    elif has_checkpoint(out) and not cfg.force:
        raise NpgptError(f"{out} already holds a checkpoint; pass --resume to continue it or --force to overwrite it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise NpgptError(f"--out {out} is not writable ({e.strerror}); choose another folder") from None
    return out


def _open_data(cfg: TrainConfig, log, comm):
    if cfg.data is None:
        log("no --data given: using the built-in pydoc corpus, character-level (prepared once, cached)")
        path = local_rank0_first(comm, lambda: ensure_builtin_dataset("pydoc", tokenizer="char"))
    else:
        path = Path(cfg.data)
    data = TokenData(path)
    data.check_token_ids()              # a damaged .bin would index past the embedding
    return data


def build_model(cfg: TrainConfig, data, log, load_model=None):
    """The model to train: resumed, initialised from a folder, or new from the preset + overrides.

    load_model(folder, dropout=...): how a folder becomes a model; by default GPT.from_pretrained,
    float folders only. A caller's loader may read more (npgpt.lora.load_model_folder: quantised
    bases and LoRA runs' adapter folders); its plugins then decide what of the model trains."""
    vocab = data.vocab_size
    if cfg.resume or cfg.init_from:
        src = find_checkpoint(cfg.out if cfg.resume else cfg.init_from)
        if load_model is None:
            if records_quantization(read_hf_config(src)):
                raise NpgptError(f"{src} is quantised; fine-tune the float model it came from and quantise afterwards")
            model = from_pretrained(src, dropout=cfg.dropout)
        else:
            model = load_model(src, dropout=cfg.dropout)
        if not getattr(data, "grow_vocab", False):      # resumed or fine-tuned: the data's tokenizer is the model's
            _check_same_tokenizer(src, data)
        if model.config.vocab_size < vocab and getattr(data, "grow_vocab", False):
            log(f"adding {vocab - model.config.vocab_size} embedding rows for new special tokens")
            model.resize_token_embeddings(vocab)
        if model.config.vocab_size < vocab:
            raise NpgptError(f"the data's vocabulary ({vocab}) is larger than the model's ({model.config.vocab_size})")
        return model, src
    over = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg, k)}
    over.update({k: getattr(cfg, k) for k in RECIPE_DEFAULTS if getattr(cfg, k) is not None})
    mcfg = preset_config(cfg.preset, cfg.arch, vocab_size=vocab, dropout=cfg.dropout, bias=cfg.bias, **over)
    return new_model(mcfg, seed=cfg.seed), None


def _check_same_tokenizer(model_dir, data):
    if not tk.is_tokenizer_dir(model_dir):
        raise NpgptError(f"{model_dir} has no tokenizer files; a model folder needs its tokenizer to fine-tune on prepared data")
    mine = tk.load(model_dir).fingerprint()
    theirs = data.tokenizer().fingerprint()
    if mine != theirs:
        raise NpgptError(f"the data in {data.path} was tokenized with a different tokenizer than the model in "
                         f"{model_dir}; prepare it with `npgpt prepare --tokenizer-from {model_dir}`")


def estimate_loss(model, data, cfg, it, block_size, dp=None):
    """Mean loss over eval_iters batches of each split (model in eval mode, no graph); with `dp`
    (data-parallel) the ranks share the same batches and average them."""
    out = {}
    model.eval()
    with no_grad():
        for split in ("train", "val"):
            r = step_rng(cfg.seed, it, EVAL_STREAM if split == "val" else EVAL_STREAM + 10)
            if dp is not None:
                batches = (data.get_batch(split, cfg.batch_size, block_size, r, device=cfg.device)
                           for _ in range(cfg.eval_iters))
                out[split] = dp.eval_losses(model, batches)
                continue
            losses = []
            for _ in range(cfg.eval_iters):
                x, y = data.get_batch(split, cfg.batch_size, block_size, r, device=cfg.device)
                losses.append(model(x, y)[1].data)
            out[split] = float(asnumpy(sum(losses))) / len(losses)   # one device sync per split
    model.train()
    return out


def save_checkpoint(out, model, tokenizer, optimizer, state, save_files=(), save_model=None):
    """Write OUT/ckpt atomically: model folder (HF GPT-2) + tokenizer + optimizer + state.json
    (+ what each `save_files` callback writes into the folder). save_model(folder), when given,
    writes the model instead of save_pretrained (a LoRA run writes only its adapters)."""
    with checkpoint_writer(out) as tmp:
        (save_model or model.save_pretrained)(tmp)
        tokenizer.save(tmp)
        for save in save_files:
            save(tmp)
        if optimizer is not None:
            tensors, meta = optimizer.state_dict()
            save_tensors(tmp / "optimizer.safetensors", tensors)
            state = {**state, "optimizer": meta}
        atomic_write_json(tmp / "state.json", state)


STATE_FIELDS = {"iter": Int(lo=0), "best_val_loss": Float(default=float("inf"), allow_inf=True),
                "config": Obj(), "optimizer": Obj(default=None), "loss_scaler": Obj(default=None)}


def read_state(ckpt) -> dict:
    """A checkpoint's state.json, checked: types of every field (the run's config too) and iter <=
    max_iters. NpgptError naming the file and field; the config comes back as a TrainConfig."""
    p = Path(ckpt) / "state.json"
    if not p.is_file():
        raise NpgptError(f"{p} is missing; the folder is a model, not a training run's checkpoint")
    # Infinity: best_val_loss before the first evaluation (npgpt has always written it so)
    state = check(read_json_object(p, "training state", allow_infinity=True), STATE_FIELDS, str(p))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        config = apply_overrides(TrainConfig(), {k: v for k, v in state["config"].items() if k in known}).validate()
    except NpgptError as e:
        raise NpgptError(f"{p}: field 'config' is damaged ({e})") from None
    if state["iter"] > config.max_iters:
        raise NpgptError(f"{p}: field 'iter' is {state['iter']}, beyond the run's max_iters {config.max_iters}; "
                         f"the file is damaged")
    return {**state, "config": config}


def _load_resume_state(out, optimizer):
    ckpt = find_checkpoint(out)
    verify_checkpoint(ckpt)
    state = read_state(ckpt)
    if (ckpt / "optimizer.safetensors").exists():
        if state["optimizer"] is None:
            raise NpgptError(f"{ckpt / 'state.json'}: field 'optimizer' is missing; cannot resume")
        saved, mine = state["optimizer"].get("type", "AdamW"), "Muon" if isinstance(optimizer, Muon) else "AdamW"
        if saved != mine:
            raise NpgptError(f"{ckpt} was trained with {saved}, this run asks for {mine}; resume with "
                             f"--set optimizer={str(saved).lower()} or start a new run")
        optimizer.load_state_dict(load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
    return state


class _Logger:
    """One line per log interval (or a live status line on a TTY), and metrics.jsonl records.
    A context manager: leaving the block ends the live line and closes metrics.jsonl."""

    def __init__(self, out, quiet, stream=None, append=False, writer=True):
        self.quiet = quiet or not writer                  # data-parallel: rank 0 alone speaks
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.path = Path(out) / "metrics.jsonl" if writer else Path(os.devnull)
        try:                                  # a resumed run adds to its records; any other starts afresh
            self.metrics = open(self.path, "a" if append else "w", encoding="utf-8")
        except OSError as e:
            raise write_error(self.path, e) from None
        self.live = False

    def __call__(self, msg):
        if not self.quiet:
            if self.live:
                self.stream.write("\n")
                self.live = False
            print(msg, file=self.stream, flush=True)

    def status(self, msg):
        """On a TTY, rewrite one live line; otherwise print a line."""
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\033[K" + msg)
            self.stream.flush()
            self.live = True
        else:
            print(msg, file=self.stream, flush=True)

    def record(self, **rec):
        try:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()
        except OSError as e:
            raise write_error(self.path, e) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.live and not self.quiet:
            self.stream.write("\n")
        self.metrics.close()


def _bar(frac, width=20):
    n = int(frac * width)
    return "[" + "#" * n + "-" * (width - n) + "]"


# ---- the trainer's seams -----------------------------------------------------------------------------
def model_loss(model, x, y):
    """The default loss function: the model's own cross-entropy (mean over the target tokens)."""
    return model(x, y)[1]


@dataclass
class Hooks:
    """What a caller can plug into the training step, in the order the step runs them.

    loss_fn(model, x, y) -> loss Tensor
        The loss of one micro-batch (default: the model's cross-entropy). Distillation plugs in here.
    reduce_grads(flat_grad, n_tokens) -> None
        Runs after the last micro-batch's backward and before clipping, on the optimizer's flat
        gradient buffer (the mean over this process's micro-batches) and the number of target tokens
        it saw. Data-parallel training all-reduces the gradients here, weighting each process by
        its n_tokens; None (the default) means one process, nothing to reduce.
    after_step: [fn(model, it)]
        Run after every optimizer step (pruning keeps pruned weights at zero here).
    save_files: [fn(folder)]
        Write extra files into each checkpoint folder (pruning saves its masks).
    save_model: fn(folder) or None
        Write the model into a checkpoint folder instead of model.save_pretrained (LoRA: adapters only).
    """
    loss_fn: Callable = model_loss
    reduce_grads: Callable | None = None
    after_step: list = field(default_factory=list)
    save_files: list = field(default_factory=list)
    save_model: Callable | None = None


def train(config: TrainConfig, stream=None, batch_source=None, plugins=(), load_model=None) -> TrainResult:
    """Run training as `config` says; returns a TrainResult (raises NpgptError on bad input).

    batch_source: optional object with get_batch / tokenizer / vocab_size (SFT data plugs in here).
    plugins: callables plugin(model, src, cfg, hooks), run once the model is built (src: the folder it
    came from, or None), that fill in `hooks` (see Hooks); npgpt.compress.TRAINING_PLUGINS adds
    distillation (--teacher) and keeping pruned weights at zero.
    load_model: how --init-from / --resume folders load (see build_model).
    Parameters with requires_grad off (a LoRA base) get no gradient buffer and no optimizer state.
    """
    cfg = config.validate()
    if cfg.sft and batch_source is None:
        raise NpgptError(f"{cfg.out} is a fine-tuning run on {cfg.sft}; continue it with `npgpt finetune --resume "
                         f"--out {cfg.out}`" if cfg.resume else "an --sft run needs its SFT data: use `npgpt finetune --sft`")
    # paths stored absolute in state.json, so --resume from another directory finds the same files
    cfg = dataclasses.replace(cfg, **{k: str(Path(getattr(cfg, k)).resolve())
                                      for k in ("data", "init_from", "sft", "teacher") if getattr(cfg, k)})
    comm, device = for_device(current(), cfg.device)  # mpiexec -n N: this rank's GPU and NCCL; else as is
    cfg = dataclasses.replace(cfg, device=device) if device != cfg.device else cfg
    xp = xp_for(cfg.device)                           # a clear error now if the GPU is unusable
    tune_malloc()
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise NpgptError(f"--out {cfg.out} is a file; choose a folder for the run")
    # data-parallel: rank 0 holds the run folder's lock for the whole job
    lock = run_lock(cfg.out, "finetune" if cfg.init_from or cfg.sft else "train") if comm.is_root else nullcontext()
    with lock:
        return _train_locked(cfg, stream, batch_source, plugins, xp, comm, load_model)


def _train_locked(cfg, stream, batch_source, plugins, xp, comm, load_model=None):
    out = _prepare_out(cfg)
    with _Logger(out, cfg.quiet, stream, append=cfg.resume, writer=comm.is_root) as log:
        data = batch_source or _open_data(cfg, log, comm)
        model, src = build_model(cfg, data, log, load_model)
        block = _block_size(cfg, data, model)
        tokenizer = data.tokenizer()
        if cfg.device != "cpu":
            model.to(cfg.device)
        model.train()
        hooks = Hooks()
        for plugin in plugins:
            plugin(model, src, cfg, hooks)
        replicas_plugin(model, src, cfg, hooks)         # last: it wraps the loss the others set
        if cfg.teacher and hooks.loss_fn is model_loss:
            raise NpgptError("--teacher needs the distillation plugin (npgpt.compress.TRAINING_PLUGINS)")
        if cfg.lora_rank is not None and hooks.save_model is None:
            raise NpgptError("--lora-rank needs the LoRA plugin (npgpt.lora.lora_plugin, with load_model="
                             "npgpt.lora.load_model_folder)")
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]   # LoRA freezes the base
        optimizer = build_optimizer(trainable, comm, cfg)
        dp = None
        if comm.world_size > 1:                       # data-parallel: count-weighted loss, gradient reduction
            dp = DataParallel(comm)
            dp.install(hooks, optimizer)
        scaler = DynamicLossScaler(enabled=Precision(cfg.precision).needs_loss_scaling)
        run = _Run(cfg, out, log, data, model, tokenizer, optimizer, scaler, hooks, block, src, dp)
        run.describe(xp)
        with use_precision(cfg.precision), _catch_sigint() as interrupted:
            if dp is not None:
                interrupted = dp.agree_on(interrupted)   # every rank stops at the same step
            it = run.loop(interrupted)
        if interrupted():
            run.checkpoint(it, "interrupt")
            log(f"interrupted at step {it}: checkpoint saved in {out / 'ckpt'}")
            raise Interrupted(out)
        return TrainResult(out, it, run.best_val, run.last_loss, run.history)


def build_optimizer(named_params, comm, cfg: TrainConfig):
    """The run's optimizer: AdamW (ZeroAdamW with zero_stage=1), or Muon + AdamW (optimizer=muon;
    ZeroMuon with zero_stage=1)."""
    common = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "muon":          # zero_stage=1: whole matrices per rank (Newton-Schulz needs them)
        return make_muon(named_params, comm, cfg.zero_stage, **common, muon_lr=cfg.muon_lr,
                         muon_momentum=cfg.muon_momentum, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps,
                         muon_weight_decay=cfg.muon_weight_decay)
    return make_optimizer(named_params, comm, cfg.zero_stage, **common)


class _Run:
    """The state of one training run and the loop over it (nanoGPT's train.py loop, in small parts)."""

    def __init__(self, cfg, out, log, data, model, tokenizer, optimizer, scaler, hooks, block, src, dp=None):
        self.cfg, self.out, self.log, self.data, self.model = cfg, out, log, data, model
        self.tokenizer, self.optimizer, self.scaler, self.hooks, self.block = tokenizer, optimizer, scaler, hooks, block
        self.start, self.best_val, self.last_loss, self.history = 0, float("inf"), None, []
        self.dp, self.rank = dp, dp.rank if dp is not None else 0       # data-parallel (None: one process)
        ranks = dp.comm.world_size if dp is not None else 1
        self.tokens_per_iter = cfg.batch_size * block * cfg.gradient_accumulation_steps * ranks
        if cfg.resume:
            state = _load_resume_state(out, optimizer)
            self.start, self.best_val = state["iter"], state["best_val_loss"]
            if self.start > cfg.max_iters:
                raise NpgptError(f"the checkpoint is at step {self.start}, beyond --max-iters {cfg.max_iters}; "
                                 f"give a larger --max-iters to continue it")
            if scaler.enabled and "loss_scaler" in state:
                scaler.load_state_dict(state["loss_scaler"])
        mcfg = model.config
        log(f"model: {mcfg.n_layer} layers, {mcfg.n_head} heads, n_embd {mcfg.n_embd}, block {block}, "
            f"vocab {mcfg.vocab_size}: {model.num_params():,} parameters" + (f" (from {src})" if src else ""))
        log(optimizer.describe())
        if cfg.resume:
            log(f"resuming from step {self.start} (best val loss {self.best_val:.4f})")

    def describe(self, xp):
        self.flops_per_iter = self.model.flops_per_token(self.block) * self.tokens_per_iter
        ranks = self.dp.comm.world_size if self.dp is not None else 1   # each rank measures its share
        self.peak = gemm_peak_gflops(xp, precision=self.cfg.precision) * 1e9 * ranks   # the run's precision
        self.log(f"tokens per iteration: {self.tokens_per_iter:,}; training {self.cfg.max_iters} iterations "
                 f"on {self.cfg.device}")

    def loop(self, interrupted):
        """eval/checkpoint -> one optimizer step over the micro-batches -> log; returns the last step."""
        cfg = self.cfg
        self.clock = _Clock()
        it = self.start
        for it in range(self.start, cfg.max_iters + 1):
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and not (cfg.resume and it == self.start):
                self.evaluate_and_save(it)
                self.clock.restart()                          # eval time is not training time
            if it == cfg.max_iters or interrupted():
                break
            lr = lr_at(it, cfg)
            _set_dropout_rng(self.model, step_rng(cfg.seed, it, DROPOUT_STREAM, self.rank))
            batch_rng = step_rng(cfg.seed, it, 0, self.rank)          # rank r's own micro-batches
            batches = (self.data.get_batch("train", cfg.batch_size, self.block, batch_rng, device=cfg.device)
                       for _ in range(cfg.gradient_accumulation_steps))
            loss_sum = train_step(self.model, self.optimizer, batches, cfg.gradient_accumulation_steps,
                                  cfg.grad_clip, lr, self.hooks, self.scaler)
            for callback in self.hooks.after_step:
                callback(self.model, it + 1)
            self.clock.tick()
            if (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.max_iters:
                self.log_step(it + 1, loss_sum, lr)
        return it

    def evaluate_and_save(self, it):
        losses = estimate_loss(self.model, self.data, self.cfg, it, self.block, self.dp)
        if not all(math.isfinite(v) for v in losses.values()):
            self.diverged(losses["train"], it)
        rec = {"kind": "eval", "iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
               "lr": lr_at(it, self.cfg)}
        self.history.append(rec)
        self.log.record(**rec)
        self.log(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        improved = losses["val"] < self.best_val
        if improved:
            self.best_val = losses["val"]
        if it > 0 and (improved or self.cfg.always_save_checkpoint):
            self.checkpoint(it, "eval")
            self.log(f"saved checkpoint to {self.out / 'ckpt'}")

    def log_step(self, step, loss_sum, lr):
        cfg = self.cfg
        if self.dp is not None:
            self.last_loss = self.dp.global_loss            # the global batch's loss, the same on every rank
        else:
            self.last_loss = float(asnumpy(loss_sum)) / cfg.gradient_accumulation_steps   # sync point
        if not math.isfinite(self.last_loss):
            self.diverged(self.last_loss, step)
        synchronize()
        dt = self.clock.seconds_per_iter()
        tps, mfu = self.tokens_per_iter / dt, self.flops_per_iter / dt / self.peak
        norm = getattr(self.optimizer, "last_grad_norm", None)
        norm = float(norm) if norm is not None and math.isfinite(float(norm)) else None
        self.log.record(kind="train", iter=step, loss=self.last_loss, lr=lr, ms_per_iter=dt * 1e3,
                        tokens_per_s=tps, mfu=mfu, grad_norm=norm)
        msg = (f"iter {step}/{cfg.max_iters}: loss {self.last_loss:.4f}, lr {lr:.2e}, {dt * 1e3:.1f} ms/iter, "
               f"{tps:,.0f} tok/s, MFU {mfu * 100:.1f}%, ETA {dt * (cfg.max_iters - step):.0f}s")
        self.log.status(f"{_bar(step / cfg.max_iters)} {msg}" if self.log.tty else msg)

    def diverged(self, loss, step):
        raise NpgptError(f"loss became {loss} at step {step}; stopped. The last good checkpoint is kept in "
                         f"{self.out / 'ckpt'}: try a lower --lr")

    def checkpoint(self, it, reason):
        cfg = self.cfg
        optimizer = self.optimizer
        if self.dp is not None:
            optimizer = self.dp.saved_optimizer(optimizer)   # collective (ZeRO-1 gathers its shards)
            if not self.dp.comm.is_root:
                return                                        # rank 0 alone writes
        save_checkpoint(self.out, self.model, self.tokenizer, optimizer, {
            "iter": it, "best_val_loss": self.best_val, "config": dataclasses.asdict(cfg),
            "rng": {"scheme": "numpy default_rng([seed, iter, stream])", "seed": cfg.seed,
                    "streams": {"batches": 0, "eval": EVAL_STREAM, "dropout": DROPOUT_STREAM}},
            "data": {"path": str(Path(self.data.path).resolve()) if getattr(self.data, "path", "") else "",
                     "next_batch_iter": it},
            "reason": reason, "loss_scaler": self.scaler.state_dict(),
        }, self.hooks.save_files, self.hooks.save_model)


class _Clock:
    """Seconds per training iteration since the last reading (eval time left out by restart())."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.t, self.iters = time.perf_counter(), 0

    def tick(self):
        self.iters += 1

    def seconds_per_iter(self):
        now = time.perf_counter()
        dt = (now - self.t) / max(self.iters, 1)
        self.t, self.iters = now, 0
        return dt


def _block_size(cfg, data, model):
    """The training context: --block-size, else the data's (SFT), else the model's; checked."""
    block = cfg.block_size or getattr(data, "block_size", None) or model.config.block_size
    if block > model.config.block_size:
        raise NpgptError(f"block_size {block} is larger than the model's n_positions {model.config.block_size}")
    data.check_split_sizes(block)
    return block


@contextmanager
def _catch_sigint():
    """Within the block, Ctrl-C sets a flag (read by calling the yielded function) instead of raising,
    so the loop stops at the end of the step and saves; outside the main thread signals are not ours."""
    caught = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield lambda: bool(caught)
    finally:
        signal.signal(signal.SIGINT, previous)


def train_step(model, optimizer, batches, n_micro, grad_clip, lr, hooks=None, scaler=None):
    """One optimizer step over `n_micro` micro-batches; returns the summed (unscaled) loss array.

        for each micro-batch: loss = hooks.loss_fn(model, x, y); backward(loss / n_micro)
        hooks.reduce_grads(flat_grad, n_tokens)       <- the data-parallel seam
        clip the global gradient norm; AdamW step

    Each micro-batch's loss is scaled by 1/n_micro *before* backward, so the gradients that
    accumulate in the optimizer's flat buffer are the mean over micro-batches; clipping then sees
    the same global norm one big batch would give (the bug of nanoGPT issue #168 cannot happen).
    """
    hooks = hooks or Hooks()
    optimizer.zero_grad()
    loss_sum, n_tokens = None, 0
    for x, y in batches:
        loss = hooks.loss_fn(model, x, y)
        scaled = loss * (1.0 / n_micro)
        (scaler.scale_loss(scaled) if scaler is not None else scaled).backward()
        loss_sum = loss.data if loss_sum is None else loss_sum + loss.data
        n_tokens += y.size
    if hooks.reduce_grads is not None:
        hooks.reduce_grads(optimizer.grad, n_tokens)
    # the gradient norm before clipping is kept for the log line (`npgpt plot` draws it)
    if scaler is not None and scaler.enabled:
        _, optimizer.last_grad_norm = scaler.step(optimizer, lr, grad_clip)   # fp16: skips the step on inf/NaN
    else:
        optimizer.last_grad_norm = optimizer.clip_grad_norm(grad_clip)
        optimizer.step(lr)
    return loss_sum


def _set_dropout_rng(model, rng):
    """Point every module's dropout at this step's generator."""
    for m in model.modules():
        if hasattr(m, "rng"):
            m.rng = rng


def config_for_resume(out, overrides: dict) -> TrainConfig:
    """The saved run's config from OUT/ckpt/state.json, with `overrides` (e.g. a longer max_iters)."""
    base = read_state(find_checkpoint(out))["config"]
    types = _field_types()
    for fixed in ("n_layer", "n_head", "n_embd", "preset", "arch", "bias", "optimizer", *RECIPE_DEFAULTS):
        # compared as the field's type: `--set n_layer=1` equals a saved 1
        if fixed in overrides and _coerce(fixed, overrides[fixed], types[fixed]) != getattr(base, fixed):
            raise NpgptError(f"--resume cannot change {fixed} (the checkpoint has {getattr(base, fixed)})")
    return apply_overrides(base, {**overrides, "resume": True, "out": str(out), "force": False}).validate()
