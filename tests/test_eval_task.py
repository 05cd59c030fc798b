"""Task evaluation: multiple-choice scoring in HellaSwag's layout, sliding-window perplexity."""

import json

import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.errors import NpgptError
from npgpt.evaluate import sliding_token_loss, token_loss
from npgpt.tasks import continuation, encode_item, evaluate_task, read_task, score_endings
from npgpt.tokenizer import CharTokenizer
from npgpt.ops.nn import cross_entropy

TEXT = "abcdefgh xyz.\n"


@pytest.fixture
def tok():
    return CharTokenizer.train(TEXT)


def _forced_model(tok, block_size=16):
    """A hand-built model that predicts 'the next letter of abcdefgh' with high confidence.

    Embeddings are zero-mean one-hot codes (wte = 3 (I - 1/V)), positions zero, attention output
    zero. The MLP (n_inner = V) maps token i's code to a large multiple of the code of next(i):
    c_fc = 2 I picks out the code, c_proj = 10 P with P[i, next(i)] = 1 moves it. The residual
    stream then points at next(i), and the tied head scores that token ~10 nats above the rest.
    """
    V = tok.vocab_size
    cfg = GPTConfig(vocab_size=V, block_size=block_size, n_layer=1, n_head=1, n_embd=V, n_inner=V)
    m = GPT(cfg, seed=0)
    tr, blk = m.transformer, m.transformer.h[0]
    tr.wpe.weight.data[...] = 0
    tr.wte.weight.data[...] = 3 * (np.eye(V) - 1 / V)
    blk.attn.c_proj.weight.data[...] = 0
    blk.attn.c_proj.bias.data[...] = 0
    blk.mlp.c_fc.weight.data[...] = 2 * np.eye(V)
    blk.mlp.c_fc.bias.data[...] = 0
    perm = np.zeros((V, V), np.float32)
    for a, b in zip("abcdefg", "bcdefgh"):
        perm[tok.encode(a)[0], tok.encode(b)[0]] = 10
    blk.mlp.c_proj.weight.data[...] = perm
    blk.mlp.c_proj.bias.data[...] = 0
    return m


def test_forced_model_predicts_the_next_letter(tok):
    m = _forced_model(tok)
    logits = m(np.array([tok.encode("abcdefg")]))[0].data[0]
    assert tok.decode(list(logits.argmax(-1))) == "bcdefgh"
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 5).all()


def test_mc_scoring_picks_the_forced_ending(tok, tmp_path):
    m = _forced_model(tok)
    items = [{"ctx": "abc", "endings": ["xyz", "def", "hgf"], "label": 1},
             {"ctx": "bcde", "endings": ["fgh", "zz.", "xab"], "label": 0},
             {"ctx": "a", "endings": ["cb", "bc"], "label": "1"}]       # label as HF's HellaSwag stores it
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    loaded = read_task(path)
    assert loaded[2]["label"] == 1
    r = evaluate_task(m, tok, loaded)
    assert r["items"] == 3
    # each ending follows one joining space; the forced chain inside the ending decides
    assert [x["pred"] for x in r["results"]] == [1, 0, 1]
    assert [x["pred_norm"] for x in r["results"]] == [1, 0, 1]
    assert r["acc"] == 1.0 and r["acc_norm"] == 1.0
    res = r["results"][0]
    assert len(res["loglik"]) == 3 and res["tokens"] == [4, 4, 4]
    np.testing.assert_allclose(res["loglik_norm"], np.array(res["loglik"]) / 4)
    # the same items with the labels moved: accuracy drops to 0, so the score is not a constant
    wrong = [{**it, "label": (it["label"] + 1) % len(it["endings"])} for it in loaded]
    assert evaluate_task(m, tok, wrong)["acc"] == 0.0


def test_scores_equal_cross_entropy_of_the_ending_tokens(tok):
    """The summed score is minus the cross-entropy over exactly the ending's tokens."""
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8), seed=1)
    item = {"ctx": "abc de", "endings": ["fgh", "x"], "label": 0}
    rows = encode_item(tok, item, 16)
    sums, counts = score_endings(m, rows)
    for (ids, n_end), s, n in zip(rows, sums, counts):
        x = np.array([ids[:-1]])
        y = np.array([ids[1:]])
        y[0, :len(ids) - 1 - n_end] = -1
        want = -float(cross_entropy(m(x)[0], y).data) * n_end
        assert n == n_end and abs(s - want) < 1e-4


def test_continuation_and_truncation(tok):
    assert continuation("abc", "def") == " def"
    assert continuation("abc ", "def") == "def" and continuation("abc", " def") == " def"
    assert continuation("", "def") == "def"
    rows = encode_item(tok, {"ctx": "abcdefgh" * 4, "endings": ["xyz", "a"], "label": 0}, block_size=8)
    assert all(len(ids) <= 9 for ids, _ in rows) and rows[0][1] == 4
    with pytest.raises(NpgptError, match="longer than the model's block_size"):
        encode_item(tok, {"ctx": "a", "endings": ["abcdefghabc", "b"], "label": 0}, block_size=8)


@pytest.mark.parametrize("line, msg", [
    ("not json", "not valid JSON"),
    ('{"ctx": 1, "endings": ["a", "b"], "label": 0}', "'ctx' must be a string"),
    ('{"ctx": "a", "endings": ["a"], "label": 0}', "at least 2"),
    ('{"ctx": "a", "endings": ["a", "b"], "label": 2}', "'label' must be the index"),
    ('{"ctx": "a", "endings": ["a", "b"], "label": true}', "'label' must be the index"),
])
def test_bad_task_files(tmp_path, line, msg):
    p = tmp_path / "t.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(NpgptError, match=msg):
        read_task(p)


def test_stride_equal_block_size_equals_plain_eval_and_smaller_stride_differs():
    r = np.random.default_rng(0)
    m = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=2)
    tokens = r.integers(0, 30, 8 * 5 + 4)          # 5 full windows and a tail
    total, count = token_loss(m, tokens)
    t2, c2 = sliding_token_loss(m, tokens, stride=8)
    assert c2 == count == len(tokens) - 1
    assert abs(t2 - total) <= 1e-6 * abs(total)
    t3, c3 = sliding_token_loss(m, tokens, stride=3)
    assert c3 == count and abs(t3 - total) > 1e-4       # the same tokens, seen with more context
    with pytest.raises(NpgptError, match="--stride"):
        sliding_token_loss(m, tokens, stride=9)


def test_sliding_window_scores_each_token_once_with_long_context():
    """stride 1: every token j >= T is predicted from exactly the T tokens before it."""
    r = np.random.default_rng(1)
    T = 6
    m = GPT(GPTConfig(vocab_size=20, block_size=T, n_layer=1, n_head=2, n_embd=8), seed=3)
    tokens = r.integers(0, 20, 15)
    total, count = sliding_token_loss(m, tokens, stride=1)
    want = token_loss(m, tokens[:T + 1])[0]          # the first window: targets 1..T
    for j in range(T + 1, len(tokens)):
        x = tokens[j - T:j][None]
        y = np.full((1, T), -1)
        y[0, -1] = tokens[j]
        want += float(cross_entropy(m(x)[0], y).data)
    assert count == len(tokens) - 1 and abs(total - want) < 1e-4
