"""Training: the loop, evaluation, checkpoints and exact resume (the config is npgpt.training.config).

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
    hooks.eval_loss(model, x, y) -> loss       an evaluation batch's loss (DPO's pairs, RL's prompts)
    hooks.eval_metrics: [fn(model, it) -> {}]  extra numbers at each evaluation (held-out accuracy)

    def my_plugin(model, src, cfg, hooks):     # src: the folder the model came from, or None
        hooks.after_step.append(lambda model, it: ...)
    train(cfg, plugins=[my_plugin])

The standard plugins (npgpt.training.plugins: pruning masks, distillation, LoRA) sit one floor below
and always run, so `train(cfg)` trains every config as it is; the trainer itself imports nothing above
its floor. The config (TrainConfig, its sections and `--set key=value` parsing) is
npgpt.training.config; batches come from a npgpt.data.BatchSource; train_step returns a StepStats.

Given a communicator of N ranks (`train(cfg, comm=...)`; `mpiexec -n N npgpt train` passes the
job's) the trainer fills the loss and gradient hooks with npgpt.distributed.data_parallel.DataParallel
(count-weighted loss, one gradient reduction per step), shares evaluation, agrees on Ctrl-C, and lets rank 0 alone write (README "Data-parallel
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
from npgpt.backend import asnumpy, check_fits, synchronize, xp_for
from npgpt.checkpoint import (STATE_FILE, atomic_write_json, checkpoint_writer, find_checkpoint, has_checkpoint,
                              load_tensors, read_run_state, save_tensors, verify_checkpoint)
from npgpt.data import BatchSource, TokenData, ensure_builtin_dataset
from npgpt.distributed.comm import Communicator, SingleProcess, for_device, local_rank0_first
from npgpt.distributed.data_parallel import DataParallel, check_ranks_agree
from npgpt.distributed.zero import make_muon, make_optimizer
from npgpt.errors import NpgptError
from npgpt.fileio import open_log, write_error
from npgpt.gguf_models import is_gguf
from npgpt.hub import is_hub_ref
from npgpt.llama import build_model as new_model
from npgpt.llama import preset_config
from npgpt.loading import from_pretrained
from npgpt.model import RECIPE_DEFAULTS
from npgpt.optim import Muon, get_lr
from npgpt.perf import gemm_peak_gflops, shared_cpu_threads, tune_malloc
from npgpt.precision import Precision, use_precision
from npgpt.replicas import training_plugin as replicas_plugin
from npgpt.safeio import run_lock
from npgpt.tensor import no_grad
from npgpt.training.config import TrainConfig, apply_overrides, coerce, field_types
from npgpt.training.plugins import PLUGINS
from npgpt.training.scaler import DynamicLossScaler

EVAL_STREAM, DROPOUT_STREAM = 1, 2   # sub-streams of the per-step generator seeds


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

    def __init__(self, out, step=None):
        at = f" at step {step}" if step is not None else ""
        super().__init__(f"interrupted{at}: checkpoint saved in {out}; continue with --resume")
        self.out = out


def _plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


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


def _open_data(cfg: TrainConfig, log, comm, trust_pattern=False):
    if cfg.data is None:
        log("no --data given: using the built-in pydoc corpus, character-level (prepared once, cached)")
        path = local_rank0_first(comm, lambda: ensure_builtin_dataset("pydoc", tokenizer="char"))
    else:
        path = Path(cfg.data)
    data = TokenData(path, trust_pattern=trust_pattern)
    data.check_token_ids()              # a damaged .bin would index past the embedding
    return data


def build_model(cfg: TrainConfig, data, log, trust_pattern=False):
    """The model to train: resumed, initialised from a folder (npgpt.loading reads any model folder:
    GPT-2, Llama, quantised, a LoRA run's adapter with its base), or new from the preset + overrides."""
    vocab = data.vocab_size
    if cfg.resume or cfg.init_from:
        src = find_checkpoint(cfg.out if cfg.resume else cfg.init_from)
        kept = {"keep_quantized": True} if cfg.keep_quantized and not cfg.resume else {}
        if kept and not is_gguf(src):
            raise NpgptError(f"keep_quantized applies to --init-from a .gguf file, and {src} is not one")
        model = from_pretrained(src, dropout=cfg.dropout, **kept)   # a quantised one trains LoRA adapters only
        if not data.grow_vocab:                         # resumed or fine-tuned: the data's tokenizer is the model's
            _check_same_tokenizer(src, data, trust_pattern)
        if model.config.vocab_size < vocab and data.grow_vocab:
            log(f"adding {vocab - model.config.vocab_size} embedding rows for new special tokens")
            model.resize_token_embeddings(vocab)
        if model.config.vocab_size < vocab:
            raise NpgptError(f"the data's vocabulary ({vocab}) is larger than the model's ({model.config.vocab_size})")
        return model, src
    over = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg, k)}
    over.update({k: getattr(cfg, k) for k in RECIPE_DEFAULTS if getattr(cfg, k) is not None})
    mcfg = preset_config(cfg.preset, cfg.arch, vocab_size=vocab, dropout=cfg.dropout, bias=cfg.bias, **over)
    n = mcfg.num_params()        # float32 weights, gradients and AdamW's two moments: 16 bytes a parameter
    check_fits(16 * n, f"training a model of {n:,} parameters", cfg.device,
               "use a smaller model (--set n_layer=, n_embd=, or a smaller --preset)")
    return new_model(mcfg, seed=cfg.seed), None


