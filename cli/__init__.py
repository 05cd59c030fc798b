"""The `npgpt` command line: thin click commands, one module per topic, each calling the library."""

import click


def job(key, default=None):
    """A setting of the running command's job: the communicator under `mpiexec` ("comm", set by
    npgpt.distributed.launcher.run_cli) or --trust-pattern ("trust_pattern", set by the `npgpt`
    group). It lives in click's context object, handed to the library as an argument: never a
    module global or an environment variable."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return (obj or {}).get(key, default)
