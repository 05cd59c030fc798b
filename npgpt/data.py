"""Training data: text corpora -> token files on disk -> random batches.

Preparing (`prepare`, run by `npgpt prepare`)
    Text files (or folders of them, or a built-in corpus) are tokenized into a data folder:

        train.bin, val.bin   the token ids, one after another (uint16 when the vocabulary has at most
                             65,536 tokens, else uint32), as nanoGPT writes them
        meta.json            token counts, dtype, tokenizer kind / vocab size / fingerprint, the
                             sources (name, bytes, sha256), the validation fraction
        tokenizer files      `tok.save(folder)`, so the folder says how to decode its own tokens

    The input is streamed in chunks (about 1 MiB), both to train the tokenizer and to encode, so a
    1 GB corpus prepares in bounded memory. A chunk is only cut where the tokenizer's splitting cannot
    change: anywhere for the character tokenizer; after a letter followed by whitespace for byte-level
    BPE (a pre-token always ends there in the GPT-2 and GPT-4 patterns). The tokens are therefore the
    same as encoding the whole text at once.

    Documents (several files) are separated by `<|endoftext|>` for BPE, as in GPT-2's training data;
    for the character tokenizer they are joined by a blank line ("\\n\\n"), plain text that needs no
    special token and reads naturally in samples.

    Split: as in nanoGPT, the first (1 - val_fraction) of the whole token stream is `train` and the
    rest `val`. To do this while streaming, the cut is placed by byte position: token i goes to train
    when the input bytes before it number fewer than (1 - val_fraction) x total bytes (the
    separators counted too). With several files, `val` is the end of the last file(s).

    Nothing half-written is ever left behind: files are written into a temporary folder inside the
    output folder and moved into place only after everything succeeded, `meta.json` last (the old one
    removed first), so a data folder with a `meta.json` is always complete.

Built-in corpora
    `pydoc`            the Python reference documentation that ships with every CPython
                       (`pydoc_data.topics`, ~465 KB): always available, even offline
    `tinyshakespeare`  Karpathy's 1.1 MB Shakespeare file, downloaded once (sha256-checked) and cached
                       under the npgpt data folder ($NPGPT_HOME, or $XDG_DATA_HOME/npgpt, or
                       ~/.local/share/npgpt)

Batches (`TokenData`)
    The token files are memory-mapped; `get_batch` draws B random windows of T + 1 tokens with a
    NumPy Generator (reproducible), gathers them with one fancy index, and returns x and y = x shifted
    by one, as int64 on the requested device.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from npgpt import tokenizer as tk
from npgpt import backend
from npgpt.checkpoint import has_checkpoint, is_model_dir, sha256_file
from npgpt.errors import NpgptError
from npgpt.fileio import atomic_write_bytes, atomic_write_text, check_replaceable, fsync_dir
from npgpt.safeio import Int, Str, check, read_json, read_json_object, run_lock
from npgpt.tokenizer import BPETokenizer, CharTokenizer, iter_text_chunks
from npgpt.tokenizer.base import DEFAULT_SPECIALS, META_FILE, regroup_at_safe_cuts
from npgpt.tokenizer.bpe import Progress
from npgpt.tokenizer.bpe import safe_cut as bpe_safe_cut
from npgpt.tokenizer.files import DEFAULT_CHUNK_BYTES

DEFAULT_BPE_VOCAB = 4096
META = "meta.json"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".markdown", ".tex", ".org", ".adoc")
CHAR_SEPARATOR = "\n\n"

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATASETS = ("pydoc", "tinyshakespeare")



# ------------------------------------------------------------------------------------ folders

def npgpt_home() -> Path:
    """npgpt's data folder: $NPGPT_HOME, else $XDG_DATA_HOME/npgpt, else ~/.local/share/npgpt."""
    if os.environ.get("NPGPT_HOME"):
        return Path(os.environ["NPGPT_HOME"]).expanduser()
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]).expanduser() / "npgpt"
    return Path.home() / ".local" / "share" / "npgpt"


def default_data_dir(name: str) -> Path:
    """Cache folder for a built-in prepared dataset, e.g. `$NPGPT_HOME/data/pydoc-char`."""
    return npgpt_home() / "data" / name


# --------------------------------------------------------------------------- built-in corpora

