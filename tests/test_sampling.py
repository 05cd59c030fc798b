"""The one sampler: SamplingParams checked once, per-sequence Sampler, the incremental Detokenizer
with stop-string hold-back (UTF-8 safe, bounded work per token)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt import GPT, GPTConfig
from npgpt.errors import NpgptError
from npgpt.generate import generate, generate_stream
from npgpt.sampling import Detokenizer, Sampler, SamplingError, SamplingParams, sampling_probs
from npgpt.tokenizer import BPETokenizer, CharTokenizer

CHARS = CharTokenizer.train("abc\nxyz")
BPE = BPETokenizer.train("héllo wörld ünïcode ✓ " * 20, vocab_size=270)


def released(tok, ids, stop=(), skip=()):
    d = Detokenizer(tok, stop, skip)
    out = [d.add(t) for t in ids]
    return out, d.flush(), d


def cut_reference(text, stops):
    """The text before the first stop string to complete, reading left to right (None: none did)."""
    for end in range(1, len(text) + 1):
        for s in stops:
            if text[:end].endswith(s):
                return text[:end - len(s)]
    return None


# ---- the detokenizer -------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, BPE.vocab_size - 1), max_size=40))
def test_detokenizer_text_equals_one_decode_of_all_tokens(ids):
    """Byte-level tokens in any order (characters split over tokens, invalid bytes): the pieces it
    releases add up to decode(all tokens), and it never releases a partial character early."""
    pieces, rest, d = released(BPE, ids)
    assert "".join(pieces) + rest == BPE.decode(ids)
    for i, _ in enumerate(ids):
        # what was released after i+1 tokens is a prefix of the final text
        assert BPE.decode(ids).startswith("".join(pieces[:i + 1]))


def test_a_character_split_over_two_tokens_comes_out_whole():
    e_acute = list("é".encode())                     # two byte tokens: 0xC3, 0xA9
    ids = [BPE.token_bytes(t) for t in range(256)].index(bytes([e_acute[0]])), \
        [BPE.token_bytes(t) for t in range(256)].index(bytes([e_acute[1]]))
    d = Detokenizer(BPE)
    assert d.add(ids[0]) == ""                       # half a character: held
    assert d.add(ids[1]) == "é"


@settings(max_examples=150, deadline=None)
@given(st.text("abcxyz\n", max_size=30), st.lists(st.text("abcx\n", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_strings_cut_the_text_where_the_first_one_completes(text, stops):
    ids = CHARS.encode(text)
    pieces, rest, d = released(CHARS, ids, stops)
    want = cut_reference(text, stops)
    if want is None:
        assert not d.stopped and "".join(pieces) + rest == text
    else:
        assert d.stopped and "".join(pieces) + rest == want
    # held-back text never reaches a stop string's length: bounded work per token
    d = Detokenizer(CHARS, stops)
    for t in ids:
        d.add(t)
        assert len(d._held) < max(map(len, stops))


def test_stop_string_held_back_then_released_when_it_cannot_complete():
    d = Detokenizer(CHARS, ["abc"])
    assert [d.add(t) for t in CHARS.encode("xab")] == ["x", "", ""]
    assert d.add(CHARS.encode("x")[0]) == "abx"      # "abx" cannot become "abc": released
    assert [d.add(t) for t in CHARS.encode("abc")] == ["", "", ""] and d.stopped
    assert d.text == "xabx" and d.flush() == ""


def test_skip_ids_add_no_text_and_flush_releases_held_text():
    eot = CHARS.eot_id
    pieces, rest, d = released(CHARS, CHARS.encode("ab") + [eot], ["abc"], [eot])
    assert pieces == ["", "", ""] and rest == "ab" and not d.stopped


def test_long_stop_strings_keep_per_token_work_bounded():
    """A 2,000-token text against a 300-character stop string that nearly matches everywhere: the
    held text stays under the stop's length, and the automaton states advance by the new
    characters only (work counted, not timed)."""
    stop = "a" * 299 + "b"
    d = Detokenizer(CHARS, [stop])
    ids = CHARS.encode("a" * 2000)
    for t in ids:
        d.add(t)
        assert len(d._held) <= len(stop) - 1
    assert not d.stopped and d.flush() == "a" * 299 and d.text == "a" * 2000


# ---- the settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, param", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(seed=-1), "seed"), (dict(seed=True), "seed"),
    (dict(stop=[""]), "stop"), (dict(stop=[3]), "stop"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(logit_bias={1: 101}), "logit_bias"), (dict(logit_bias={"one": 1}), "logit_bias"),
    (dict(logit_bias={1: float("inf")}), "logit_bias"),
])
def test_sampling_params_refuse_bad_values_naming_the_setting(bad, param):
    with pytest.raises(SamplingError, match=param) as e:
        SamplingParams(**bad)
    assert e.value.param == param


def test_sampling_params_normalise_and_check_ids_against_the_vocabulary():
    p = SamplingParams(stop="\n", logit_bias={"3": -5, 4: 1}, top_p=None, seed=np.int64(2))
    assert p.stop == ("\n",) and p.logit_bias == {3: -5.0, 4: 1.0} and p.top_p == 1.0 and p.seed == 2
    with pytest.raises(NpgptError, match="out of range"):
        p.check_vocab(4)
    with pytest.raises(NpgptError, match="out of range"):
        SamplingParams(stop_token_ids=[9]).check_vocab(5)
    with pytest.raises(SamplingError, match="top_k"):
        p.replace(top_k=-1)                           # a changed copy is checked again


# ---- the sampler ------------------------------------------------------------------------------------
def test_sampler_reports_the_probability_it_drew_with():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0])
    params = SamplingParams(temperature=0.7, top_k=3, frequency_penalty=1.0, seed=4)
    s = Sampler(params, 5, prompt=[0])
    t, prob = s.sample(logits)
    want = sampling_probs(params.apply_controls(logits[None], np.zeros((1, 5)), np.eye(5, dtype=bool)[[0]]),
                          0.7, 3)[0]
    assert prob == pytest.approx(want[t])
    assert s.history.counts[0, t] == 1                # recorded for the next token's penalties
    with pytest.raises(NpgptError, match="NaN"):
        s.sample(np.array([np.nan] * 5))


def test_seeded_sequences_do_not_depend_on_their_batch():
    m = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8), seed=2)
    alone = generate(m, [1, 2, 3], 8, temperature=1.0, seed=9)
    batched = generate(m, [[1, 2, 3], [4, 5], [6]], 8, temperature=1.0, seed=9)
    assert batched[0] == alone
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=9)
    assert generate(m, [1, 2, 3], params=params) == alone          # keywords and params are one thing


def test_generate_stream_carries_text_and_finish_reasons():
    m = GPT(GPTConfig(vocab_size=CHARS.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=8), seed=3)
    steps = [s for st_ in generate_stream(m, CHARS.encode("ab"), 12, temperature=1.0, seed=1, tokenizer=CHARS)
             for s in st_]
    text = "".join(s.text for s in steps)
    assert text == CHARS.decode([s.token for s in steps])        # no stop token: special names are text
    steps = [s for st_ in generate_stream(m, CHARS.encode("ab"), 12, temperature=1.0, seed=1, tokenizer=CHARS,
                                          eot_id=CHARS.eot_id) for s in st_]
    text = "".join(s.text for s in steps)
    assert text == CHARS.decode([s.token for s in steps if s.token != CHARS.eot_id])
    assert steps[-1].finish in ("stop", "length") and all(s.finish is None for s in steps[:-1])
    # a stop string made of the text's own second character stops there, cut before it
    if len(text) > 2:
        stop = text[1]
        cut = [s for st_ in generate_stream(m, CHARS.encode("ab"), 12, temperature=1.0, seed=1, tokenizer=CHARS,
                                            eot_id=CHARS.eot_id, stop=[stop]) for s in st_]
        assert "".join(s.text for s in cut) == text[:text.index(stop)] and cut[-1].finish == "stop"
