"""npgpt's GGUF reading and writing against transformers' GGUF loader (`gguf_file=`), and its decoding speed.

    python examples/gguf_compare.py SmolLM2-135M-Instruct.Q4_1.gguf

Needs torch, transformers and gguf (a comparison venv; npgpt itself never imports them); exits 0 with
a message when they are missing. Three checks:

1. the real GGUF: transformers dequantises it to float32 as npgpt does; logits on a chat prompt compared;
2. a GGUF npgpt writes (a small random Llama with SmolLM2's tokenizer, f32): transformers loads it,
   logits compared (llama.cpp's q/k row order must be right for this to agree);
3. greedy decoding speed, batch 1, transformers' `generate` against npgpt's, same prompt, same count.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    from npgpt.programs import existing_file   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=existing_file, help="the GGUF file to compare (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    a = ap.parse_args()
    try:
        import torch
        import transformers
    except ImportError:
        print("skipped: needs torch and transformers (pip install torch transformers gguf)")
        return
    from npgpt.generate import generate
    from npgpt.gguf_models import export_gguf, load_gguf_model
    from npgpt.llama import Llama, LlamaConfig
    from npgpt.tokenizer import load

    path = Path(a.gguf).resolve()
    torch.set_num_threads(1)
    tok = load(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True)

    ours = load_gguf_model(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        ref = theirs(torch.tensor([ids])).logits.numpy()
    got = ours(np.array([ids]))[0].data
    print(f"1. {path.name}: max |logit difference| {np.abs(got - ref).max():.2e} over {len(ids)} positions, "
          f"same argmax at {np.mean(got.argmax(-1) == ref.argmax(-1)):.0%} of them")

    cfg = LlamaConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=9, n_kv_head=3, n_embd=576,
                      n_inner=1536, tie_word_embeddings=True, rope_theta=100000.0)
    small = Llama(cfg, seed=0)
    with tempfile.TemporaryDirectory() as d:
        out = export_gguf(small, tok, Path(d) / "small.gguf", "f32")
        t2 = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="small.gguf",
                                                               dtype=torch.float32).eval()
        with torch.no_grad():
            ref2 = t2(torch.tensor([ids])).logits.numpy()
    got2 = small(np.array([ids]))[0].data
    print(f"2. npgpt-written GGUF in transformers: max |logit difference| {np.abs(got2 - ref2).max():.2e}")

    n = 32
    t = time.perf_counter()
    mine = generate(ours, ids, n, temperature=0)
    ours_s = time.perf_counter() - t
    with torch.no_grad():
        t = time.perf_counter()
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        theirs_s = time.perf_counter() - t
    mine = list(mine[0] if isinstance(mine[0], list) else mine)
    # min_new_tokens keeps transformers from stopping, by banning the end token: compare up to it
    end = mine.index(tok.eot_id) if tok.eot_id in mine else n
    same = [int(t) for t in out[0, len(ids):len(ids) + end]] == mine[:end]
    print(f"3. greedy, batch 1, {n} tokens: npgpt {n / ours_s:.1f} tok/s, transformers {n / theirs_s:.1f} tok/s "
          f"(both one thread); the same {end} tokens up to the end of the answer: {same}")


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