def _download(url: str, timeout: float = 10.0) -> bytes:
    """The bytes at `url` (tests replace this function; they never touch the network)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def pydoc_text() -> str:
    """The Python reference topics shipped with CPython, in sorted key order, blank-line separated."""
    from pydoc_data.topics import topics   # the stdlib docs text, read only for the built-in corpus

    return "\n\n".join(topics[key] for key in sorted(topics))


def builtin_corpus(name: str) -> Path:
    """Path of a built-in corpus as a UTF-8 text file (written or downloaded once into the cache)."""
    corpora = npgpt_home() / "corpora"
    if name == "pydoc":
        data = pydoc_text().encode("utf-8")
        path = corpora / "pydoc.txt"
        # Regenerated when this Python's topics differ from the cached file (another Python version).
        if not path.is_file() or path.stat().st_size != len(data) or path.read_bytes() != data:
            atomic_write_bytes(path, data)
        return path
    if name == "tinyshakespeare":
        path = corpora / "tinyshakespeare.txt"
        if path.is_file() and sha256_file(path) == TINYSHAKESPEARE_SHA256:
            return path
        hint = (f"download {TINYSHAKESPEARE_URL} yourself and pass it with `--input FILE` "
                f"(or use --dataset pydoc, which needs no network)")
        try:
            data = _download(TINYSHAKESPEARE_URL, timeout=10.0)
        except Exception as e:   # URLError, timeouts, HTTP errors, DNS failures: all mean "no download"
            raise NpgptError(f"cannot download tinyshakespeare ({str(e)[:100] or type(e).__name__}); {hint}") from None
        if hashlib.sha256(data).hexdigest() != TINYSHAKESPEARE_SHA256:
            raise NpgptError(f"the tinyshakespeare download has the wrong sha256 ({len(data)} bytes; expected "
                             f"{TINYSHAKESPEARE_SHA256[:12]}...); {hint}")
        try:
            atomic_write_bytes(path, data)
        except OSError as e:
            raise NpgptError(f"cannot cache tinyshakespeare in {corpora} ({e.strerror}); set NPGPT_HOME to a "
                             f"writable folder") from None
        return path
    raise NpgptError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or pass --input FILE")


# ----------------------------------------------------------------------------------- sources

def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_inputs(inputs, exclude: Path | None = None) -> list[Path]:
    """Files to read, in order: each file as given; each folder's text files, recursively, sorted.

    Hidden files and folders are skipped, and so is `exclude` (the output folder, which may sit
    inside an input folder and holds text-like tokenizer files).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise NpgptError(f"input {p} does not exist; check the path")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES and not _is_hidden(f, p)
                           and not (exclude is not None and exclude.resolve() in f.resolve().parents))
            if not found:
                raise NpgptError(f"input folder {p} holds no text files ({', '.join(TEXT_SUFFIXES)}); "
                                 f"give a folder of text files or a file")
            files += found
        else:
            files.append(p)
    if not files:
        raise NpgptError("no input given: pass --input FILE (or FOLDER), or --dataset pydoc")
    return files


# ---------------------------------------------------------------------------------- preparing

def _train_tokenizer(files, kind, vocab_size, chunk_bytes, progress, errors="strict"):
    if kind == "char":
        def stream():
            for i, path in enumerate(files):
                if i:
                    yield CHAR_SEPARATOR     # the separator's characters must be in the vocabulary
                yield from iter_text_chunks(path, chunk_bytes=chunk_bytes, errors=errors)
        return CharTokenizer.train(stream())
    if len(files) == 1:
        return BPETokenizer.train_from_file(files[0], vocab_size, progress=progress, chunk_bytes=chunk_bytes,
                                            errors=errors)
    # Several documents: pieces end at safe cuts, so no pre-token is split between two of them.
    pieces = (piece for path in files
              for piece in regroup_at_safe_cuts(iter_text_chunks(path, chunk_bytes=chunk_bytes, errors=errors),
                                                bpe_safe_cut, DEFAULT_SPECIALS))
    return BPETokenizer.train(pieces, vocab_size, progress=progress)


def _token_byte_lengths(tok) -> np.ndarray:
    """(V,) int64: UTF-8 bytes each token stands for (0 for ids a vocabulary leaves unused)."""
    lengths = np.zeros(tok.vocab_size, dtype=np.int64)
    for i in range(tok.vocab_size):
        try:
            lengths[i] = len(tok.token_bytes(i))
        except NpgptError:
            pass
    return lengths


