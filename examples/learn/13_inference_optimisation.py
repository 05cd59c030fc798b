"""Lesson 13: inference optimisation: the KV cache, batching, and speculative decoding.

    python examples/learn/13_inference_optimisation.py [--fast]

Generating token t+1 needs the model's output at position t, which depends on tokens 0..t. A
full forward recomputes all t positions for each new token: O(t) work per token, O(T^2) per text.
But in a causal model the keys and values of positions 0..t-1 never change once computed (they
see only earlier tokens), so they can be cached: each new token runs one position through the
model and attends to the cached keys and values (npgpt/model.py: KVCache, forward_cached). The
output is the same; the lesson checks it token for token, then times both.

Batching: one forward over B prompts at once costs much less than B forwards (the matmuls get
bigger and use the hardware better), so serving decodes many rows together; rows of different
lengths are left-padded and the padding is masked (npgpt/generate.py).

Speculative decoding: a small draft model proposes k tokens, the big model checks all k in one
forward and keeps the longest prefix it agrees with (plus one token of its own), so several tokens
can cost one big-model forward. With greedy decoding the output is exactly the big model's.
npgpt.generate.speculative_stream does this; the lesson runs it when present (it arrived with
issue 17) and says so when it is not.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesson_kit import check, parse, pretrained, small_gpt, title, train_lm  # noqa: E402

import npgpt.generate as G  # noqa: E402
from npgpt.generate import generate  # noqa: E402


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
    spec = getattr(G, "speculative_stream", None)
    if spec is None:
        print("this npgpt.generate has no speculative_stream (it arrives with issue 17); skipped.")
        res["speculative"] = None
    else:
        # the draft: a 1-block, 32-wide model trained briefly on the same text (same tokenizer)
        draft = small_gpt(tok.vocab_size, True, block=block, seed=1)
        train_lm(draft, train_ids, 30 if args.fast else 200, block)
        stats = {}
        out = [s.token for steps in spec(model, draft, prompt, n, temperature=0, num_draft=4, stats=stats)
               for s in steps]
        print(f"draft proposals accepted: {stats.get('accepted', '?')} of {stats.get('proposed', '?')} "
              f"in {stats.get('rounds', '?')} big-model forwards for {len(out)} tokens")
        check(out[:n] == cached[:len(out[:n])], "greedy speculative decoding equals the big model's own greedy output")
        res["speculative"] = stats
    return res


if __name__ == "__main__":
    main()
