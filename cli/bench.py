"""`npgpt bench`: training-step and decoding speed, a thin wrapper over npgpt.bench."""

from __future__ import annotations

import json

import click

from npgpt.bench import DEFAULT_BATCH_SIZE, DEFAULT_PRESET
from npgpt.cli import job


@click.command()
@click.option("--preset", default=DEFAULT_PRESET, show_default=True, help="Model preset (npgpt.model.PRESETS).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A setting with `npgpt train`'s key names, e.g. --set n_layer=2 or --set batch_size=64 "
                   "(repeatable). Dropout is 0 unless set.")
@click.option("--batch-size", type=int, default=None, help=f"Sequences per batch [default: {DEFAULT_BATCH_SIZE}].")
@click.option("--block-size", type=int, default=None, help="Sequence length T (default: the preset's block_size).")
@click.option("--device", default="cpu", show_default=True, help="cpu or gpu.")
@click.option("--iters", type=int, default=20, show_default=True, help="Timed training iterations.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed iterations first.")
@click.option("--profile", is_flag=True, help="Also print time by op kind (a second, profiled pass).")
@click.option("--generate", "gen", is_flag=True,
              help="Also time decoding: with and without the KV cache, and a sweep over --batches (latency, "
                   "tokens/s, memory-bandwidth use).")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Time decoding of this model (folder, .gguf, hf:ORG/NAME) instead of training a preset.")
@click.option("--batches", default="1,4,16", show_default=True, help="Decoding batch sizes to sweep (comma list).")
@click.option("--new-tokens", type=int, default=32, show_default=True, help="Decode steps timed per batch size.")
@click.option("--prompt-len", type=int, default=64, show_default=True, help="Prompt tokens prefilled first.")
@click.option("--gemv-mb", type=float, default=256, show_default=True,
              help="Size (MB) of the matrix whose matrix-vector product measures the memory bandwidth.")
@click.option("--llama-cpp", "llama_cpp", type=click.Path(), default=None,
              help="With a .gguf --checkpoint: llama.cpp's llama-batched-bench program (or its folder) to run "
                   "the same sweep on the same file [default: the one on PATH, if any].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def bench(preset, sets, batch_size, block_size, device, iters, warmup, profile, gen, checkpoint, batches, new_tokens,
          prompt_len, gemv_mb, llama_cpp, as_json):
    """Time training iterations (forward, backward, clipping, AdamW): ms/iter, tokens/s, GFLOP/s, MFU.

    GFLOP/s counts 6*N_non_embedding + 12*n_layer*n_embd*T FLOPs per token; MFU divides it by the
    fp32 GEMM peak measured in the same run. With --checkpoint, time decoding that model instead
    (batch sweep; bandwidth use against a NumPy GEMV's bandwidth measured in the same run).
    """
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.bench import (bench_decode, bench_generate, bench_train, decode_model, find_llama_batched_bench,
                             format_decode, format_generate, format_train, llama_cpp_decode, parse_overrides)

    try:
        sweep = [int(b) for b in batches.split(",")]
    except ValueError:
        sweep = []
    if not sweep or min(sweep) < 1:
        raise click.BadParameter("a comma list of positive batch sizes, e.g. 1,4,16", param_hint="--batches")
    if new_tokens < 1 or prompt_len < 1:
        raise click.BadParameter("must be at least 1", param_hint="--new-tokens/--prompt-len")
    if not 0.01 <= gemv_mb <= 1 << 16:
        raise click.BadParameter("must be between 0.01 and 65536 MB", param_hint="--gemv-mb")
    if llama_cpp is not None and not str(checkpoint or "").endswith(".gguf"):
        raise click.BadParameter("compares a .gguf --checkpoint (llama.cpp reads GGUF files)", param_hint="--llama-cpp")
    if checkpoint is not None:
        from npgpt.loading import load_run    # only for --checkpoint: the loaders are many modules
        program = find_llama_batched_bench(llama_cpp) if str(checkpoint).endswith(".gguf") else None
        model = load_run(checkpoint, device=device)[0]
        d = bench_decode(model, sweep, new_tokens, prompt_len, bandwidth_mb=gemv_mb)
        if program is not None:
            d["llama_cpp"] = llama_cpp_decode(program, checkpoint, sweep, new_tokens, d["prompt_len"])
        click.echo(json.dumps({"decode": d}) if as_json else format_decode(d, str(checkpoint)))
        return

    overrides = parse_overrides(sets)
    preset = overrides.get("preset", preset)
    if batch_size is None:
        batch_size = overrides.get("batch_size", DEFAULT_BATCH_SIZE)
    device = overrides.get("device", device)
    seed = overrides.get("seed", 0)
    comm = job("comm")                          # the job's communicator (mpiexec), or None
    if comm is not None and comm.world_size > 1:   # mpiexec -n N npgpt bench: --batch-size is per rank
        from npgpt.distributed.launcher import bench_data_parallel, format_bench   # only for launched jobs
        result = bench_data_parallel(preset, overrides, batch_size, block_size, device, iters, warmup, seed=seed,
                                     lr=overrides.get("learning_rate", 6e-4), grad_clip=overrides.get("grad_clip", 1.0),
                                     zero_stage=overrides.get("zero_stage", 0), comm=comm)
        click.echo(json.dumps(result) if as_json else format_bench(result))
        return
    result = bench_train(preset, overrides, batch_size=batch_size, block_size=block_size, device=device,
                         iters=iters, warmup=warmup, profile=profile, seed=seed,
                         lr=overrides.get("learning_rate", 6e-4), grad_clip=overrides.get("grad_clip", 1.0),
                         replicas=overrides.get("replicas", 1))
    if gen:
        result["generate"] = bench_generate(preset, overrides, block_size=block_size, device=device, seed=seed)
        model = decode_model(preset, overrides, block_size, device, seed)
        new = min(new_tokens, model.config.block_size // 2)
        result["decode"] = bench_decode(model, sweep, new, min(prompt_len, model.config.block_size - new - 1),
                                        bandwidth_mb=gemv_mb)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(format_train(result))
    if gen:
        click.echo(format_generate(result["generate"]))
        click.echo(format_decode(result["decode"], f"preset {preset}"))


COMMANDS = [bench]
