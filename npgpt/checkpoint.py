"""Checkpoints on disk: safetensors + JSON only (no executable formats), atomic writes.

A training run keeps its checkpoint in one folder, `RUN/ckpt/`:

    config.json, model.safetensors     the model (Hugging Face GPT-2 layout, `model.save_pretrained`)
    tokenizer files                    `tokenizer.save(folder)`
    optimizer.safetensors, state.json  AdamW moments, step, config, RNG scheme (written by the trainer)
    manifest.json                      size + sha256 of every other file, written last

Nothing is ever pickled: tensors go to safetensors, everything else to JSON, so loading a checkpoint
cannot run code.

Each file is written atomically by `npgpt.fileio` (temporary file in the same folder, flush + fsync,
`os.replace`, fsync the folder; re-exported here), and so is the folder as a whole. `checkpoint_writer(run_dir)` hands out a fresh
`RUN/ckpt.tmp/`; when the caller's block finishes it writes the manifest and swaps folders with two
renames:

    ckpt -> ckpt.old,  ckpt.tmp -> ckpt,  then ckpt.old is removed

A crash at any moment leaves one complete checkpoint: before the first rename it is `ckpt` (the
half-written `ckpt.tmp` is ignored and later removed); between the renames it is `ckpt.old`, which
`find_checkpoint` renames back; after the second it is the new `ckpt`. `verify_checkpoint` compares
the files with the manifest, catching truncation or edits made since the save.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from npgpt.backend import asnumpy
from npgpt.errors import NpgptError
from npgpt.fileio import (atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text,  # noqa: F401
                          fsync_dir, write_error)
from npgpt.hub import is_hub_ref, snapshot
from npgpt.safeio import (Float, Int, Obj, Str, check, inside, load_safetensors, read_json_object, run_lock,
                          write_safetensors)

CKPT_DIR = "ckpt"
TMP_DIR = "ckpt.tmp"
OLD_DIR = "ckpt.old"
MANIFEST = "manifest.json"
MODEL_FILES = ("config.json", "model.safetensors")   # what makes a folder a loadable model
_HASH_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------ tensors

def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write `{name: array}` as a safetensors file, atomically. CuPy arrays are copied to the host."""
    host = {name: np.ascontiguousarray(asnumpy(a)) for name, a in tensors.items()}
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    write_safetensors(path, host, metadata=meta)     # streams to disk: no second in-memory copy


