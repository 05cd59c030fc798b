"""Data preparation (streamed, atomic, checked) and random batches from memory-mapped token files."""

import hashlib
import json
import os
import urllib.error
import warnings

import numpy as np
import pytest

from npgpt import data as npdata
from npgpt import tokenizer as tk
from npgpt.data import TokenData, default_data_dir, ensure_builtin_dataset, prepare
from npgpt.errors import NpgptError


def make_text(n_lines=300, seed=0):
    """Word-like text with punctuation, digits, some non-ASCII, CRLF and long whitespace runs."""
    r = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "mat", "naïve", "café", "über", "42", "3.14", "hello,", "world!",
             "don't", "we'll", "x", "   ", "\t", "émigré", "日本", "🙂"]
    lines = []
    for _ in range(n_lines):
        k = r.integers(1, 12)
        line = " ".join(words[i] for i in r.integers(0, len(words), size=k))
        lines.append(line + ("\r\n" if r.random() < 0.1 else "\n"))
        if r.random() < 0.1:
            lines.append("\n\n")
    return "".join(lines)


def tokens_of(folder):
    meta = json.loads((folder / "meta.json").read_text())
    train = np.fromfile(folder / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(folder / "val.bin", dtype=meta["dtype"])
    return meta, train, val


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_bytes(make_text().encode("utf-8"))
    return p


def test_prepare_char(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare([corpus], out)
    text = corpus.read_bytes().decode("utf-8")
    m, train, val = tokens_of(out)
    assert m == meta
    assert m["tokenizer"] == "char" and m["dtype"] == "uint16" and m["val_fraction"] == 0.1
    assert m["train_tokens"] == len(train) and m["val_tokens"] == len(val) and len(train) + len(val) == len(text)
    assert abs(len(val) / len(text) - 0.1) < 0.02
    tok = tk.load(out)
    assert m["vocab_size"] == tok.vocab_size and m["tokenizer_fingerprint"] == tok.fingerprint()
    assert tok.decode(np.concatenate([train, val])) == text
    assert m["sources"] == [{"name": str(corpus), "bytes": corpus.stat().st_size,
                             "sha256": hashlib.sha256(corpus.read_bytes()).hexdigest()}]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]          # no temp folder left


def test_prepare_bpe_small_vocab(corpus, tmp_path):
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                      # small corpus: fewer merges
        meta = prepare([corpus], out, tokenizer="bpe", vocab_size=300, val_fraction=0.2)
    m, train, val = tokens_of(out)
    tok = tk.load(out)
    assert m["tokenizer"] == "bpe" and tok.kind == "bpe" and m["vocab_size"] == tok.vocab_size <= 300
    text = corpus.read_bytes().decode("utf-8")
    ids = np.concatenate([train, val])
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(ids, tok.encode(text))
    assert tok.eot_id not in ids                                             # one file: no separator
    assert abs(len(tok.decode(val).encode()) / len(text.encode()) - 0.2) < 0.02   # split by bytes
    assert meta["train_tokens"] == len(train)


def test_dtype_uint32_for_large_vocab_with_tokenizer_from(tmp_path):
    chars = [chr(0x10000 + i) for i in range(70_000)]                        # > 65,536 ids
    tok = tk.CharTokenizer(chars)
    tok.save(tmp_path / "tok")
    src = tmp_path / "in.txt"
    src.write_text("".join(chars[-50:]) * 4, encoding="utf-8")
    m = prepare([src], tmp_path / "out", tokenizer_from=tmp_path / "tok")
    assert m["dtype"] == "uint32" and m["vocab_size"] == tok.vocab_size
    _, train, val = tokens_of(tmp_path / "out")
    assert train.dtype == np.uint32 and int(train.max()) >= 65536
    assert tok.decode(np.concatenate([train, val])) == src.read_text(encoding="utf-8")
    assert tk.load(tmp_path / "out").fingerprint() == tok.fingerprint()


def test_multi_file_documents_are_separated(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.txt").write_text("second document here\n")
    (docs / "a.md").write_text("first document, hello\n")
    (docs / "sub" / "c.rst").write_text("third one in a subfolder\n")
    (docs / ".hidden.txt").write_text("SECRET")
    (docs / "image.png").write_bytes(b"\x89PNG\x00")
    (docs / "empty.txt").write_text("")
    texts = ["first document, hello\n", "second document here\n", "third one in a subfolder\n"]

    m = prepare([docs], tmp_path / "bpe", tokenizer="bpe", vocab_size=270, val_fraction=0.2)
    _, train, val = tokens_of(tmp_path / "bpe")
    tok = tk.load(tmp_path / "bpe")
    ids = np.concatenate([train, val]).tolist()
    assert ids.count(tok.eot_id) == 2
    expected = tok.encode(texts[0]) + [tok.eot_id] + tok.encode(texts[1]) + [tok.eot_id] + tok.encode(texts[2])
    assert ids == expected
    assert [s["name"] for s in m["sources"]] == [str(docs / "a.md"), str(docs / "b.txt"), str(docs / "sub" / "c.rst")]

    prepare([docs], tmp_path / "char")
    _, train, val = tokens_of(tmp_path / "char")
    assert tk.load(tmp_path / "char").decode(np.concatenate([train, val])) == "\n\n".join(texts)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_streaming_with_tiny_chunks_matches_unstreamed(tmp_path, kind):
    text = make_text(200, seed=1) + "word" + " " * 50 + "tail"          # a long whitespace run at a cut
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(text.encode())
    b.write_bytes(make_text(50, seed=2).encode())
    opts = dict(tokenizer=kind, vocab_size=280 if kind == "bpe" else None, val_fraction=0.15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare([a, b], tmp_path / "big", **opts)
        prepare([a, b], tmp_path / "tiny", chunk_bytes=7, **opts)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "big" / name).read_bytes() == (tmp_path / "tiny" / name).read_bytes(), name
    tok = tk.load(tmp_path / "big")
    _, train, val = tokens_of(tmp_path / "big")
    sep = [tok.eot_id] if kind == "bpe" else tok.encode("\n\n")
    whole = tok.encode(text) + sep + tok.encode(b.read_bytes().decode("utf-8"))
    assert np.concatenate([train, val]).tolist() == whole


def test_batches_shift_and_reproducibility(corpus, tmp_path):
    prepare([corpus], tmp_path / "d")
    d = TokenData(tmp_path / "d")
    assert d.vocab_size == d.meta["vocab_size"] and d.tokenizer().kind == "char"
    x, y = d.get_batch("train", 8, 16, np.random.default_rng(5))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
    assert x.flags.c_contiguous and y.flags.c_contiguous
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])                      # y is x shifted by one
    train = d.split("train")
    for row_x, row_y in zip(x, y):                                          # each row is a real window
        starts = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(train, 17).__eq__(
            np.concatenate([row_x, row_y[-1:]])).all(axis=1))
        assert len(starts) >= 1
    x2, y2 = d.get_batch("train", 8, 16, np.random.default_rng(5))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    xv, _ = d.get_batch("val", 2, 4, np.random.default_rng(5))
    assert xv.max() < d.vocab_size
    n_val = len(d.split("val"))
    x, y = d.get_batch("val", 3, n_val - 1, np.random.default_rng(0))     # the longest possible window
    np.testing.assert_array_equal(x[0], d.split("val")[:-1])
    with pytest.raises(NpgptError, match=rf"val split has {n_val} tokens, fewer than block_size\+1 = {n_val + 1}"):
        d.get_batch("val", 1, n_val, np.random.default_rng(0))
    with pytest.raises(NpgptError, match="smaller --block-size"):
        d.check_split_sizes(n_val)
    d.check_split_sizes(n_val - 1)
    with pytest.raises(NpgptError, match="unknown split"):
        d.split("test")


