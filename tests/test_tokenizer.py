"""Tokenizers: training, encoding, special tokens, file formats, and every user mistake.

The corpus is CPython's own help text (`pydoc_data.topics`), so the tests need no downloaded data.
"""

import json
import warnings
from functools import lru_cache

import numpy as np
import pytest
from pydoc_data.topics import topics

from npgpt.errors import NpgptError
from npgpt.tokenizer import (
    BPETokenizer, CharTokenizer, is_tokenizer_dir, iter_text_chunks, load, read_text_checked,
)
from npgpt.tokenizer.bpe import _apply_merges, _reference_merge
from npgpt.tokenizer.files import bytes_to_unicode, gpt2_string_to_bytes

CORPUS = "".join(topics[name] for name in sorted(topics))
EOT = "<|endoftext|>"


@lru_cache(maxsize=None)
def trained(vocab_size=800, pattern="gpt2"):
    return BPETokenizer.train(CORPUS[:150_000], vocab_size, pattern=pattern)


def saved_files(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------- char tokenizer

def test_char_vocab_is_sorted_characters_then_specials():
    tok = CharTokenizer.train("hello world")
    assert tok.kind == "char"
    assert tok.chars == sorted(set("hello world"))
    assert tok.eot_id == len(tok.chars) and tok.vocab_size == len(tok.chars) + 1
    assert tok.special_tokens == {EOT: tok.eot_id}
    ids = tok.encode("hello")
    assert ids == [tok.chars.index(c) for c in "hello"] and tok.decode(ids) == "hello"
    assert tok.decode(np.array(ids)) == "hello"


def test_char_unknown_character_names_it_and_its_position():
    tok = CharTokenizer.train("abc")
    with pytest.raises(NpgptError, match=r"'\\n' at position 3"):
        tok.encode("abc\nabc")
    tok.add_special_tokens(["<s>"])
    # Positions count in the caller's text, also after a special token was split off.
    with pytest.raises(NpgptError, match=r"'z' at position 5"):
        tok.encode("ab<s>z", allowed_special="all")


def test_char_train_from_files_streams_and_matches_train(tmp_path):
    text = "Ünïcödé 🙂 text\r\nwith lines\n" * 50
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    (tmp_path / "b.txt").write_bytes("xyz".encode("utf-8"))
    tok = CharTokenizer.train_from_files([tmp_path / "a.txt", tmp_path / "b.txt"], chunk_bytes=7)
    assert tok.chars == sorted(set(text + "xyz"))
    assert CharTokenizer.train_from_files(tmp_path / "b.txt").chars == ["x", "y", "z"]


def test_char_save_load_round_trip(tmp_path):
    tok = CharTokenizer.train(CORPUS[:5000], special_tokens=(EOT, "<|user|>"))
    tok.save(tmp_path / "tok")
    assert saved_files(tmp_path / "tok") == ["tokenizer_npgpt.json"]
    again = load(tmp_path / "tok")
    assert isinstance(again, CharTokenizer) and again.special_tokens == tok.special_tokens
    assert again.encode(CORPUS[:5000]) == tok.encode(CORPUS[:5000])
    assert again.fingerprint() == tok.fingerprint()


def test_char_errors():
    with pytest.raises(NpgptError, match="empty"):
        CharTokenizer.train("")
    with pytest.raises(NpgptError, match="outside"):
        CharTokenizer.train("ab").decode([0, 7])
    with pytest.raises(NpgptError, match="outside"):
        CharTokenizer.train("ab").decode([-1])
    with pytest.raises(NpgptError, match="str"):
        CharTokenizer.train([b"bytes"])


def test_char_follows_the_special_token_rules():
    tok = CharTokenizer.train("<|endoftext|> ab")
    with pytest.raises(NpgptError, match="special token"):
        tok.encode("a<|endoftext|>")
    assert tok.encode("a<|endoftext|>", allowed_special="all")[-1] == tok.eot_id
    assert tok.decode(tok.encode("a<|endoftext|>", disallowed_special=())) == "a<|endoftext|>"


# ---------------------------------------------------------------------------------- BPE training

def test_bpe_vocab_size_counts_bytes_merges_and_specials():
    tok = trained()
    assert tok.kind == "bpe" and tok.vocab_size == 800
    assert len(tok.merges) == 800 - 256 - 1
    assert tok.eot_id == 799 and tok.special_tokens == {EOT: 799}
    # Trained ids: bytes in byte order, then merges in rank order.
    assert [tok.token_bytes(i) for i in range(256)] == [bytes([b]) for b in range(256)]
    for rank, (left, right) in enumerate(tok.merges):
        assert tok.token_bytes(256 + rank) == tok.token_bytes(left) + tok.token_bytes(right)
    assert len({tok.token_bytes(i) for i in range(tok.vocab_size)}) == tok.vocab_size   # no repeats


def test_bpe_first_merge_and_tie_break():
    # One word: the most frequent pair is ('a', 'a').
    assert BPETokenizer.train("aaabdaaabac", 258).merges == [(97, 97)]
    # Pre-tokens "ab", " cd": every pair occurs once, so the smallest pair of ids goes first.
    assert BPETokenizer.train("ab cd", 260).merges == [(32, 99), (97, 98), (256, 100)]


def test_bpe_training_is_deterministic():
    first = BPETokenizer.train(CORPUS[:40_000], 500)
    second = BPETokenizer.train([CORPUS[:20_000], CORPUS[20_000:40_000]], 500)
    third = BPETokenizer.train(CORPUS[:40_000], 500)
    assert first.merges == third.merges and first.fingerprint() == third.fingerprint()
    # Two documents differ from one only where a pre-token spans the cut, so nearly all merges agree.
    assert len(set(first.merges) & set(second.merges)) > 0.95 * len(first.merges)


def test_bpe_special_strings_in_corpus_are_not_learned():
    tok = BPETokenizer.train((CORPUS[:3000] + "<|endoftext|>") * 3, 300, special_tokens=("<|user|>",))
    assert set(tok.special_tokens) == {EOT, "<|user|>"}   # <|endoftext|> is always there
    learned = [tok.token_bytes(i) for i in range(256, tok.vocab_size - 2)]
    assert not any(b"endoftext" in token or b"<|" in token for token in learned)


def test_bpe_progress_callback():
    calls = []
    BPETokenizer.train([CORPUS[:5000], CORPUS[5000:9000]], 300, progress=lambda *a: calls.append(a))
    assert calls[0] == ("count", 5000, None) and calls[1] == ("count", 9000, None)
    merges = [c for c in calls if c[0] == "merge"]
    assert merges[-1] == ("merge", 300 - 257, 300 - 257)
    assert [c[1] for c in merges] == sorted(c[1] for c in merges)


def test_bpe_small_corpus_warns_and_stops():
    with pytest.warns(UserWarning, match="only supports"):
        tok = BPETokenizer.train("abab", 1000)   # merges: a+b, then ab+ab
    assert tok.vocab_size == 256 + 2 + 1 and tok.decode(tok.encode("abab")) == "abab"


def test_bpe_training_errors():
    with pytest.raises(NpgptError, match="at least 258"):
        BPETokenizer.train("text", 257, special_tokens=(EOT, "<|user|>"))
    with pytest.raises(NpgptError, match="empty"):
        BPETokenizer.train("", 300)
    with pytest.raises(NpgptError, match="empty"):
        BPETokenizer.train([], 300)
    with pytest.raises(NpgptError, match="str"):
        BPETokenizer.train([b"bytes"], 300)
    with pytest.raises(NpgptError, match="pattern"):
        BPETokenizer.train("text", 300, pattern="gpt5(")
    with pytest.raises(NpgptError, match="integer"):
        BPETokenizer.train("text", 300.0)
    with pytest.raises(NpgptError, match="duplicate"):
        BPETokenizer.train("text", 300, special_tokens=("<a>", "<a>"))


def test_bpe_train_from_file_equals_train_on_text(tmp_path):
    text = CORPUS[:30_000].replace("\n", "\r\n") + "\n<|endoftext|>\nMore text after the separator."
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    calls = []
    streamed = BPETokenizer.train_from_file(path, 400, chunk_bytes=256, progress=lambda *a: calls.append(a))
    assert streamed.merges == BPETokenizer.train(text, 400).merges
    counts = [c for c in calls if c[0] == "count"]
    assert counts[-1] == ("count", path.stat().st_size, path.stat().st_size)


# ---------------------------------------------------------------------------------- BPE encoding

def test_bpe_fast_encoder_matches_reference():
    for pattern in ("gpt2", "gpt4"):
        tok = trained(pattern=pattern)
        text = CORPUS[150_000:200_000]
        assert tok.encode(text, disallowed_special=()) == tok._reference_encode(text)


def test_apply_merges_matches_reference_on_repeated_tokens():
    tok = trained()
    for word in ["a" * 50, "  " * 40, "ab" * 30, "ееее", "\n\n\n\n\n\n"]:
        ids = [tok._byte_ids[b] for b in word.encode("utf-8")]
        assert _apply_merges(ids, tok._merges) == _reference_merge(ids, tok._merges)


def test_bpe_round_trip_and_long_whitespace_run():
    tok = trained()
    text = "x" + " " * 20_000 + "\n" * 5000 + "y"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text)