def _check_same_tokenizer(model_dir, data, trust_pattern=False):
    if not tk.is_tokenizer_dir(model_dir) and not is_gguf(model_dir):
        raise NpgptError(f"{model_dir} has no tokenizer files; a model folder needs its tokenizer to fine-tune on prepared data")
    mine = tk.load(model_dir, trust_pattern=trust_pattern).fingerprint()
    theirs = data.tokenizer().fingerprint()
    if mine != theirs:
        raise NpgptError(f"the data in {data.path} was tokenized with a different tokenizer than the model in "
                         f"{model_dir}; prepare it with `npgpt prepare --tokenizer-from {model_dir}`")


def estimate_loss(model, data, cfg, it, block_size, dp=None, loss_fn=None):
    """Mean loss over eval_iters batches of each split (model in eval mode, no graph); with `dp`
    (data-parallel) the ranks share the same batches and average them. loss_fn(model, x, y): the
    loss of one batch (default: the model's cross-entropy; Hooks.eval_loss)."""
    loss_fn = loss_fn or model_loss
    out = {}
    model.eval()
    with no_grad():
        for split in ("train", "val"):
            r = step_rng(cfg.seed, it, EVAL_STREAM if split == "val" else EVAL_STREAM + 10)
            if dp is not None:
                batches = (data.get_batch(split, cfg.batch_size, block_size, r, device=cfg.device)
                           for _ in range(cfg.eval_iters))
                out[split] = dp.eval_losses(model, batches, loss_fn)
                continue
            losses = []
            for _ in range(cfg.eval_iters):
                x, y = data.get_batch(split, cfg.batch_size, block_size, r, device=cfg.device)
                losses.append(loss_fn(model, x, y).data)
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


