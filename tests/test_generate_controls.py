"""Generation controls: penalties and logit bias, beam search, speculative decoding (exact target
distribution by a chi-square test; greedy identical to plain decoding)."""

import numpy as np
import pytest
from click.testing import CliRunner

from npgpt import GPT, GPTConfig
from npgpt.cli.main import cli
from npgpt.errors import NpgptError
from npgpt.generate import beam_search, generate, speculative_stream
from npgpt.sampling import SamplingParams, log_softmax, softmax
from npgpt.tokenizer import CharTokenizer

from helpers import corpus


def tiny(seed, n_layer=2, vocab=12, block=24, scale=8.0):
    """A random tiny model whose weight matrices are scaled up so its distributions are peaked and
    varied (GPT-2's 0.02 init gives near-uniform logits, where greedy ties would decide tests)."""
    m = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=2, n_embd=16), seed=seed)
    for p in m.parameters():
        if p.data.ndim > 1:
            p.data *= scale
    return m


def spec_tokens(model, draft, prompt, n, **kw):
    return [s.token for steps in speculative_stream(model, draft, prompt, n, **kw) for s in steps]


# ---- penalties and logit bias ------------------------------------------------------------------
def test_penalties_formulas():
    z = np.array([[2.0, -1.0, 0.5, 3.0]])
    counts = np.array([[2, 0, 1, 0]])
    seen = np.array([[True, True, False, False]])
    out = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                         logit_bias={3: -10}).apply_controls(z, counts, seen)
    # bias, then presence/frequency on generated counts, then repetition on seen tokens
    expect = np.array([(2.0 - 0.5 - 0.5) / 2.0, -1.0 * 2.0, 0.5 - 0.25 - 0.5, 3.0 - 10])
    np.testing.assert_allclose(out[0], expect)
    assert not SamplingParams().penalized


@pytest.mark.parametrize("bad", [dict(presence_penalty=3), dict(frequency_penalty=-2.5), dict(repetition_penalty=0),
                                 dict(logit_bias={99: 1}), dict(logit_bias={1: 101}),
                                 dict(repetition_penalty=float("nan")), dict(logit_bias={"x": 1})])
def test_penalties_reject_bad_values(bad):
    with pytest.raises(NpgptError, match=next(iter(bad))):
        SamplingParams(**bad).check_vocab(12)


def test_logit_bias_bans_and_forces_tokens():
    m = tiny(0)
    free = generate(m, [1, 2], 20, temperature=1.0, seed=3)
    banned = free[0]
    out = generate(m, [1, 2], 20, temperature=1.0, seed=3, logit_bias={banned: -100})
    assert banned not in out
    assert generate(m, [1, 2], 8, temperature=1.0, seed=3, logit_bias={7: 100}) == [7] * 8


def test_frequency_penalty_reduces_repetition():
    m = tiny(0)
    plain = generate(m, [1, 2, 3], 20, temperature=0)
    pen = generate(m, [1, 2, 3], 20, temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    assert max(np.bincount(pen)) < max(np.bincount(plain))


def test_greedy_with_penalties_matches_a_hand_loop():
    m = tiny(1)
    out = generate(m, [4, 5], 12, temperature=0, presence_penalty=1.0, frequency_penalty=0.5,
                   repetition_penalty=1.3, use_cache=False)
    toks, counts = [4, 5], np.zeros((1, 12))
    for _ in range(12):
        logits = m.forward_cached(np.array([toks]), m.new_cache(1))[:, -1].astype(np.float64)
        seen = np.zeros((1, 12), dtype=bool)
        seen[0, toks] = True
        controls = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.3)
        t = int(controls.apply_controls(logits, counts, seen).argmax())
        counts[0, t] += 1
        toks.append(t)
    assert out == toks[2:]


# ---- beam search -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eot", [None, 0])
def test_one_beam_is_greedy(seed, eot):
    m = tiny(seed)
    prompt = [3, 1, 4]
    # 30 tokens runs past block_size 24: the cache rebuild path too
    assert beam_search(m, prompt, 30, num_beams=1, eot_id=eot) == generate(m, prompt, 30, temperature=0, eot_id=eot)


def seq_logprob(m, prompt, toks):
    ids = np.array([prompt + toks])
    lp = log_softmax(m.forward_cached(ids, m.new_cache(1))[0].astype(np.float64))
    return sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(toks))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_more_beams_find_likelier_sequences(seed):
    m = tiny(seed, scale=3.0)
    prompt = [2, 7]
    greedy = generate(m, prompt, 6, temperature=0)
    beams = beam_search(m, prompt, 6, num_beams=5, length_penalty=0.0)
    assert len(beams) == 6
    assert seq_logprob(m, prompt, beams) >= seq_logprob(m, prompt, greedy) - 1e-9


def test_beam_search_exhaustive_on_two_tokens():
    """With as many beams as the vocabulary, 2-token beam search is an exhaustive search."""
    m = tiny(4, vocab=6, scale=3.0)
    prompt = [1, 2]
    best = max(([a, b] for a in range(6) for b in range(6)), key=lambda s: seq_logprob(m, prompt, s))
    assert beam_search(m, prompt, 2, num_beams=6, length_penalty=0.0) == best