def test_bpe_encode_batch_and_decode_slices():
    tok = trained()
    docs = ["héllo wörld", "", "🙂🙂 emoji", CORPUS[:300]]
    batch = tok.encode_batch(docs)
    assert batch == [tok.encode(d) for d in docs]
    assert [tok.decode(ids) for ids in batch] == docs
    # A slice that cuts the 4-byte emoji shows the replacement character, never an exception.
    ids = tok.encode("🙂")
    assert len(ids) > 1 and tok.decode(ids[:1]) == "\ufffd"
    with pytest.raises(NpgptError, match="list of strings"):
        tok.encode_batch("a single string")


def test_bpe_decode_rejects_bad_ids():
    tok = trained()
    for bad in ([tok.vocab_size], [-1], [1.5], ["3"]):
        with pytest.raises(NpgptError):
            tok.decode(bad)


def test_token_display_helpers():
    tok = trained()
    the = tok.encode(" the")
    assert len(the) == 1 and tok.token_bytes(the[0]) == b" the" and tok.id_to_piece(the[0]) == " the"
    assert tok.id_to_piece(tok.eot_id) == EOT
    with pytest.raises(NpgptError):
        tok.token_bytes(tok.vocab_size)


def test_encode_file_equals_encode(tmp_path):
    text = CORPUS[:20_000] + "<|endoftext|>" + CORPUS[20_000:30_000]
    path = tmp_path / "data.txt"
    path.write_text(text, encoding="utf-8")
    for tok in (trained(), CharTokenizer.train(text)):
        pieces = list(tok.encode_file(path, chunk_bytes=100, allowed_special="all"))
        assert len(pieces) > 10
        assert [i for ids in pieces for i in ids] == tok.encode(text, allowed_special="all")


