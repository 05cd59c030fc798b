"""tokenizer.json (npgpt.tokenizer.hf) against the `tokenizers` library, the oracle (a test-only dependency).

Tokenizers are trained with `tokenizers` inside the test, in the pipelines of GPT-2, Llama 3, Qwen2 and
SmolLM2, saved as tokenizer.json, read by npgpt, and both encode the same hypothesis-generated text
with add_special_tokens true and false.
"""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt import tokenizer as tk
from npgpt.errors import NpgptError
from npgpt.tokenizer.bpe import LLAMA3_PATTERN, QWEN2_PATTERN
from npgpt.tokenizer.files import bytes_to_unicode
from npgpt.tokenizer.hf import PRE_TOKENIZERS, AddedToken, HFTokenizer, split_by

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "mat", "Hello", "world", "naïve", "café", "東京", "123", "4567", "it's",
         "DON'T", "  ", "\n", "\r\n", "\t", "!!", "...", "über", "x1y2", "🙂", "ǅ", "٣٤"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
KINDS = ["gpt2", "gpt2-prefix", "llama3", "qwen2", "smollm", "split-variants"]


def corpus(seed=0, n=300):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(n)]


def train_oracle(kind, vocab_size=420):
    """A `tokenizers` tokenizer in the pipeline `kind`, trained on a small synthetic corpus."""
    t = tokenizers.Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if kind == "gpt2":
        t.pre_tokenizer = byte_level
    elif kind == "gpt2-prefix":
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    elif kind in ("llama3", "qwen2"):
        if kind == "qwen2":
            t.normalizer = normalizers.NFC()
        pattern = LLAMA3_PATTERN if kind == "llama3" else QWEN2_PATTERN
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif kind == "smollm":
        t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif kind == "split-variants":   # the other Split behaviours and Digits without individual digits
        t.normalizer = normalizers.Sequence([normalizers.NFKC()])
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("!", "merged_with_previous"), pre_tokenizers.Split(".", "contiguous"),
            pre_tokenizers.Split("t", "merged_with_next"), pre_tokenizers.Split("\t", "removed"),
            pre_tokenizers.Split(" ", "isolated", invert=True), pre_tokenizers.Digits(individual_digits=False),
            byte_level])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(corpus(), trainer)
    if kind in ("llama3", "smollm"):
        t.add_special_tokens(["<|begin_of_text|>"])
        bos = t.token_to_id("<|begin_of_text|>")
        template = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
        t.post_processor = (processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
                            if kind == "llama3" else template)
    if kind == "qwen2":
        t.add_tokens(["<tool_call>"])                                       # an added, non-special token
        t.add_tokens([tokenizers.AddedToken("[MASK]", lstrip=True, rstrip=True, special=True)])
        t.add_tokens([tokenizers.AddedToken("cats", single_word=True, normalized=True)])
    return t


@pytest.fixture(scope="module")
def oracles():
    return {kind: train_oracle(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def ours(oracles):
    return {kind: HFTokenizer.from_json(json.loads(t.to_str()), f"<{kind}>") for kind, t in oracles.items()}


def assert_same(oracle, tok, text):
    for add in (True, False):
        expected = oracle.encode(text, add_special_tokens=add).ids
        assert tok.encode(text, allowed_special="all", add_special_tokens=add) == expected, (text, add)


# Text built from the corpus' words (so merges fire), special and added tokens, and any characters
# assigned in Python's Unicode database: for characters newer than it, the `regex` module, Python's
# NFC and the tokenizers library's Oniguruma may each know a different Unicode version (U+323B0 is a
# letter to `regex` and unassigned to Oniguruma), so there the split may differ.
assigned = st.characters(blacklist_categories=("Cs", "Cn"))
pieces = st.one_of(st.sampled_from(WORDS + SPECIALS + ["<tool_call>", "[MASK]", " [MASK] ", "cats", "xcats"]),
                   st.text(alphabet=assigned, max_size=6), st.sampled_from([" ", "  ", "\n", "1", "'s", "e\u0301"]))
texts = st.lists(pieces, max_size=14).map("".join)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(text=texts)
def test_encoding_equals_tokenizers(oracles, ours, kind, text):
    assert_same(oracles[kind], ours[kind], text)


@pytest.mark.parametrize("kind", KINDS)
def test_corpus_encodes_and_round_trips(oracles, ours, kind):
    tok, oracle = ours[kind], oracles[kind]
    assert tok.vocab_size == oracle.get_vocab_size()
    for doc in corpus(seed=1, n=40):
        assert_same(oracle, tok, doc)
        ids = tok.encode(doc, allowed_special="all")
        assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=False)
        if kind not in ("gpt2-prefix", "split-variants"):   # these change the text by design
            assert tok.decode(ids) == (doc if kind != "qwen2" else __import__("unicodedata").normalize("NFC", doc))


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=assigned, max_size=40))
def test_decoding_round_trips(ours, text):
    tok = ours["llama3"]
    assert tok.decode(tok.encode(text, disallowed_special=())) == text
    assert tok.decode(tok.encode(text, allowed_special="all", add_special_tokens=True)) == "<|begin_of_text|>" + text


