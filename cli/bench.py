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
@click.option("--generate", "gen", is_flag=True, help="Also time greedy decoding with and without the KV cache.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def bench(preset, sets, batch_size, block_size, device, iters, warmup, profile, gen, as_json):
    """Time training iterations (forward, backward, clipping, AdamW): ms/iter, tokens/s, GFLOP/s, MFU.

    GFLOP/s counts 6*N_non_embedding + 12*n_layer*n_embd*T FLOPs per token; MFU divides it by the
    fp32 GEMM peak measured in the same run.
    """
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.bench import bench_generate, bench_train, format_generate, format_train, parse_overrides

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
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(format_train(result))
    if gen:
        click.echo(format_generate(result["generate"]))


COMMANDS = [bench]