def read_state(ckpt) -> dict:
    """A checkpoint's state.json, checked: types of every field (the run's config too) and iter <=
    max_iters. NpgptError naming the file and field; the config comes back as a TrainConfig."""
    p = Path(ckpt) / STATE_FILE
    state = read_run_state(ckpt)
    if state is None:
        raise NpgptError(f"{p} is missing; the folder is a model, not a training run's checkpoint")
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
        # a resumed run adds to its records; any other starts afresh (a link or device: npgpt.fileio's rules)
        self.metrics = open_log(self.path, append=append)
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
    step_context: () -> context manager
        Entered around each step's micro-batches and gradient reduction (the thread replicas hold
        BLAS at one thread per replica there); leaving it, by an error too, restores what it set.
    close: [fn()]
        Run when training ends, however it ends (the thread replicas shut their pool down).
    eval_loss(model, x, y) -> loss Tensor
        The loss of one evaluation batch, in eval mode without a graph (default: the model's
        cross-entropy). A batch source whose batches are not (ids, targets) sets it (DPO's pairs).
    eval_metrics: [fn(model, it) -> {name: float}]
        Run at each evaluation; the numbers join the eval record in metrics.jsonl and its log line
        (DPO: held-out preference accuracy and reward margin; RL: held-out accuracy).
    """
    loss_fn: Callable = model_loss
    reduce_grads: Callable | None = None
    after_step: list = field(default_factory=list)
    save_files: list = field(default_factory=list)
    step_context: Callable = nullcontext
    close: list = field(default_factory=list)
    save_model: Callable | None = None
    eval_loss: Callable = model_loss
    eval_metrics: list = field(default_factory=list)


def train(config: TrainConfig, stream=None, batch_source: BatchSource | None = None, plugins=(),
          comm: Communicator | None = None, trust_pattern: bool = False) -> TrainResult:
    """Run training as `config` says; returns a TrainResult (raises NpgptError on bad input).

    comm: the job's communicator (npgpt.distributed.comm.get_communicator() under mpiexec: then the
    run is data-parallel over its ranks); None trains in this process alone.

    trust_pattern: the data's and the model's tokenizers may use a split regex that is not a named
    one (what `npgpt --trust-pattern` passes).

    batch_source: where batches come from (npgpt.data.BatchSource; SFT data plugs in here), default
    the prepared data folder cfg.data. Every config trains as it is: the standard plugins
    (npgpt.training.plugins: pruning masks, distillation, LoRA) always run, each doing nothing unless
    its settings ask; `plugins` adds the caller's own, plugin(model, src, cfg, hooks), run after them
    (src: the folder the model came from, or None), that fill in `hooks` (see Hooks).
    Parameters with requires_grad off (a LoRA base) get no gradient buffer and no optimizer state.
    """
    cfg = config.validate()
    if cfg.sft and batch_source is None:
        raise NpgptError(f"{cfg.out} is a fine-tuning run on {cfg.sft}; continue it with `npgpt finetune --resume "
                         f"--out {cfg.out}`" if cfg.resume else "an --sft run needs its SFT data: use `npgpt finetune --sft`")
    for key, how in (("dpo", "npgpt.dpo.finetune_dpo"), ("rl", "npgpt.rl.finetune_rl")):
        if getattr(cfg, key) and batch_source is None:
            raise NpgptError(f"a --{key} run needs its batches and loss: use `npgpt finetune --{key}` (or {how})")
    # paths stored absolute in state.json, so --resume from another directory finds the same files
    # (an hf:ORG/NAME model reference names the same model from anywhere)
    cfg = dataclasses.replace(cfg, **{k: str(Path(getattr(cfg, k)).resolve())
                                      for k in ("data", "init_from", "sft", "teacher")
                                      if getattr(cfg, k) and not is_hub_ref(getattr(cfg, k))})
    comm, device = for_device(comm or SingleProcess(), cfg.device)   # several ranks: this rank's GPU, NCCL
    cfg = dataclasses.replace(cfg, device=device) if device != cfg.device else cfg
    xp = xp_for(cfg.device)                           # a clear error now if the GPU is unusable
    tune_malloc()
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise NpgptError(f"--out {cfg.out} is a file; choose a folder for the run")
    created = not Path(cfg.out).exists()
    # data-parallel: rank 0 holds the run folder's lock for the whole job
    lock = run_lock(cfg.out, "finetune" if cfg.init_from or cfg.sft else "train") if comm.is_root else nullcontext()
    try:
        # a busy CPU: fewer row-block threads, chosen once here (npgpt.perf; changes no number)
        with lock, shared_cpu_threads() if cfg.device == "cpu" else nullcontext((None, "")) as threads:
            return _train_locked(cfg, stream, batch_source, plugins, xp, comm, trust_pattern, threads)
    except NpgptError:
        if created and comm.is_root:
            _remove_unused_out(Path(cfg.out))
        raise


def _remove_unused_out(out: Path):
    """A run refused before its first record leaves no trace: the --out folder it created goes again
    when it holds nothing but the empty metrics.jsonl (anything else there stays)."""
    try:
        entries = list(out.iterdir())
        if all(p.name == "metrics.jsonl" and p.is_file() and not p.is_symlink() and p.stat().st_size == 0
               for p in entries):
            for p in entries:
                p.unlink()
            out.rmdir()
    except OSError:
        pass                                              # best effort: the error being raised is what matters


def _train_locked(cfg, stream, batch_source, plugins, xp, comm, trust_pattern=False, threads=(None, "")):
    out = _prepare_out(cfg)
    with _Logger(out, cfg.quiet, stream, append=cfg.resume, writer=comm.is_root) as log:
        data = batch_source or _open_data(cfg, log, comm, trust_pattern)
        model, src = build_model(cfg, data, log, trust_pattern)
        if threads[0] is not None:                  # after the inputs are checked: bad input stays one line
            log(f"threads: {threads[0]} ({threads[1]})")
        block = _block_size(cfg, data, model)
        tokenizer = data.tokenizer()
        if cfg.device != "cpu":
            model.to(cfg.device)
        model.train()
        hooks = Hooks()
        for plugin in (*PLUGINS, *plugins):             # the standard ones (pruning masks, distillation, LoRA)
            plugin(model, src, cfg, hooks)
        replicas_plugin(model, src, cfg, hooks)         # last: it wraps the loss the others set
        try:
            if comm.world_size > 1:                     # before any collective sizes a buffer by the model
                check_ranks_agree(comm, tokenizer, model)
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
                log.record(kind="interrupt", iter=it)          # the CLI prints the one line about it
                raise Interrupted(out, it)
            return TrainResult(out, it, run.best_val, run.last_loss, run.history)
        finally:
            for close in hooks.close:                   # however training ends (the replicas' threads)
                close()


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
            self.resumed_tokens = (state.get("tokens_per_iter"), state.get("ranks"))
            if self.start > cfg.max_iters:
                raise NpgptError(f"the checkpoint is at step {self.start}, beyond --max-iters {cfg.max_iters}; "
                                 f"give a larger --max-iters to continue it")
            if scaler.enabled and "loss_scaler" in state:
                scaler.load_state_dict(state["loss_scaler"])
        mcfg = model.config
        heads = _plural(mcfg.n_head, 'head') + (f" ({mcfg.n_kv_head} key/value)" if mcfg.n_kv_head != mcfg.n_head else "")
        log(f"model: {mcfg.arch}, {_plural(mcfg.n_layer, 'layer')}, {heads}, n_embd {mcfg.n_embd}, context {mcfg.block_size}, "
            f"vocab {mcfg.vocab_size}: {model.num_params():,} parameters" + (f" (from {src})" if src else "")
            + (f"; training rows of {block} tokens" if block != mcfg.block_size else ""))
        log(optimizer.describe())
        if cfg.resume:
            log(f"resuming from step {self.start} (best val loss {self.best_val:.4f})")

    def describe(self, xp):
        self.flops_per_iter = self.model.flops_per_token(self.block) * self.tokens_per_iter
        ranks = self.dp.comm.world_size if self.dp is not None else 1   # each rank measures its share
        self.peak = gemm_peak_gflops(xp, precision=self.cfg.precision) * 1e9 * ranks   # the run's precision
        cfg = self.cfg
        shape = (f" ({ranks} ranks x batch {cfg.batch_size} x {self.block} tokens"
                 + (f" x {cfg.gradient_accumulation_steps} micro-steps" if cfg.gradient_accumulation_steps > 1 else "")
                 + ")") if ranks > 1 else ""
        where = f"{ranks} ranks, each on {cfg.device}" if ranks > 1 else cfg.device
        self.log(f"tokens per iteration: {self.tokens_per_iter:,}{shape}; training {cfg.max_iters} iterations on {where}")
        before, before_ranks = getattr(self, "resumed_tokens", (None, None))
        if before is not None and before != self.tokens_per_iter:
            # the schedule counts steps, so each remaining step now sees a different number of tokens
            self.log(f"note: this run took {before:,} tokens per iteration"
                     + (f" on {_plural(before_ranks, 'rank')}" if before_ranks else "")
                     + f"; it now takes {self.tokens_per_iter:,}. The learning-rate schedule counts steps; to keep "
                     f"the global batch, set --batch-size so that ranks x batch x accumulation matches")

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
            stats = train_step(self.model, self.optimizer, batches, cfg.gradient_accumulation_steps,
                               cfg.grad_clip, lr, self.hooks, self.scaler)
            for callback in self.hooks.after_step:
                callback(self.model, it + 1)
            self.clock.tick()
            if (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.max_iters:
                self.log_step(it + 1, stats, lr)
        return it

    def evaluate_and_save(self, it):
        losses = estimate_loss(self.model, self.data, self.cfg, it, self.block, self.dp, self.hooks.eval_loss)
        if not all(math.isfinite(v) for v in losses.values()):
            self.diverged(losses["train"], it)
        extra = {}
        for metrics in self.hooks.eval_metrics:
            extra.update(metrics(self.model, it))
        rec = {"kind": "eval", "iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
               "lr": lr_at(it, self.cfg), **extra}
        self.history.append(rec)
        self.log.record(**rec)
        self.log(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                 + "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in extra.items()))
        improved = losses["val"] < self.best_val
        if improved:
            self.best_val = losses["val"]
        if it > 0 and (improved or self.cfg.always_save_checkpoint):
            self.checkpoint(it, "eval")
            self.log(f"saved checkpoint to {self.out / 'ckpt'}")

    def log_step(self, step, stats, lr):
        cfg = self.cfg
        if self.dp is not None:
            self.last_loss = self.dp.global_loss            # the global batch's loss, the same on every rank
        else:
            self.last_loss = float(asnumpy(stats.loss)) / cfg.gradient_accumulation_steps   # sync point
        if not math.isfinite(self.last_loss):
            self.diverged(self.last_loss, step)
        synchronize()
        dt = self.clock.seconds_per_iter()
        tps, mfu = self.tokens_per_iter / dt, self.flops_per_iter / dt / self.peak
        norm = float(stats.grad_norm) if math.isfinite(float(stats.grad_norm)) else None
        self.log.record(kind="train", iter=step, loss=self.last_loss, lr=lr, ms_per_iter=dt * 1e3,
                        tokens_per_s=tps, mfu=mfu, grad_norm=norm)
        msg = (f"iter {step}/{cfg.max_iters}: loss {self.last_loss:.4f}, lr {lr:.2e}, {dt * 1e3:.1f} ms/iter, "
               f"{tps:,.0f} tok/s, ETA {dt * (cfg.max_iters - step):.0f}s")
        # MFU stays in metrics.jsonl only: its peak is measured once at start, and on a busy machine
        # that reading is low, so a per-step "MFU 228%" would mislead (npgpt bench measures it properly)
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
            "data": {"path": str(Path(self.data.path).resolve()) if self.data.path else "",
                     "next_batch_iter": it},
            "reason": reason, "loss_scaler": self.scaler.state_dict(),
            "tokens_per_iter": self.tokens_per_iter, "ranks": self.dp.comm.world_size if self.dp is not None else 1,
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
    block = cfg.block_size or data.block_size or model.config.block_size
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


@dataclass
class StepStats:
    """What one optimizer step reports (train_step's result).

    loss        the micro-batches' losses summed (unscaled; an array on the model's device, so reading
                it is a sync point: divide by n_micro for the mean)
    grad_norm   the gradient's global norm before clipping (`npgpt plot` draws it); inf on an fp16 overflow
    skipped     True when the loss scaler skipped the update (fp16 overflow)
    """
    loss: object
    grad_norm: object
    skipped: bool = False


def train_step(model, optimizer, batches, n_micro, grad_clip, lr, hooks=None, scaler=None) -> StepStats:
    """One optimizer step over `n_micro` micro-batches; returns its StepStats.

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
    with hooks.step_context():
        for x, y in batches:
            loss = hooks.loss_fn(model, x, y)
            scaled = loss * (1.0 / n_micro)
            (scaler.scale_loss(scaled) if scaler is not None else scaled).backward()
            loss_sum = loss.data if loss_sum is None else loss_sum + loss.data
            n_tokens += y.size
        if hooks.reduce_grads is not None:
            hooks.reduce_grads(optimizer.grad, n_tokens)
    if scaler is not None and scaler.enabled:
        stepped, norm = scaler.step(optimizer, lr, grad_clip)       # fp16: skips the step on inf/NaN
        return StepStats(loss_sum, norm, skipped=not stepped)
    norm = optimizer.clip_grad_norm(grad_clip)
    optimizer.step(lr)
    return StepStats(loss_sum, norm)


def _set_dropout_rng(model, rng):
    """Point every module's dropout at this step's generator."""
    for m in model.modules():
        if hasattr(m, "rng"):
            m.rng = rng


def config_for_resume(out, overrides: dict) -> TrainConfig:
    """The saved run's config from OUT/ckpt/state.json, with `overrides` (e.g. a longer max_iters)."""
    base = read_state(find_checkpoint(out))["config"]
    types = field_types()
    for fixed in ("n_layer", "n_head", "n_embd", "preset", "arch", "bias", "optimizer", *RECIPE_DEFAULTS):
        # compared as the field's type: `--set n_layer=1` equals a saved 1
        if fixed in overrides and coerce(fixed, overrides[fixed], types[fixed]) != getattr(base, fixed):
            raise NpgptError(f"--resume cannot change {fixed} (the checkpoint has {getattr(base, fixed)})")
    return apply_overrides(base, {**overrides, "resume": True, "out": str(out), "force": False}).validate()