def test_windows_cover_the_whole_split(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("abcdefghij" * 3)
    prepare([src], tmp_path / "d", val_fraction=0.3)
    d = TokenData(tmp_path / "d")
    train = np.asarray(d.split("train"))
    n, T = len(train), 3
    x, y = d.get_batch("train", 500, T, np.random.default_rng(0))
    ix = np.random.default_rng(0).integers(0, n - T, size=500)              # the documented draw
    assert set(ix) == set(range(n - T))                                     # first to last window
    np.testing.assert_array_equal(x, train[ix[:, None] + np.arange(T)])
    np.testing.assert_array_equal(y, train[ix[:, None] + np.arange(1, T + 1)])


def test_bad_inputs_write_nothing(tmp_path):
    out = tmp_path / "nested" / "out"
    good = tmp_path / "good.txt"
    good.write_text("hello world, this is fine\n" * 20)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"abc\x00def")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok so far\n".encode() + "café".encode("latin-1"))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab")
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    cases = [
        (dict(inputs=[tmp_path / "missing.txt"]), "does not exist"),
        (dict(inputs=[empty]), "empty"),
        (dict(inputs=[binary]), "binary"),
        (dict(inputs=[latin1]), "not valid UTF-8 .*byte offset 13"),
        (dict(inputs=[tiny]), "too short .*--val-fraction"),
        (dict(inputs=[good], val_fraction=0.0), "too short .*--val-fraction"),
        (dict(inputs=[good], val_fraction=1.0), "--val-fraction"),
        (dict(inputs=[good], val_fraction=-0.1), "--val-fraction"),
        (dict(inputs=[empty_dir]), "no text files"),
        (dict(inputs=[]), "--input"),
        (dict(inputs=[good], dataset="pydoc"), "not both"),
        (dict(inputs=[good], tokenizer="word"), "unknown tokenizer"),
        (dict(inputs=[good], vocab_size=300), "--vocab-size applies to --tokenizer bpe"),
        (dict(inputs=[good], tokenizer="bpe", vocab_size=100), "--vocab-size"),
        (dict(inputs=[good], tokenizer_from=tmp_path / "nope"), "does not exist"),
        (dict(dataset="imagenet"), "unknown dataset"),
    ]
    for kwargs, message in cases:
        with pytest.raises(NpgptError, match=message):
            prepare(out_dir=out, **kwargs)
        assert not (tmp_path / "nested").exists(), kwargs

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(NpgptError, match="is a file"):
        prepare([good], afile)
    assert afile.read_text() == "x"