def _fast_char_encoder(tok, dtype):
    """A vectorised `encode` for character tokenizers (several times faster on big corpora), or None.

    A table indexed by code point gives each character's id (-1 for characters outside the
    vocabulary; at most 0x110000 entries). Any unknown character falls back to `tok.encode`, which
    raises the tokenizer's own error naming it.
    """
    chars = getattr(tok, "chars", None)
    if tok.kind != "char" or not isinstance(chars, list) or not chars:
        return None
    points = np.array([ord(c) for c in chars], dtype=np.int64)           # (n,) code point of id i
    table = np.full(int(points.max()) + 1, -1, dtype=np.int64)           # code point -> id
    table[points] = np.arange(len(chars))
    top = len(table) - 1

    def encode(piece: str) -> np.ndarray:
        cps = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)   # (len(piece),)
        ids = table[np.minimum(cps, top)]
        if (cps > top).any() or (ids < 0).any():
            return np.asarray(tok.encode(piece, disallowed_special=()), dtype=dtype)   # raises
        return ids.astype(dtype)
    return encode


def _has_prepared_data(folder: Path) -> bool:
    return any((folder / name).exists() for name in (META, "train.bin", "val.bin"))


# Every file prepare writes: the only names `prepare --force` may remove (never a list read from disk).
PREPARED_FILES = ("train.bin", "val.bin", META, META_FILE, "vocab.json", "merges.txt")


def prepare(inputs=None, out_dir=None, tokenizer: str | None = None, vocab_size: int | None = None,
            tokenizer_from=None, val_fraction: float = 0.1, dataset: str | None = None,
            progress: Progress | None = None, force: bool = False,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES, errors: str = "strict", trust_pattern: bool = False) -> dict:
    """Tokenize text into `out_dir` (train.bin, val.bin, meta.json, tokenizer files); return the meta.

    inputs: files and/or folders (or give `dataset`: "pydoc" or "tinyshakespeare").
    tokenizer: "char" (default) or "bpe" (trained to `vocab_size`, default 4096); or `tokenizer_from`,
    a folder holding a tokenizer to reuse (a model's own, for fine-tuning); trust_pattern: that
    tokenizer may use a split regex that is not a named one (`npgpt --trust-pattern`).
    errors: "strict" (invalid UTF-8 is an error naming its byte offset) or "replace" (U+FFFD).
    progress(stage, done, total): optional; stages "count"/"merge" (BPE training), "encode" (bytes).
    """
    if out_dir is None:
        raise NpgptError("no output folder given: pass --out DIR")
    out_dir = Path(out_dir).expanduser()
    try:
        val_fraction = float(val_fraction)
    except (TypeError, ValueError):
        val_fraction = float("nan")
    if not 0.0 <= val_fraction < 1.0:   # NaN fails this too
        raise NpgptError(f"--val-fraction must be at least 0 and below 1 (e.g. 0.1), got {val_fraction}")
    if tokenizer_from is not None:
        if vocab_size is not None:
            raise NpgptError("--vocab-size cannot be used with --tokenizer-from (the tokenizer is reused as is)")
    else:
        tokenizer = tokenizer or "char"
        if tokenizer not in ("char", "bpe"):
            raise NpgptError(f"unknown tokenizer {tokenizer!r}: use char or bpe")
        if tokenizer == "char" and vocab_size is not None:
            raise NpgptError("--vocab-size applies to --tokenizer bpe (a char vocabulary is the corpus's characters)")
        if tokenizer == "bpe":
            vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
                raise NpgptError(f"--vocab-size must be an integer of at least 257 (256 bytes + <|endoftext|>), "
                                 f"got {vocab_size}")
    if out_dir.exists() and not out_dir.is_dir():
        raise NpgptError(f"--out {out_dir} is a file; give a folder for the prepared data")
    if is_model_dir(out_dir) or has_checkpoint(out_dir):
        raise NpgptError(f"{out_dir} holds a model or checkpoint; prepare data into a folder of its own (--force "
                         f"does not apply: it would replace the model's tokenizer)")
    if out_dir.is_dir() and _has_prepared_data(out_dir) and not force:
        raise NpgptError(f"{out_dir} already holds prepared data; pass --force to replace it or choose another --out")
    if (dataset is None) == (not inputs):
        raise NpgptError("give either --input FILE/FOLDER or --dataset NAME (one of them, not both)")

    # Resolve the sources first: every input problem is reported before anything is written.
    if dataset is not None:
        files = [builtin_corpus(dataset)]
        names = [dataset]
    else:
        files = resolve_inputs(inputs, exclude=out_dir)
        names = [str(f) for f in files]
    for f in files:
        if not os.access(f, os.R_OK):
            raise NpgptError(f"cannot read input {f}; check its permissions")
    # a pipe or FIFO (`--input <(cat file)`) has no size and can be read once: it is copied first
    sizes = [f.stat().st_size if f.is_file() else None for f in files]
    if all(size == 0 for size in sizes):
        raise NpgptError(f"the input is empty ({', '.join(names[:3])}); give a text file with some content")

    # The outermost folder this call creates: removed again on failure, so nothing is left behind.
    created = next((p for p in [*reversed(out_dir.parents), out_dir] if not p.exists()), None)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NpgptError(f"cannot create {out_dir} ({e.strerror}); check the path and permissions") from None
    with run_lock(out_dir, "prepare"):
        try:
            work = Path(tempfile.mkdtemp(dir=out_dir, prefix=".prepare-", suffix=".tmp"))
            spool = Path(tempfile.mkdtemp(dir=out_dir, prefix=".inputs-", suffix=".tmp"))
        except OSError as e:
            raise NpgptError(f"cannot write in {out_dir} ({e.strerror}); check the path and permissions") from None
        try:
            files, sizes = _spool_streams(files, sizes, spool)
            if sum(sizes) == 0:
                raise NpgptError(f"the input is empty ({', '.join(names[:3])}); give a text file with some content")
            docs = [(name, path, size) for name, path, size in zip(names, files, sizes) if size > 0]   # skip empty
            meta = _prepare_into(work, docs, tokenizer, vocab_size, tokenizer_from, val_fraction, dataset,
                                 progress, chunk_bytes, errors, trust_pattern)
            _move_into_place(work, out_dir)
            return meta
        except BaseException as e:
            shutil.rmtree(work, ignore_errors=True)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            if isinstance(e, OSError):   # disk full, permissions, an input vanishing midway
                raise NpgptError(f"preparing {out_dir} failed ({e.strerror or e}: {e.filename}); "
                                 f"check free space and permissions") from None
            raise
        finally:
            shutil.rmtree(spool, ignore_errors=True)