# ---- speculative decoding ----------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_equals_plain_greedy(seed, k):
    target, draft = tiny(seed), tiny(seed + 10, n_layer=1)
    prompt = [1, 2, 3]
    stats = {}
    # 40 tokens run past block_size (24): the windowed fallback too
    out = spec_tokens(target, draft, prompt, 40, temperature=0, num_draft=k, stats=stats)
    assert out == generate(target, prompt, 40, temperature=0)
    assert stats["proposed"] > 0
    # the same model as its own draft accepts everything
    stats = {}
    spec_tokens(target, target, prompt, 10, temperature=0, num_draft=k, stats=stats)
    assert stats["accepted"] == stats["proposed"]


def test_speculative_greedy_with_controls_and_eot():
    target, draft = tiny(5), tiny(6, n_layer=1)
    kw = dict(temperature=0, presence_penalty=0.7, frequency_penalty=0.3, repetition_penalty=1.2,
              logit_bias={2: 1.5}, eot_id=0)
    assert spec_tokens(target, draft, [4, 4], 30, num_draft=3, **kw) == generate(target, [4, 4], 30, **kw)


def chi2_critical(df, z=3.29):
    """Upper chi-square quantile by Wilson-Hilferty; z = 3.29 is the one-sided 0.0005 level."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def chi2_stat(observed, expected):
    """Chi-square statistic and degrees of freedom, pooling cells expected below 5; a cell of
    probability 0 (cut by top-k) observed at all makes the statistic infinite."""
    if observed[expected == 0].sum():
        return float("inf"), 1
    observed, expected = observed[expected > 0], expected[expected > 0]
    order = np.argsort(expected)
    obs, exp = observed[order], expected[order]
    small = np.cumsum(exp) < 5
    obs = np.concatenate([[obs[small].sum()], obs[~small]]) if small.any() else obs
    exp = np.concatenate([[exp[small].sum()], exp[~small]]) if small.any() else exp
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=3)])
def test_speculative_sampling_keeps_the_target_distribution(sampling):
    """Frequencies of 2-token continuations under speculative sampling match the target's exact
    joint distribution; sampling from the draft alone fails the same test (the test has power)."""
    V, prompt, N = 5, [1, 3], 2000
    target, draft = tiny(0, vocab=V, scale=2.0), tiny(7, n_layer=1, vocab=V, scale=2.0)

    def dist(m, ctx):
        from npgpt.sampling import sampling_probs
        z = m.forward_cached(np.array([ctx]), m.new_cache(1))[:, -1]
        return sampling_probs(z, **sampling)[0]

    def joint(m):
        p1 = dist(m, prompt)
        return np.array([p1[a] * dist(m, prompt + [a])[b] for a in range(V) for b in range(V)])

    exact = joint(target)
    counts = np.zeros(V * V)
    for i in range(N):
        a, b = spec_tokens(target, draft, prompt, 2, seed=i, num_draft=2, **sampling)
        counts[a * V + b] += 1
    stat, df = chi2_stat(counts, exact * N)
    assert stat < chi2_critical(df), (stat, df)
    # power check: the draft's own distribution is told apart by the same statistic
    rng = np.random.default_rng(0)
    draft_counts = np.bincount(rng.choice(V * V, size=N, p=joint(draft)), minlength=V * V).astype(float)
    stat_d, df_d = chi2_stat(draft_counts, exact * N)
    assert stat_d > chi2_critical(df_d), (stat_d, df_d)


def test_speculative_rejects_mismatched_draft():
    with pytest.raises(NpgptError, match="vocabulary"):
        spec_tokens(tiny(0), tiny(1, vocab=13), [1], 3)


# ---- the sample CLI ----------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path):
    tok = CharTokenizer.train(corpus(300))
    m = tiny(0, vocab=tok.vocab_size, block=32, scale=4.0)
    d = tmp_path / "m"
    m.save_pretrained(d)
    tok.save(d)
    return d


def test_sample_cli_controls(model_dir):
    r = CliRunner()
    base = ["sample", "--checkpoint", str(model_dir), "--prompt", "the ", "--max-new-tokens", "20",
            "--temperature", "0"]
    plain = r.invoke(cli, base)
    assert plain.exit_code == 0, plain.output
    for extra in (["--num-beams", "1"], ["--draft", str(model_dir), "--num-draft", "3"]):
        res = r.invoke(cli, base + extra)
        assert res.exit_code == 0, res.output
        assert res.output.splitlines()[0] == plain.output.splitlines()[0]
    beams = r.invoke(cli, base + ["--num-beams", "3", "--length-penalty", "0.5"])
    assert beams.exit_code == 0 and "3 beams" in beams.output
    spec = r.invoke(cli, base + ["--draft", str(model_dir)])
    assert "100%" in spec.output                       # a model drafting for itself: all accepted
    biased = r.invoke(cli, base + ["--logit-bias", "z=100", "--frequency-penalty", "0.5"])
    assert biased.exit_code == 0 and biased.output.splitlines()[0] == "the " + "z" * 20
    for bad, msg in ((["--logit-bias", "zz=1"], "not one"), (["--logit-bias", "x"], "TOKEN=BIAS"),
                     (["--presence-penalty", "5"], "presence_penalty"),
                     (["--num-beams", "2", "--draft", str(model_dir)], "not both"),
                     (["--num-beams", "0"], "num_beams")):
        res = r.invoke(cli, base + bad)
        assert res.exit_code == 1 and "Error:" in res.output and msg in res.output, (bad, res.output)
        assert "Traceback" not in res.output
