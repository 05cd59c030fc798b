"""Lesson 13: inference optimisation: the KV cache, batching, and speculative decoding.

    python examples/learn/13_inference_optimisation.py [--fast]

Generating token t+1 needs the model's output at position t, which depends on tokens 0..t. A
full forward recomputes all t positions for each new token. Its cost per new token, for a model
of P parameters (about 2 P multiply-adds per position) and width C over n_layer blocks:

    without a cache:  ~ 2 P t  +  2 n_layer t^2 C      (every position again; each attends to all earlier)
    with a cache:     ~ 2 P    +  2 n_layer t C        (one position; it attends to t cached keys/values)

The first term is the matmuls of the weights, the second attention's scores and weighted sums
(q . k and att @ v for every pair of positions: t^2 C per layer without the cache). Summed over a
text of T tokens that is O(P T^2 + T^3 C) against O(P T + T^2 C). The keys and values of positions
0..t-1 never change once computed in a causal model (they see only earlier tokens), so they can
be cached: each new token runs one position through the model and attends to the cached keys and
values (npgpt/model.py: KVCache, forward_cached). The output is the same; the lesson checks it token for token, then times both.

Batching: one forward over B prompts at once costs much less than B forwards (the matmuls get
bigger and use the hardware better), so serving decodes many rows together; rows of different
lengths are left-padded and the padding is masked (npgpt/generate.py).

Speculative decoding: a small draft model proposes k tokens, the big model checks all k in one
forward and keeps the longest prefix it agrees with (plus one token of its own), so several tokens
can cost one big-model forward. With greedy decoding the output is exactly the big model's.
npgpt.generate.speculative_stream does this; the lesson counts the accepted drafts and the
big model's forwards, and checks the output equals plain greedy decoding.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, parse, picture, pretrained, small_gpt, title, train_lm  # noqa: E402

from npgpt.generate import generate, speculative_stream  # noqa: E402


def timed(fn, repeats=2):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main(argv=None):
    args = parse(argv, __doc__)
    model, tok, train_ids, _, block = pretrained(args.fast)
    prompt = tok.encode("The ")
    n = 24 if args.fast else 60
    res = {}

    title("KV cache: same tokens, less work")
    cached, t_cache = timed(lambda: generate(model, prompt, n, temperature=0, use_cache=True))
    full, t_full = timed(lambda: generate(model, prompt, n, temperature=0, use_cache=False))
    print(f"{n} tokens: with cache {n / t_cache:,.0f} tok/s, without {n / t_full:,.0f} tok/s "
          f"({t_full / t_cache:.1f}x); text: {tok.decode(cached)!r}")
    check(cached == full, "cached and uncached greedy decoding produce the same tokens")
    res["cache_speedup"] = t_full / t_cache

    title("batching: 16 prompts together vs one after another")
    prompts = [tok.encode(p) for p in ("The ", "A ", "In the ", "If ", "It ", "Th", "When ", "For ")] * 2
    together, t_b = timed(lambda: generate(model, prompts, n, temperature=0))
    alone, t_1 = timed(lambda: [generate(model, p, n, temperature=0) for p in prompts], repeats=1)
    print(f"{len(prompts)} rows x {n} tokens: batched {len(prompts) * n / t_b:,.0f} tok/s, "
          f"one by one {len(prompts) * n / t_1:,.0f} tok/s ({t_1 / t_b:.1f}x)")
    check(together == alone, "every row of the batch gets exactly the tokens it gets alone")
    res["batch_speedup"] = t_1 / t_b

    title("speculative decoding")
    # the draft: a 1-block, 32-wide model trained briefly on the same text (same tokenizer)
    draft = small_gpt(tok.vocab_size, True, block=block, seed=1)
    train_lm(draft, train_ids, 30 if args.fast else 200, block)
    stats = {}
    out = [s.token for steps in speculative_stream(model, draft, prompt, n, temperature=0, num_draft=4, stats=stats)
           for s in steps]
    print(f"draft proposals accepted: {stats['accepted']} of {stats['proposed']} "
          f"in {stats['rounds']} big-model forwards for {len(out)} tokens")
    check(out[:n] == cached[:len(out[:n])], "greedy speculative decoding equals the big model's own greedy output")
    res["speculative"] = stats

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        labels = ["no cache", "KV cache", "16 rows, one by one", "16 rows, batched"]
        ax.bar(labels, [n / t_full, n / t_cache, len(prompts) * n / t_1, len(prompts) * n / t_b])
        ax.set(ylabel="tokens / s (this machine, noisy)", title="inference: the cache and batching")
        ax.tick_params(axis="x", labelsize=7)
    picture(args.out, "13_tokens_per_second.png", draw)
    return res


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
