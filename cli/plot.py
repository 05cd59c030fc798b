"""`npgpt plot`: training curves (loss, learning rate, tokens/s, gradient norm) from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import click

from npgpt.errors import NpgptError


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--png", type=click.Path(), default=None,
              help="Draw the curves into this PNG (needs npgpt[plot]); without it, text charts.")
@click.option("--width", type=int, default=60, show_default=True, help="Text chart width in characters.")
def plot(runs, png, width):
    """Plot train/val loss, learning rate, tokens/s and gradient norm of one or more RUNS.

    Each RUN is a run folder (holding metrics.jsonl) or a metrics.jsonl file. Several runs share
    each panel, so curves compare directly.
    """
    # imported when the command runs: `npgpt --help` does not load every command's modules
    from npgpt.viz import plot_runs, read_metrics, text_report
    if width < 10:
        raise NpgptError(f"--width must be at least 10, got {width}")
    metrics = {}
    for run in runs:
        name = Path(run).name if Path(run).is_dir() else Path(run).parent.name or run
        while name in metrics:
            name += "'"
        metrics[name] = read_metrics(run)
        if metrics[name]["skipped"]:
            click.echo(f"note: {run}: skipped {metrics[name]['skipped']} unreadable line(s)", err=True)
        if metrics[name]["dropped"]:
            click.echo(f"note: {run}: left out {metrics[name]['dropped']} value(s) that are not finite numbers "
                       f"(NaN, infinity, beyond 1e100: a diverged run?)", err=True)
    if png is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            click.echo("\n".join(text_report(metrics, width=width)))
            raise NpgptError(f"matplotlib is not installed, so {png} was not written (the text charts are "
                             f"above): pip install 'npgpt[plot]'") from None
    if png is None:
        click.echo("\n".join(text_report(metrics, width=width)))
        return
    plot_runs(metrics, png)
    click.echo(f"wrote {png}", err=True)      # on stderr: `--png /dev/stdout` keeps stdout a PNG


COMMANDS = [plot]