def test_special_tokens_follow_npgpt_rules(ours):
    tok = ours["qwen2"]
    with pytest.raises(NpgptError, match="special token '<\\|im_start\\|>'"):
        tok.encode("a<|im_start|>b")
    as_text = tok.encode("a<|im_start|>b", disallowed_special=())
    assert tok.special_tokens["<|im_start|>"] not in as_text and tok.decode(as_text) == "a<|im_start|>b"
    # a non-special added token always matches, and is not a special token
    assert "<tool_call>" not in tok.special_tokens
    assert tok.encode("x<tool_call>y") == tok.encode("x") + [tok.token_id("<tool_call>")] + tok.encode("y")


def test_save_and_load_back(tmp_path, oracles, ours):
    for kind in ("llama3", "qwen2", "smollm"):
        tok = ours[kind]
        tok.chat_template = "{{ messages[0]['content'] }}"
        tok.eos_token = "<|im_end|>"
        folder = tmp_path / kind
        tok.save(folder)
        back = tk.load(folder)
        assert isinstance(back, HFTokenizer) and back.fingerprint() == tok.fingerprint()
        assert back.chat_template == tok.chat_template and back.eot_id == tok.token_id("<|im_end|>")
        reread = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))   # the library reads ours
        for doc in corpus(seed=2, n=5) + ["<|im_start|>a 12 café<tool_call>"]:
            assert reread.encode(doc).ids == oracles[kind].encode(doc).ids


def test_tokenizer_json_preferred_over_vocab_and_merges(tmp_path, oracles):
    """A Qwen2 folder holds vocab.json + merges.txt too; read alone they would split with GPT-2's pattern."""
    folder = tmp_path / "qwen"
    folder.mkdir()
    oracles["qwen2"].save(str(folder / "tokenizer.json"))
    oracles["qwen2"].model.save(str(folder))
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": "{{ bos_token }}"}))
    tok = tk.load(folder)
    assert isinstance(tok, HFTokenizer) and tk.is_tokenizer_dir(folder)
    assert tok.eot_id == oracles["qwen2"].token_to_id("<|im_end|>")
    assert tok.chat_template == "{{ bos_token }}"
    text = "12345 it's"
    assert tok.encode(text) == oracles["qwen2"].encode(text).ids
    (folder / "chat_template.jinja").write_text("{{ eos_token }}")     # the separate file wins, as in transformers
    assert tk.load(folder).chat_template == "{{ eos_token }}"


def test_stream_encoding_equals_whole(tmp_path, ours):
    text = "".join(corpus(seed=3, n=30)) + "<|im_start|> tail"
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    for kind in ("llama3", "gpt2-prefix"):
        tok = ours[kind]
        streamed = [i for ids in tok.encode_file(path, chunk_bytes=37, allowed_special="all") for i in ids]
        assert streamed == tok.encode(text, allowed_special="all")


@pytest.mark.parametrize("behavior,expected", [
    ("Removed", ["the", "final", "countdown"]),
    ("Isolated", ["the", "-", "final", "-", "-", "countdown"]),
    ("MergedWithPrevious", ["the-", "final-", "-", "countdown"]),
    ("MergedWithNext", ["the", "-final", "-", "-countdown"]),
    ("Contiguous", ["the", "-", "final", "--", "countdown"]),
])
def test_split_behaviours_as_documented(behavior, expected):
    import regex
    assert split_by("the-final--countdown", regex.compile("-"), behavior) == expected


def test_named_pre_tokenizers_build():
    vocab = {bytes([b]): b for b in range(256)}
    for name in PRE_TOKENIZERS:
        tok = HFTokenizer(vocab, [], [], pre_tokenizer=name)
        assert tok.decode(tok.encode("It's 2024, café!")) == "It's 2024, café!"
    assert HFTokenizer(vocab, [], [], pre_tokenizer="smollm")._split("a 123") == ["a", " ", "1", "2", "3"]


# ------------------------------------------------------------------------------ hostile files