def load_tensors(path) -> dict[str, np.ndarray]:
    """`{name: array}` from a safetensors file, header checked first (npgpt.safeio); NpgptError if it is
    missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise NpgptError(f"checkpoint file {path} does not exist; check the path or save the checkpoint again")
    return load_safetensors(path, upcast=False)


# ------------------------------------------------------------------------ checkpoint folders

def sha256_file(path) -> str:
    """Hex sha256 of a file, read in chunks (bounded memory for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def write_manifest(folder) -> dict:
    """Record size and sha256 of every file in `folder` in `folder/manifest.json` (written last)."""
    folder = Path(folder)
    files = {}
    for p in _files_in(folder):
        rel = p.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": "npgpt-checkpoint", "version": 1, "files": files}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


@contextmanager
def checkpoint_writer(run_dir):
    """Context manager: write a whole checkpoint folder, which replaces `run_dir/ckpt` atomically.

        with checkpoint_writer(run_dir) as tmp:   # tmp = run_dir/ckpt.tmp, fresh and empty
            model.save_pretrained(tmp)
            ...

    On a clean exit the manifest is written and the folders are swapped (see the module docstring).
    If the block raises, `ckpt.tmp` is removed, the previous `ckpt` is left untouched, and the
    exception propagates.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NpgptError(f"{run_dir} is a file; give a folder for the run's checkpoint")
    tmp = run_dir / TMP_DIR
    final = run_dir / CKPT_DIR
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise NpgptError(f"{final} is {'a symbolic link' if final.is_symlink() else 'not a folder'}; npgpt replaces "
                         f"a checkpoint folder whole and will not rename over it: remove it or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)             # left over by a crash mid-save: never complete
        tmp.mkdir()
    except OSError as e:
        raise write_error(tmp, e) from None
    try:
        yield tmp
        write_manifest(tmp)
        fsync_dir(tmp)
        _swap_in(run_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(run_dir: Path, tmp: Path) -> None:
    """ckpt -> ckpt.old, ckpt.tmp -> ckpt, drop ckpt.old; one complete checkpoint at every instant."""
    final, old = run_dir / CKPT_DIR, run_dir / OLD_DIR
    try:
        if final.exists():
            if old.exists():
                shutil.rmtree(old)         # a finished swap's leftover; `final` is complete
            os.rename(final, old)
            fsync_dir(run_dir)
        os.rename(tmp, final)
        fsync_dir(run_dir)
    except OSError as e:
        raise write_error(final, e) from None
    shutil.rmtree(old, ignore_errors=True)


SHARD_INDEX = "model.safetensors.index.json"     # a Hugging Face model split into shards


def is_model_dir(path) -> bool:
    """True for a folder holding a model: config.json and model.safetensors (npgpt or Hugging Face),
    or config.json and a shard index (a large Hugging Face model)."""
    path = Path(path)
    return all((path / name).is_file() for name in MODEL_FILES) or \
        ((path / "config.json").is_file() and (path / SHARD_INDEX).is_file())


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")   # a LoRA run's checkpoint (npgpt.lora)


def is_checkpoint_dir(path) -> bool:
    """A model folder, or a LoRA run's adapter folder (its base is recorded in adapter_config.json)."""
    path = Path(path)
    return is_model_dir(path) or all((path / name).is_file() for name in ADAPTER_FILES)


def has_checkpoint(run_dir) -> bool:
    """True when `run_dir` holds a checkpoint (`ckpt`, or `ckpt.old` left by a crash mid-swap)."""
    run_dir = Path(run_dir)
    return is_checkpoint_dir(run_dir / CKPT_DIR) or is_checkpoint_dir(run_dir / OLD_DIR)


def find_checkpoint(path) -> Path:
    """The checkpoint folder for `path`: a run folder, its `ckpt` folder, or any model folder (or a .gguf
    file, returned as is).

    A model folder (config.json + model.safetensors, e.g. a Hugging Face GPT-2 download) is returned
    as is; `hf:ORG/NAME[@REVISION]` is fetched into huggingface_hub's cache (npgpt.hub) and its
    snapshot folder returned. For a run folder whose save crashed between the two renames (`ckpt.old` but no `ckpt`),
    `ckpt.old` is renamed back to `ckpt` and returned.
    """
    if is_hub_ref(path):                       # hf:ORG/NAME[@REVISION]: its snapshot in huggingface_hub's cache
        return find_checkpoint(snapshot(path))
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":     # a GGUF file is a model of its own
        return path
    if not path.exists() and not (path.name == CKPT_DIR and path.parent.is_dir()):
        raise NpgptError(f"no checkpoint in {path}: the folder does not exist (check the path, or train one "
                         f"with `npgpt train --out {path}`)")
    if is_checkpoint_dir(path):
        return path
    run_dir = path.parent if path.name == CKPT_DIR and not path.exists() else path
    final, old = run_dir / CKPT_DIR, run_dir / OLD_DIR
    if is_checkpoint_dir(final):
        return final
    if not final.exists() and is_checkpoint_dir(old):
        try:
            # a run writing this folder right now is between its two renames: leave its folders alone
            with run_lock(run_dir, "recover"):
                if not final.exists():
                    os.rename(old, final)
                    fsync_dir(run_dir)
                    return final
        except (OSError, NpgptError):
            pass
        return old                         # locked by a writer, or read-only: use it where it is
    raise NpgptError(f"no checkpoint in {run_dir}: train one with `npgpt train --out {run_dir}`")


_MANIFEST_ENTRY = {"size": Int(lo=0), "sha256": Str(max_len=64)}


def read_manifest(folder) -> dict | None:
    """The checked manifest of a checkpoint folder, or None when it has none (e.g. a Hugging Face folder).

    Every entry must name a file inside the folder (no `..`, no absolute path, no symlink out)."""
    folder = Path(folder)
    p = folder / MANIFEST
    if not p.exists():
        return None
    manifest = read_json_object(p, "checkpoint manifest")
    where = f"{p} is damaged (save the checkpoint again)"
    files = check(manifest, {"files": Obj()}, where)["files"]
    for rel, entry in files.items():
        check(entry, _MANIFEST_ENTRY, where, prefix=f"files.{rel}.")
        inside(folder, rel, f"file listed in {MANIFEST}")
    return manifest


def verify_checkpoint(folder) -> bool:
    """Check every file against the manifest (size, then sha256). False when there is no manifest.

    Raises NpgptError naming the first file that is missing, truncated or modified since the save.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    for rel, entry in manifest["files"].items():
        p = inside(folder, rel, f"file listed in {MANIFEST}")
        if not p.is_file():
            raise NpgptError(f"checkpoint file {p} is missing (listed in {MANIFEST}); the checkpoint is incomplete")
        size = p.stat().st_size
        if size != entry["size"] or sha256_file(p) != entry["sha256"]:
            detail = f"{size} bytes, saved with {entry['size']}" if size != entry["size"] else "sha256 differs"
            raise NpgptError(f"checkpoint file {p} is truncated or modified since it was saved ({detail}); "
                             f"restore it or save the checkpoint again")
    return True


# ---- a run's state.json --------------------------------------------------------------------------------
STATE_FILE = "state.json"
STATE_FIELDS = {"iter": Int(lo=0), "best_val_loss": Float(default=float("inf"), allow_inf=True),
                "config": Obj(), "optimizer": Obj(default=None), "loss_scaler": Obj(default=None),
                "tokens_per_iter": Int(lo=1, default=None), "ranks": Int(lo=1, default=None)}


def read_run_state(ckpt) -> dict | None:
    """A checkpoint's state.json with the types of its fields checked (its `config` a plain dict; the
    trainer checks it as a config), or None when the folder has none (a model folder, not a run's)."""
    p = Path(ckpt) / STATE_FILE
    if not p.is_file():
        return None
    # Infinity: best_val_loss before the first evaluation (npgpt has always written it so)
    return check(read_json_object(p, "training state", allow_infinity=True), STATE_FIELDS, str(p))
