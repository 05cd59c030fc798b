"""Checkpoints on disk: safetensors + JSON only (no executable formats), atomic writes.

A training run keeps its checkpoint in one folder, `RUN/ckpt/`:

    config.json, model.safetensors     the model (Hugging Face GPT-2 layout, `model.save_pretrained`)
    tokenizer files                    `tokenizer.save(folder)`
    optimizer.safetensors, state.json  AdamW moments, step, config, RNG scheme (written by the trainer)
    manifest.json                      size + sha256 of every other file, written last

Nothing is ever pickled: tensors go to safetensors, everything else to JSON, so loading a checkpoint
cannot run code.

Each file is written atomically (temporary file in the same folder, flush + fsync, `os.replace`, fsync
the folder), and so is the folder as a whole. `checkpoint_writer(run_dir)` hands out a fresh
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
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from npgpt.errors import NpgptError

CKPT_DIR = "ckpt"
TMP_DIR = "ckpt.tmp"
OLD_DIR = "ckpt.old"
MANIFEST = "manifest.json"
MODEL_FILES = ("config.json", "model.safetensors")   # what makes a folder a loadable model
_HASH_CHUNK = 1 << 20


# ------------------------------------------------------------------------------- atomic files

def _fsync_dir(folder) -> None:
    """Make a rename or new file inside `folder` durable (no-op where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_error(path, e: OSError) -> NpgptError:
    return NpgptError(f"cannot write {path} ({e.strerror or e}); check free space and permissions")


@contextmanager
def _atomic_path(path):
    """Yield a temporary path next to `path`; on success fsync it and move it onto `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        yield Path(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise _write_error(path, e) from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def _remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    with _atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()


def atomic_write_text(path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text (newlines written as given)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj):
    # NumPy scalars and arrays turn up in metrics and configs; JSON knows their Python equivalents.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path, obj) -> None:
    """Write `obj` as indented JSON, atomically. Infinity/NaN are allowed (Python's json reads them)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


# ------------------------------------------------------------------------------------ tensors

def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write `{name: array}` as a safetensors file, atomically. CuPy arrays are copied to the host."""
    from safetensors.numpy import save_file

    from npgpt.backend import asnumpy

    host = {name: np.ascontiguousarray(asnumpy(a)) for name, a in tensors.items()}
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    with _atomic_path(path) as tmp:
        # save_file streams to disk: no second in-memory copy of a large model
        save_file(host, str(tmp), metadata=meta)


def load_tensors(path) -> dict[str, np.ndarray]:
    """`{name: array}` from a safetensors file; NpgptError if it is missing, truncated or corrupt."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise NpgptError(f"checkpoint file {path} does not exist; check the path or save the checkpoint again")
    try:
        return load_file(str(path))
    except Exception as e:   # safetensors raises its own SafetensorError, OSError or ValueError
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise NpgptError(f"checkpoint file {path} is truncated or corrupt ({reason}); it cannot be loaded") from None


def load_tensor_metadata(path) -> dict[str, str]:
    """The string metadata stored in a safetensors header ({} when none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise NpgptError(f"checkpoint file {path} is truncated or corrupt ({str(e)[:120]}); "
                         f"it cannot be loaded") from None


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
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)             # left over by a crash mid-save: never complete
        tmp.mkdir()
    except OSError as e:
        raise _write_error(tmp, e) from None
    try:
        yield tmp
        write_manifest(tmp)
        _fsync_dir(tmp)
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
            _fsync_dir(run_dir)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
    except OSError as e:
        raise _write_error(final, e) from None
    shutil.rmtree(old, ignore_errors=True)


def is_model_dir(path) -> bool:
    """True for a folder holding a model: config.json and model.safetensors (npgpt or Hugging Face)."""
    path = Path(path)
    return all((path / name).is_file() for name in MODEL_FILES)


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
    """The checkpoint folder for `path`: a run folder, its `ckpt` folder, or any model folder.

    A model folder (config.json + model.safetensors, e.g. a Hugging Face GPT-2 download) is returned
    as is. For a run folder whose save crashed between the two renames (`ckpt.old` but no `ckpt`),
    `ckpt.old` is renamed back to `ckpt` and returned.
    """
    path = Path(path)
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
            os.rename(old, final)
            _fsync_dir(run_dir)
            return final
        except OSError:
            return old                     # read-only folder: use it where it is
    raise NpgptError(f"no checkpoint in {run_dir}: train one with `npgpt train --out {run_dir}`")


def read_manifest(folder) -> dict | None:
    """The parsed manifest of a checkpoint folder, or None when it has none (e.g. a Hugging Face folder)."""
    p = Path(folder) / MANIFEST
    if not p.exists():
        return None
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and "size" in v and "sha256" in v
                                                  for v in files.values()):
            raise ValueError("bad files table")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NpgptError(f"{p} is damaged ({str(e)[:80]}); the checkpoint cannot be verified: save it again") from None
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
        p = folder / rel
        if not p.is_file():
            raise NpgptError(f"checkpoint file {p} is missing (listed in {MANIFEST}); the checkpoint is incomplete")
        size = p.stat().st_size
        if size != entry["size"] or sha256_file(p) != entry["sha256"]:
            detail = f"{size} bytes, saved with {entry['size']}" if size != entry["size"] else "sha256 differs"
            raise NpgptError(f"checkpoint file {p} is truncated or modified since it was saved ({detail}); "
                             f"restore it or save the checkpoint again")
    return True


# ---------------------------------------------------------------------------------- RNG state

def _to_json_value(value):
    if isinstance(value, dict):
        return {k: _to_json_value(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_json_value(value):
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        return {k: _from_json_value(v) for k, v in value.items()}
    return value


_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def rng_state_to_json(generator: np.random.Generator) -> dict:
    """A JSON-ready dict of a Generator's exact state (Python ints hold the 128-bit PCG64 words)."""
    return _to_json_value(generator.bit_generator.state)


def rng_from_json(obj: dict) -> np.random.Generator:
    """The Generator whose state `rng_state_to_json` recorded; it continues the same stream."""
    try:
        name = obj["bit_generator"]
        if name not in _BIT_GENERATORS:
            raise ValueError(f"unknown bit generator {name!r}")
        bit_generator = getattr(np.random, name)()
        bit_generator.state = _from_json_value(obj)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise NpgptError(f"the saved random-generator state is damaged ({str(e)[:80]}); "
                         f"the checkpoint's state.json cannot be resumed exactly") from None
    return np.random.Generator(bit_generator)
