"""npgpt.structured: the regex / JSON Schema automaton against Python's `re` and a small validator, its
refusals and size bounds, and constrained sampling through the one sampler (output always in the
language, closed within max_new_tokens, whatever the logits)."""

import json
import re

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from npgpt.errors import NpgptError
from npgpt.sampling import Sampler, SamplingError, SamplingParams
from npgpt import structured
from npgpt.structured import (Grammar, GrammarError, TokenTable, constraint_for, parse_regex,
                              token_table, utf8_sequences)
from npgpt.structured import Chars, DFA

from structured_helpers import bpe_tokenizer, random_schema, validate


# ---- the regex automaton against re.fullmatch ----------------------------------------------------
ATOMS = ["a", "b", "-", r"\.", ".", r"\d", r"\w", r"\s", r"\D", "[a-c]", "[^ab]", "[b-]", "[\\d.]", "é", "[α-ω]",
         r"\x41", r"\u00e9"]


@st.composite
def regexes(draw, depth=0):
    n = draw(st.integers(1, 3))
    parts = []
    for _ in range(n):
        if depth < 2 and draw(st.integers(0, 4)) == 0:
            alts = draw(st.lists(regexes(depth + 1), min_size=1, max_size=3))
            atom = "(" + "|".join(alts) + ")"
        else:
            atom = draw(st.sampled_from(ATOMS))
        q = draw(st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,3}", "{,2}", "{2,}", "*?"]))
        parts.append(atom + q)
    return "".join(parts)


@given(st.data())
def test_regex_accepts_exactly_what_re_fullmatch_accepts(data):
    pattern = data.draw(regexes())
    try:
        g = Grammar.regex(pattern)
    except GrammarError as e:                    # past the size bound: refused, as designed
        assert "states" in str(e)
        assume(False)
    py = re.compile(pattern, re.ASCII)
    for _ in range(6):
        text = data.draw(st.one_of(st.from_regex(py, fullmatch=True), st.text("ab-.1 \né_Aα", max_size=8)))
        assume(not any(0xD800 <= ord(c) <= 0xDFFF for c in text))
        assert g.matches(text) == bool(py.fullmatch(text)), (pattern, text)


@given(st.integers(0, 0x10FFFF), st.integers(0, 3000))
def test_utf8_ranges_accept_exactly_their_code_points(lo, width):
    hi = min(lo + width, 0x10FFFF)
    if 0xD800 <= lo and hi <= 0xDFFF:              # surrogates only: UTF-8 has none of them
        with pytest.raises(GrammarError, match="no text"):
            DFA.from_tree(Chars(((lo, hi),)))
        return
    dfa = DFA.from_tree(Chars(((lo, hi),)))
    for cp in {lo, hi, (lo + hi) // 2, max(lo - 1, 0), min(hi + 1, 0x10FFFF), 0x7F, 0x80, 0x7FF, 0x800, 0xFFFF,
               0x10000}:
        if 0xD800 <= cp <= 0xDFFF:
            continue
        assert dfa.matches(chr(cp).encode()) == (lo <= cp <= hi), (lo, hi, cp)
    # every byte-range sequence is well-formed UTF-8 of one length
    for seq in utf8_sequences(((lo, hi),)):
        assert all(a <= b for a, b in seq)


def test_regex_examples():
    g = Grammar.regex(r"^\d{3}-\d{4}$")
    assert g.matches("555-1234") and not g.matches("555-123") and not g.matches("5551234")
    assert Grammar.regex("(?P<x>ab)+|c").matches("abab") and not Grammar.regex("(?:ab)+").matches("")
    assert Grammar.regex(r"[]a]").matches("]") and Grammar.regex(r"a\{").matches("a{")


@pytest.mark.parametrize("pattern", [r"(a)\1", "a(?=b)", "(?i)a", r"\bword", "a{2", "a**", "a*+", "[a", "(a",
                                     "a)", "x{5000}", r"\p{L}", "[[:alpha:]]", "a^b", "a$b", "*a", r"\Z"])
def test_unsupported_regex_is_refused_clearly(pattern):
    with pytest.raises(GrammarError, match="regex"):
        Grammar.regex(pattern)


