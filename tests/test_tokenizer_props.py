"""Properties of the tokenizers on arbitrary text (hypothesis).

Text strategies mix arbitrary unicode with the things tokenizers trip on: emoji, combining marks, CJK,
CRLF, long runs of spaces and newlines, digits, contractions, and special-token look-alikes.
"""

from collections import Counter
from functools import lru_cache

import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from pydoc_data.topics import topics

from npgpt.errors import NpgptError
from npgpt.tokenizer import BPETokenizer, CharTokenizer, iter_text_chunks
from npgpt.tokenizer.base import regroup_at_safe_cuts
from npgpt.tokenizer.bpe import PATTERNS
from npgpt.tokenizer.bpe import safe_cut as _safe_cut

CORPUS = "".join(topics[name] for name in sorted(topics))[:120_000]

tricky_pieces = st.sampled_from([
    " ", "  ", "    ", "\n", "\n\n", "\r\n", "\t", " " * 40, "\n" * 12, "the", " the", "The", "'s", "'ll",
    "don't", "123", "4567890", "3.14", "é", "e\u0301", "🙂", "👍🏽", "👨‍👩‍👧", "中文", "日本語", "한국어",
    "Привет", "ﬁ", "<|", "|>", "<|endoftext|", "$", ".", "...", "!?", "x",
])
texts = st.lists(st.one_of(tricky_pieces, st.text(max_size=8)), max_size=25).map("".join)
# Letters and whitespace dominate: they decide where a stream may be cut.
stream_texts = st.text(alphabet="ab ZY\n\r\t'sl3.é中🙂\u0301", max_size=80)


@lru_cache(maxsize=None)
def bpe(pattern):
    return BPETokenizer.train(CORPUS, 600, pattern=pattern)


@settings(max_examples=150, deadline=None)
@given(text=texts, pattern=st.sampled_from(["gpt2", "gpt4"]))
def test_bpe_round_trip(text, pattern):
    tok = bpe(pattern)
    ids = tok.encode(text, disallowed_special=())
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(text=texts, pattern=st.sampled_from(["gpt2", "gpt4"]))
def test_fast_encoder_equals_reference(text, pattern):
    tok = bpe(pattern)
    assert tok.encode(text, disallowed_special=()) == tok._reference_encode(text)


@settings(max_examples=100, deadline=None)
@given(text=texts, start=st.integers(0, 30), stop=st.integers(0, 30))
def test_decoding_any_slice_gives_text(text, start, stop):
    tok = bpe("gpt2")
    piece = tok.decode(tok.encode(text, disallowed_special=())[start:stop])
    assert isinstance(piece, str)
    piece.encode("utf-8")   # no lone surrogates: always valid text


@settings(max_examples=100, deadline=None)
@given(before=texts, after=texts)
def test_specials_become_ids_only_when_allowed(before, after):
    tok = bpe("gpt2")
    text = before + "<|endoftext|>" + after
    ids = tok.encode(text, allowed_special="all")
    assert tok.eot_id in ids and tok.decode(ids) == text
    assert tok.eot_id not in tok.encode(text, disallowed_special=())
    try:
        tok.encode(text)
    except NpgptError as e:
        assert "<|endoftext|>" in str(e)
    else:
        raise AssertionError("a special token's text was accepted by default")


@settings(max_examples=150, deadline=None)
@given(text=stream_texts, cuts=st.lists(st.integers(0, 80), max_size=6), pattern=st.sampled_from(["gpt2", "gpt4"]))
def test_stream_cuts_never_change_pretokens(text, cuts, pattern):
    bounds = sorted({0, len(text), *[c for c in cuts if c < len(text)]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    pieces = list(regroup_at_safe_cuts(chunks, _safe_cut, ["<|endoftext|>"]))
    assert "".join(pieces) == text
    split = regex.compile(PATTERNS[pattern])
    assert Counter(p for piece in pieces for p in split.findall(piece)) == Counter(split.findall(text))


@settings(max_examples=60, deadline=None)
@given(text=texts)
def test_char_round_trip(text):
    tok = CharTokenizer.train(text + "x")
    assert tok.decode(tok.encode(text, disallowed_special=())) == text


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=60), chunk_bytes=st.integers(1, 9))
def test_chunked_decoding_matches_python(tmp_path_factory, data, chunk_bytes):
    data = data.replace(b"\x00", b"")
    path = tmp_path_factory.mktemp("bytes") / "data.txt"
    path.write_bytes(data)
    assert "".join(iter_text_chunks(path, chunk_bytes, errors="replace")) == data.decode("utf-8", "replace")
    try:
        expected = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # Whatever the chunk size, the error names the byte Python's one-shot decode stops at.
        offset = e.start
        try:
            list(iter_text_chunks(path, chunk_bytes))
        except NpgptError as error:
            assert f"byte offset {offset})" in str(error)
        else:
            raise AssertionError("invalid UTF-8 was accepted")
    else:
        assert "".join(iter_text_chunks(path, chunk_bytes)) == expected
