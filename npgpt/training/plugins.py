"""The trainer's standard plugins, one floor below it: `train(cfg)` runs all of them, each doing nothing
unless its settings ask for it, so every config trains without the caller wiring anything.

A plugin is plugin(model, src, cfg, hooks): it runs once the model is built (src: the folder the
model came from, or None) and fills the trainer's Hooks (npgpt.train.Hooks):

    keep_pruned_zeros      a model from `npgpt prune` keeps its pruned weights at zero: the masks
                           (prune_mask.safetensors) are applied after every optimizer step and saved
                           with each checkpoint
    boost_new_token_rows   `sft`: embedding rows added for the chat template's new special tokens
                           learn `sft_new_token_lr` times faster than the rest, so a short
                           fine-tune learns its end-of-turn token and chat stops
    distill_from_teacher   `teacher`: the loss becomes alpha * KD(teacher) + (1 - alpha) * CE
    lora_plugin            `lora_rank`: adapters on the frozen base, checkpoints hold the adapters only
                           (PEFT's layout); without it, a quantised model is refused (nothing to train)

PLUGINS is their order. The trainer adds two more after the caller's own: the in-process thread
replicas (npgpt.replicas, `replicas`) and data parallelism (npgpt.distributed.data_parallel, under
mpiexec), which wrap whatever loss and gradient hooks the others set.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from npgpt.backend import asnumpy, get_xp
from npgpt.checkpoint import find_checkpoint, is_model_dir, load_tensors, save_tensors
from npgpt.errors import NpgptError
from npgpt.loading import from_pretrained
from npgpt.lora import apply_lora, has_lora, lora_layers, present_targets, save_adapter
from npgpt.model import read_hf_config
from npgpt.ops.distill import mixed_loss
from npgpt.tensor import no_grad

PRUNE_MASK_FILE = "prune_mask.safetensors"


# ---- pruning masks ---------------------------------------------------------------------------------
def save_prune_masks(folder, masks):
    save_tensors(Path(folder) / PRUNE_MASK_FILE, {k: np.asarray(asnumpy(m), dtype=bool) for k, m in masks.items()})


def load_prune_masks(folder):
    """{parameter name: bool keep-mask} from `folder/prune_mask.safetensors`; {} when there is none."""
    f = Path(folder) / PRUNE_MASK_FILE
    if not f.is_file():
        return {}
    return {k: v.astype(bool, copy=False) for k, v in load_tensors(f).items()}


def apply_prune_masks(model, masks):
    """Zero the pruned entries (mask False) of each masked parameter's data and gradient, in place.

    In place because the optimizer's parameters are views into its flat buffer. Call it after each
    optimizer step: AdamW's moments and weight decay would otherwise move pruned weights off zero.
    Masks are moved to the parameters' device once (the dict is updated with the device copies).
    """
    if not masks:
        return model
    params = dict(model.named_parameters())
    for name, m in masks.items():
        p = params.get(name)
        if p is None:
            raise NpgptError(f"prune mask for {name}, which the model does not have; the mask file belongs to another model")
        if tuple(m.shape) != tuple(p.shape):
            raise NpgptError(f"prune mask for {name} has shape {tuple(m.shape)}, the weight {tuple(p.shape)}; "
                             f"the mask file belongs to another model")
        xp = get_xp(p.data)
        if get_xp(m) is not xp:
            m = masks[name] = xp.asarray(m)
        p.data *= m                                  # bool -> 0/1 in the weight's dtype
        if p.grad is not None:
            p.grad *= m
    return model


def keep_pruned_zeros(model, src, cfg, hooks):
    """Training plugin: a model that came from `npgpt prune` keeps its pruned weights at zero (the
    masks are applied after every optimizer step) and its checkpoints carry the masks on."""
    masks = load_prune_masks(src) if src else {}
    if masks:
        hooks.after_step.append(lambda model, it: apply_prune_masks(model, masks))
        hooks.save_files.append(lambda folder: save_prune_masks(folder, masks))


# ---- distillation ----------------------------------------------------------------------------------
def load_teacher(path, student, device="cpu"):
    """The teacher for `npgpt finetune --teacher DIR`: loaded in eval mode and checked against the
    student (same vocabulary, a context at least as long), so their logits compare position by position."""
    teacher = from_pretrained(path, device=device)      # any model folder: quantised, Llama, .gguf too
    s, t = student.config, teacher.config
    if t.vocab_size != s.vocab_size:
        raise NpgptError(f"--teacher {path} has vocab_size {t.vocab_size}, the student {s.vocab_size}; "
                         f"distillation needs the same tokenizer")
    if t.block_size < s.block_size:
        raise NpgptError(f"--teacher {path} has block_size {t.block_size}, shorter than the student's {s.block_size}")
    return teacher.eval()


def distill_from_teacher(model, src, cfg, hooks):
    """Training plugin for `--teacher DIR`: the loss becomes alpha * KD(teacher) + (1 - alpha) * CE."""
    if not cfg.teacher:
        return
    teacher = load_teacher(cfg.teacher, model, cfg.device)
    alpha, temperature = cfg.distill_alpha, cfg.distill_temperature
    if not cfg.quiet:
        print(f"distillation: teacher {cfg.teacher} ({teacher.num_params():,} parameters); the step "
              f"loss is {alpha:g} x KL(teacher || student) at temperature {temperature:g} + {1 - alpha:g} x "
              f"cross-entropy on the data")

    def loss_fn(model, x, y):
        logits, _ = model(x, y)
        with no_grad():
            t_logits, _ = teacher(x)
        return mixed_loss(logits, t_logits, y, alpha, temperature)
    hooks.loss_fn = loss_fn


# ---- SFT: learning to stop ------------------------------------------------------------------------
def _base_vocab(init_from):
    """The vocabulary size of the model a fine-tune started from, or None where it can't be read."""
    try:
        folder = find_checkpoint(init_from)
        return int(read_hf_config(folder)["vocab_size"]) if is_model_dir(folder) else None
    except (NpgptError, KeyError, TypeError, ValueError, OSError):
        return None


