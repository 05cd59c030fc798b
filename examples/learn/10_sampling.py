"""Lesson 10: sampling: temperature, top-k, top-p, and what they do to the distribution.

    python examples/learn/10_sampling.py

The model gives logits z for the next token; decoding picks one. npgpt.sampling.sampling_probs
turns logits into the distribution actually sampled from:

    temperature T:  p = softmax(z / T).  T < 1 sharpens (T -> 0 is greedy argmax), T > 1 flattens
                    (T -> inf is uniform). Entropy grows with T.
    top-k:          keep the k largest logits, renormalise; the rest get probability 0.
    top-p (nucleus): keep the smallest set of most likely tokens whose probability reaches p,
                    renormalise. Adapts to the shape: 1 token when the model is sure, many when not.

Order in npgpt (as in Hugging Face): temperature, then top-k, then top-p. So "the probability of
the token" means two things: the model's own p (softmax at T = 1, what the loss trains) and the
probability it was drawn with after the three steps. `npgpt sample --show-probs` prints both.

Drawing one token: inverse CDF, one uniform number u per row, token = first index where the
cumulative sum passes u (npgpt.sampling.draw). The lesson checks empirical frequencies against p.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, parse, picture, title  # noqa: E402

from npgpt.sampling import draw, sampling_probs  # noqa: E402


def entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()) + 0.0      # + 0.0: a one-hot p gives -0.0, printed as "-0.00"


def bar(p, width=40):
    return "#" * int(round(p * width))


def main(argv=None):
    args = parse(argv, __doc__)
    z = np.array([[3.0, 2.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    names = list("abcdefgh")
    out = {}

    title("temperature")
    ents = []
    for T in (0.0, 0.5, 1.0, 2.0, 10.0):
        p = sampling_probs(z, temperature=T)[0]
        ents.append(entropy(p))
        print(f"T = {T:4}: entropy {ents[-1]:.2f}   " + " ".join(f"{n}:{q:.2f}" for n, q in zip(names, p)))
    out["entropy"] = ents
    check(all(a < b for a, b in zip(ents, ents[1:])), "entropy grows with temperature (0 = greedy: entropy 0)")
    check(ents[-1] > 0.95 * np.log(len(names)), "at T = 10 the distribution is nearly uniform")

    title("top-k = 3")
    p = sampling_probs(z, temperature=1.0, top_k=3)[0]
    full = sampling_probs(z, temperature=1.0)[0]
    for n, q, f in zip(names, p, full):
        print(f"  {n}: model {f:.3f} -> sampled with {q:.3f}  {bar(q)}")
    check((p > 0).sum() == 3 and np.allclose(p[:3], full[:3] / full[:3].sum()),
          "top-k keeps the 3 largest and renormalises them")

    title("top-p = 0.8")
    p = sampling_probs(z, temperature=1.0, top_p=0.8)[0]
    kept = int((p > 0).sum())
    print(f"  keeps {kept} tokens: cumulative model probability {full[:kept].sum():.3f} "
          f"(without the last one {full[:kept - 1].sum():.3f} < 0.8)")
    check(full[:kept].sum() >= 0.8 > full[:kept - 1].sum(), "top-p keeps the smallest set reaching p")
    sharp = sampling_probs(np.array([[10.0, 0, 0, 0, 0, 0, 0, 0]]), top_p=0.8)[0]
    check((sharp > 0).sum() == 1, "a confident model: top-p keeps a single token")

    title("drawing: empirical frequencies match p")
    rng = np.random.default_rng(0)
    n = 5000 if args.fast else 50000
    p = sampling_probs(z, temperature=1.0, top_k=5)
    draws = draw(np.repeat(p, n, axis=0), rng)
    freq = np.bincount(draws, minlength=8) / n
    print("  p:    " + " ".join(f"{q:.3f}" for q in p[0]))
    print("  freq: " + " ".join(f"{q:.3f}" for q in freq))
    check(np.abs(freq - p[0]).max() < 0.02 and freq[5:].sum() == 0,
          "frequencies within 0.02 of p; tokens cut by top-k are never drawn")

    def distributions(fig):
        rows = [("T = 0.5", dict(temperature=0.5)), ("T = 1", dict(temperature=1.0)), ("T = 2", dict(temperature=2.0)),
                ("top-k = 3", dict(top_k=3)), ("top-p = 0.8", dict(top_p=0.8))]
        for i, (label, kw) in enumerate(rows):
            ax = fig.add_subplot(1, len(rows), i + 1)
            ax.bar(names, sampling_probs(z, **kw)[0])
            ax.set_ylim(0, 1)
            ax.set_title(label, fontsize=9)
        fig.suptitle("the distribution each setting samples from (the same 8 logits)", fontsize=9)
    picture(args.out, "10_sampling_distributions.png", distributions, size=(11, 2.8))
    return out


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
