"""What `npgpt serve` counts, for GET /metrics (Prometheus' text format) and the per-request log line.

    Metrics     counters, gauges and histograms of one server, safe to update from the handler threads
                and the decoding thread; `render()` writes the text format (version 0.0.4)
    RequestLog  one JSON object per line per request, to stderr or a file

The metrics (all prefixed npgpt_):

    requests_total{endpoint, status}          requests answered, by route and HTTP status
    prompt_tokens_total{model}                prompt tokens prefilled / tokens generated, by model id
    completion_tokens_total{model}              (an adapter's name is its model id)
    queue_length                              requests waiting for a slot (gauge)
    running_sequences                         sequences in the decoding batch now (gauge)
    batch_size                                sequences per decoding step (histogram)
    time_to_first_token_seconds               arrival to first sampled token, per request (histogram)
    time_per_output_token_seconds             between consecutive tokens of one sequence (histogram)
    request_duration_seconds                  arrival to the last byte, per request (histogram)
    prefix_cache_hits_total, _misses_total    prompts that did / did not reuse cached keys/values
    prefix_cache_hit_tokens_total             prompt tokens served from the prefix cache
    prefix_cache_evictions_total              blocks evicted; prefix_cache_bytes, _blocks: its size (gauges)
    prefill_tokens_total, prefill_chunks_total  prompt tokens run through the model, in how many chunks
    steps_total, cancelled_total              decoding steps run; sequences cancelled

Label values are bounded: endpoints are the server's routes (anything else is "other"), models are
the ids the server itself serves; nothing a client writes becomes a label.

Written here rather than taken from prometheus_client: the format is a page of text, and npgpt's
runtime dependencies stay numpy, regex, click, safetensors (the tests parse the output with
prometheus_client's own parser).
"""

from __future__ import annotations

import bisect
import json
import sys
import threading
from datetime import datetime, timezone

from npgpt.fileio import open_log