# -------------------------------------------------------------------------------- special tokens

def test_special_tokens_are_refused_by_default():
    tok = trained()
    with pytest.raises(NpgptError, match=r"'<\|endoftext\|>' at position 4.*allowed_special"):
        tok.encode("abc <|endoftext|> def")


def test_allowed_and_disallowed_specials():
    tok = trained()
    text = "abc<|endoftext|>def"
    for allowed in ({EOT}, "all"):
        ids = tok.encode(text, allowed_special=allowed)
        assert ids == tok.encode("abc") + [tok.eot_id] + tok.encode("def")
        assert tok.decode(ids) == text
    as_text = tok.encode(text, disallowed_special=())
    assert tok.eot_id not in as_text and tok.decode(as_text) == text
    with pytest.raises(NpgptError, match="not special tokens"):
        tok.encode(text, allowed_special={"<|nope|>"})


def test_add_special_tokens_appends_fresh_ids():
    tok = BPETokenizer.train(CORPUS[:20_000], 400)
    before = tok.fingerprint()
    ids = tok.add_special_tokens(["<|user|>", "<|assistant|>", EOT])
    assert ids == [400, 401, tok.eot_id] and tok.vocab_size == 402
    assert tok.special_tokens["<|assistant|>"] == 401 and tok.fingerprint() != before
    text = "<|user|>hi<|assistant|>hello<|endoftext|>"
    ids = tok.encode(text, allowed_special="all")
    assert ids[0] == 400 and tok.decode(ids) == text
    # The longest special wins where one is a prefix of another.
    tok.add_special_tokens(["<|user|>x"])
    assert tok.encode("<|user|>x", allowed_special="all") == [402]


