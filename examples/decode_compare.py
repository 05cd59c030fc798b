"""Decoding a real model: npgpt against transformers (and llama.cpp when installed), batch 1, 4, 16.

    python examples/decode_compare.py SmolLM2-135M-Instruct.Q4_1.gguf [--batches 1,4,16] [--new-tokens 32]

One process, one table. For each batch size B both sides prefill the same prompt in B rows, then
take --new-tokens greedy cached steps; the sides alternate per batch size (npgpt, transformers,
then the other order at the next size), and each reports the median step. Columns: the latency of
one step, tokens/s over all rows, and the bandwidth use of the weight stream: float32 weight bytes
read per step x steps/s / the bandwidth of a large NumPy GEMV measured in the same run
(npgpt.perf.gemv_bandwidth_gbs; at batch 1 that is the ceiling). transformers loads the GGUF
dequantised to float32 (`gguf_file=`), as npgpt does, and runs eager with torch's default
threads. llama.cpp reads the quantised file as it is, in one of two ways: its own
`llama-batched-bench` program (--llama-cpp PATH, or found on PATH), which decodes B sequences at
once like the other two sides (B rows of --prompt-len random tokens, then --new-tokens steps of B
tokens; it reports tokens/s over the steps, from which the step time follows), so every batch size
has a llama.cpp row; or, without it, `llama_cpp` (llama-cpp-python) if importable, which decodes one
sequence, so batch 1 only. Otherwise its rows say "not measured". Build the program from the
llama.cpp sources that llama-cpp-python's sdist carries (vendor/llama.cpp):
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build build -j2 --target llama-batched-bench        # then --llama-cpp build/bin
Prefill: one row of --prompt-len tokens, median of 3.
--cpu-time: npgpt alone, one BLAS thread, each step timed in CPU seconds of this process
(time.process_time), a figure a busy machine disturbs far less than wall time: batch scaling
(tokens per CPU-second at batch B over batch 1) when no quiet machine is at hand.
Needs torch, transformers and gguf (a comparison venv; npgpt never imports them); without them it
prints npgpt's rows only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def npgpt_side(path):
    from npgpt.loading import load_run
    model = load_run(str(path))[0]

    def prefill(ids):
        cache = model.new_cache(ids.shape[0])
        return cache, model.forward_cached(ids, cache)[:, -1].argmax(-1)[:, None]

    def step(state):
        cache, tok = state
        return cache, model.forward_cached(tok, cache)[:, -1].argmax(-1)[:, None]
    return model, prefill, step


def torch_side(path, torch, transformers):
    m = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    m.eval()

    @torch.no_grad()
    def prefill(ids):
        out = m(input_ids=torch.from_numpy(ids), use_cache=True)
        return out.past_key_values, out.logits[:, -1].argmax(-1)[:, None]

    @torch.no_grad()
    def step(state):
        pkv, tok = state
        out = m(input_ids=tok, past_key_values=pkv, use_cache=True)
        return out.past_key_values, out.logits[:, -1].argmax(-1)[:, None]
    return m, prefill, step


def llama_cpp_side(path, n_ctx):
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, verbose=False, logits_all=False)

    def prefill(ids):
        if ids.shape[0] != 1:
            return None                      # the high-level API decodes one sequence
        llm.reset()
        llm.eval(ids[0].tolist())
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def step(tok):
        llm.eval([tok])
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return llm, prefill, step


def llama_cpp_steps(program, path, threads, prompt_len, new_tokens):
    """llama.cpp's own batched decoding (npgpt.bench.llama_cpp_decode), one batch size at a time, so
    that it can alternate with the other sides: measure(B) -> (seconds per step of B tokens, prefill
    tokens/s of one row)."""
    from npgpt.bench import llama_cpp_decode

    def measure(B):
        d = llama_cpp_decode(program, path, [B], new_tokens, prompt_len, threads)
        return d["rows"][0]["step_ms"] / 1e3, d["prefill_tokens_per_s"]
    return measure


def time_steps(prefill, step, ids, n, clock=time.perf_counter):
    state = prefill(ids)
    if state is None:
        return None
    times = []
    for _ in range(n):
        t = clock()
        state = step(state)
        times.append(clock() - t)
    return statistics.median(times)


def cpu_time_scaling(path, batches, n, prompt_len):
    from npgpt.perf import blas_controller
    model, prefill, step = npgpt_side(path)
    prompt = np.random.default_rng(0).integers(100, model.config.vocab_size, (1, prompt_len))
    print(f"npgpt, one BLAS thread, CPU seconds per step (median of {n}); load average {os.getloadavg()[0]:.2f}")
    with blas_controller().limit(limits=1, user_api="blas"):
        base = None
        for B in batches:
            s = time_steps(prefill, step, np.repeat(prompt, B, axis=0), n, time.process_time)
            base = base or B / s
            print(f"batch {B:>3}: {1e3 * s:8.2f} ms CPU per step, {B / s:8.1f} tokens per CPU-second "
                  f"({B / s / base:.2f}x batch {batches[0]})", flush=True)


def batch_list(text):
    try:
        out = [int(b) for b in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"a comma list of positive batch sizes, e.g. 1,4,16, got {text!r}")
    return out


def main():
    from npgpt.bench import find_llama_batched_bench
    from npgpt.programs import existing_file, positive_int   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=existing_file, help="the GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument("--batches", type=batch_list, default=[1, 4, 16], help="batch sizes, a comma list")
    ap.add_argument("--new-tokens", type=positive_int, default=32)
    ap.add_argument("--prompt-len", type=positive_int, default=64)
    ap.add_argument("--cpu-time", action="store_true", help="npgpt alone: CPU seconds per step, one BLAS thread")
    ap.add_argument("--llama-cpp", metavar="PATH", help="llama.cpp's llama-batched-bench program or its folder "
                    "(default: llama-batched-bench on PATH, else llama-cpp-python for batch 1)")
    ap.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)),
                    help="llama.cpp's threads (default: the CPUs this process may use)")
    a = ap.parse_args()
    path = Path(a.gguf).resolve()
    program = find_llama_batched_bench(a.llama_cpp)
    if a.cpu_time:
        return cpu_time_scaling(path, a.batches, a.new_tokens, a.prompt_len)
    from npgpt.bench import decode_weight_bytes
    from npgpt.perf import gemv_bandwidth_gbs

    sides = {}
    model, *fns = npgpt_side(path)
    sides["npgpt"] = fns
    try:
        import torch
        import transformers
        torch_model, *tfns = torch_side(path, torch, transformers)
        sides["transformers"] = tfns
        print(f"transformers {transformers.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        print("transformers: not measured (needs torch, transformers, gguf)")
    lc = None if program else llama_cpp_side(path, a.prompt_len + a.new_tokens + 8)
    if program:
        sides["llama.cpp"] = llama_cpp_steps(program, path, a.threads, a.prompt_len, a.new_tokens)
        print(f"llama.cpp: {program}, {a.threads} threads, the quantised file as it is")
    elif lc is not None:
        sides["llama.cpp"] = lc[1:]
    else:
        print("llama.cpp: not measured (no llama-batched-bench program, and llama_cpp from pip install "
              "llama-cpp-python is not importable)")
    bw = gemv_bandwidth_gbs()
    wbytes = decode_weight_bytes(model)
    print(f"weights read per step (float32): {wbytes / 1e6:,.0f} MB; NumPy GEMV bandwidth {bw:.1f} GB/s; "
          f"batch-1 limit {bw * 1e9 / wbytes:.1f} tokens/s; load average {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, model.config.vocab_size, (1, a.prompt_len))
    # prefill, one row
    pre = {}
    for name, fns in sides.items():
        if callable(fns):               # llama-batched-bench: one row's prefill, median of 3 runs
            pre[name] = statistics.median(fns(1)[1] for _ in range(3))
            continue
        prefill, _ = fns
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            prefill(prompt)
            ts.append(time.perf_counter() - t)
        pre[name] = a.prompt_len / statistics.median(ts)
    print("prefill tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in pre.items()))
    rows = []
    names = list(sides)
    for i, B in enumerate(a.batches):
        ids = np.repeat(prompt, B, axis=0)
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            fns = sides[name]
            step = fns(B)[0] if callable(fns) else time_steps(*fns, ids, a.new_tokens)
            if step is not None:
                rows.append((B, name, step, os.getloadavg()[0]))
    print(f"{'batch':>5} {'side':>12} {'step ms':>8} {'tokens/s':>9} {'bandwidth use':>13} {'load':>5}")
    for B, name, step, load in rows:
        use = f"{wbytes / step / 1e9 / bw:12.0%}" if name != "llama.cpp" else f"{'(quantised)':>12}"
        print(f"{B:>5} {name:>12} {1e3 * step:8.2f} {B / step:9.1f} {use} {load:5.1f}")
    by = {(B, n): B / s for B, n, s, _ in rows}
    for B in sorted({r[0] for r in rows}):
        if (B, "transformers") in by:
            print(f"batch {B}: npgpt / transformers tokens/s = {by[(B, 'npgpt')] / by[(B, 'transformers')]:.2f}")
        if (B, "llama.cpp") in by:
            print(f"batch {B}: npgpt / llama.cpp tokens/s = {by[(B, 'npgpt')] / by[(B, 'llama.cpp')]:.2f}")
    if (1, "npgpt") in by and (8, "npgpt") in by:
        print(f"npgpt batch 8 / batch 1 tokens/s = {by[(8, 'npgpt')] / by[(1, 'npgpt')]:.2f}")


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
