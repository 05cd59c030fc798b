"""`npgpt quantize`, `npgpt prune`, `npgpt trim`: smaller copies of a model, with a before/after report.

Thin wrappers over npgpt.compress and npgpt.quant; each writes a new model folder (model files + a
copy of the tokenizer) that `npgpt sample` and `npgpt eval` read like any other.
"""

from __future__ import annotations

import click

from npgpt.cli import job
from npgpt.errors import NpgptError


def report_options(fn):
    """The options every compression command shares: where, and what to measure."""
    opts = [
        click.option("--checkpoint", required=True, type=click.Path(), help="Run folder or model folder to compress."),
        click.option("--out", required=True, type=click.Path(), help="New folder for the compressed model."),
        click.option("--data", type=click.Path(), default=None,
                     help="Prepared data folder: report val loss / perplexity before and after."),
        click.option("--eval-tokens", type=int, default=None, help="Evaluate on at most this many val tokens."),
        click.option("--sample-tokens", type=int, default=64, show_default=True,
                     help="Tokens to generate greedily when timing sampling (0 skips it)."),
        click.option("--force", is_flag=True, help="Write into --out even if it is not empty."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _run(fn, checkpoint, out, data, eval_tokens, sample_tokens, force, **kw):
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.compress import format_report
    if sample_tokens < 0:
        raise NpgptError(f"--sample-tokens must be >= 0, got {sample_tokens}")
    if eval_tokens is not None and eval_tokens < 2:
        raise NpgptError(f"--eval-tokens must be at least 2, got {eval_tokens}")
    r = fn(checkpoint, out, data=data, max_eval_tokens=eval_tokens, sample_tokens=sample_tokens, force=force,
           trust_pattern=job("trust_pattern", False), **kw)
    click.echo(f"{r['checkpoint']} -> {r['out']}")
    click.echo(format_report(r["before"], r["after"], r["notes"]))
    click.echo(f"try it:  npgpt sample --checkpoint {r['out']}   # add --prompt TEXT to start from your text")


@click.command()
@report_options
@click.option("--bits", type=int, default=8, show_default=True, help="8 (int8) or 4 (two values per byte).")
@click.option("--group-size", type=int, default=None,
              help="One scale per this many input rows (default: one per output channel).")
@click.option("--embedding/--no-embedding", default=False, show_default=True,
              help="Quantise the token embedding (tied LM head) too.")
def quantize(checkpoint, out, data, eval_tokens, sample_tokens, force, bits, group_size, embedding):
    """Weight-only quantisation of every linear weight to int8 or int4 with float32 scales."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.compress import quantize_checkpoint
    from npgpt.layers import check_scheme
    check_scheme(bits, group_size)
    _run(quantize_checkpoint, checkpoint, out, data, eval_tokens, sample_tokens, force,
         bits=bits, group_size=group_size, embedding=embedding)


@click.command()
@report_options
@click.option("--sparsity", type=float, required=True, help="Fraction of linear weights set to zero, in [0, 1).")
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="One magnitude threshold over all linear weights, or the same fraction in each.")
def prune(checkpoint, out, data, eval_tokens, sample_tokens, force, sparsity, scope):
    """Magnitude pruning of the linear weights; the keep-masks go to prune_mask.safetensors."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.compress import check_sparsity, prune_checkpoint
    check_sparsity(sparsity, scope)
    _run(prune_checkpoint, checkpoint, out, data, eval_tokens, sample_tokens, force,
         sparsity=sparsity, scope=scope)


@click.command()
@report_options
@click.option("--mlp-keep", type=float, default=1.0, show_default=True,
              help="Fraction of MLP hidden units kept per block (the most important ones).")
@click.option("--drop-layers", default="", help="Comma-separated block indices to remove, e.g. 0,3.")
def trim(checkpoint, out, data, eval_tokens, sample_tokens, force, mlp_keep, drop_layers):
    """Structured trimming: drop the least important MLP units and/or whole blocks."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.compress import check_mlp_keep, parse_layers, trim_checkpoint
    check_mlp_keep(mlp_keep)
    layers = parse_layers(drop_layers)
    if mlp_keep == 1.0 and not layers:
        raise NpgptError("nothing to trim: give --mlp-keep below 1 and/or --drop-layers")
    _run(trim_checkpoint, checkpoint, out, data, eval_tokens, sample_tokens, force,
         mlp_keep=mlp_keep, drop_layers=layers)


COMMANDS = [quantize, prune, trim]
