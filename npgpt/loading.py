"""Loading a model: the one answer to "where is a model loaded?".

    from_pretrained(path, adapter=None, device="cpu", **overrides)   -> the model, in eval mode
    load_run(path, adapter=None, device="cpu", trust_pattern=False, **overrides)
                                                                     -> Loaded(model, tokenizer, folder, state)

`path` is a run folder (its ckpt/ is used), a checkpoint or model folder (npgpt's, or a Hugging Face
download), a quantised folder (`npgpt quantize`), or a LoRA run's adapter folder (the base it recorded,
plus the adapter). `adapter` applies a PEFT-layout LoRA adapter folder on top, unmerged. `overrides`
replace config fields (e.g. dropout=0.1). `trust_pattern=True` lets the tokenizer use a split regex
that is not a named one (what `npgpt --trust-pattern` passes; from_pretrained reads no tokenizer).
`npgpt.from_pretrained` and `npgpt.load_run` are these.

Which reader runs is decided by one table, FORMATS, tried in order. Each `Format` says which paths are
its own -- matches(folder, hf), where hf is the folder's config.json as a dict (None when there is
none, or when the path is a single file) -- and how to load one:

    hub          hf:ORG/NAME[@REVISION]: fetched into huggingface_hub's cache (npgpt.hub), then read as
                 the folder it is
    gguf         a .gguf file: weights, tokenizer and chat template in one (npgpt.gguf_models; keep_quantized=True
                 keeps Q8_0 / Q4_0 / Q4_1 weights in quantised layers)
    lora-run     an adapter folder with no model of its own: the recorded base, then the adapter
    quantised    config.json records npgpt.quantization: QuantizedLinear layers from int8 / int4 weights
    llama        config.json's architectures is LlamaForCausalLM or Qwen2ForCausalLM (or npgpt's Npgpt* twins: recipe switches)
    gpt2         config.json's architectures is GPT2LMHeadModel, or names none (npgpt's older folders), or
                 NpgptGPTForCausalLM (a GPT with recipe switches GPT-2 cannot hold, npgpt.model)

A new model family is one entry that matches on `architecture(hf)` (config.json's "architectures"),
a new file format one that matches on the path (e.g. its suffix); `register_format` adds it. The
model classes keep their own folder readers (GPT.from_pretrained reads a GPT-2 folder); this module
decides which one runs and does what every load does (verify the checkpoint's manifest, apply the
adapter, leave the model in eval mode on its device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from npgpt import tokenizer as tk
from npgpt.checkpoint import find_checkpoint, is_model_dir, read_run_state, verify_checkpoint
from npgpt.errors import NpgptError
from npgpt.gguf_models import is_gguf, load_gguf_model, load_gguf_tokenizer
from npgpt.hub import is_hub_ref, snapshot
from npgpt.layers import QuantizedLinear, check_scheme, decode_weight, linear_layers
from npgpt.llama import Llama, build_model, config_from_hf, is_llama_config
from npgpt.llama import check_shapes as check_llama_shapes
from npgpt.lora import is_adapter_dir, load_adapter, read_adapter
from npgpt.model import (GPT, check_config_matches, read_hf_config, records_quantization,
                         weights_header)
from npgpt.safeio import Bool, Int, check, check_finite_tensors, load_safetensors

QUANT_FILE = "model.safetensors"          # a quantised folder keeps GPT-2's file name, with qweight/scales inside


# ---- the table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Format:
    """One kind of model path: which paths are its own, and how one loads.

    matches(folder, hf) -> bool       hf: config.json as a dict, or None (no config.json, or a file)
    load(folder, hf, device="cpu", **overrides) -> model, in eval mode, on `device`
    tokenizer(folder, trust_pattern=False) -> Tokenizer    for load_run; default: the folder's tokenizer files
    """
    name: str
    what: str                          # for the error that lists what npgpt loads
    matches: Callable
    load: Callable
    tokenizer: Callable | None = None


FORMATS: list[Format] = []


def register_format(fmt: Format, before: str | None = None):
    """Add a format to the table (at the end, or before the entry named `before`); returns it."""
    if any(f.name == fmt.name for f in FORMATS):
        raise ValueError(f"a format named {fmt.name!r} is registered already")
    names = [f.name for f in FORMATS]
    FORMATS.insert(names.index(before) if before in names else len(FORMATS), fmt)
    return fmt


def architecture(hf: dict | None) -> str | None:
    """config.json's first "architectures" entry (Hugging Face's class name, e.g. GPT2LMHeadModel), or None."""
    if hf is None or hf.get("architectures") is None:
        return None
    arch = hf["architectures"]
    if not isinstance(arch, list) or not arch or not all(isinstance(a, str) for a in arch):
        raise NpgptError(f"config.json: field 'architectures' must be a list of class names, got {arch!r}")
    return arch[0]


def resolve(path) -> tuple[Path, dict | None, Format]:
    """(folder or file, its config.json or None, the Format that loads it), or a clear NpgptError."""
    path = Path(path)
    if not path.is_dir():
        for fmt in FORMATS:                            # a single file (or its name): matched by the path
            if fmt.matches(path, None):
                return path, None, fmt
    # a folder with config.json is a model folder: its reader names what is missing (pytorch_model.bin ...);
    # anything else is a run folder (-> its ckpt) or an error that names the path
    folder = path if (path / "config.json").is_file() else find_checkpoint(path)
    verify_checkpoint(folder)                          # the manifest's sizes and hashes, when it has one
    hf = read_hf_config(folder) if (folder / "config.json").is_file() else None
    for fmt in FORMATS:
        if fmt.matches(folder, hf):
            return folder, hf, fmt
    named = f"architecture {architecture(hf)!r}" if architecture(hf) else \
        f"model_type {hf.get('model_type')!r}" if hf else "no config.json"
    raise NpgptError(f"{folder}: {named} is not a model npgpt loads; it loads " +
                     ", ".join(f.what for f in FORMATS))


# ---- the two entry points ------------------------------------------------------------------------
def from_pretrained(path, adapter=None, device="cpu", allow_other_base=False, **overrides):
    """The model at `path` (see the module doc), with `adapter` applied when given; in eval mode.
    `allow_other_base`: apply an adapter whose recorded base fingerprint is not this model's (npgpt.lora)."""
    folder, hf, fmt = resolve(path)
    return _load(folder, hf, fmt, adapter, device, overrides, allow_other_base)