def test_existing_data_needs_force_and_failures_keep_it(tmp_path, corpus):
    out = tmp_path / "out"
    prepare([corpus], out, tokenizer="bpe", vocab_size=270)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"vocab.json", "merges.txt"} <= set(before)
    with pytest.raises(NpgptError, match="--force"):
        prepare([corpus], out)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text " * 100 + b"\xff")
    with pytest.raises(NpgptError, match="UTF-8"):
        prepare([bad], out, force=True)

    def boom(stage, done, total):
        if stage == "encode":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus], out, force=True, progress=boom)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before      # untouched, no temp files
    # a forced char preparation replaces it, and drops the old BPE files
    prepare([corpus], out, force=True)
    assert tk.load(out).kind == "char"
    assert not (out / "vocab.json").exists() and not (out / "merges.txt").exists()


def test_input_folder_containing_the_output(tmp_path):
    (tmp_path / "corpus.txt").write_text("some text for the corpus\n" * 30)
    prepare([tmp_path], tmp_path / "data", tokenizer="bpe", vocab_size=260)
    m = prepare([tmp_path], tmp_path / "data", tokenizer="bpe", vocab_size=260, force=True)
    assert [s["name"] for s in m["sources"]] == [str(tmp_path / "corpus.txt")]   # merges.txt not read back


def test_token_data_errors(tmp_path, corpus):
    with pytest.raises(NpgptError, match="does not exist"):
        TokenData(tmp_path / "none")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(NpgptError, match="no prepared data"):
        TokenData(tmp_path / "emptydir")
    out = tmp_path / "out"
    prepare([corpus], out)
    meta = (out / "meta.json").read_text()
    (out / "meta.json").write_text("{broken")
    with pytest.raises(NpgptError, match="meta.json is not valid JSON"):
        TokenData(out)
    (out / "meta.json").write_text(meta)
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-2])
    with pytest.raises(NpgptError, match="train.bin is truncated"):
        TokenData(out)
    (out / "train.bin").write_bytes(data)
    d = TokenData(out)
    with pytest.raises(TypeError, match="Generator"):
        d.get_batch("train", 2, 4, 1234)


def test_pydoc_dataset_and_builtin_cache(tmp_path):
    m = prepare(out_dir=tmp_path / "p", dataset="pydoc")
    assert m["dataset"] == "pydoc" and m["tokenizer"] == "char"
    assert m["sources"][0]["bytes"] == len(npdata.pydoc_text().encode())
    assert m["train_tokens"] + m["val_tokens"] == len(npdata.pydoc_text())
    folder = ensure_builtin_dataset("pydoc", tokenizer="char")
    assert folder == default_data_dir("pydoc-char") and str(folder).startswith(os.environ["NPGPT_HOME"])
    stamp = (folder / "meta.json").stat().st_mtime_ns
    assert ensure_builtin_dataset("pydoc") == folder                        # reused, not prepared again
    assert (folder / "meta.json").stat().st_mtime_ns == stamp
    assert TokenData(folder).meta["train_tokens"] == m["train_tokens"]


