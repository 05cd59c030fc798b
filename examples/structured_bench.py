"""The per-token cost of constrained decoding (npgpt.structured): a JSON schema against free sampling.

    python examples/structured_bench.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf [--rounds 3]

Three figures, each with the load average beside it:
  * compile: the schema's DFA (states) and, for this vocabulary, the constraint (the walk over every
    token from every state and the exact shortest completions), first time and cached;
  * the sampler alone: microseconds per Sampler.probs on the same stored logits, with and without
    the constraint (the mask: one gather of the state's destination row, a compare, a where), along
    the same token path, rounds alternated;
  * one step on one state, best of 7 x 50 calls: free, constrained with the state's mask cached, and
    the mask alone near the budget;
  * end to end: ms per generated token of `generate` (greedy, KV cache) with the constraint against
    the same number of free tokens, rounds alternated.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "owner"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
                         "owner": {"type": "object", "required": ["city"], "properties": {
                             "city": {"type": "string"}, "cat": {"type": "boolean"}}}}}


def load():
    return "%.1f" % os.getloadavg()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model folder or GGUF file")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    ap.add_argument("--max-tokens", type=int, default=96, help="token budget of the constrained reply")
    args = ap.parse_args()

    from npgpt.generate import generate
    from npgpt.gguf_models import load_options
    from npgpt.loading import load_run
    from npgpt.sampling import Sampler, SamplingParams
    from npgpt.sft import render_chat
    from npgpt.structured import Grammar, token_table

    model, tok = load_run(args.checkpoint, **load_options(args.checkpoint, False))[:2]
    model.eval()
    V = model.config.vocab_size
    t = time.perf_counter()
    table = token_table(tok, V)
    t_table = time.perf_counter() - t
    t = time.perf_counter()
    grammar = Grammar.json_schema(SCHEMA)
    t_dfa = time.perf_counter() - t
    t = time.perf_counter()
    constraint = grammar.for_tokens(table)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    grammar.for_tokens(table)
    t_cached = time.perf_counter() - t
    print(f"vocabulary {V}: token table {t_table:.2f} s; schema -> DFA of {len(grammar.dfa.table)} states "
          f"{t_dfa * 1e3:.0f} ms; constraint (exact={constraint.exact}, min {constraint.min_tokens} tokens) "
          f"{t_first:.2f} s first, {t_cached * 1e6:.0f} us cached (load {load()})")

    ids = render_chat(tok, [{"role": "user", "content": "Describe a cat as JSON."}], add_generation_prompt=True)[0]
    stops = tuple(tok.chat_stop_ids()) if tok.chat_template is not None else (tok.eot_id,)
    free = SamplingParams(temperature=0, max_new_tokens=args.max_tokens, stop_token_ids=stops)
    guided = free.replace(constraint=constraint)
    out = generate(model, ids, args.max_tokens, params=guided)
    text = tok.decode([t for t in out if t not in stops])
    json.loads(text)
    n = len(out)
    print(f"constrained reply ({n} tokens): {text}")

    # the sampler alone, on the logits the model gave along this reply
    from npgpt.backend import asnumpy
    cache = model.new_cache(1)
    logits = [asnumpy(model.forward_cached(np.array([ids]), cache)[0, -1]).astype(np.float64)]
    for t in out[:-1]:
        logits.append(asnumpy(model.forward_cached(np.array([[t]]), cache)[0, -1]).astype(np.float64))
    for r in range(args.rounds):
        for name, params in (("free", free), ("constrained", guided)) if r % 2 == 0 else \
                (("constrained", guided), ("free", free)):
            times = []
            for _ in range(5):                  # the fastest of 5 passes: what the work costs without the load
                s = Sampler(params, V, ids)
                t = time.perf_counter()
                for z, tok_id in zip(logits, out):
                    s.probs(z)
                    s.accept(tok_id)
                times.append((time.perf_counter() - t) / len(out))
            print(f"round {r + 1} sampler {name:>11}: {min(times) * 1e6:8.1f} us/token best of 5, "
                  f"{np.median(times) * 1e6:8.1f} median (load {load()})")

    # one step on one state, its mask cached (far from the budget) and near it (gather and compare)
    import timeit
    s_free, s_con = Sampler(free, V, ids), Sampler(guided, V, ids)
    z = logits[0]
    s_con.probs(z)
    for name, f in (("free step", lambda: s_free.probs(z)), ("constrained step", lambda: s_con.probs(z)),
                    ("mask near the budget", lambda: s_con.guide.allowed(2))):
        best = min(timeit.repeat(f, number=50, repeat=7)) / 50
        print(f"{name}: {best * 1e6:.0f} us, best of 7 x 50 (load {load()})")

    eot_ban = {tok.eot_id: -100.0} if tok.eot_id not in stops else {}
    plain = free.replace(max_new_tokens=n, stop_token_ids=(), logit_bias={t: -100.0 for t in stops} | eot_ban)
    for r in range(args.rounds):
        for name, params in (("free", plain), ("constrained", guided)) if r % 2 == 0 else \
                (("constrained", guided), ("free", plain)):
            t = time.perf_counter()
            got = generate(model, ids, params.max_new_tokens, params=params)
            dt = (time.perf_counter() - t) / len(got)
            print(f"round {r + 1} generate {name:>11}: {dt * 1e3:7.2f} ms/token over {len(got)} tokens "
                  f"(load {load()})")


if __name__ == "__main__":
    main()
