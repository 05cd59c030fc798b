"""Throughput and latency of `npgpt serve` (continuous batching) for 1, 4 and 16 concurrent
streaming clients, against serving the same requests one at a time.

    python examples/serve_bench.py --checkpoint out [--max-tokens 64] [--clients 1,4,16]
    python examples/serve_bench.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --shared-system [--rounds 3]

Starts `npgpt serve` on a free port, then for each client count C sends C streaming completion
requests (greedy, end-of-text banned so each produces exactly --max-tokens tokens): first one after
the other, then all at once. Prints wall time, aggregate tokens/s, and per request the time to its
first and to its last token, counted from the moment all C requests were due (so one-by-one
latency includes the wait for the requests before it). Standard library only.

--shared-system: the prefix cache and chunked prefill, before and after. 16 (--clients) chat clients
stream at once, each with the same long system prompt and its own question; a server with the
prefix cache off and the whole prompt prefilled in one go ("before": --prefix-cache-mb 0
--prefill-chunk 1000000, the engine as it was) against the defaults ("after"), alternated for
--rounds rounds (a fresh server each time; its first round warms the cache with one request).
--context N: both servers serve N positions per request (`npgpt serve --context`), a smaller KV cache.
Prints time to first token (median, 90th percentile), aggregate tokens/s, the engine's prefix-cache
hits, the medians over rounds, and the load average beside each run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def stream(port, path, body, t0=None, timeout=600):
    """(time to first token, time to last token, tokens) of one streaming request to `path`, timed
    from t0 (default: when it is sent). A token has come when a chunk carries text: `text` for
    completions, `delta.content` for chat."""
    t0 = time.perf_counter() if t0 is None else t0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"request failed: {r.status} {r.read().decode()}")
    first, n, buf = None, 0, b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            data = event[6:]
            if data == b"[DONE]":
                continue
            obj = json.loads(data)
            choice = obj["choices"][0] if obj.get("choices") else {}
            if choice.get("text") or choice.get("delta", {}).get("content"):
                first = first or time.perf_counter() - t0
            if obj.get("usage"):
                n = obj["usage"]["completion_tokens"]
    conn.close()
    return first, time.perf_counter() - t0, n


def stream_request(port, body, t0=None):
    return stream(port, "/v1/completions", body, t0)


def stream_chat(port, body, t0):
    return stream(port, "/v1/chat/completions", body, t0, timeout=7200)

SYSTEM = ("You are a careful assistant for a small public library. Answer in one or two short sentences, "
          "politely and plainly. The library opens at nine in the morning and closes at six in the evening "
          "on weekdays, and at four on Saturdays; it is closed on Sundays and public holidays. Members may "
          "borrow up to eight books for three weeks and renew them twice online or at the desk. Late books "
          "cost ten cents a day. The reading room on the first floor is quiet; the children's corner is on "
          "the ground floor beside the entrance. Printing costs five cents a page. Wi-Fi is free: the network "
          "is called Library-Guest and needs no password. Lost cards are replaced for two dollars. Never "
          "invent facts that are not given here; if you do not know, say so and suggest asking at the desk.")
QUESTIONS = ["When do you open on Saturday?", "How many books can I borrow?", "What does printing cost?",
             "Is there Wi-Fi?", "Where is the children's corner?", "Can I renew a book online?",
             "What if my book is late?", "Are you open on Sunday?", "I lost my card, what now?",
             "Where can I read quietly?", "How long is a loan?", "Do you close at six on Friday?",
             "Is the Wi-Fi password needed?", "Can I renew three times?", "Where is the entrance?",
             "Do you sell coffee?"]

def context_flag(args):
    return ["--context", str(args.context)] if args.context else []


def start_server(checkpoint, *flags):
    proc = subprocess.Popen([sys.executable, "-m", "npgpt.cli.main", "serve", "--checkpoint", checkpoint,
                             "--port", "0", *flags], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = ""
    while "http://" not in line:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("the server did not start")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, int(re.search(r":(\d+)/", line).group(1))


def engine_stats(port):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/v1/models")
    return json.loads(conn.getresponse().read())["data"][0]["npgpt"].get("engine", {})


def shared_system(args):
    modes = {"before": ["--prefix-cache-mb", "0", "--prefill-chunk", "1000000"], "after": []}
    C = int(args.clients.split(",")[-1])
    bodies = [{"messages": [{"role": "system", "content": SYSTEM},
                            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
               "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}} for i in range(C)]
    print(f"{C} chat clients at once, a shared system prompt of {len(SYSTEM)} characters, "
          f"{args.max_tokens} tokens at most each, {args.rounds} rounds alternating before/after")
    print(f"{'round':>5} {'mode':>6} {'wall s':>7} {'tok/s':>7} {'TTFT med':>8} {'TTFT p90':>8} {'hits':>5} "
          f"{'load avg (1 min)':>16}")
    table = {m: [] for m in modes}
    for rnd in range(args.rounds):
        for mode in (("before", "after") if rnd % 2 == 0 else ("after", "before")):
            proc, port = start_server(args.checkpoint, *modes[mode], *context_flag(args))
            try:
                warm = dict(bodies[0], max_tokens=2, messages=[bodies[0]["messages"][0],
                                                               {"role": "user", "content": "Hello"}])
                stream_chat(port, warm, time.perf_counter())         # warm-up (and, after, the cache)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(C) as pool:
                    res = list(pool.map(lambda b: stream_chat(port, b, t0), bodies))
                wall = time.perf_counter() - t0
                stats = engine_stats(port)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
            ttft = sorted(r[0] for r in res)
            row = {"wall": wall, "tok_s": sum(r[2] for r in res) / wall, "ttft_med": statistics.median(ttft),
                   "ttft_p90": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]}
            table[mode].append(row)
            print(f"{rnd:>5} {mode:>6} {wall:7.2f} {row['tok_s']:7.1f} {row['ttft_med']:8.2f} {row['ttft_p90']:8.2f} "
                  f"{stats.get('prefix_cache_hits', 0):>5} {os.getloadavg()[0]:16.2f}", flush=True)
    print("medians over rounds:")
    for mode, rows in table.items():
        print(f"  {mode:>6}: tok/s {statistics.median(r['tok_s'] for r in rows):.1f}, "
              f"TTFT median {statistics.median(r['ttft_med'] for r in rows):.2f} s, "
              f"TTFT p90 {statistics.median(r['ttft_p90'] for r in rows):.2f} s")
    b, a = ({k: statistics.median(r[k] for r in table[m]) for k in ("tok_s", "ttft_med")} for m in ("before", "after"))
    print(f"after / before: tokens/s x{a['tok_s'] / b['tok_s']:.2f}, TTFT median x{a['ttft_med'] / b['ttft_med']:.2f}")


def main():
    from npgpt.programs import existing_path, positive_int   # the CLI's checks and one-line errors
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, type=existing_path)
    ap.add_argument("--max-tokens", type=positive_int, default=64)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--prompt", default="The ")
    ap.add_argument("--shared-system", action="store_true",
                    help="chat clients sharing a system prompt: prefix cache and chunked prefill, before and after")
    ap.add_argument("--rounds", type=positive_int, default=3, help="--shared-system: rounds of before/after (alternated)")
    ap.add_argument("--context", type=positive_int, default=None, help="the servers' --context (default: the model's)")
    args = ap.parse_args()
    if args.shared_system:
        return shared_system(args)
    proc = subprocess.Popen([sys.executable, "-m", "npgpt.cli.main", "serve", "--checkpoint", args.checkpoint,
                             "--port", "0", *context_flag(args)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", "/v1/models")
        card = json.loads(conn.getresponse().read())["data"][0]
        from npgpt.checkpoint import find_checkpoint
        from npgpt.tokenizer import load
        eot = load(find_checkpoint(args.checkpoint)).eot_id
        body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "logit_bias": {str(eot): -100}}
        stream_request(port, dict(body, max_tokens=4))          # warm-up
        print(f"model {card['id']}, {args.max_tokens} tokens per request, prompt {args.prompt!r}")
        print(f"{'clients':>7} {'mode':>11} {'wall s':>7} {'tok/s':>7} {'TTFT mean':>9} {'latency mean':>12} "
              f"{'latency max':>11}")
        for c in [int(x) for x in args.clients.split(",")]:
            for mode in ("one-by-one", "concurrent"):
                t0 = time.perf_counter()
                # all C requests are due at t0: one by one, request i also waits for the i before it
                if mode == "one-by-one":
                    res = [stream_request(port, body, t0) for _ in range(c)]
                else:
                    with ThreadPoolExecutor(c) as pool:
                        res = list(pool.map(lambda _: stream_request(port, body, t0), range(c)))
                wall = time.perf_counter() - t0
                toks = sum(r[2] for r in res)
                print(f"{c:>7} {mode:>11} {wall:7.2f} {toks / wall:7.1f} {statistics.mean(r[0] for r in res):9.3f} "
                      f"{statistics.mean(r[1] for r in res):12.3f} {max(r[1] for r in res):11.3f}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    from npgpt.programs import run     # one `Error:` line for bad input, as the CLI
    run(main)
