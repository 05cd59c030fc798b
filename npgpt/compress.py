"""Make a trained model smaller: magnitude pruning, structured trimming, and the before/after report.

Pruning (`prune_model`) sets the smallest-magnitude entries of the linear weights (c_attn, c_proj,
c_fc of every block; not the embeddings or LayerNorms) to zero, either against one threshold shared
by all of them (`scope="global"`: layers with many small weights lose more) or to the same fraction
in each weight (`scope="layer"`). The keep-masks are saved beside the model as
`prune_mask.safetensors` ({parameter name: bool, True = kept}), so fine-tuning can hold pruned entries
at zero with `apply_prune_masks` after every optimizer step. Pruning alone does not shrink the
file or speed anything up (dense zeros are still stored and multiplied); it is the first step
towards sparse storage, and a study of how much of a model matters.

Trimming (`trim_model`) removes whole structures, so the model really gets smaller and faster:

    MLP hidden units  unit j of a block computes  gelu(x . c_fc.weight[:, j] + c_fc.bias[j])  and
                      writes it through  c_proj.weight[j, :].  Its importance is the product of the
                      two norms  ||c_fc.weight[:, j]||_2 * ||c_proj.weight[j, :]||_2  (how strongly it
                      can read and write the residual stream); the round(F * hidden) most important
                      units of each block are kept, in their original order, and n_inner shrinks
                      (stored in config.json's GPT-2 key `n_inner`).
    blocks            whole blocks are dropped and the rest renumbered h.0, h.1, ... (the residual
                      stream makes a block removable: the next block reads what the previous wrote).

Every command reports the model before and after (`measure`, `format_report`): size on disk,
parameters and non-zero parameters, validation loss / perplexity when data is given, and greedy
sampling speed with the KV cache.

Fine-tuning a pruned model keeps its pruned weights at zero, and `npgpt finetune --teacher DIR`
distils: both are the trainer's standard plugins (npgpt.training.plugins, which also reads and
writes the mask files). The trainer never imports this module.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from npgpt.backend import asnumpy, get_xp, synchronize
from npgpt.checkpoint import atomic_write_json, find_checkpoint, write_manifest
from npgpt.data import TokenData
from npgpt.errors import NpgptError
from npgpt.fileio import atomic_write_bytes
from npgpt.gguf_models import is_gguf
from npgpt.evaluate import token_loss
from npgpt.loading import from_pretrained, load_run
from npgpt.generate import generate
from npgpt.llama import build_model
from npgpt.model import read_hf_config, records_quantization
from npgpt.layers import QuantizedLinear, check_scheme, linear_layers
from npgpt.quant import save_quantized
from npgpt.safeio import read_json_object
from npgpt.training.plugins import PRUNE_MASK_FILE, apply_prune_masks, save_prune_masks

# Files of a checkpoint folder that belong to the training run, not to the model: not copied.
RUN_FILES = ("optimizer.safetensors", "state.json", "manifest.json")
MODEL_FILES = ("config.json", "model.safetensors", PRUNE_MASK_FILE)


# ---- which weights -----------------------------------------------------------------------------
def linear_weights(model):
    """[(parameter name, Parameter)] of every linear weight in the blocks (what pruning touches)."""
    out = []
    for name, _, _, lin in linear_layers(model):
        if isinstance(lin, QuantizedLinear):
            raise NpgptError("the model is quantised; prune or trim the original float model, then quantise")
        out.append((f"{name}.weight", lin.weight))
    return out


# ---- pruning -----------------------------------------------------------------------------------
def check_sparsity(sparsity, scope="global"):
    if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise NpgptError(f"--sparsity must be in [0, 1) (the fraction of linear weights set to zero), got {sparsity}")
    if scope not in ("global", "layer"):
        raise NpgptError(f"--scope must be global or layer, got {scope!r}")


def magnitude_masks(model, sparsity, scope="global"):
    """{name: bool keep-mask} zeroing round(sparsity * n) smallest |w| (n over all weights or per weight).

    Exactly that many entries are pruned even when magnitudes tie (argpartition picks them), so the
    requested sparsity is hit to within one entry per tensor.
    """
    check_sparsity(sparsity, scope)
    weights = [(name, np.abs(asnumpy(p.data)).ravel()) for name, p in linear_weights(model)]
    masks = {}
    if scope == "layer":
        for name, mag in weights:
            masks[name] = _keep_largest(mag, round(sparsity * mag.size))
    else:
        allmag = np.concatenate([mag for _, mag in weights])
        keep = _keep_largest(allmag, round(sparsity * allmag.size))
        start = 0
        for name, mag in weights:
            masks[name] = keep[start:start + mag.size]
            start += mag.size
    shapes = dict((n, p.shape) for n, p in linear_weights(model))
    return {name: m.reshape(shapes[name]) for name, m in masks.items()}


def _keep_largest(mag, n_prune):
    """Bool mask over mag (1-D), False at its n_prune smallest entries."""
    keep = np.ones(mag.size, dtype=bool)
    if n_prune > 0:
        keep[np.argpartition(mag, n_prune - 1)[:n_prune]] = False
    return keep


def prune_model(model, sparsity, scope="global"):
    """Magnitude-prune the linear weights in place; returns the keep-masks."""
    masks = magnitude_masks(model, sparsity, scope)
    apply_prune_masks(model, masks)
    return masks


# ---- trimming ----------------------------------------------------------------------------------
# (layers reading the residual stream, layer writing it back) of each family's MLP; a Llama unit j
# computes silu(x . gate[:, j]) * (x . up[:, j]), so it reads through two columns
MLP_READ = {"gpt": ("c_fc",), "llama": ("gate_proj", "up_proj")}
MLP_WRITE = {"gpt": "c_proj", "llama": "down_proj"}


def mlp_importance(block, arch="gpt"):
    """(hidden,) importance of each MLP unit: the norms of the columns that read it (GPT-2's c_fc;
    Llama's gate_proj and up_proj) times the norm of the row that writes it (c_proj; down_proj)."""
    w_out = asnumpy(getattr(block.mlp, MLP_WRITE[arch]).weight.data).astype(np.float64)   # (H, C)
    score = np.linalg.norm(w_out, axis=1)
    for name in MLP_READ[arch]:
        if getattr(block.mlp, name) is None:            # a relu2 Llama has no gate_proj
            continue
        w_in = asnumpy(getattr(block.mlp, name).weight.data).astype(np.float64)         # (C, H)
        score = score * np.linalg.norm(w_in, axis=0)
    return score


def parse_layers(text):
    """'0,3' -> [0, 3]; '' or None -> []."""
    if text is None or not str(text).strip():
        return []
    try:
        return [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise NpgptError(f"--drop-layers takes comma-separated block indices such as 0,3; got {text!r}") from None


def check_mlp_keep(mlp_keep):
    if not 0 < mlp_keep <= 1:
        raise NpgptError(f"--mlp-keep must be in (0, 1], the fraction of MLP units kept; got {mlp_keep}")


def check_trim(config, mlp_keep, drop_layers):
    """Validate trim options against the model; returns (hidden units kept, sorted layers to drop)."""
    check_mlp_keep(mlp_keep)
    n_keep = round(mlp_keep * config.hidden)
    if n_keep < 1:
        raise NpgptError(f"--mlp-keep {mlp_keep} keeps zero of the {config.hidden} MLP units per block; "
                         f"use at least {1 / config.hidden:.3g}")
    drop = sorted(set(drop_layers))
    bad = [i for i in drop if not 0 <= i < config.n_layer]
    if bad:
        raise NpgptError(f"--drop-layers: block {bad[0]} is out of range; the model has blocks 0..{config.n_layer - 1}")
    if len(drop) == config.n_layer:
        raise NpgptError(f"--drop-layers would remove all {config.n_layer} blocks; keep at least one")
    return n_keep, drop


def trim_model(model, mlp_keep=1.0, drop_layers=()):
    """A new, smaller model (GPT or Llama): the most important round(mlp_keep * hidden) MLP units of each block kept
    (original order, so mlp_keep=1 reproduces the model exactly) and the `drop_layers` blocks removed."""
    cfg = model.config
    linear_weights(model)                               # refuses a quantised model
    n_keep, drop = check_trim(cfg, mlp_keep, drop_layers)
    kept_layers = [i for i in range(cfg.n_layer) if i not in drop]
    new_cfg = replace(cfg, n_layer=len(kept_layers), n_inner=cfg.n_inner if n_keep == cfg.hidden else n_keep)
    arch, prefix = cfg.arch, cfg.blocks_name          # transformer.h, model.layers
    reads = tuple(f"mlp.{n}" for n in MLP_READ[arch])
    blocks = model
    for part in prefix.split("."):
        blocks = getattr(blocks, part)
    state = {}
    for name, a in model.state_dict().items():
        if not name.startswith(prefix + "."):
            state[name] = asnumpy(a)
    for new_i, old_i in enumerate(kept_layers):
        block = blocks[old_i]
        units = np.sort(np.argsort(-mlp_importance(block, arch), kind="stable")[:n_keep])
        for name, p in block.named_parameters(prefix=f"{prefix}.{new_i}."):
            a = asnumpy(p.data)
            if name.endswith(tuple(f"{r}.weight" for r in reads)):
                a = a[:, units]
            elif name.endswith(tuple(f"{r}.bias" for r in reads)):
                a = a[units]
            elif name.endswith(f"mlp.{MLP_WRITE[arch]}.weight"):
                a = a[units, :]
            state[name] = a
    new = build_model(new_cfg)
    new.load_state_dict(state)
    return new.train(model.training)


# ---- counting and measuring --------------------------------------------------------------------
def count_params(model):
    """(parameters, non-zero parameters), quantised linear weights and biases included.
    The total is the config's count (GPTConfig.num_params); only the non-zeros are counted here."""
    nonzero = 0
    for p in model.parameters():
        nonzero += int(get_xp(p.data).count_nonzero(p.data))
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            nonzero += int(np.count_nonzero(asnumpy(m.dequantized())))
            if m.bias is not None:
                nonzero += int(np.count_nonzero(asnumpy(m.bias.data)))
    return model.config.num_params(), nonzero


def sampling_speed(model, n_tokens=64, start_id=0, repeats=3):
    """Greedy KV-cached generation speed in tokens/s (one row of n_tokens after one start token).

    After a short warm-up, the best of `repeats` runs: on a shared machine the fastest run is the
    least disturbed estimate of what the model itself costs.
    """
    generate(model, [int(start_id)], min(n_tokens, 4), temperature=0, use_cache=True)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(model, [int(start_id)], n_tokens, temperature=0, use_cache=True)
        synchronize()
        best = max(best, len(out) / max(time.perf_counter() - t0, 1e-9))
    return best


def val_tokens(data, tok, max_tokens=None, model_dir="MODEL", trust_pattern=False):
    """The val split of prepared data folder `data`, checked against the model's tokenizer."""
    td = TokenData(data, trust_pattern=trust_pattern)
    if td.tokenizer().fingerprint() != tok.fingerprint():
        raise NpgptError(f"the data in {data} was tokenized with a different tokenizer than the model in {model_dir}; "
                         f"prepare it with the model's own: `npgpt prepare --tokenizer-from {model_dir}`")
    tokens = np.asarray(td.split("val"))
    return tokens[:max_tokens] if max_tokens else tokens


def val_loss(model, tokens):
    """(mean next-token loss in nats, perplexity) over consecutive block_size windows of tokens."""
    if int(np.max(tokens)) >= model.config.vocab_size:
        raise NpgptError("the data has tokens outside the model's vocabulary")
    total, count = token_loss(model, tokens)
    loss = total / count
    return loss, math.exp(loss)


def measure(model, folder, tokens=None, sample_tokens=64, start_id=0):
    """The report's row for one model: size of model.safetensors, parameters, loss, speed."""
    total, nonzero = count_params(model)
    weights = Path(folder) if is_gguf(folder) else Path(folder) / "model.safetensors"
    row = {"size_bytes": weights.stat().st_size,
           "params": total, "nonzero_params": nonzero,
           "val_loss": None, "perplexity": None, "tokens_per_s": None}
    if tokens is not None:
        row["val_loss"], row["perplexity"] = val_loss(model, tokens)
    if sample_tokens:
        row["tokens_per_s"] = sampling_speed(model, sample_tokens, start_id)
    return row


def format_report(before, after, notes=()):
    """A small before/after table (plain text) of two `measure` rows."""
    def size(n):
        return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"

    rows = [("model size on disk", "size_bytes", size, True),
            ("parameters", "params", lambda n: f"{n:,}", True),
            ("non-zero parameters", "nonzero_params", lambda n: f"{n:,}", True),
            ("val loss", "val_loss", lambda x: f"{x:.4f}", False),
            ("val perplexity", "perplexity", lambda x: f"{x:.2f}", True),
            ("sampling tokens/s", "tokens_per_s", lambda x: f"{x:.1f}", True)]
    lines = [f"{'':22}{'before':>16}{'after':>16}{'change':>10}"]
    for label, key, fmt, ratio in rows:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        change = f"x{a / b:.2f}" if ratio and b else f"{a - b:+.4f}"
        lines.append(f"{label:22}{fmt(b):>16}{fmt(a):>16}{change:>10}")
    return "\n".join(lines + [f"note: {n}" for n in notes])


# ---- folders -----------------------------------------------------------------------------------
def open_source(checkpoint, trust_pattern=False):
    """(model, tokenizer, checkpoint folder) for a float (not quantised) model folder or run folder."""
    ckpt = find_checkpoint(checkpoint)
    if not is_gguf(ckpt) and records_quantization(read_hf_config(ckpt)):
        raise NpgptError(f"{ckpt} holds a quantised model; compress the original float model instead")
    model, tok, ckpt = load_run(ckpt, trust_pattern=trust_pattern)[:3]
    return model, tok, ckpt


def prepare_out(src, out, force=False):
    """Create the output folder, refusing the source itself or (without force) a non-empty folder."""
    src, out = Path(src), Path(out)
    if out.exists() and out.resolve() in (src.resolve(), src.resolve().parent):
        raise NpgptError(f"--out {out} is the source checkpoint's folder; give a new folder")
    if out.exists() and not out.is_dir():
        raise NpgptError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise NpgptError(f"--out {out} exists and is not empty; choose a new folder or pass --force")
        for name in MODEL_FILES + RUN_FILES:           # stale files a previous output may have left
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def finish_out(src, out, tok=None):
    """Copy the tokenizer (and any other model-side file) from src, then write a fresh manifest. A GGUF
    source holds its tokenizer inside: `tok` is saved instead (tokenizer.json and its chat template)."""
    if is_gguf(src):
        tok.save(out)
        write_manifest(out)
        return
    for f in Path(src).iterdir():
        if f.is_file() and f.name not in RUN_FILES + MODEL_FILES:
            atomic_write_bytes(Path(out) / f.name, f.read_bytes())     # npgpt.fileio's rules for the target
    write_manifest(out)


def _start_id(tok):
    return tok.eot_id if getattr(tok, "eot_id", None) is not None else 0


def _compress(checkpoint, out, transform, data=None, max_eval_tokens=None, sample_tokens=64, force=False,
              trust_pattern=False):
    """Shared skeleton: load, measure, transform + write, reload the written folder, measure again.

    transform(model, out_dir) writes the model files into out_dir and returns notes for the report.
    trust_pattern: the tokenizers may use a split regex that is not a named one (`npgpt --trust-pattern`).
    """
    model, tok, ckpt = open_source(checkpoint, trust_pattern)
    tokens = val_tokens(data, tok, max_eval_tokens, ckpt, trust_pattern) if data is not None else None
    out = prepare_out(ckpt, out, force)
    start = _start_id(tok)
    before = measure(model, ckpt, tokens, sample_tokens, start)
    notes = list(transform(model, out) or [])
    finish_out(ckpt, out, tok)
    after_model = from_pretrained(out)
    after = measure(after_model, out, tokens, sample_tokens, start)
    if tokens is None:
        notes.append("val loss skipped: pass --data DIR (a prepared data folder) to measure it")
    return {"checkpoint": str(ckpt), "out": str(out), "before": before, "after": after, "notes": notes}


def quantize_checkpoint(checkpoint, out, bits=8, group_size=None, embedding=False, **kw):
    """`npgpt quantize`: write a weight-only quantised copy of a model folder; returns the report."""
    check_scheme(bits, group_size)

    def transform(model, out_dir):
        save_quantized(model, out_dir, bits, group_size, embedding)
        what = "linear weights" + (" and the token embedding" if embedding else "")
        per = f"group of {group_size} input rows" if group_size else "output channel"
        return [f"{what} stored as {bits}-bit integers with one float32 scale per {per}"]
    return _compress(checkpoint, out, transform, **kw)


def prune_checkpoint(checkpoint, out, sparsity, scope="global", **kw):
    """`npgpt prune`: magnitude-prune the linear weights, save model + prune_mask.safetensors."""
    check_sparsity(sparsity, scope)

    def transform(model, out_dir):
        masks = prune_model(model, sparsity, scope)
        _save_float(model, out_dir, {"pruning": {"sparsity": sparsity, "scope": scope}})
        save_prune_masks(out_dir, masks)
        n = sum(m.size for m in masks.values())
        kept = sum(int(m.sum()) for m in masks.values())
        return [f"linear weights {100 * (1 - kept / max(n, 1)):.1f}% zero ({scope} threshold); masks in "
                f"{PRUNE_MASK_FILE}. Dense storage: the file does not shrink until it is quantised or sparse-stored"]
    return _compress(checkpoint, out, transform, **kw)


def trim_checkpoint(checkpoint, out, mlp_keep=1.0, drop_layers=(), **kw):
    """`npgpt trim`: keep the most important MLP units and/or drop blocks; save the smaller model."""
    check_mlp_keep(mlp_keep)                  # before loading anything

    def transform(model, out_dir):
        cfg = model.config
        small = trim_model(model, mlp_keep, drop_layers)
        _save_float(small, out_dir, {"trimmed": {"mlp_keep": mlp_keep, "dropped_layers": sorted(set(drop_layers)),
                                                 "from": {"n_layer": cfg.n_layer, "n_inner": cfg.hidden}}})
        return [f"blocks {cfg.n_layer} -> {small.config.n_layer}, MLP units per block "
                f"{cfg.hidden} -> {small.config.hidden}"]
    return _compress(checkpoint, out, transform, **kw)


def _save_float(model, out_dir, record):
    """save_pretrained, plus a record of what was done under config.json's "npgpt" key."""
    model.save_pretrained(out_dir)
    hf = read_json_object(Path(out_dir) / "config.json", "config.json")
    hf.setdefault("npgpt", {}).update(record)
    atomic_write_json(Path(out_dir) / "config.json", hf)
