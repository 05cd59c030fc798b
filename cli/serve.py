"""`npgpt serve`: an OpenAI-compatible server for a model folder; a thin wrapper over npgpt.serve.http."""

from __future__ import annotations

import sys

import click

from npgpt.cli import job
from npgpt.cli.export import keep_quantized_option


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="Run folder or model folder to serve.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the model to your network.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0 = any free port).")
@click.option("--api-key", default=None, envvar="NPGPT_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (or set $NPGPT_API_KEY).")
@click.option("--device", default="cpu", show_default=True, help="cpu or gpu.")
@click.option("--max-batch", type=int, default=16, show_default=True,
              help="Sequences decoded together (KV cache slots); also the largest n per request.")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests allowed to wait for a slot; more get 429 with Retry-After.")
@click.option("--max-tokens", type=int, default=1024, show_default=True, help="Largest max_tokens a request may ask.")
@click.option("--max-body", type=int, default=1 << 20, show_default=True, help="Largest request body in bytes (413).")
@click.option("--max-connections", type=int, default=512, show_default=True,
              help="Open connections served at once (a thread each); more are answered 503 at once.")
@click.option("--max-request-tokens", type=int, default=None,
              help="Most tokens one request may generate: its choices x max_tokens (default: 4 x --max-tokens). "
                   "Its prompts may hold this many tokens, or one full context if that is more.")
@click.option("--model-name", default=None, help="Model id reported by /v1/models (default: the folder's name).")
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="On SIGTERM, seconds running requests get to finish before they are cancelled.")
@click.option("--context", type=int, default=None,
              help="Positions per request (prompt + reply), at most the model's; the KV cache holds "
                   "max-batch x context positions. [default: the model's context]")
@click.option("--prefill-chunk", type=int, default=256, show_default=True,
              help="Prompt tokens prefilled per engine step: a long prompt is split so running streams keep pace.")
@click.option("--prefix-cache-mb", type=float, default=512, show_default=True,
              help="Memory (MiB) for keys/values of shared prompt prefixes, least recently used evicted; 0 = off.")
@click.option("--prefix-request-mb", type=float, default=128, show_default=True,
              help="Most prefix-cache memory (MiB) one prompt may add.")
@click.option("--verbose", is_flag=True, help="Log every HTTP request to stderr.")
@click.option("--adapter", "adapters", multiple=True, metavar="[NAME=]DIR",
              help="A LoRA adapter folder. DIR: applied to the default model (unmerged). NAME=DIR (repeatable): "
                   "served side by side over the one base as model NAME; a request's 'model' picks it.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Append one JSON line per request here (default: stderr).")
@click.option("--no-request-log", is_flag=True, help="Write no per-request log lines.")
@keep_quantized_option
def serve(checkpoint, host, port, api_key, device, max_batch, max_queue, max_tokens, max_body, max_connections,
          max_request_tokens, model_name, grace, prefill_chunk, prefix_cache_mb, prefix_request_mb, verbose, adapters,
          log_file, no_request_log, keep_quantized, context):
    """Serve a model with the OpenAI API (completions, chat, streaming), LoRA adapters per request, /metrics,
    /health, /tokenize, /detokenize, and a chat page at /."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.serve.http import parse_adapter_options, serve as run
    adapter, named = parse_adapter_options(adapters)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    sys.exit(run(checkpoint, host=host, port=port, api_key=api_key, device=device, max_batch=max_batch,
                 max_queue=max_queue, max_tokens=max_tokens, max_body=max_body,
                 max_request_tokens=max_request_tokens, max_connections=max_connections, model_name=model_name,
                 grace=grace, verbose=verbose, adapter=adapter, adapters=named, log_file=log_file,
                 request_log=not no_request_log, keep_quantized=keep_quantized,
                 prefill_chunk=prefill_chunk, context=context, prefix_cache_mb=prefix_cache_mb, prefix_request_mb=prefix_request_mb,
                 trust_pattern=job("trust_pattern", False), ready=lambda line: click.echo(line) or sys.stdout.flush()))


COMMANDS = [serve]