def test_size_bounds_refuse_blowups(monkeypatch):
    monkeypatch.setattr(structured, "MAX_STATES", 300)   # the bound is read when compiling: a small one is quick
    with pytest.raises(GrammarError, match="more than 300 states"):
        Grammar.regex("[ab]*a[ab]{10}")                  # the classic exponential DFA: 2 ** 11 states
    monkeypatch.setattr(structured, "MAX_NFA", 3000)
    with pytest.raises(GrammarError, match="too large"):
        Grammar.regex("(.{1000}){1000}")
    with pytest.raises(GrammarError, match="characters"):
        Grammar.regex("a" * 5000)


# ---- JSON Schema ---------------------------------------------------------------------------------
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                         "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pet"}]}},
          "$defs": {"pet": {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]}}}


@pytest.mark.parametrize("text, ok", [
    ('{"name":"bo","age":3}', True), ('{"name": "bo", "age": -30,"tags":["a","b"]}', True),
    ('{"name":"bo","age":3,"pet":null}', True), ('{"name":"bo","age":3,"pet":{"kind":"cat"}}', True),
    ('{"name":"b\\"o\\n","age":0}', True), ('{"age":3,"name":"bo"}', False), ('{"name":"bo"}', False),
    ('{"name":"123456789","age":3}', False), ('{"name":"bo","age":03}', False), ('{"name":"bo","age":3.5}', False),
    ('{"name":"bo","age":3,"tags":["a","b","a"]}', False), ('{"name":"bo","age":3,"x":1}', False),
    ('{"name":"\u0001","age":1}', False)])
def test_schema_language(text, ok):
    assert Grammar.json_schema(PERSON).matches(text) == ok
    if ok:
        assert validate(json.loads(text), PERSON)


@pytest.mark.parametrize("schema, word", [
    ({"type": "string", "pattern": "a+"}, "pattern"), ({"type": "integer", "minimum": 0}, "minimum"),
    ({"type": "string", "format": "date"}, "format"), ({"oneOf": [{"type": "null"}]}, "oneOf"),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, "additionalProperties"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}}}}, "recursive"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'b'"), ({"type": "tuple"}, "tuple"),
    ({"type": "string", "maxLength": 5000}, "maxLength"), ([1], "object")])
def test_unsupported_schema_is_refused_clearly(schema, word):
    with pytest.raises(GrammarError, match=word):
        Grammar.json_schema(schema)


def test_json_object_and_any():
    g = Grammar.json_object()
    for text in ('{}', '{"a":[1,{"b":null}],"c":"x"}', '{"a": -1.5e3}'):
        assert g.matches(text)
    for text in ('[]', '{"a":1,}', '{"a":[[[[1]]]]}', '"x"'):
        assert not g.matches(text)


# ---- constrained sampling --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def run_sampler(tok, constraint, max_new, rng, logits_fn, V=None, **kw):
    """Sample through the one Sampler with adversarial random logits; returns (text, finish)."""
    V = V or tok.vocab_size
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=(tok.eot_id,), constraint=constraint, **kw)
    s = Sampler(params, V, [0], 0)
    out = []
    for _ in range(max_new):
        t, _ = s.sample(logits_fn(rng, V))
        if t == tok.eot_id:
            return tok.decode(out), "stop"
        out.append(t)
    return tok.decode(out), "length"


def test_constrained_output_is_valid_and_closes_within_budget(tok):
    rng = np.random.default_rng(0)
    schema = PERSON
    c = constraint_for(tok, json_schema=schema)
    for budget in (c.min_tokens, c.min_tokens + 3, 60):
        for seed in range(4):
            text, _ = run_sampler(tok, c, budget, rng, lambda r, V: r.normal(0, 5, V), seed=seed)
            assert validate(json.loads(text), schema), text
    with pytest.raises(SamplingError, match="at least"):
        SamplingParams(max_new_tokens=c.min_tokens - 1, constraint=c)


def test_no_bias_escapes_the_grammar(tok):
    c = constraint_for(tok, regex="[0-9]{2,4}")
    digit_free = [t for t in range(tok.vocab_size) if t != tok.eot_id and not tok.decode([t]).isdigit()]
    text, finish = run_sampler(tok, c, 8, np.random.default_rng(1), lambda r, V: np.zeros(V),
                               logit_bias={t: 100 for t in digit_free[:300]}, temperature=0.7)
    assert re.fullmatch("[0-9]{2,4}", text) and finish == "stop"