# ---------------------------------------------------------------------------------- save and load

@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+"])
def test_bpe_save_load_gives_identical_ids(tmp_path, pattern):
    tok = BPETokenizer.train(CORPUS[:30_000], 400, pattern=pattern, special_tokens=(EOT, "<|pad|>"))
    tok.save(tmp_path / "tok")
    assert saved_files(tmp_path / "tok") == ["merges.txt", "tokenizer_npgpt.json", "vocab.json"]
    assert is_tokenizer_dir(tmp_path / "tok")
    custom = pattern not in ("gpt2", "gpt4")
    if custom:                                   # a pattern read from a file needs the user's opt-in
        with pytest.raises(NpgptError, match="trust-pattern"):
            load(tmp_path / "tok")
    again = load(tmp_path / "tok", trust_pattern=custom)
    assert again.pattern == pattern and again.special_tokens == tok.special_tokens
    text = CORPUS[30_000:40_000]
    assert again.encode(text, disallowed_special=()) == tok.encode(text, disallowed_special=())
    assert again.fingerprint() == tok.fingerprint()


def test_saved_files_are_in_gpt2_format(tmp_path):
    tok = trained()
    tok.save(tmp_path)
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + len(tok.merges) + 1 and lines[-1] == ""
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["Ġ"] == 32 and vocab["Ċ"] == 10 and vocab["!"] == 33 and vocab[EOT] == tok.eot_id
    left, right = lines[1].split(" ")
    assert vocab[left + right] == 256
    meta = json.loads((tmp_path / "tokenizer_npgpt.json").read_text(encoding="utf-8"))
    assert meta["kind"] == "bpe" and meta["pattern"] == "gpt2" and meta["special_tokens"] == {EOT: 799}


def test_plain_gpt2_folder_without_npgpt_json(tmp_path):
    tok = trained()
    tok.save(tmp_path)
    (tmp_path / "tokenizer_npgpt.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{not even json", encoding="utf-8")   # ignored
    again = load(tmp_path)
    assert again.pattern == "gpt2" and again.eot_id == tok.eot_id
    assert again.encode(CORPUS[:5000]) == tok.encode(CORPUS[:5000])


def test_bytes_to_unicode_alphabet():
    alphabet = bytes_to_unicode()
    assert len(set(alphabet.values())) == 256
    assert alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ" and alphabet[ord("A")] == "A"
    assert alphabet[0] == "Ā" and alphabet[0xAD] == "Ń" and alphabet[0xFF] == "ÿ"
    assert gpt2_string_to_bytes("Ġthe") == b" the" and gpt2_string_to_bytes("<|x|>") == b"<|x|>"
    assert gpt2_string_to_bytes("\u4e2d") is None


def hand_written_gpt2_folder(folder):
    """A tiny GPT-2 style folder written by hand: byte tokens in GPT-2's order (printable bytes
    first, as in the real vocab.json), three merges, and <|endoftext|> last."""
    alphabet = bytes_to_unicode()
    printable = [b for b in range(256) if alphabet[b] == chr(b)]
    order = printable + [b for b in range(256) if b not in printable]
    vocab = {alphabet[b]: i for i, b in enumerate(order)}
    vocab.update({"Ġt": 256, "he": 257, "Ġthe": 258, EOT: 259})
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\nh e\nĠt he\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text("{}", encoding="utf-8")
    return vocab


