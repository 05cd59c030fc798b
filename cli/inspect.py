"""`npgpt inspect`: where each token of a prompt looks, as text heat maps (or a PNG)."""

from __future__ import annotations

import click

from npgpt.errors import NpgptError

MATRIX_MAX_TOKENS = 48     # wider shaded matrices wrap in a terminal; the top-k list still shows


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="Run folder or model folder.")
@click.option("--prompt", required=True, help="Text whose attention to show.")
@click.option("--layer", type=int, default=None, help="Only this layer (default: every layer).")
@click.option("--head", type=int, default=None, help="Only this head (default: the mean over heads).")
@click.option("--top", "top_k", type=int, default=3, show_default=True, help="Attended tokens listed per token.")
@click.option("--png", type=click.Path(), default=None, help="Also draw the heat map(s) into this PNG (needs npgpt[plot]).")
def inspect(checkpoint, prompt, layer, head, top_k, png):
    """Show which earlier tokens each token of PROMPT attends to most."""
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.evaluate import load_model_and_tokenizer
    from npgpt.inspect import attention_maps, format_top, save_heatmap_png, select, shade_matrix, token_labels
    if top_k <= 0:
        raise NpgptError(f"--top must be positive, got {top_k}")
    if png is not None:
        try:
            import matplotlib  # noqa: F401  (fail before the model loads, not after)
        except ImportError:
            raise NpgptError("--png needs matplotlib: pip install 'npgpt[plot]'") from None
    model, tok, _ = load_model_and_tokenizer(checkpoint)
    ids = tok.encode_prompt(prompt)
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
        save_heatmap_png(chosen, labels, png, title=f"attention, {heads}")
        click.echo(f"wrote {png}")


COMMANDS = [inspect]