def test_choice_and_padded_vocab(tok):
    V = tok.vocab_size + 7                       # a model's embedding rows past the tokenizer's ids
    c = Grammar.choice(["yes", "no", "maybe so"]).for_tokens(token_table(tok, V))
    for seed in range(5):
        text, finish = run_sampler(tok, c, 10, np.random.default_rng(seed), lambda r, V: r.normal(0, 3, V), V=V)
        assert text in ("yes", "no", "maybe so") and finish == "stop"


def test_vocabulary_without_the_characters_is_refused():
    table = TokenTable([b"a", b"b", None], 3)
    with pytest.raises(GrammarError, match="vocabulary"):
        Grammar.regex("c+").for_tokens(table)


def test_library_generate_and_speculative_refusal(tok):
    from npgpt import GPT, GPTConfig
    from npgpt.generate import generate, speculative_stream
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16), seed=0)
    c = constraint_for(tok, m.config.vocab_size, json_schema={"type": "array", "items": {"type": "boolean"},
                                                              "minItems": 1})
    out = generate(m, tok.encode("x"), 30, eot_id=tok.eot_id, params=SamplingParams(seed=3, constraint=c))
    vals = json.loads(tok.decode([t for t in out if t != tok.eot_id]))
    assert vals and all(isinstance(v, bool) for v in vals)
    with pytest.raises(NpgptError, match="speculative"):
        next(speculative_stream(m, m, tok.encode("x"), 10, eot_id=tok.eot_id, params=SamplingParams(constraint=c)))
    with pytest.raises(SamplingError, match="stop token"):
        Sampler(SamplingParams(constraint=c), tok.vocab_size)


def test_parse_regex_is_bounded_on_hostile_input():
    for bad in ("(" * 3000, "[" * 100, "\\", "a{1,2}{3}", "\ud800"):
        with pytest.raises(GrammarError):
            parse_regex(bad)
    for make in (lambda: Grammar.regex("a\ud800"), lambda: Grammar.choice(["\ud800"]),
                 lambda: Grammar.json_schema({"enum": ["\ud800"]})):
        with pytest.raises(GrammarError, match="surrogate"):
            make()


def test_bounded_distances_are_an_upper_bound_that_still_closes(tok, monkeypatch):
    exact = Grammar.json_schema(PERSON).for_tokens(TokenTable.of(tok))
    monkeypatch.setattr(structured, "EXACT_BUDGET", 2000)          # the walks stop early: partly unit tokens
    bound = Grammar.json_schema(PERSON).for_tokens(TokenTable.of(tok))
    assert exact.exact and not bound.exact
    assert (bound.dist >= exact.dist).all() and bound.min_tokens >= exact.min_tokens
    for seed in range(3):
        text, _ = run_sampler(tok, bound, bound.min_tokens, np.random.default_rng(seed),
                              lambda r, V: r.normal(0, 5, V))
        assert validate(json.loads(text), PERSON), text


def test_sample_cli_json_schema_regex_choice(tok, tmp_path):
    from click.testing import CliRunner
    from npgpt import GPT, GPTConfig
    from npgpt.cli.main import cli
    d = tmp_path / "m"
    GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=16), seed=0).save_pretrained(d)
    tok.save(d)
    (tmp_path / "s.json").write_text(json.dumps(PERSON))
    run = CliRunner().invoke
    r = run(cli, ["sample", "--checkpoint", str(d), "--prompt", "P:", "--json-schema", str(tmp_path / "s.json"),
                  "--seed", "1", "--max-new-tokens", "60", "--no-stream"])
    assert r.exit_code == 0, r.output
    assert validate(json.loads(r.stdout.splitlines()[0][len("P:"):]), PERSON)
    r = run(cli, ["sample", "--checkpoint", str(d), "--prompt", "P:", "--choice", "yes", "--choice", "no",
                  "--seed", "2", "--num-samples", "3", "--no-stream"])
    assert r.exit_code == 0 and {line for line in r.stdout.splitlines() if line.startswith("P:")} <= {"P:yes", "P:no"}
    for args, msg in ((["--regex", "a(?=b)"], "lookaround"), (["--json-schema", str(tmp_path / "s.json"),
                                                              "--max-new-tokens", "3"], "at least"),
                      (["--regex", "a", "--choice", "b"], "not several")):
        r = run(cli, ["sample", "--checkpoint", str(d), "--prompt", "P:", *args])
        assert r.exit_code == 1 and "Error:" in r.output and msg in r.output and "Traceback" not in r.output
