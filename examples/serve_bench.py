"""Throughput and latency of `npgpt serve` (continuous batching) for 1, 4 and 16 concurrent
streaming clients, against serving the same requests one at a time.

    python examples/serve_bench.py --checkpoint out [--max-tokens 64] [--clients 1,4,16]

Starts `npgpt serve` on a free port, then for each client count C sends C streaming completion
requests (greedy, end-of-text banned so each produces exactly --max-tokens tokens): first one after
the other, then all at once. Prints wall time, aggregate tokens/s, and per request the time to its
first and to its last token, counted from the moment all C requests were due (so one-by-one
latency includes the wait for the requests before it). Standard library only.
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


def stream_request(port, body, t0=None):
    """(time to first token, time to last token, tokens) of one streaming request, timed from t0
    (default: when it is sent)."""
    t0 = time.perf_counter() if t0 is None else t0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
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
            if obj.get("choices") and obj["choices"][0]["text"]:
                first = first or time.perf_counter() - t0
            if obj.get("usage"):
                n = obj["usage"]["completion_tokens"]
    conn.close()
    return first, time.perf_counter() - t0, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--prompt", default="The ")
    args = ap.parse_args()
    proc = subprocess.Popen([sys.executable, "-m", "npgpt.cli.main", "serve", "--checkpoint", args.checkpoint,
                             "--port", "0"], stdout=subprocess.PIPE, text=True,
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
    main()