# seconds: from a GPU's millisecond steps to a CPU's first token of a long prompt
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """Cumulative buckets (`le`), a sum and a count, as Prometheus defines a histogram."""

    def __init__(self, buckets):
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)       # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v):
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name):
        out, acc = [], 0
        for bound, c in zip(self.bounds + (float("inf"),), self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{_le(bound)}"}} {acc}')
        out += [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]
        return out


def _le(b):
    return "+Inf" if b == float("inf") else repr(float(b))


def _num(v):
    return repr(float(v)) if isinstance(v, float) else str(v)


def _label(v):
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """One server's metrics. `engine` supplies the gauges (queue, running batch) and its own counters
    (steps, cancellations, Engine.stats: the prefix cache and prefill)."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
                 "/health", "/metrics", "/")

    # the engine's own counters (Engine.stats), shown as they are
    ENGINE_STATS = (("prefix_cache_hits", "counter", "Prompts that reused cached keys/values of an earlier prompt."),
                    ("prefix_cache_misses", "counter", "Prompts that found no cached prefix."),
                    ("prefix_cache_hit_tokens", "counter", "Prompt tokens whose keys/values came from the prefix cache."),
                    ("prefix_cache_evictions", "counter", "Prefix-cache blocks evicted to make room."),
                    ("prefix_cache_bytes", "gauge", "Bytes of keys/values the prefix cache holds."),
                    ("prefix_cache_blocks", "gauge", "Token blocks the prefix cache holds."),
                    ("prefill_tokens", "counter", "Prompt tokens run through the model (cache hits excluded)."),
                    ("prefill_chunks", "counter", "Prefill chunks run."))

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}                    # (endpoint, status) -> count
        self.prompt_tokens = {}               # model id -> tokens
        self.completion_tokens = {}
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.tpot = Histogram(LATENCY_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.engine = None                    # set by the App once its Engine exists

    # ---- updates --------------------------------------------------------------------------------
    def endpoint(self, path):
        """The label for a request path: one of the server's routes, /v1/models/ID as /v1/models, else other."""
        if path.startswith("/v1/models/"):
            return "/v1/models"
        return path if path in self.ENDPOINTS else "other"

    def request(self, path, status):
        key = (self.endpoint(path), int(status))
        with self.lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def generation(self, model, prompt_tokens, completion_tokens, ttft, duration):
        """A finished generation request: its tokens and latencies (ttft None if no token came)."""
        with self.lock:
            self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + prompt_tokens
            self.completion_tokens[model] = self.completion_tokens.get(model, 0) + completion_tokens
            if ttft is not None:
                self.ttft.observe(ttft)
            self.duration.observe(duration)

    def token_gap(self, seconds):             # from the decoding thread
        with self.lock:
            self.tpot.observe(seconds)

    def batch(self, n):                       # from the decoding thread, once per step
        with self.lock:
            self.batch_size.observe(n)

    # ---- the text format ------------------------------------------------------------------------
    def render(self, models=()):
        """The Prometheus text exposition (version 0.0.4). `models`: ids to show at 0 before use."""
        e = self.engine
        out = []

        def family(name, kind, help_):
            out.append(f"# HELP npgpt_{name} {help_}")
            out.append(f"# TYPE npgpt_{name} {kind}")

        with self.lock:
            family("requests", "counter", "HTTP requests answered, by endpoint and status.")
            for (ep, st), c in sorted(self.requests.items()):
                out.append(f'npgpt_requests_total{{endpoint="{_label(ep)}",status="{st}"}} {c}')
            for name, table, what in (("prompt_tokens", self.prompt_tokens, "Prompt tokens prefilled"),
                                      ("completion_tokens", self.completion_tokens, "Tokens generated")):
                family(name, "counter", f"{what}, by model id.")
                for m in sorted(set(models) | set(table)):
                    out.append(f'npgpt_{name}_total{{model="{_label(m)}"}} {table.get(m, 0)}')
            family("queue_length", "gauge", "Requests waiting for a decoding slot.")
            out.append(f"npgpt_queue_length {len(e.waiting) if e else 0}")
            family("running_sequences", "gauge", "Sequences in the decoding batch now.")
            out.append(f"npgpt_running_sequences {len(e.active) if e else 0}")
            for name, h, help_ in (
                    ("batch_size", self.batch_size, "Sequences decoded together, per decoding step."),
                    ("time_to_first_token_seconds", self.ttft, "Seconds from a request's arrival to its first token."),
                    ("time_per_output_token_seconds", self.tpot, "Seconds between consecutive tokens of a sequence."),
                    ("request_duration_seconds", self.duration, "Seconds from a generation request's arrival "
                                                                "to its last byte.")):
                family(name, "histogram", help_)
                out += h.lines(f"npgpt_{name}")
        st = dict(e.stats) if e else {}
        for key, kind, help_ in self.ENGINE_STATS:
            family(key, kind, help_)
            out.append(f"npgpt_{key}{'_total' if kind == 'counter' else ''} {st.get(key, 0)}")
        family("steps", "counter", "Decoding steps run.")
        out.append(f"npgpt_steps_total {e.steps if e else 0}")
        family("cancelled", "counter", "Sequences cancelled before they finished (client gone, shutdown).")
        out.append(f"npgpt_cancelled_total {e.cancelled if e else 0}")
        return "\n".join(out) + "\n"


class RequestLog:
    """One JSON object per line per request (to stderr, or appended to a file), written whole under a lock."""

    def __init__(self, path=None):
        self.lock = threading.Lock()
        self.path = path
        self.failed = False                   # a write failed (said once on stderr)
        self.file = open_log(path) if path is not None else None     # npgpt.fileio's rules for links and devices

    def write(self, record):
        line = json.dumps({"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record},
                          ensure_ascii=False) + "\n"
        with self.lock:
            try:
                f = self.file or sys.stderr
                f.write(line)
                f.flush()
            except (OSError, ValueError) as e:     # a full disk must not fail the request it describes
                if not self.failed:
                    print(f"npgpt serve: cannot write the request log ({e}); requests go on unlogged",
                          file=sys.stderr)
                self.failed = True

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