def test_hand_written_gpt2_folder_gives_its_ids(tmp_path):
    vocab = hand_written_gpt2_folder(tmp_path / "gpt2")
    tok = load(tmp_path / "gpt2")
    assert tok.vocab_size == 260 and tok.eot_id == 259 and tok.special_tokens == {EOT: 259}
    # "!" is id 0 and " " is id 220 in GPT-2's vocab.json, as here.
    assert tok.encode("!") == [0] and tok.encode(" ") == [220] == [vocab["Ġ"]]
    assert tok.encode(" the") == [258]
    assert tok.encode("the") == [vocab["t"], 257]
    assert tok.encode(" the<|endoftext|>", allowed_special="all") == [258, 259]
    assert tok.encode("\n") == [vocab["Ċ"]] == [198]
    assert tok.decode([258, 259, 198]) == " the<|endoftext|>\n"
    # Written back out, the folder reads the same.
    tok.save(tmp_path / "copy")
    copy = load(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "vocab.json").read_text(encoding="utf-8")) == vocab
    assert copy.encode(" the the") == [258, 258] and copy.fingerprint() == tok.fingerprint()


def test_tiktoken_file_round_trip(tmp_path):
    tok = BPETokenizer.train(CORPUS[:60_000], 700, pattern="gpt4", special_tokens=(EOT, "<|user|>"))
    tok.save_tiktoken(tmp_path / "tok.tiktoken")
    lines = (tmp_path / "tok.tiktoken").read_text(encoding="ascii").splitlines()
    assert len(lines) == 698 and lines[0] == "AA== 0"     # base64 of b"\x00", rank 0
    again = BPETokenizer.from_tiktoken_file(tmp_path / "tok.tiktoken", pattern="gpt4",
                                            special_tokens=tok.special_tokens)
    assert again.merges == tok.merges and again.fingerprint() == tok.fingerprint()
    text = CORPUS[60_000:80_000]
    assert again.encode(text, disallowed_special=()) == tok.encode(text, disallowed_special=())
    # A list of special names gets ids after the largest rank.
    listed = BPETokenizer.from_tiktoken_file(tmp_path / "tok.tiktoken", pattern="gpt4",
                                             special_tokens=[EOT, "<|user|>"])
    assert listed.special_tokens == tok.special_tokens


def test_tiktoken_hand_written(tmp_path):
    import base64
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    lines += [f"{base64.b64encode(b'ab').decode()} 256", f"{base64.b64encode(b'abc').decode()} 257"]
    (tmp_path / "t.tiktoken").write_text("\n".join(lines) + "\n", encoding="ascii")
    tok = BPETokenizer.from_tiktoken_file(tmp_path / "t.tiktoken", pattern="gpt2")
    assert tok.encode("abc abd") == [257, 32, 256, 100] and tok.eot_id == 258


# ------------------------------------------------------------------------------------- bad input

def test_non_utf8_file_names_the_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo wörld ".encode("utf-8") * 10 + b"\xff tail")
    offset = len("héllo wörld ".encode("utf-8")) * 10
    for chunk_bytes in (1, 5, 1 << 20):   # the bad byte in the middle of a chunk and at its start
        with pytest.raises(NpgptError, match=f"0xff at byte offset {offset}.*--errors replace"):
            read_text_checked(path) if chunk_bytes == 1 << 20 else list(iter_text_chunks(path, chunk_bytes))
    assert read_text_checked(path, errors="replace").endswith("\ufffd tail")
    with pytest.raises(NpgptError, match=f"byte offset {offset}"):
        BPETokenizer.train_from_file(path, 300)
    with pytest.warns(UserWarning, match="only supports"):   # a tiny corpus
        tok = BPETokenizer.train_from_file(path, 300, errors="replace")
    assert tok.decode(tok.encode("\ufffd tail")) == "\ufffd tail"


