"""`npgpt inspect`: where each token of a prompt looks, as text heat maps (or a PNG)."""

from __future__ import annotations

import click

from npgpt.cli import job
from npgpt.cli.export import keep_quantized_option
from npgpt.errors import NpgptError

MATRIX_MAX_TOKENS = 48     # wider shaded matrices wrap in a terminal; the top-k list still shows


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="Run folder or model folder.")
@click.option("--prompt", required=True, help="Text whose attention to show.")
@click.option("--layer", type=int, default=None, help="Only this layer (default: every layer).")
@click.option("--head", type=int, default=None, help="Only this head (default: the mean over heads).")
@click.option("--top", "top_k", type=int, default=3, show_default=True, help="Attended tokens listed per token.")
@click.option("--png", type=click.Path(), default=None,
              help="Also draw into this PNG (needs npgpt[plot]): a layer x head grid of attention maps, "
                   "or with --logit-lens the lens heat map.")
@click.option("--scale", type=click.Choice(["linear", "log", "row"]), default="linear", show_default=True,
              help="PNG colour scale: weights, log10 weights, or each row over its maximum.")
@click.option("--logit-lens", "lens", is_flag=True,
              help="Instead of attention: per layer, the token ln_f + unembedding would predict from "
                   "that layer's residual stream.")
@click.option("--allow-special", is_flag=True,
              help="Read special-token strings in the prompt (e.g. <|endoftext|>) as those tokens.")
@keep_quantized_option
def inspect(checkpoint, prompt, layer, head, top_k, png, scale, lens, allow_special, keep_quantized):
    """Show which earlier tokens each token of PROMPT attends to most (or, with --logit-lens, what
    each layer would predict)."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.cli.sample import encode_prompt
    from npgpt.gguf_models import load_options
    from npgpt.loading import load_run
    from npgpt.interpret import (attention_maps, format_logit_lens, format_top, logit_lens, save_attention_grid_png,
                               save_logit_lens_png, select, shade_matrix, token_labels)
    if top_k <= 0:
        raise NpgptError(f"--top must be positive, got {top_k}")
    if png is not None:
        try:
            import matplotlib  # noqa: F401  (fail before the model loads, not after)
        except ImportError:
            raise NpgptError("--png needs matplotlib: pip install 'npgpt[plot]'") from None
    model, tok = load_run(checkpoint, trust_pattern=job("trust_pattern", False),
                          **load_options(checkpoint, keep_quantized))[:2]
    ids = encode_prompt(tok, prompt, allow_special)
    if lens:
        probs = logit_lens(model, ids)
        labels = token_labels(tok, ids, width=8)
        click.echo("logit lens: top next-token prediction (and its probability) after each layer")
        click.echo("\n".join(format_logit_lens(probs, labels, tok)))
        if png is not None:
            save_logit_lens_png(probs, labels, tok, png)
            click.echo(f"wrote {png}")
        return
    maps = attention_maps(model, ids)
    chosen = select(maps, layer, head)
    labels = token_labels(tok, ids)
    heads = f"head {head}" if head is not None else f"mean of {maps[0].shape[0]} heads"
    for i, att in chosen:
        click.echo(f"== layer {i}, {heads} ==")
        click.echo("\n".join(format_top(att, labels, top_k)))
        if len(ids) <= MATRIX_MAX_TOKENS:
            click.echo("\n".join(shade_matrix(att, labels)))
    if png is not None:
        save_attention_grid_png(maps, labels, png, layers=[layer] if layer is not None else None,
                                heads=[head] if head is not None else None, scale=scale,
                                title=f"attention of {len(ids)} tokens, {scale} scale")
        click.echo(f"wrote {png}")


COMMANDS = [inspect]
