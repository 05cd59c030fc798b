"""Lesson 14: interpretability through probability distributions: token probabilities, attention
per head, and the logit lens.

    python examples/learn/14_interpretability.py [--fast] [--out pictures/]

1. Token probabilities. Each generated token came from a distribution; its probability says how
   sure the model was, and the runners-up show what else it considered. Low-probability tokens
   mark where the text could easily have gone another way (`npgpt sample --show-probs`).
2. Attention per head. For each layer and head, a (T, T) matrix: row i is how query token i spreads
   its attention over tokens 0..i (each row sums to 1; the upper triangle is masked). Heads
   specialise: some look at the previous token, some at the first token (a common "resting"
   place), some at the same character earlier (`npgpt inspect --png att.png`).
3. The logit lens. Apply the final LayerNorm and the unembedding to the residual stream after
   each block: what would the model predict if it stopped there? Early layers tend to predict
   something like the bigram guess, later layers refine it; the last layer is by construction the
   model's own prediction (`npgpt inspect --logit-lens`). The row for the embeddings alone
   mostly echoes the input token: with tied weights the logit of token v is x . wte[v], and an
   embedding is most similar to itself, so "predict the current token" is the lens's reading of a
   stream that holds nothing else yet.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, have_matplotlib, parse, pretrained, title  # noqa: E402

from npgpt.generate import generate_stream  # noqa: E402
from npgpt.interpret import (attention_maps, format_logit_lens, logit_lens, save_attention_grid_png,  # noqa: E402
                           save_logit_lens_png, token_labels)


def main(argv=None):
    args = parse(argv, __doc__)
    model, tok, _, _, _ = pretrained(args.fast)
    res = {}

    title("1. token probabilities while sampling")
    steps = [s[0] for s in generate_stream(model, tok.encode("The "), 20, temperature=0.8, top_k=10, seed=0)]
    for s in steps:
        alts = ", ".join(f"{tok.decode([t])!r} {p:.2f}" for t, p in s.top[:3])
        print(f"  {tok.decode([s.token])!r:>6} p={s.prob:.2f}   top-3: {alts}")
    probs = [s.prob for s in steps]
    print(f"mean probability of the chosen token: {np.mean(probs):.2f}; least sure: {min(probs):.2f}")
    check(all(0 < s.prob <= 1 for s in steps) and all(s.top[0][1] >= s.prob for s in steps),
          "every chosen token has a probability, at most the top candidate's")

    title("2. attention per head")
    text = "The value of the"
    ids = tok.encode(text)
    maps = attention_maps(model, ids)
    labels = token_labels(tok, ids)
    for layer, att in enumerate(maps):
        for h in range(att.shape[0]):
            prev = float(np.mean([att[h, i, i - 1] for i in range(1, len(ids))]))
            first = float(np.mean(att[h, 1:, 0]))
            print(f"  layer {layer} head {h}: mean weight on the previous token {prev:.2f}, on the first token {first:.2f}")
    check(all(np.allclose(a.sum(-1), 1, atol=1e-5) and np.all(np.triu(a, 1) == 0) for a in maps),
          "in every layer and head, rows sum to 1 and nothing attends to the future")
    if args.out and have_matplotlib():
        save_attention_grid_png(maps, labels, Path(args.out) / "14_attention.png", scale="row")
        print(f"wrote {args.out}/14_attention.png")

    title("3. the logit lens")
    lens = logit_lens(model, ids)
    print("\n".join(format_logit_lens(lens, token_labels(tok, ids, width=6), tok, width=6)))
    logits = model(np.array([ids]))[0].data[0]
    check(np.array_equal(lens[-1].argmax(-1), logits.argmax(-1)), "the last layer's lens is the model's own prediction")
    agree = [float(np.mean(lens[i].argmax(-1) == lens[-1].argmax(-1))) for i in range(len(lens))]
    print("agreement of each layer's top token with the final prediction:", ", ".join(f"{a:.2f}" for a in agree))
    if args.out and have_matplotlib():
        save_logit_lens_png(lens, token_labels(tok, ids, width=6), tok, Path(args.out) / "14_logit_lens.png")
        print(f"wrote {args.out}/14_logit_lens.png")
    res["agreement"] = agree
    return res


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
