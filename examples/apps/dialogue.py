"""Application: dialogue, a chat model fine-tuned with npgpt's chat template (chat SFT).

    python examples/apps/dialogue.py [--fast] [--steps N]

    <|user|>hi, I am Tavo.<|end|><|assistant|>Hello Tavo! How can I help?<|end|>
    <|user|>I like plums.<|end|><|assistant|>Plums are a fine choice.<|end|>
    <|user|>what is my name?<|end|><|assistant|>  ->  Your name is Tavo.<|end|>

The conversations are rendered by npgpt.sft.render_chat, the same template `npgpt finetune --sft`
and `npgpt chat` use: special tokens mark who speaks, and the loss counts only the assistant's
words (and its <|end|>). The last question asks for something said two turns back (the user's
name or what they like), so the model must keep the conversation in view: a chat model's memory
is nothing but its context window. Held-out conversations use names the model never saw in
training (made from the same syllables), so copying, not memorising, is the only way to answer.
What it cannot do: talk about anything else. It has learned five kinds of turns and nothing
about language; a useful assistant starts from a model pretrained on a large corpus.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_kit import char_tokenizer, check_claims, model_for, parse, score, split, train_rows  # noqa: E402

from npgpt.sft import ensure_chat_tokens, render_chat  # noqa: E402

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
LIKES = "plums tea jazz chess rain maps soup kites".split()


def conversation(rng, name):
    like = str(rng.choice(LIKES))
    msgs = [{"role": "user", "content": f"hi, I am {name}."},
            {"role": "assistant", "content": f"Hello {name}! How can I help?"},
            {"role": "user", "content": f"I like {like}."},
            {"role": "assistant", "content": f"{like.capitalize()} are a fine choice."}]
    if rng.random() < 0.5:
        msgs += [{"role": "user", "content": "what is my name?"},
                 {"role": "assistant", "content": f"Your name is {name}."}]
    else:
        msgs += [{"role": "user", "content": "what do I like?"},
                 {"role": "assistant", "content": f"You like {like}."}]
    return msgs


CLAIM = 0.90   # held-out exact match at the default size (README states the measured figure)


def main(argv=None):
    args = parse(argv, __doc__, steps=600)
    rng = np.random.default_rng(args.seed)
    names = sorted({(a + b).capitalize() for a in SYLLABLES for b in SYLLABLES})
    train_names, test_names = split(names, 300, rng)
    train = [conversation(rng, train_names[rng.integers(len(train_names))]) for _ in range(8000)]
    test = [conversation(rng, n) for n in test_names[:200]]
    tok = char_tokenizer([m["content"] for c in train + test for m in c])
    ensure_chat_tokens(tok)                              # <|user|>, <|assistant|>, <|end|>, ...
    rows = [render_chat(tok, c) for c in train]
    block = max(len(r[0]) for r in rows)
    model = model_for(tok.vocab_size, block, args.fast, seed=args.seed)
    print(f"{len(train)} training conversations, {len(test)} held out with unseen names; "
          f"{model.num_params():,} parameters; block {block}")
    print("a rendered conversation:", tok.decode(rows[0][0]))
    end = tok.special_tokens["<|end|>"]
    # score the last reply, given the conversation so far (the template's generation prompt)
    prompts = [render_chat(tok, c[:-1], add_generation_prompt=True)[0] for c in test]
    pairs = [(c[-2]["content"], c[-1]["content"]) for c in test]
    before, _ = score(model, tok, pairs, 32, show=0, stop_id=end, prompts=prompts, label="before training: ")
    history = train_rows(model, rows, args.steps, block, tok.eot_id, seed=args.seed)
    acc, got = score(model, tok, pairs, 32, show=6, stop_id=end, prompts=prompts, label="after training:  ")
    names_ok = [g == a for g, (q, a) in zip(got, pairs) if "name" in q]
    likes_ok = [g == a for g, (q, a) in zip(got, pairs) if "like" in q]
    print(f"'what is my name?' {np.mean(names_ok):.1%} right (a name never seen in training); "
          f"'what do I like?' {np.mean(likes_ok):.1%} right")
    check_claims(args, history, acc, CLAIM)
    return {"accuracy": acc, "before": before, "name": float(np.mean(names_ok)), "like": float(np.mean(likes_ok)),
            "steps": args.steps}


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
