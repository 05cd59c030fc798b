"""Measure a GGUF model in npgpt: load time, resident memory, prefill and decode speed.

    python examples/gguf_bench.py SmolLM2-135M-Instruct.Q4_1.gguf [--tokens 32] [--prompt 128]

Each mode (float32: every block dequantised at load; kept: Q8_0 / Q4_0 / Q4_1 weights and the tied
embedding stay quantised) runs in its own fresh process, so its resident memory (VmRSS after loading,
and VmHWM, the peak, after decoding) is its own. Prefill: one forward over a `--prompt`-token prompt.
Decode: greedy steps with the KV cache at batch 1 and batch 8, tokens per second over all rows. The
context is cut to `--context` positions (the KV cache is allocated for all of them).
Figures vary with the machine's load: print `uptime` beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(path, keep, n_tokens, n_prompt, context):
    import numpy as np

    from npgpt.gguf_models import load_gguf_model

    base = status_mb("VmRSS")
    t = time.perf_counter()
    # the KV cache holds `context` positions (SmolLM2's own 8192 would make batch 8's cache 2.4 GB)
    model = load_gguf_model(path, keep_quantized=keep, block_size=context)
    load_s = time.perf_counter() - t
    rss = status_mb("VmRSS") - base
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    out = {"mode": "kept" if keep else "float32", "load_s": load_s, "rss_mb": rss}
    cache = model.new_cache(1)
    prompt = rng.integers(100, V, size=(1, n_prompt))
    t = time.perf_counter()
    model.forward_cached(prompt, cache)
    out["prefill_tok_s"] = n_prompt / (time.perf_counter() - t)
    for B in (1, 8):
        cache = model.new_cache(B)
        model.forward_cached(rng.integers(100, V, size=(B, 8)), cache)
        tok = rng.integers(100, V, size=(B, 1))
        t = time.perf_counter()
        for _ in range(n_tokens):
            logits = model.forward_cached(tok, cache)
            tok = logits[:, -1].argmax(-1)[:, None]
        out[f"decode_b{B}_tok_s"] = B * n_tokens / (time.perf_counter() - t)
    out["peak_rss_mb"] = status_mb("VmHWM") - base
    return out


def main():
    from npgpt.programs import existing_file, positive_int   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=existing_file)
    ap.add_argument("--tokens", type=positive_int, default=32, help="decode steps per batch size")
    ap.add_argument("--prompt", type=int, default=128, help="prefill length")
    ap.add_argument("--context", type=positive_int, default=512, help="context (KV cache) length")
    ap.add_argument("--one", choices=["float32", "kept"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.gguf, a.one == "kept", a.tokens, a.prompt, a.context)))
        return
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"{'mode':8} {'load s':>7} {'RSS MB':>7} {'peak MB':>8} {'prefill tok/s':>14} {'decode b1':>10} {'decode b8':>10}")
    for mode in ("float32", "kept"):
        p = subprocess.run([sys.executable, __file__, a.gguf, "--one", mode, "--tokens", str(a.tokens),
                            "--prompt", str(a.prompt), "--context", str(a.context)], capture_output=True, text=True, env=dict(os.environ))
        if p.returncode:
            sys.exit(p.stderr[-2000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{r['mode']:8} {r['load_s']:7.1f} {r['rss_mb']:7.0f} {r['peak_rss_mb']:8.0f} {r['prefill_tok_s']:14.1f} "
              f"{r['decode_b1_tok_s']:10.1f} {r['decode_b8_tok_s']:10.1f}")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