def boost_new_token_rows(model, src, cfg, hooks):
    """Training plugin for SFT runs that added special tokens (npgpt's chat template on a model that
    lacked it): their embedding rows start as the mean row and, at fine-tuning's small learning rate,
    would hardly move in a few hundred steps, so the model gives its end-of-turn token little
    probability and rambles. After every optimizer step each new row moves sft_new_token_lr times as
    far as the optimizer moved it (the same as that learning rate for those rows alone).

    The rows are counted from the base model (`init_from`), so a resumed run boosts the same rows and
    the step before a resume is the weights saved with it: resume stays exact."""
    k = cfg.sft_new_token_lr
    if not cfg.sft or k == 1 or not cfg.init_from:
        return
    first = _base_vocab(cfg.init_from)
    if first is None:                       # (a GGUF base brings its own tokenizer: no rows were added)
        return
    weight = model.input_embedding
    if first >= weight.shape[0] or not weight.requires_grad:
        return
    xp = get_xp(weight.data)
    before = [xp.array(weight.data[first:])]                # (n_new, C): the rows after the last step

    def after_step(model, it):
        rows = weight.data[first:]
        rows[...] = before[0] + k * (rows - before[0])      # in place: the optimizer holds views
        before[0] = xp.array(rows)
    hooks.after_step.append(after_step)
    if not cfg.quiet:
        print(f"SFT: {weight.shape[0] - first} new token rows (the chat template's) learn {k:g}x faster")


# ---- LoRA -------------------------------------------------------------------------------------------
def lora_plugin(model, src, cfg, hooks):
    """Training plugin for `lora_rank` (`npgpt finetune --lora-rank R`).

    Adds adapters to the freshly loaded base (or, on --resume, finds them already loaded from the
    run's adapter folder by npgpt.loading), freezes the base, and makes checkpoints hold the
    adapters only, in PEFT's layout. Without lora_rank it only refuses a quantised model, which
    full fine-tuning cannot train.
    """
    quantised = bool(model.quantization)
    if cfg.lora_rank is None:
        if quantised:
            raise NpgptError(f"{src} is quantised; fine-tune the float model it came from and quantise "
                             f"afterwards, or train LoRA adapters on it with --lora-rank R")
        return
    if src is None:
        raise NpgptError("LoRA fine-tunes a pretrained model: give --init-from DIR (a model folder, float or int8)")
    if not has_lora(model):
        if Path(src).is_dir() and is_model_dir(src) and int(read_hf_config(src).get("vocab_size", 0)) < model.config.vocab_size:
            raise NpgptError(f"the data needs {model.config.vocab_size - int(read_hf_config(src)['vocab_size'])} "
                             f"new tokens (the chat template's special tokens?), but LoRA keeps the base's "
                             f"embedding frozen; use prompt/completion records, or a base whose tokenizer "
                             f"already has them (one fine-tuned with --sft)")
        lora = cfg.lora_config(model.config.arch)
        if not cfg.lora_targets:                    # every linear layer the family has, and this model too
            lora = replace(lora, targets=present_targets(model, lora.targets))
        apply_lora(model, lora, seed=cfg.seed)
        model.lora_base = str(Path(src).resolve())
    hooks.save_model = lambda folder: save_adapter(model, folder)
    n_train = sum(p.size for p in model.parameters() if p.requires_grad)
    layers = lora_layers(model)
    n_base = model.num_params()        # the config's count: the base's weights, float or quantised
    if not cfg.quiet:
        print(f"LoRA: r={layers[0][1].r}, alpha={model.lora.alpha:g}, {len(layers)} adapted layers, "
              f"{n_train:,} trainable parameters ({100 * n_train / max(n_base, 1):.2f}% of the base's "
              f"{n_base:,}); base frozen" + (f", {model.quantization['bits']}-bit" if quantised else ""))


PLUGINS = (keep_pruned_zeros, boost_new_token_rows, distill_from_teacher, lora_plugin)