def minimal(**changes):
    data = {"added_tokens": [{"id": 256, "content": "<|endoftext|>", "special": True}],
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
            "post_processor": None,
            "model": {"type": "BPE", "vocab": {c: b for b, c in bytes_to_unicode().items()}, "merges": []}}
    for key, value in changes.items():
        if key.startswith("model_"):
            data["model"][key[6:]] = value
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("changes,message", [
    ({"model_byte_fallback": True}, "SentencePiece-style.*not supported yet"),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, "SentencePiece-style.*Llama 2"),
    ({"model_type": "Unigram"}, "Unigram tokenizer.*not supported yet"),
    ({"model_type": "WordPiece"}, "WordPiece"),
    ({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated"}}, "no ByteLevel"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated"}, {"type": "ByteLevel"}]}},
     "its own split pattern.*--trust-pattern"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {"type": "ByteLevel"}]}},
     "'Whitespace' is not supported yet"),
    ({"normalizer": {"type": "Lowercase"}}, "normalizer 'Lowercase' is not supported yet"),
    ({"post_processor": {"type": "BertProcessing"}}, "post_processor 'BertProcessing' is not supported yet"),
    ({"added_tokens": [{"id": 10 ** 9, "content": "<x>", "special": True}]}, "beyond the"),
    ({"added_tokens": [{"id": 300, "content": "<x>", "special": True}]}, "beyond the"),
    ({"added_tokens": [{"id": 256, "content": "<x>"}, {"id": 256, "content": "<y>"}]}, "share an id"),
    ({"added_tokens": [{"id": 5, "content": "<x>", "special": True}]}, "which an ordinary token also has"),
    ({"model_merges": ["Ġ t"]}, "not in the vocabulary"),
    ({"model_merges": [["a"]]}, "merge 0"),
    ({"model_merges": 7}, "'merges' must be list"),
    ({"model_vocab": {"a": 0}}, "has id 256, beyond the 2 entries"),
    ({"model_vocab": {"a": True}}, "non-negative integers"),
    ({"added_tokens": [{"id": 256, "content": ""}]}, "non-empty string"),
    ({"post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "<s>"}}],
                         "special_tokens": {"<s>": {"id": "<s>", "ids": [999], "tokens": ["<s>"]}}}}, "outside the vocabulary"),
])
def test_bad_files_get_clear_errors(tmp_path, changes, message):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(minimal(**changes)))
    with pytest.raises(NpgptError, match=message):
        tk.load(folder)


def test_minimal_file_loads_and_trusted_pattern_loads(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(minimal()))
    assert tk.load(folder).encode("hi<|endoftext|>", allowed_special="all") == [ord("h"), ord("i"), 256]
    custom = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\w+|\W"}, "behavior": "Isolated"}, {"type": "ByteLevel", "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(minimal(pre_tokenizer=custom)))
    assert tk.load(folder, trust_pattern=True).encode("ab c") == [97, 98, 32, 99]


def test_oversized_counts_refused_before_building(tmp_path, monkeypatch):
    import npgpt.tokenizer.hf as hf
    monkeypatch.setattr(hf, "MAX_VOCAB", 100)
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(minimal()))
    with pytest.raises(NpgptError, match="vocab has 256 entries, more than npgpt reads"):
        tk.load(folder)


def test_tokenizer_config_names_must_exist(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(minimal()))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|nope|>"}}))
    with pytest.raises(NpgptError, match="eos_token '<\\|nope\\|>' is not a token"):
        tk.load(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(NpgptError, match="chat_template must be a string"):
        tk.load(folder)


def test_a_byte_without_a_token_is_dropped_as_the_tokenizers_library_does(tmp_path):
    # real vocabularies may lack bytes (SmolLM2's has no token for 0x04, 0xC0, 0xF5-0xFF, ...)
    vocab = {c: i for i, c in enumerate(sorted(set(bytes_to_unicode().values()) - {"a"}))}
    data = minimal(model_vocab=vocab, added_tokens=[{"id": 255, "content": "<x>", "special": True,
                                                     "single_word": False, "lstrip": False, "rstrip": False,
                                                     "normalized": False}],
                   pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                  "use_regex": True})
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(data))
    ours = HFTokenizer.from_folder(folder)
    theirs = tokenizers.Tokenizer.from_str(json.dumps(ours.to_json()))      # the same vocabulary, as tokenizers reads it
    assert "a" not in json.loads(theirs.to_str())["model"]["vocab"]
    for text in ["banana", "a", "bcd a efg"]:
        assert ours.encode(text) == theirs.encode(text).ids
    assert ours.decode(ours.encode("banana")) == "bnn"


def test_added_tokens_inside_the_id_range_survive_the_library(tmp_path):
    """Built from parts as a GGUF file gives them (specials at ids 0..2, before the byte tokens): the
    saved tokenizer.json must keep those ids when the tokenizers library reads it."""
    vocab = {bytes([b]): b + 3 for b in range(256)}
    merges = [(b"h", b"i")]
    vocab[b"hi"] = 259
    added = [AddedToken(0, "<|endoftext|>"), AddedToken(1, "<|im_start|>"), AddedToken(2, "<|im_end|>")]
    tok = HFTokenizer(vocab, merges, added, pre_tokenizer="smollm", eos_token="<|im_end|>")
    tok.save(tmp_path)
    reread = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "<|im_start|>hi 12<|im_end|>"
    assert reread.encode(text).ids == tok.encode(text, allowed_special="all") == [1, 259, 3 + 32, 3 + 49, 3 + 50, 2]
    assert tk.load(tmp_path).fingerprint() == tok.fingerprint()
