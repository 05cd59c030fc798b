"""Speed-up of speculative decoding with a small draft model, measured in one process.

    npgpt trim --checkpoint out --out out-trim --drop-layers 1,2,3
    npgpt finetune --init-from out-trim --teacher out --out out-draft        # distil the draft
    python examples/speculative_bench.py --checkpoint out --draft out-draft [--tokens 60] [--k 2,4,6]

For each draft length k, alternates plain decoding and speculative decoding of the same prompts
(greedy, then sampled at temperature 0.8), reports tokens/s of each, the ratio, the share of
drafted tokens accepted and tokens per target forward, and checks that greedy outputs are equal.
"""

from __future__ import annotations

import argparse
import statistics
import time

from npgpt.loading import load_run
from npgpt.generate import generate, speculative_stream


def main():
    from npgpt.programs import existing_path, positive_int   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, type=existing_path)
    ap.add_argument("--draft", required=True, type=existing_path)
    ap.add_argument("--tokens", type=positive_int, default=60, help="New tokens per prompt (keep prompt + this <= block_size).")
    ap.add_argument("--k", default="2,4,6", help="Draft lengths to try.")
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--prompts", default="The |def |import |In the ")
    args = ap.parse_args()
    model, tok = load_run(args.checkpoint)[:2]
    draft = load_run(args.draft).model
    prompts = [tok.encode(p) for p in args.prompts.split("|")]
    print(f"target {model.num_params():,} params ({model.config.n_layer} layers), draft {draft.num_params():,} "
          f"({draft.config.n_layer} layers); {args.tokens} tokens x {len(prompts)} prompts, median of {args.repeats}")
    for temp in (0.0, 0.8):
        for k in [int(x) for x in args.k.split(",")]:
            plain_t, spec_t, acc, prop, rounds, n_tok = [], [], 0, 0, 0, 0
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                plain = [generate(model, p, args.tokens, temperature=temp, seed=rep) for p in prompts]
                plain_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                spec = []
                for p in prompts:
                    st = {}
                    spec.append([s.token for steps in speculative_stream(model, draft, p, args.tokens, temperature=temp,
                                                                         seed=rep, num_draft=k, stats=st)
                                 for s in steps])
                    acc, prop, rounds = acc + st["accepted"], prop + st["proposed"], rounds + st["rounds"]
                spec_t.append(time.perf_counter() - t0)
                n_tok += sum(map(len, spec))
                if temp == 0:
                    assert spec == plain, "greedy speculative output differs from plain greedy"
            total = args.tokens * len(prompts)
            tp, ts = total / statistics.median(plain_t), total / statistics.median(spec_t)
            print(f"T={temp} k={k}: plain {tp:7.1f} tok/s, speculative {ts:7.1f} tok/s, speed-up x{ts / tp:.2f}; "
                  f"accepted {acc / max(prop, 1):.0%} of drafted, {n_tok / max(rounds, 1):.2f} tokens per target "
                  f"forward{'; greedy outputs identical' if temp == 0 else ''}", flush=True)


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
