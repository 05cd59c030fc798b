"""Generation: cache == no cache, greedy == argmax, top-k / top-p support, seeds, batching."""

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, no_grad
from npgpt.errors import NpgptError
from npgpt.generate import generate, generate_stream
from npgpt.sampling import draw, sampling_probs

CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def model():
    return GPT(CFG, seed=11).eval()


def reference_greedy(model, prompt, n):
    """nanoGPT's loop: crop to block_size, full forward, argmax."""
    toks = list(prompt)
    with no_grad():
        for _ in range(n):
            logits = model(np.array([toks[-CFG.block_size:]]))[0].data[0, -1]
            toks.append(int(logits.argmax()))
    return toks[len(prompt):]


def test_greedy_cached_equals_uncached_past_block_size(model):
    prompt = [1, 2, 3]
    ref = reference_greedy(model, prompt, 20)          # runs well past block_size 8
    assert generate(model, prompt, 20, temperature=0) == ref
    assert generate(model, prompt, 20, temperature=0, use_cache=False) == ref


def test_sampled_cached_equals_uncached_with_seed(model):
    a = generate(model, [4, 5], 15, temperature=1.0, seed=3)
    b = generate(model, [4, 5], 15, temperature=1.0, seed=3, use_cache=False)
    assert a == b
    assert generate(model, [4, 5], 15, seed=3) == a          # a seed reproduces the sample
    assert generate(model, [4, 5], 15, seed=4) != a


def test_batched_ragged_prompts_match_single(model):
    prompts = [[1], [2, 3, 4, 5], [6, 7]]
    batched = generate(model, prompts, 12, temperature=0)
    for p, out in zip(prompts, batched):
        assert out == generate(model, p, 12, temperature=0)


def test_right_and_left_padding_with_mask(model):
    prompts = [[1, 2, 3], [4]]
    expect = generate(model, prompts, 6, temperature=0)
    right = np.array([[1, 2, 3], [4, 0, 0]])
    left = np.array([[1, 2, 3], [0, 0, 4]])
    assert generate(model, right, 6, temperature=0, mask=right > 0) == expect
    assert generate(model, left, 6, temperature=0, mask=left > 0) == expect


def test_temperature_to_zero_is_argmax():
    logits = np.array([[0.1, 2.0, 1.9, -1.0]])
    assert sampling_probs(logits, 0)[0].argmax() == 1
    p = sampling_probs(logits, 1e-4)
    assert p[0, 1] > 0.999


def test_top_k_and_top_p_support():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    p = sampling_probs(logits, 1.0, top_k=2)
    assert set(np.flatnonzero(p[0])) == {0, 1}
    np.testing.assert_allclose(p[0, :2], [0.4 / 0.7, 0.3 / 0.7])
    p = sampling_probs(logits, 1.0, top_p=0.8)                  # 0.4 + 0.3 < 0.8 <= 0.85
    assert set(np.flatnonzero(p[0])) == {0, 1, 2}
    p = sampling_probs(logits, 1.0, top_k=4, top_p=0.6)         # top-k first, then top-p
    assert set(np.flatnonzero(p[0])) == {0, 1}
    draws = [int(draw(sampling_probs(logits, 1.0, top_k=3, top_p=0.5), rng)[0]) for _ in range(2000)]
    assert set(draws) <= {0, 1}
    draws = np.array([int(draw(sampling_probs(logits, 1.0), rng)[0]) for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / 4000, [0.4, 0.3, 0.15, 0.1, 0.05], atol=0.03)


def test_stop_at_eot_and_stream_probs(model):
    out = generate(model, [1], 30, temperature=0)
    eot = out[3]
    stopped = generate(model, [1], 30, temperature=0, eot_id=eot)
    assert stopped[-1] == eot and len(stopped) <= 4
    for steps in generate_stream(model, [1], 5, temperature=0.8, seed=1):
        (s,) = steps
        probs = [p for _, p in s.top]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9 and len(s.top) == 5
        if s.token in dict(s.top):
            assert dict(s.top)[s.token] == pytest.approx(s.prob)


def test_bad_arguments(model):
    for kw, msg in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k")]:
        args = {"max_new_tokens": 3, **kw}
        with pytest.raises(NpgptError, match=msg):
            generate(model, [1], **args)
    with pytest.raises(NpgptError, match="empty prompt"):
        generate(model, [], 3)
    # an empty prompt starts from end-of-text
    plain = generate(model, [0], 3, temperature=0)
    expected = plain[:plain.index(0) + 1] if 0 in plain else plain
    assert generate(model, [], 3, eot_id=0, temperature=0) == expected