def test_data_home_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("NPGPT_HOME", str(tmp_path / "h"))
    assert default_data_dir("x") == tmp_path / "h" / "data" / "x"
    monkeypatch.delenv("NPGPT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert npdata.npgpt_home() == tmp_path / "xdg" / "npgpt"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert npdata.npgpt_home().parts[-3:] == (".local", "share", "npgpt")


def test_tinyshakespeare_download_checked_and_cached(monkeypatch, tmp_path):
    fake = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
    calls = []

    def fetch(url, timeout=10.0):
        calls.append(url)
        return fake

    monkeypatch.setattr(npdata, "_download", fetch)
    with pytest.raises(NpgptError, match="wrong sha256.*--input FILE"):      # the real hash: mismatch
        prepare(out_dir=tmp_path / "a", dataset="tinyshakespeare")
    assert not (tmp_path / "a").exists()

    monkeypatch.setattr(npdata, "TINYSHAKESPEARE_SHA256", hashlib.sha256(fake).hexdigest())
    m = prepare(out_dir=tmp_path / "b", dataset="tinyshakespeare")
    assert m["sources"][0]["bytes"] == len(fake) and len(calls) == 2
    prepare(out_dir=tmp_path / "c", dataset="tinyshakespeare")
    assert len(calls) == 2                                                  # cached: no second download
    assert calls[0] == npdata.TINYSHAKESPEARE_URL


def test_tinyshakespeare_offline_error(monkeypatch, tmp_path):
    def offline(url, timeout=10.0):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(npdata, "_download", offline)
    with pytest.raises(NpgptError, match="cannot download tinyshakespeare.*--input FILE"):
        prepare(out_dir=tmp_path / "a", dataset="tinyshakespeare")
    assert not (tmp_path / "a").exists()


def test_canonical_tinyshakespeare_hash():
    path = "/work/shared/data/tinyshakespeare.txt"
    if not os.path.exists(path):
        pytest.skip("canonical copy not present")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == npdata.TINYSHAKESPEARE_SHA256


def test_tokenizer_from_rejects_unknown_characters(tmp_path):
    tk.CharTokenizer.train("abc \n").save(tmp_path / "tok")
    src = tmp_path / "in.txt"
    src.write_text("abc cab\n" * 10 + "abz\n")
    with pytest.raises(NpgptError, match="'z' at position"):
        prepare([src], tmp_path / "out", tokenizer_from=tmp_path / "tok")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("device_tokens", [False, True])
def test_gpu_batches_match_cpu(corpus, tmp_path, device_tokens):
    from npgpt.backend import asnumpy, gpu_available, is_gpu_array
    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    prepare([corpus], tmp_path / "d")
    d = TokenData(tmp_path / "d", device_tokens=device_tokens)
    xc, yc = d.get_batch("train", 4, 16, np.random.default_rng(9))
    xg, yg = d.get_batch("train", 4, 16, np.random.default_rng(9), device="cuda")
    assert is_gpu_array(xg) and is_gpu_array(yg) and str(xg.dtype) == "int64"
    np.testing.assert_array_equal(asnumpy(xg), xc)
    np.testing.assert_array_equal(asnumpy(yg), yc)


def test_device_paths_gather_the_same_windows(corpus, tmp_path, monkeypatch):
    """The device code paths (one copy per batch; tokens resident on the device), with a stand-in device."""
    import npgpt.backend as backend
    moved = []

    def fake_to_device(a, device):
        moved.append(a.shape)
        return np.array(a)                                                  # a copy, as a transfer makes

    monkeypatch.setattr(backend, "to_device", fake_to_device)
    prepare([corpus], tmp_path / "d")
    ref = TokenData(tmp_path / "d").get_batch("train", 4, 16, np.random.default_rng(9))
    for device_tokens in (False, True):
        d = TokenData(tmp_path / "d", device_tokens=device_tokens)
        for _ in range(2):
            moved.clear()
            x, y = d.get_batch("train", 4, 16, np.random.default_rng(9), device="cuda")
            np.testing.assert_array_equal(x, ref[0])
            np.testing.assert_array_equal(y, ref[1])
            assert x.flags.c_contiguous and y.flags.c_contiguous and x.dtype == np.int64
        # per batch: one (2, B, T) copy; or, with resident tokens, only the (B, T+1) indices
        assert moved == ([(4, 17)] if device_tokens else [(2, 4, 16)])
