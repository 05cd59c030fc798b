"""Training: the typed config, the loop, evaluation, checkpoints and exact resume.

`train(config)` is the whole job `npgpt train` runs, importable and free of side effects at
import time:

    data (memmapped token files) -> batches -> model forward/backward (accumulated over micro-steps)
    -> clip -> AdamW step with the scheduled lr -> log / eval / checkpoint

Reproducibility by construction: the batch of step `it` is drawn from a generator seeded with
(seed, it), and so is that step's dropout; eval batches likewise from (seed, it, "eval"). Nothing
random carries over from one step to the next, so a resumed run needs only the weights, the
optimizer moments and the step number to continue bit-identically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npgpt.backend import asnumpy, parse_device, synchronize, xp_for
from npgpt.errors import NpgptError

EVAL_STREAM, DROPOUT_STREAM = 1, 2   # sub-streams of the per-step generator seeds


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
    preset: str = "baby"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None        # context length; defaults to the preset's
    dropout: float = 0.0
    bias: bool = True
    # optimisation
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
    lora_rank: int | None = None         # train only LoRA adapters of this rank (npgpt.lora); base frozen
    lora_alpha: float | None = None      # LoRA scale alpha / rank; default 2 * rank
    lora_dropout: float = 0.0
    lora_targets: str | None = None      # comma-separated layer names; default c_attn,c_proj,c_fc

    def validate(self):
        positive = ["max_iters", "batch_size", "learning_rate", "eval_interval", "eval_iters", "log_interval",
                    "gradient_accumulation_steps"]
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
        if not 0 <= self.dropout < 1:
            raise NpgptError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise NpgptError("beta1 and beta2 must be in [0, 1)")
        if self.teacher:
            from npgpt.ops.distill import check_distill_args
            check_distill_args(self.distill_alpha, self.distill_temperature)
        if self.lora_rank is not None:
            from npgpt.lora import lora_config
            lora_config(self)                               # a clear error for bad LoRA settings
        parse_device(self.device)
        from npgpt.precision import Precision
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
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise NpgptError("TOML config files need Python 3.11+; use a JSON file instead") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise NpgptError(f"config file {p} is not valid TOML ({e})") from None
        data = data.get("train", data)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise NpgptError(f"config file {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise NpgptError(f"config file {p} must hold an object of key: value pairs")
    return data


# ---- learning-rate schedule ----------------------------------------------------------------------
def lr_at(it, cfg: TrainConfig):
    from npgpt.optim import get_lr
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


def step_rng(seed, it, stream=0):
    """The generator for step `it` (and sub-stream): a pure function of (seed, it, stream)."""
    return np.random.default_rng([seed, it, stream])


def _prepare_out(cfg: TrainConfig):
    from npgpt.checkpoint import has_checkpoint
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


def _open_data(cfg: TrainConfig, log):
    from npgpt.data import TokenData, ensure_builtin_dataset
    if cfg.data is None:
        log("no --data given: using the built-in pydoc corpus, character-level (prepared once, cached)")
        path = ensure_builtin_dataset("pydoc", tokenizer="char")
    else:
        path = Path(cfg.data)
    return TokenData(path)


def build_model(cfg: TrainConfig, data, log):
    """The model to train: resumed, initialised from a folder, or new from the preset + overrides."""
    from npgpt.checkpoint import find_checkpoint
    from npgpt.model import GPT, GPTConfig

    vocab = data.vocab_size
    if cfg.lora_rank is not None:
        from npgpt.lora import build_lora_model          # frozen base + adapters (resumed or new)
        return build_lora_model(cfg, data, log)
    if cfg.resume or cfg.init_from:
        src = find_checkpoint(cfg.out if cfg.resume else cfg.init_from)
        model = GPT.from_pretrained(src, dropout=cfg.dropout)
        if getattr(model, "quantization", None):
            raise NpgptError(f"{src} is quantised; fine-tune the float model it came from and quantise afterwards")
        if cfg.init_from and not cfg.resume and not getattr(data, "grow_vocab", False):
            _check_same_tokenizer(src, data)
        if model.config.vocab_size < vocab and getattr(data, "grow_vocab", False):
            log(f"adding {vocab - model.config.vocab_size} embedding rows for new special tokens")
            model.resize_token_embeddings(vocab)
        if model.config.vocab_size < vocab:
            raise NpgptError(f"the data's vocabulary ({vocab}) is larger than the model's ({model.config.vocab_size})")
        return model, src
    base = GPTConfig.preset(cfg.preset)
    over = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg, k)}
    mcfg = dataclasses.replace(base, vocab_size=vocab, dropout=cfg.dropout, bias=cfg.bias, **over)
    return GPT(mcfg, seed=cfg.seed), None


def _check_same_tokenizer(model_dir, data):
    from npgpt import tokenizer as tk
    if not tk.is_tokenizer_dir(model_dir):
        raise NpgptError(f"{model_dir} has no tokenizer files; a model folder needs its tokenizer to fine-tune on prepared data")
    mine = tk.load(model_dir).fingerprint()
    theirs = data.tokenizer().fingerprint()
    if mine != theirs:
        raise NpgptError(f"the data in {data.path} was tokenized with a different tokenizer than the model in "
                         f"{model_dir}; prepare it with `npgpt prepare --tokenizer-from {model_dir}`")


def estimate_loss(model, data, cfg, it, block_size):
    """Mean loss over eval_iters batches of each split (model in eval mode, no graph)."""
    from npgpt.tensor import no_grad
    out = {}
    model.eval()
    with no_grad():
        for split in ("train", "val"):
            r = step_rng(cfg.seed, it, EVAL_STREAM if split == "val" else EVAL_STREAM + 10)
            losses = []
            for _ in range(cfg.eval_iters):
                x, y = data.get_batch(split, cfg.batch_size, block_size, r, device=cfg.device)
                losses.append(model(x, y)[1].data)
            out[split] = float(asnumpy(sum(losses))) / len(losses)   # one device sync per split
    model.train()
    return out


def save_checkpoint(out, model, tokenizer, optimizer, state):
    """Write OUT/ckpt atomically: model folder (HF GPT-2) + tokenizer + optimizer + state.json."""
    from npgpt.checkpoint import atomic_write_json, checkpoint_writer, save_tensors
    with checkpoint_writer(out) as tmp:
        if getattr(model, "lora", None):
            from npgpt.lora import save_adapter
            save_adapter(model, tmp)                       # a LoRA run saves only its adapters
        else:
            model.save_pretrained(tmp)
        tokenizer.save(tmp)
        if getattr(model, "prune_masks", None):
            from npgpt.compress import save_prune_masks
            save_prune_masks(tmp, model.prune_masks)
        if optimizer is not None:
            tensors, meta = optimizer.state_dict()
            save_tensors(tmp / "optimizer.safetensors", tensors)
            state = {**state, "optimizer": meta}
        atomic_write_json(tmp / "state.json", state)


def _load_resume_state(out, optimizer):
    from npgpt.checkpoint import find_checkpoint, load_tensors, verify_checkpoint
    ckpt = find_checkpoint(out)
    verify_checkpoint(ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NpgptError(f"{ckpt / 'state.json'} is missing or not valid JSON ({e}); cannot resume") from None
    if (ckpt / "optimizer.safetensors").exists():
        optimizer.load_state_dict(load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
    return state


class _Logger:
    """One line per log interval (or a live status line on a TTY), and metrics.jsonl records."""

    def __init__(self, out, quiet, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.metrics = open(Path(out) / "metrics.jsonl", "a", encoding="utf-8")
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
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()

    def close(self):
        if self.live and not self.quiet:
            self.stream.write("\n")
        self.metrics.close()


def _bar(frac, width=20):
    n = int(frac * width)
    return "[" + "#" * n + "-" * (width - n) + "]"


def train(config: TrainConfig, stream=None, batch_source=None) -> TrainResult:
    """Run training as `config` says; returns a TrainResult (raises NpgptError on bad input).

    batch_source: optional object with get_batch / tokenizer / vocab_size (SFT data plugs in here).
    """
    from npgpt.optim import AdamW
    from npgpt.perf import gemm_peak_gflops

    cfg = config.validate()
    xp = xp_for(cfg.device)                           # a clear error now if the GPU is unusable
    out = _prepare_out(cfg)
    log = _Logger(out, cfg.quiet, stream)
    try:
        data = batch_source or _open_data(cfg, log)
        model, src = build_model(cfg, data, log)
        mcfg = model.config
        block = cfg.block_size or getattr(data, "block_size", None) or mcfg.block_size
        if block > mcfg.block_size:
            raise NpgptError(f"block_size {block} is larger than the model's n_positions {mcfg.block_size}")
        data.check_split_sizes(block)
        tokenizer = data.tokenizer()
        if cfg.device != "cpu":
            model.to(cfg.device)
        model.train()
        from npgpt.compress import apply_prune_masks, load_prune_masks, load_teacher
        model.prune_masks = load_prune_masks(src) if src else {}    # `npgpt prune`: zeros stay zero
        teacher = load_teacher(cfg.teacher, model, cfg.device) if cfg.teacher else None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]   # LoRA: adapters only
        optimizer = AdamW(named, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        log(f"model: {mcfg.n_layer} layers, {mcfg.n_head} heads, n_embd {mcfg.n_embd}, block {block}, "
            f"vocab {mcfg.vocab_size}: {model.num_params():,} parameters"
            + (f" (from {src})" if src else ""))
        log(optimizer.describe())
        from npgpt.precision import DynamicLossScaler, Precision, set_precision
        precision = Precision(cfg.precision)
        scaler = DynamicLossScaler(enabled=precision.needs_loss_scaling)
        start, best_val = 0, float("inf")
        if cfg.resume:
            state = _load_resume_state(out, optimizer)
            start, best_val = int(state["iter"]), float(state.get("best_val_loss", float("inf")))
            if scaler.enabled and "loss_scaler" in state:
                scaler.load_state_dict(state["loss_scaler"])
            log(f"resuming from step {start} (best val loss {best_val:.4f})")
        tokens_per_iter = cfg.batch_size * block * cfg.gradient_accumulation_steps
        flops_per_iter = model.flops_per_token(block) * tokens_per_iter
        peak = gemm_peak_gflops(xp, seconds=0.2) * 1e9
        log(f"tokens per iteration: {tokens_per_iter:,}; training {cfg.max_iters} iterations on {cfg.device}")

        def checkpoint(it, reason):
            save_checkpoint(out, model, tokenizer, optimizer, {
                "iter": it, "best_val_loss": best_val, "config": dataclasses.asdict(cfg),
                "rng": {"scheme": "numpy default_rng([seed, iter, stream])", "seed": cfg.seed,
                        "streams": {"batches": 0, "eval": EVAL_STREAM, "dropout": DROPOUT_STREAM}},
                "data": {"path": str(getattr(data, "path", "")), "next_batch_iter": it},
                "reason": reason, "loss_scaler": scaler.state_dict(),
            })

        interrupted = {"flag": False}
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            interrupted["flag"] = True

        in_main = _in_main_thread()
        if in_main:
            signal.signal(signal.SIGINT, on_sigint)
        history, last_loss = [], None
        t_last, t_iters, it = time.perf_counter(), 0, start
        previous_precision = set_precision(precision)
        try:
            for it in range(start, cfg.max_iters + 1):
                if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                    if not (cfg.resume and it == start):
                        losses = estimate_loss(model, data, cfg, it, block)
                        if not all(math.isfinite(v) for v in losses.values()):
                            raise NpgptError(f"loss became {losses['train']} at step {it}; stopped. The last good "
                                             f"checkpoint is kept in {out / 'ckpt'}: try a lower --lr")
                        rec = {"kind": "eval", "iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                               "lr": lr_at(it, cfg)}
                        history.append(rec)
                        log.record(**rec)
                        log(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                        t_last, t_iters = time.perf_counter(), 0   # eval time is not training time
                        improved = losses["val"] < best_val
                        if improved:
                            best_val = losses["val"]
                        if it > 0 and (improved or cfg.always_save_checkpoint):
                            checkpoint(it, "eval")
                            log(f"saved checkpoint to {out / 'ckpt'}")
                if it == cfg.max_iters or interrupted["flag"]:
                    break
                lr = lr_at(it, cfg)
                batch_rng = step_rng(cfg.seed, it)
                _set_dropout_rng(model, step_rng(cfg.seed, it, DROPOUT_STREAM))
                batches = (data.get_batch("train", cfg.batch_size, block, batch_rng, device=cfg.device)
                           for _ in range(cfg.gradient_accumulation_steps))
                loss_sum = train_step(model, optimizer, batches, cfg.gradient_accumulation_steps, cfg.grad_clip,
                                      lr, teacher, cfg.distill_alpha, cfg.distill_temperature, scaler=scaler)
                t_iters += 1
                if model.prune_masks:
                    apply_prune_masks(model, model.prune_masks)
                if (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.max_iters:
                    last_loss = float(asnumpy(loss_sum)) / cfg.gradient_accumulation_steps   # sync point
                    if not math.isfinite(last_loss):
                        raise NpgptError(f"loss became {last_loss} at step {it + 1}; stopped. The last good "
                                         f"checkpoint is kept in {out / 'ckpt'}: try a lower --lr")
                    synchronize()
                    now = time.perf_counter()
                    dt = (now - t_last) / max(t_iters, 1)
                    t_last, t_iters = now, 0
                    tps = tokens_per_iter / dt
                    mfu = flops_per_iter / dt / peak
                    eta = dt * (cfg.max_iters - it - 1)
                    log.record(kind="train", iter=it + 1, loss=last_loss, lr=lr, ms_per_iter=dt * 1e3,
                               tokens_per_s=tps, mfu=mfu)
                    frac = (it + 1) / cfg.max_iters
                    msg = (f"iter {it + 1}/{cfg.max_iters}: loss {last_loss:.4f}, lr {lr:.2e}, "
                           f"{dt * 1e3:.1f} ms/iter, {tps:,.0f} tok/s, MFU {mfu * 100:.1f}%, ETA {eta:.0f}s")
                    log.status(f"{_bar(frac)} {msg}" if log.tty else msg)
        finally:
            set_precision(previous_precision)
            if in_main:
                signal.signal(signal.SIGINT, previous)
        if interrupted["flag"]:
            checkpoint(it, "interrupt")
            log(f"interrupted at step {it}: checkpoint saved in {out / 'ckpt'}")
            raise Interrupted(out)
        return TrainResult(out, it, best_val, last_loss, history)
    finally:
        log.close()


def train_step(model, optimizer, batches, n_micro, grad_clip, lr, teacher=None, alpha=0.5, temperature=2.0,
               scaler=None):
    """One optimizer step over `n_micro` micro-batches; returns the summed (unscaled) loss array.

    Each micro-batch's loss is scaled by 1/n_micro *before* backward, so the gradients that
    accumulate in the optimizer's flat buffer are the mean over micro-batches; clipping then sees
    the same global norm one big batch would give (the bug of nanoGPT issue #168 cannot happen).
    """
    from npgpt.ops.distill import mixed_loss
    from npgpt.tensor import no_grad
    optimizer.zero_grad()
    loss_sum = None
    for x, y in batches:
        logits, loss = model(x, y)
        if teacher is not None:
            with no_grad():
                t_logits, _ = teacher(x)
            loss = mixed_loss(logits, t_logits, y, alpha, temperature)
        scaled = loss * (1.0 / n_micro)
        (scaler.scale_loss(scaled) if scaler is not None else scaled).backward()
        loss_sum = loss.data if loss_sum is None else loss_sum + loss.data
    if scaler is not None and scaler.enabled:
        scaler.step(optimizer, lr, grad_clip)       # fp16: skips the step and halves the scale on inf/NaN
    else:
        optimizer.clip_grad_norm(grad_clip)
        optimizer.step(lr)
    return loss_sum


def _set_dropout_rng(model, rng):
    """Point every module's dropout at this step's generator."""
    for m in model.modules():
        if hasattr(m, "rng"):
            m.rng = rng


def _in_main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


def config_for_resume(out, overrides: dict) -> TrainConfig:
    """The saved run's config from OUT/ckpt/state.json, with `overrides` (e.g. a longer max_iters)."""
    from npgpt.checkpoint import find_checkpoint
    ckpt = find_checkpoint(out)
    try:
        saved = json.loads((ckpt / "state.json").read_text())["config"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise NpgptError(f"{ckpt / 'state.json'} is missing or damaged ({e}); cannot resume") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    for fixed in ("n_layer", "n_head", "n_embd", "preset", "bias"):
        if fixed in overrides and overrides[fixed] != getattr(base, fixed):
            raise NpgptError(f"--resume cannot change {fixed} (the checkpoint has {getattr(base, fixed)})")
    return apply_overrides(base, {**overrides, "resume": True, "out": str(out), "force": False})
