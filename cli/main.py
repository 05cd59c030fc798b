"""Entry point of the `npgpt` command: the click group that the topic modules attach to."""

import click

from npgpt import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="npgpt")
def cli():
    """npgpt: train, sample and study a GPT written with NumPy and CuPy."""


def main():
    cli()