class Loaded(NamedTuple):
    """What load_run returns: the model, its tokenizer, the folder both came from, and the run's
    state.json (iter, best_val_loss, config, ...) as a checked dict, or None for a plain model folder."""
    model: object
    tokenizer: tk.Tokenizer
    folder: Path
    state: dict | None


def load_run(path, adapter=None, device="cpu", trust_pattern=False, allow_other_base=False, **overrides) -> Loaded:
    """Model + tokenizer + run metadata of a run, checkpoint or model folder (see the module doc);
    trust_pattern: the tokenizer may use a split regex that is not a named one; allow_other_base: as
    from_pretrained."""
    folder, hf, fmt = resolve(path)
    read_tokenizer = fmt.tokenizer or folder_tokenizer
    if fmt.tokenizer is None and not tk.is_tokenizer_dir(folder):    # before the weights: fail fast
        raise NpgptError(f"{folder} has no tokenizer files (tokenizer_npgpt.json, tokenizer.json, or vocab.json + merges.txt)")
    model = _load(folder, hf, fmt, adapter, device, overrides, allow_other_base)
    state = read_run_state(folder) if folder.is_dir() else None
    return Loaded(model, read_tokenizer(folder, trust_pattern=trust_pattern), folder, state)


def folder_tokenizer(folder, trust_pattern=False):
    """The tokenizer saved beside a model (npgpt's tokenizer_npgpt.json, Hugging Face's tokenizer.json, or
    GPT-2's vocab.json + merges.txt)."""
    if not tk.is_tokenizer_dir(folder):
        raise NpgptError(f"{folder} has no tokenizer files (tokenizer_npgpt.json, tokenizer.json, or vocab.json + merges.txt)")
    return tk.load(folder, trust_pattern=trust_pattern)