def test_truncated_character_at_end_of_file(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes("ab🙂".encode("utf-8")[:-1])
    with pytest.raises(NpgptError, match="offset 2"):
        read_text_checked(path)


def test_binary_and_missing_files(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"text then \x00\x01\x02")
    with pytest.raises(NpgptError, match="binary.*offset 10"):
        read_text_checked(path)
    with pytest.raises(NpgptError, match="does not exist"):
        read_text_checked(tmp_path / "nope.txt")
    with pytest.raises(NpgptError, match="folder"):
        CharTokenizer.train_from_files([tmp_path])
    with pytest.raises(NpgptError, match="errors="):
        read_text_checked(path, errors="ignore")


def test_text_chunks_keep_crlf_and_split_characters(tmp_path):
    text = "line one\r\nligne deux — ü\r\n🙂" * 20
    path = tmp_path / "crlf.txt"
    path.write_bytes(text.encode("utf-8"))
    chunks = list(iter_text_chunks(path, chunk_bytes=3))
    assert "".join(chunks) == text and len(chunks) > 100


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "vocab.json").unlink(), "has no vocab.json"),
    (lambda d: (d / "merges.txt").unlink(), "has no merges.txt"),
    (lambda d: (d / "vocab.json").write_text("{broken", encoding="utf-8"), "vocab.json is not valid"),
    (lambda d: (d / "vocab.json").write_text('["a"]', encoding="utf-8"), "vocab.json must be a JSON object"),
    (lambda d: (d / "merges.txt").write_text("#version: 0.2\nĠ t\nx\n", encoding="utf-8"),
     "merges.txt line 3"),
    (lambda d: (d / "merges.txt").write_text("#version: 0.2\nĠ zzz\n", encoding="utf-8"),
     "merges.txt merge 1 .* not in vocab.json"),
    (lambda d: (d / "tokenizer_npgpt.json").write_text("{", encoding="utf-8"),
     "tokenizer_npgpt.json is not valid JSON"),
    (lambda d: (d / "tokenizer_npgpt.json").write_text('{"kind": "wordpiece"}', encoding="utf-8"),
     "unknown tokenizer kind"),
    (lambda d: (d / "tokenizer_npgpt.json").write_text('{"kind": "bpe", "special_tokens": {"<|endoftext|>": 3}}',
                                                       encoding="utf-8"), "has id 3"),
])
def test_damaged_tokenizer_folder_says_which_file(tmp_path, damage, message):
    folder = tmp_path / "tok"
    BPETokenizer.train(CORPUS[:5000], 300).save(folder)
    damage(folder)
    with pytest.raises(NpgptError, match=message):
        load(folder)


def test_load_errors_for_missing_or_empty_folders(tmp_path):
    with pytest.raises(NpgptError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(NpgptError, match="holds no tokenizer"):
        load(tmp_path)
    assert not is_tokenizer_dir(tmp_path) and not is_tokenizer_dir(tmp_path / "missing")
    (tmp_path / "f").write_text("x", encoding="utf-8")
    with pytest.raises(NpgptError, match="is a file"):
        load(tmp_path / "f")
    char_folder = tmp_path / "char"
    char_folder.mkdir()
    (char_folder / "tokenizer_npgpt.json").write_text('{"kind": "char", "chars": ["a", "bb"]}', encoding="utf-8")
    with pytest.raises(NpgptError, match="tokenizer_npgpt.json.*single characters"):
        load(char_folder)


def test_failed_save_writes_nothing(tmp_path):
    tok = BPETokenizer.train("abab " * 50, 260)
    tok.add_special_tokens(["ab"])   # spelled like the learned token "ab": vocab.json cannot hold both
    with pytest.raises(NpgptError, match="spelled like"):
        tok.save(tmp_path / "tok")
    assert not (tmp_path / "tok").exists()
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(NpgptError, match="is a file"):
        trained().save(tmp_path / "file")


def test_save_replaces_an_old_tokenizer_without_leftovers(tmp_path):
    trained().save(tmp_path)
    small = BPETokenizer.train(CORPUS[:5000], 300)
    small.save(tmp_path)
    assert saved_files(tmp_path) == ["merges.txt", "tokenizer_npgpt.json", "vocab.json"]
    assert load(tmp_path).fingerprint() == small.fingerprint()


def test_eot_missing_is_explained(tmp_path):
    hand_written_gpt2_folder(tmp_path / "g")
    vocab = json.loads((tmp_path / "g" / "vocab.json").read_text(encoding="utf-8"))
    del vocab[EOT]
    (tmp_path / "g" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tok = load(tmp_path / "g")
    with pytest.raises(NpgptError, match="add_special_tokens"):
        tok.eot_id
    assert tok.add_special_tokens([EOT]) == [259]


def test_no_warnings_on_normal_training():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BPETokenizer.train(CORPUS[:20_000], 300)
