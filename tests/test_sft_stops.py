"""After the README's chat SFT, a model stops: the embedding rows of the chat template's new tokens
learn faster (npgpt.training.plugins.boost_new_token_rows), and chat stops on any token of the template.
Without the boost (sft_new_token_lr=1) the same run's greedy reply rambles past its answer."""

import json
import random

import pytest

from npgpt.cli.train import FINETUNE_DEFAULTS
from npgpt.data import prepare
from npgpt.generate import generate_stream
from npgpt.loading import load_run
from npgpt.sft import SFTData, render_chat
from npgpt.train import TrainConfig, train

NAMES = ["anna", "bob", "carl", "dora", "eve", "fred", "gina", "hugo", "iris", "jack"]
COLOURS = ["red", "blue", "green", "black", "white", "pink", "grey", "brown"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny character model pretrained for 300 steps, and 40 chat records."""
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
    return w


def chat_sft(w, name, **settings):
    """The README's chat SFT (finetune's defaults) of the base on the records."""
    cfg = TrainConfig(**{**FINETUNE_DEFAULTS, "out": str(w / name)}, init_from=str(w / "base"),
                      sft=str(w / "chat.jsonl"), quiet=True, **settings)
    train(cfg, batch_source=SFTData.for_training(cfg))
    return load_run(w / name)[:2]


def _reply(model, tok, question, max_new=40, **sampling):
    """(reply text, whether a stop token ended it within max_new tokens)."""
    ids, _ = render_chat(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
    stops = set(tok.chat_stop_ids())
    out = []
    for steps in generate_stream(model, ids, max_new, **sampling):
        for s in steps:
            if s.token in stops:
                return tok.decode(out), True
            out.append(s.token)
    return tok.decode(out), False


@pytest.mark.slow
def test_chat_sft_learns_to_stop(base):
    model, tok = chat_sft(base, "chat")
    for n in ("anna", "hugo", "eve"):
        text, ended = _reply(model, tok, f"what colour does {n} like?", temperature=0)
        assert ended, text                                  # greedy replies end with the end-of-turn token
    ended = [_reply(model, tok, "what colour does bob like?", temperature=0.8, seed=s)[1] for s in range(10)]
    assert sum(ended) >= 8, ended


@pytest.mark.slow
def test_without_the_boost_the_same_sft_seldom_stops(base):
    """The control: the new rows at the base learning rate; the count above is not reached."""
    model, tok = chat_sft(base, "chat-plain", sft_new_token_lr=1.0)
    ended = [_reply(model, tok, "what colour does bob like?", temperature=0.8, seed=s)[1] for s in range(10)]
    assert sum(ended) < 8, ended