def _load(folder, hf, fmt, adapter, device, overrides, allow_other_base=False):
    if fmt.name == "lora-run":
        if adapter:
            raise NpgptError(f"{folder} is a LoRA run (a base plus its adapter) and already has an adapter; "
                             f"give its base with --checkpoint, or merge it first (npgpt merge)")
        overrides = {**overrides, "allow_other_base": allow_other_base}
    model = fmt.load(folder, hf, device=device, **overrides)
    if adapter:
        load_adapter(model, adapter, allow_other_base=allow_other_base)
    model.eval()
    return model


# ---- Llama / Qwen2 folders -------------------------------------------------------------------------
def is_llama(folder, hf) -> bool:
    return hf is not None and is_llama_config(hf)


def load_llama(folder, hf, device="cpu", **overrides):
    return Llama.from_pretrained(folder, device=device, **overrides)


# ---- GPT-2 folders --------------------------------------------------------------------------------
GPT2_ARCHITECTURES = ("GPT2LMHeadModel", "NpgptGPTForCausalLM")   # the latter: GPT with recipe switches


def is_gpt2(folder, hf) -> bool:
    return hf is not None and (architecture(hf) in GPT2_ARCHITECTURES or architecture(hf) is None)


def load_gpt2(folder, hf, device="cpu", **overrides):
    return GPT.from_pretrained(folder, device=device, **overrides)


# ---- quantised folders ----------------------------------------------------------------------------
def read_scheme(hf, where="config.json"):
    """The validated {"bits", "group_size", "embedding"} of a config.json dict, or None."""
    if not records_quantization(hf):
        return None
    scheme = hf["npgpt"]["quantization"]
    scheme = check(scheme, {"bits": Int(), "group_size": Int(default=None, none_ok=True),
                            "embedding": Bool(default=False)}, where, prefix="npgpt.quantization.")
    check_scheme(scheme["bits"], scheme["group_size"])
    return scheme


