"""After the README's chat SFT, a model stops: the closing token of each answer is weighted in the SFT
loss (npgpt.training.plugins.weight_end_of_turn), and chat stops on any token of the template."""

import json
import random

import numpy as np
import pytest

from npgpt.cli.train import FINETUNE_DEFAULTS
from npgpt.data import prepare
from npgpt.generate import generate_stream
from npgpt.loading import load_run
from npgpt.sft import SFTData, chat_stop_ids, render_chat
from npgpt.train import TrainConfig, train
from npgpt.training.plugins import closing_targets, end_weighted_loss

NAMES = ["anna", "bob", "carl", "dora", "eve", "fred", "gina", "hugo", "iris", "jack"]
COLOURS = ["red", "blue", "green", "black", "white", "pink", "grey", "brown"]


def test_end_weighted_loss_matches_a_weighted_mean():
    from npgpt import GPT, GPTConfig
    m = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8), seed=0)
    x = np.random.default_rng(0).integers(0, 11, (2, 8))
    y = np.array([[-1, -1, 3, 4, 5, -1, -1, -1], [-1, 2, -1, -1, 7, 8, 9, 1]])
    assert closing_targets(y).astype(int).tolist() == [[0, 0, 0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 1]]
    logits = np.asarray(m(x)[0].data, dtype=np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lp, np.where(y >= 0, y, 0)[..., None], -1)[..., 0]
    for w in (1.0, 5.0, 0.5):
        weights = np.where(closing_targets(y), w, 1.0) * (y >= 0)
        got = float(end_weighted_loss(w)(m, x, y).data)
        assert abs(got - (weights * nll).sum() / weights.sum()) < 1e-5


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny character model pretrained for 300 steps, then the README's chat SFT (finetune's
    defaults) on 40 records."""
    w = tmp_path_factory.mktemp("sft-stops")
    rng = random.Random(0)
    recs = []
    for _ in range(40):
        n, c = rng.choice(NAMES), rng.choice(COLOURS)
        recs.append({"messages": [{"role": "user", "content": f"what colour does {n} like?"},
                                  {"role": "assistant", "content": f"{n} likes {c}."}]})
    (w / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (w / "t.txt").write_text("".join(f"{rng.choice(NAMES)} likes {rng.choice(COLOURS)}. what colour does "
                                     f"{rng.choice(NAMES)} like? " for _ in range(3000)))
    prepare([str(w / "t.txt")], str(w / "data"), tokenizer="char", force=True)
    train(TrainConfig(data=str(w / "data"), out=str(w / "base"), max_iters=300, n_layer=2, n_head=2, n_embd=64,
                      block_size=64, eval_interval=300, learning_rate=3e-3, quiet=True))
    cfg = TrainConfig(**{**FINETUNE_DEFAULTS, "out": str(w / "chat")}, init_from=str(w / "base"),
                      sft=str(w / "chat.jsonl"), quiet=True)
    train(cfg, batch_source=SFTData.for_training(cfg))
    return load_run(w / "chat")[:2]


def _reply(model, tok, question, max_new=40, **sampling):
    """(reply text, whether a stop token ended it within max_new tokens)."""
    ids, _ = render_chat(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
    stops = set(chat_stop_ids(tok))
    out = []
    for steps in generate_stream(model, ids, max_new, **sampling):
        for s in steps:
            if s.token in stops:
                return tok.decode(out), True
            out.append(s.token)
    return tok.decode(out), False


@pytest.mark.slow
def test_chat_sft_learns_to_stop(chat_model):
    model, tok = chat_model
    for n in ("anna", "hugo", "eve"):
        text, ended = _reply(model, tok, f"what colour does {n} like?", temperature=0)
        assert ended, text                                  # greedy replies end with the end-of-turn token
    ended = [_reply(model, tok, "what colour does bob like?", temperature=0.8, seed=s)[1] for s in range(10)]
    assert sum(ended) >= 8, ended
