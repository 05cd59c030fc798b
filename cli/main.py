"""Entry point of the `npgpt` command: the click group that the topic modules attach to.

User mistakes surface as `NpgptError` from the library; the group turns them into one
`Error: ...` line and exit status 1 (click's own usage errors exit 2), never a traceback.
"""

import click

from npgpt import __version__
from npgpt.cli import bench, compress, exercise, export, interpret, lora, plot, prepare, sample, serve, train
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
@click.option("--trust-pattern", is_flag=True,
              help="Load tokenizers whose split regex is not a named one (gpt2, gpt4, llama3, qwen2); only for tokenizers you trust.")
@click.pass_context
def cli(ctx, trust_pattern):
    """npgpt: train, sample and study a GPT written with NumPy and CuPy."""
    # a setting of this command's job (npgpt.cli.job): each command hands it to the loader it calls
    # as the argument trust_pattern=..., never a global or an environment variable
    ctx.ensure_object(dict)["trust_pattern"] = trust_pattern


for _topic in (prepare, train, sample, interpret, bench, compress, serve, plot, lora, export, exercise):   # each defines plain click commands
    for _cmd in _topic.COMMANDS:
        cli.add_command(_cmd)


def main():
    from npgpt.distributed.comm import is_launched        # reads the environment only: no mpi4py import
    if is_launched():                                     # mpiexec -n N npgpt ...: one voice for N ranks
        from npgpt.distributed.launcher import run_cli    # only under a launcher: it imports mpi4py
        raise SystemExit(run_cli(cli))
    cli()


if __name__ == "__main__":
    main()
