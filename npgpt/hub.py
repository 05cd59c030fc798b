"""Models from the Hugging Face Hub: `hf:ORG/NAME[@REVISION]` as a local folder.

    npgpt chat --checkpoint hf:HuggingFaceTB/SmolLM2-135M-Instruct
    npgpt.from_pretrained("hf:Qwen/Qwen2.5-0.5B-Instruct@main")

`snapshot(ref)` fetches the files npgpt reads (config.json, safetensors weights and their index,
tokenizer.json, tokenizer_config.json, vocab.json + merges.txt, the chat template, a LoRA adapter)
through huggingface_hub (`pip install 'npgpt[hub]'`) and returns the snapshot folder in its cache, so
the model loads as any folder does, and is checked as any folder is. Pickled weights
(pytorch_model.bin, *.pt) are never fetched. huggingface_hub's cache is used as is (HF_HOME,
HF_HUB_CACHE), so a model downloaded once by transformers or `hf download` is not downloaded again;
with HF_HUB_OFFLINE=1 (or offline=True) only the cache is read, and a model that is not in it is a
clear error. REVISION is a branch, a tag or a commit hash (default: main).

npgpt.loading's table has an entry for these references (`from_pretrained`, `load_run`), and
npgpt.checkpoint.find_checkpoint resolves them, so every command that takes a model folder
(`--checkpoint`, `--init-from`, `--teacher`, `--draft`) also takes `hf:ORG/NAME[@REVISION]`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from npgpt.errors import NpgptError

PREFIX = "hf:"
# What npgpt reads from a model repository: never pickles, never other frameworks' weights.
ALLOW_PATTERNS = ["config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
                  "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
                  "chat_template.json", "adapter_config.json", "adapter_model.safetensors"]
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
_FORMAT = "hf:ORG/NAME or hf:ORG/NAME@REVISION (e.g. hf:HuggingFaceTB/SmolLM2-135M-Instruct@main)"


def is_hub_ref(path) -> bool:
    """Whether `path` (a str or Path) names a Hub model: it starts with `hf:`."""
    return str(path).startswith(PREFIX)


def parse_hub_ref(ref) -> tuple[str, str | None]:
    """(repo id, revision or None) of `hf:ORG/NAME[@REVISION]`; a clear error for anything else."""
    body = str(ref)[len(PREFIX):]
    repo, sep, revision = body.partition("@")
    if not _REPO.fullmatch(repo) or ".." in repo or (sep and (not _REVISION.fullmatch(revision) or ".." in revision)):
        raise NpgptError(f"{str(ref)[:120]!r} is not a Hub model reference; write {_FORMAT}")
    return repo, (revision if sep else None)


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def snapshot(ref, offline: bool | None = None) -> Path:
    """The local folder of Hub model `ref` (fetched into huggingface_hub's cache when needed)."""
    repo, revision = parse_hub_ref(ref)
    try:
        import huggingface_hub
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise NpgptError(f"{ref} is a Hugging Face Hub model; reading the Hub needs huggingface_hub: "
                         f"pip install 'npgpt[hub]'") from None
    offline = _offline(offline)
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                                   local_files_only=offline)
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise NpgptError(f"{ref} is not in the local Hugging Face cache and {where}; download it first "
                         f"(unset HF_HUB_OFFLINE, or `hf download {repo}`) or give a local folder") from None
    except RevisionNotFoundError:
        raise NpgptError(f"{ref}: the repository has no revision {revision!r}; give a branch, tag or commit") from None
    except GatedRepoError:
        raise NpgptError(f"{ref} is a gated model: accept its license on huggingface.co and log in "
                         f"(`hf auth login`) first") from None
    except RepositoryNotFoundError:
        raise NpgptError(f"{ref}: no such model repository on the Hub (or it is private: log in with "
                         f"`hf auth login`)") from None
    except (OSError, ValueError) as e:
        raise NpgptError(f"{ref}: could not fetch it from the Hub ({type(e).__name__}: {str(e)[:200]})") from None
    return Path(folder)


__all__ = ["ALLOW_PATTERNS", "PREFIX", "is_hub_ref", "parse_hub_ref", "snapshot"]