def _spool_streams(files, sizes, spool: Path):
    """Copy inputs that are not regular files (pipes, FIFOs, /dev/stdin) into `spool`: they can be read
    only once, and prepare reads its input twice (train the tokenizer, then encode)."""
    out_files, out_sizes = [], []
    for i, (f, size) in enumerate(zip(files, sizes)):
        if size is None:
            copy = spool / f"input-{i}.txt"
            with open(f, "rb") as src, open(copy, "wb") as dst:
                shutil.copyfileobj(src, dst, DEFAULT_CHUNK_BYTES)
            f, size = copy, copy.stat().st_size
        out_files.append(f)
        out_sizes.append(size)
    return out_files, out_sizes


def _tokenizer_folder(path):
    """A run folder's tokenizer lives in its checkpoint (RUN/ckpt); other folders hold it directly."""
    p = Path(path)
    return p / "ckpt" if not tk.is_tokenizer_dir(p) and has_checkpoint(p) else p


def _prepare_into(work: Path, docs, kind, vocab_size, tokenizer_from, val_fraction, dataset, progress,
                  chunk_bytes, errors="strict", trust_pattern=False) -> dict:
    """Tokenize `docs` into the temporary folder `work`; return the meta written there."""
    paths = [path for _, path, _ in docs]
    try:
        if tokenizer_from is not None:
            tok = tk.load(_tokenizer_folder(tokenizer_from), trust_pattern=trust_pattern)
        else:
            tok = _train_tokenizer(paths, kind, vocab_size, chunk_bytes, progress, errors)
        kind = tok.kind
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
        lengths = _token_byte_lengths(tok)                          # (V,) bytes per token
        if len(docs) == 1:
            sep_ids = np.zeros(0, dtype=dtype)                      # one document: no separator
        elif kind == "bpe":
            sep_ids = np.array([tok.eot_id], dtype=dtype)
        else:
            sep_ids = np.array(tok.encode(CHAR_SEPARATOR), dtype=dtype)
        total = sum(size for _, _, size in docs) + (len(docs) - 1) * int(lengths[sep_ids].sum())
        split_at = (1.0 - val_fraction) * total                     # byte position of the cut
        pos = 0                                                      # input bytes before the next token
        counts = {"train": 0, "val": 0}
        with open(work / "train.bin", "wb") as f_train, open(work / "val.bin", "wb") as f_val:
            def emit(ids: np.ndarray, nbytes: int):
                """Append `ids` (standing for `nbytes` input bytes) to train, val, or both."""
                nonlocal pos
                if pos + nbytes <= split_at:
                    n_train = ids.size                               # wholly before the cut
                elif pos >= split_at:
                    n_train = 0                                      # wholly after it
                else:                                                # the one piece the cut falls in
                    starts = pos + np.cumsum(lengths[ids]) - lengths[ids]   # byte position of each token
                    n_train = int(np.searchsorted(starts, split_at, side="left"))
                ids[:n_train].tofile(f_train)
                ids[n_train:].tofile(f_val)
                counts["train"] += n_train
                counts["val"] += ids.size - n_train
                pos += nbytes

            encode = _fast_char_encoder(tok, dtype) or (
                # The corpus's own "<|endoftext|>" strings stay text: only prepare inserts the id.
                lambda piece: np.asarray(tok.encode(piece, disallowed_special=()), dtype=dtype))
            for i, path in enumerate(paths):
                if i:
                    emit(sep_ids.copy(), int(lengths[sep_ids].sum()))
                for piece in tok.split_stream(iter_text_chunks(path, chunk_bytes=chunk_bytes, errors=errors)):
                    emit(encode(piece), len(piece.encode("utf-8")))
                    if progress is not None:
                        progress("encode", pos, total)
            for f in (f_train, f_val):
                f.flush()
                os.fsync(f.fileno())
    except UnicodeDecodeError as e:   # defensive: iter_text_chunks normally reports this itself
        raise NpgptError(f"an input is not valid UTF-8 ({e}); convert it to UTF-8") from None

    n_train, n_val = counts["train"], counts["val"]
    if n_train < 2 or n_val < 1:
        raise NpgptError(f"the corpus is too short to split: {n_train} train and {n_val} val tokens (need at "
                         f"least 2 and 1); give a larger input or a different --val-fraction (now {val_fraction})")
    tok.save(work)
    written = sorted(p.name for p in work.iterdir())
    meta = {
        "format": "npgpt-tokens", "version": 1,
        "train_tokens": n_train, "val_tokens": n_val, "dtype": np.dtype(dtype).name,
        "tokenizer": kind, "vocab_size": tok.vocab_size, "tokenizer_fingerprint": tok.fingerprint(),
        "eot_id": tok.eot_id,
        "separator": "<|endoftext|>" if kind == "bpe" else CHAR_SEPARATOR,
        "split": "by byte position: tokens starting in the first (1 - val_fraction) of the input are train",
        "val_fraction": val_fraction, "dataset": dataset,
        "tokenizer_from": None if tokenizer_from is None else str(tokenizer_from),
        "sources": [{"name": name, "bytes": size, "sha256": sha256_file(path)} for name, path, size in docs],
        "files": written + [META],
    }
    atomic_write_text(work / META, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def _move_into_place(work: Path, out_dir: Path) -> None:
    """Move the finished files from `work` into `out_dir`: old meta.json out first, new one in last."""
    for p in work.iterdir():                 # a link or device in --out is refused, never renamed over
        check_replaceable(out_dir / p.name)
    old_meta = _read_json(out_dir / META)
    if (out_dir / META).exists():
        os.remove(out_dir / META)            # from here on the folder reads as "not prepared" ...
    new_files = sorted(p.name for p in work.iterdir() if p.name != META)
    for name in new_files:
        os.replace(work / name, out_dir / name)
    # ... a previous preparation's tokenizer files that this one did not write would confuse loading. Only
    # names on npgpt's own list go, and only when the old meta.json says a preparation wrote them.
    old_files = (old_meta or {}).get("files", []) if isinstance(old_meta, dict) else []
    for name in PREPARED_FILES:
        stale = out_dir / name
        if name in old_files and name not in new_files and name != META and stale.is_file() and not stale.is_symlink():
            os.remove(stale)
    os.replace(work / META, out_dir / META)   # ... until the new meta.json lands, last
    shutil.rmtree(work, ignore_errors=True)
    fsync_dir(out_dir)


def _read_json(path: Path):
    try:
        return read_json(path, "data description")
    except NpgptError:
        return None


def ensure_builtin_dataset(name: str = "pydoc", tokenizer: str = "char", vocab_size: int | None = None,
                           progress: Progress | None = None) -> Path:
    """The folder of a built-in corpus prepared with `tokenizer`: prepared on first use, then reused."""
    if name not in DATASETS:
        raise NpgptError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    label = f"{name}-{tokenizer}" + (f"{vocab_size or DEFAULT_BPE_VOCAB}" if tokenizer == "bpe" else "")
    folder = default_data_dir(label)
    try:
        TokenData(folder)
        return folder
    except NpgptError:
        pass                                   # missing or damaged: prepare it (again)
    prepare(out_dir=folder, dataset=name, tokenizer=tokenizer, vocab_size=vocab_size, progress=progress, force=True)
    return folder


# ------------------------------------------------------------------------------------ batches

@runtime_checkable
class BatchSource(Protocol):
    """What the trainer reads batches from (npgpt.train.train's batch_source): TokenData here,
    npgpt.sft.SFTData for fine-tuning records.

    path         the folder or file it came from ("" when none), recorded in state.json
    vocab_size   token ids are below this
    block_size   the context its rows are cut to (SFT), or None: the trainer's / the model's
    grow_vocab   True when the model may need new embedding rows for its special tokens (SFT)
    get_batch(split, batch_size, block_size, rng, device=None) -> (x, y) int arrays (B, T)
    tokenizer()                    the tokenizer saved with each checkpoint
    check_split_sizes(block_size)  a clear error when a split is too short for one batch
    """
    path: object
    vocab_size: int
    block_size: int | None
    grow_vocab: bool

    def get_batch(self, split, batch_size, block_size, rng, device=None): ...

    def tokenizer(self): ...

    def check_split_sizes(self, block_size): ...


class TokenData:
    """A prepared data folder: memory-mapped train/val tokens and random batches from them.

    device_tokens=True copies each split to the GPU on first use and gathers batches there (worth it
    when the split fits in GPU memory: only the B x (T+1) indices cross the bus per batch).
    trust_pattern=True: the folder's tokenizer may use a split regex that is not a named one.
    """

    block_size = None          # rows are cut at the trainer's block size (a BatchSource field)
    grow_vocab = False         # the tokens were made by the model's own tokenizer

    def __init__(self, data_dir, device_tokens: bool = False, trust_pattern: bool = False):
        self.path = Path(data_dir)
        self.trust_pattern = bool(trust_pattern)
        meta_path = self.path / META
        if not meta_path.is_file():
            if not self.path.exists():
                raise NpgptError(f"data folder {self.path} does not exist; create it with "
                                 f"`npgpt prepare --input FILE --out {self.path}`")
            raise NpgptError(f"{self.path} holds no prepared data (no {META}); run "
                             f"`npgpt prepare --input FILE --out {self.path}`")
        meta = read_json_object(meta_path, "data description")
        f = check(meta, {"dtype": Str(("uint16", "uint32")), "train_tokens": Int(lo=0), "val_tokens": Int(lo=0),
                         "vocab_size": Int(lo=1, hi=1 << 32)}, f"{meta_path} (prepare the data again)")
        self.dtype = np.dtype(f["dtype"])
        counts = {"train": f["train_tokens"], "val": f["val_tokens"]}
        if f["vocab_size"] > np.iinfo(self.dtype).max + 1:
            raise NpgptError(f"{meta_path}: field 'vocab_size' {f['vocab_size']} does not fit its dtype {self.dtype}; "
                             f"prepare the data again")
        self._meta_vocab_size = f["vocab_size"]
        self.meta = meta
        self.device_tokens = device_tokens
        self._splits = {}
        for split, count in counts.items():
            path = self.path / f"{split}.bin"
            expected = count * self.dtype.itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                state = "missing" if size is None else f"{size:,} bytes, expected {expected:,}"
                raise NpgptError(f"{path} is truncated or does not match {META} ({state}); prepare the data "
                                 f"again with `npgpt prepare --force`")
            # np.memmap refuses empty files; an empty split is an empty array
            self._splits[split] = (np.memmap(path, dtype=self.dtype, mode="r", shape=(count,)) if count
                                   else np.zeros(0, dtype=self.dtype))
        self._device_splits = {}
        self._tokenizer = None

    def __repr__(self):
        return (f"TokenData({str(self.path)!r}: {len(self._splits['train']):,} train / "
                f"{len(self._splits['val']):,} val tokens, vocab {self._meta_vocab_size})")

    def split(self, name: str) -> np.ndarray:
        """The (memory-mapped) token array of split "train" or "val"."""
        if name not in self._splits:
            raise NpgptError(f"unknown split {name!r}: use train or val")
        return self._splits[name]

    def tokenizer(self):
        """The tokenizer the data was made with (loaded from the data folder once; its vocabulary size
        must be meta.json's)."""
        if self._tokenizer is None:
            tok = tk.load(self.path, trust_pattern=self.trust_pattern)
            if tok.vocab_size != self._meta_vocab_size:
                raise NpgptError(f"{self.path / META}: field 'vocab_size' is {self._meta_vocab_size} but the folder's "
                                 f"tokenizer has {tok.vocab_size} tokens; prepare the data again")
            self._tokenizer = tok
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """meta.json's vocabulary size, checked against the tokenizer (never trusted alone: it sizes a model)."""
        return self.tokenizer().vocab_size

    def check_token_ids(self, *splits) -> None:
        """NpgptError when a split holds a token id at or beyond the vocabulary (a damaged .bin file)."""
        for name in splits or ("train", "val"):
            data = self._splits[name]
            for start in range(0, len(data), 1 << 24):           # bounded memory on any size
                top = int(data[start:start + (1 << 24)].max())
                if top >= self.vocab_size:
                    raise NpgptError(f"{self.path / (name + '.bin')} holds token id {top}, beyond the vocabulary "
                                     f"({self.vocab_size} tokens); the file is damaged: prepare the data again")

    def check_split_sizes(self, block_size: int) -> None:
        """NpgptError unless both splits hold at least block_size + 1 tokens (one training window)."""
        for name in ("train", "val"):
            self._check_length(name, block_size)

    def _check_length(self, name, block_size):
        n = len(self._splits[name])
        if n < block_size + 1:
            raise NpgptError(f"{name} split has {n} tokens, fewer than block_size+1 = {block_size + 1}: use a "
                             f"smaller --block-size or more data")
        return n

    def get_batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator, device=None):
        """x, y: (B, T) int64 on `device`; B random windows of the split, y = x shifted by one token."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError("get_batch needs a numpy.random.Generator (np.random.default_rng(seed))")
        if batch_size < 1 or block_size < 1:
            raise NpgptError(f"batch_size and block_size must be at least 1, got {batch_size} and {block_size}")
        data = self.split(split)
        n = self._check_length(split, block_size)
        B, T = batch_size, block_size
        ix = rng.integers(0, n - T, size=B)                       # (B,) window starts; last start n-T-1
        idx = ix[:, None] + np.arange(T + 1)                      # (B, T+1) positions of x and the last y
        if self.device_tokens and device is not None and str(device) != "cpu":
            tokens = self._device_splits.get(split)
            if tokens is None:
                tokens = self._device_splits[split] = backend.to_device(np.ascontiguousarray(data), device)
            window = tokens[backend.to_device(idx, device)].astype("int64")  # (B, T+1), gathered on the device
            xy = backend.get_xp(window).stack([window[:, :-1], window[:, 1:]])   # (2, B, T) contiguous x and y
            return xy[0], xy[1]
        window = data[idx].astype(np.int64)                       # (B, T+1), one gather from the memmap
        xy = np.stack([window[:, :-1], window[:, 1:]])            # (2, B, T) contiguous x and y
        if device is not None and str(device) != "cpu":
            xy = backend.to_device(xy, device)                            # one host->device copy
        return xy[0], xy[1]
