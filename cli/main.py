"""Entry point of the `npgpt` command: the click group that the topic modules attach to.

User mistakes surface as `NpgptError` from the library; the group turns them into one
`Error: ...` line and exit status 1 (click's own usage errors exit 2), never a traceback.
"""

import click

from npgpt import __version__
from npgpt.cli import bench, compress, inspect, prepare, sample, train
from npgpt.errors import NpgptError


class NpgptGroup(click.Group):
    """A click group that reports NpgptError (and unreadable files) as clean one-line errors."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NpgptError as e:
            raise click.ClickException(str(e)) from None
        except MemoryError:
            raise click.ClickException("out of memory: use a smaller --batch-size, --block-size or model") from None


@click.group(cls=NpgptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="npgpt")
def cli():
    """npgpt: train, sample and study a GPT written with NumPy and CuPy."""


for _topic in (prepare, train, sample, inspect, bench, compress):   # each defines plain click commands
    for _cmd in _topic.COMMANDS:
        cli.add_command(_cmd)


def main():
    cli()


if __name__ == "__main__":
    main()