def quantized_shapes(config, scheme):
    """({tensor name: shape}, {quantised tensor name: safetensors dtype}) that a quantised folder of
    `config` holds under `scheme`: what load_quantized checks the file's header against."""
    bits, g = scheme["bits"], scheme["group_size"]
    shapes, dtypes = config.param_shapes(), {}

    def swap(name, n_in, n_out):
        if g is not None and n_in % g:
            raise NpgptError(f"config.json: npgpt.quantization.group_size {g} does not divide {name}'s {n_in} rows")
        shapes[f"{name}.qweight"] = ((n_in + 1) // 2, n_out) if bits == 4 else (n_in, n_out)
        shapes[f"{name}.scales"] = (1 if g is None else n_in // g, n_out)
        dtypes[f"{name}.qweight"], dtypes[f"{name}.scales"] = ("U8" if bits == 4 else "I8"), "F32"

    for key, shape in list(shapes.items()):
        if key.startswith(config.blocks_name + ".") and key.endswith(".weight") and len(shape) == 2:
            del shapes[key]                             # every 2-D weight in the blocks is a linear layer's
            swap(key[:-len(".weight")], *shape)
    if scheme["embedding"]:
        emb = config.embedding_name
        V, C = shapes.pop(f"{emb}.weight")
        swap(emb, C, V)
    return shapes, dtypes


def is_quantized(folder, hf) -> bool:
    return hf is not None and read_scheme(hf, str(Path(folder) / "config.json")) is not None


def load_quantized(path, hf=None, device="cpu", **overrides):
    """A model (GPT or Llama) from a quantised folder (written by npgpt.quant.save_quantized), in eval mode, its linear
    layers QuantizedLinear. `hf` is the parsed config.json when the caller has read it already."""
    path = Path(path)
    if hf is None:
        hf = read_hf_config(path)
    scheme = read_scheme(hf, str(path / "config.json"))
    if scheme is None:
        raise NpgptError(f"{path / 'config.json'} records no npgpt.quantization; load it with npgpt.from_pretrained")
    f = path / QUANT_FILE
    config = config_from_hf(hf, str(path / "config.json"))
    bits = scheme["bits"]
    header = weights_header(path)
    # every shape and dtype checked against config.json before anything is allocated
    if config.arch == "llama":
        check_llama_shapes(config, header.shapes(), quantized_shapes(config, scheme)[0], path / "config.json", f)
    else:
        check_config_matches(config, header.shapes(), path / "config.json", f,
                             lambda: quantized_shapes(config, scheme)[0])
    for key, dtype in quantized_shapes(config, scheme)[1].items():
        if header.tensors[key].dtype != dtype:
            raise NpgptError(f"{f}: tensor {key} is {header.tensors[key].dtype}, expected {dtype}; the folder "
                             f"does not match its config.json")
    raw = load_safetensors(f, header)
    check_finite_tensors(raw, f)
    model = build_model(replace(config, **overrides), init=False)
    for name, owner, attr, lin in linear_layers(model):
        bias = raw.pop(f"{name}.bias") if lin.bias is not None else None
        setattr(owner, attr, QuantizedLinear(raw.pop(f"{name}.qweight"), raw.pop(f"{name}.scales"),
                                             lin.weight.shape[0], bits, bias))
    if scheme["embedding"]:
        emb = config.embedding_name
        stored, scales = raw.pop(f"{emb}.qweight"), raw.pop(f"{emb}.scales")
        raw[f"{emb}.weight"] = decode_weight(stored, scales, config.n_embd, bits).T
    model.load_state_dict({k: v.astype(np.float32, copy=False) for k, v in raw.items()})
    model.quantization = scheme
    model.eval()
    return model.to(device) if str(device) != "cpu" else model


# ---- LoRA runs ------------------------------------------------------------------------------------
def is_lora_run(folder, hf) -> bool:
    return Path(folder).is_dir() and not is_model_dir(folder) and is_adapter_dir(folder)


def load_lora_run(folder, hf=None, device="cpu", allow_other_base=False, **overrides):
    """A LoRA run's checkpoint: the base model its adapter_config.json records, then the adapter."""
    base = read_adapter(folder)[2].get("base_model_name_or_path")
    # the base is a model folder, or a GGUF file (fine-tuned with --init-from x.gguf)
    if not isinstance(base, str) or not (Path(base).is_dir() or (is_gguf(base) and Path(base).is_file())):
        raise NpgptError(f"{folder} is a LoRA adapter whose base model ({base!r}) is not a folder here; "
                         f"give the base with --checkpoint BASE --adapter {folder}")
    model = from_pretrained(base, device=device, **overrides)
    load_adapter(model, folder, allow_other_base=allow_other_base)
    model.lora_base = base
    return model


def is_gguf_file(path, hf) -> bool:
    return hf is None and is_gguf(path)


def load_gguf(path, hf=None, device="cpu", **overrides):
    return load_gguf_model(path, device=device, **overrides)


# ---- Hugging Face Hub references --------------------------------------------------------------------
def is_hub(path, hf) -> bool:
    return hf is None and is_hub_ref(path)


def load_hub(ref, hf=None, device="cpu", **overrides):
    return from_pretrained(snapshot(ref), device=device, **overrides)


def hub_tokenizer(ref, trust_pattern=False):
    return load_run_tokenizer(snapshot(ref), trust_pattern=trust_pattern)


def gguf_tokenizer(path, trust_pattern=False):
    # a GGUF names its split regex (tokenizer.ggml.pre) from a fixed table: there is no file regex to trust
    return load_gguf_tokenizer(path)


def load_run_tokenizer(path, trust_pattern=False):
    """The tokenizer `load_run` would give for `path` (a folder or file of any format)."""
    folder, _, fmt = resolve(path)
    return (fmt.tokenizer or folder_tokenizer)(folder, trust_pattern=trust_pattern)


register_format(Format("hub", "Hugging Face Hub models (hf:ORG/NAME[@REVISION])", is_hub, load_hub, hub_tokenizer))
register_format(Format("gguf", "GGUF files (.gguf)", is_gguf_file, load_gguf, gguf_tokenizer))
register_format(Format("lora-run", "LoRA run folders (adapter + recorded base)", is_lora_run, load_lora_run))
register_format(Format("quantised", "quantised folders (npgpt quantize)", is_quantized, load_quantized))
register_format(Format("llama", "Llama / Qwen2 folders (architectures LlamaForCausalLM, Qwen2ForCausalLM; "
                       "npgpt's NpgptLlamaForCausalLM, NpgptQwen2ForCausalLM)",
                       is_llama, load_llama))
register_format(Format("gpt2", "GPT-2 folders (architectures GPT2LMHeadModel; npgpt's NpgptGPTForCausalLM)", is_gpt2,
                       load_gpt2))
