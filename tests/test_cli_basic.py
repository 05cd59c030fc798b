"""The command line's skeleton: --version, --help, and clean errors."""

from click.testing import CliRunner

from npgpt import __version__
from npgpt.cli.main import cli


def test_version_and_help():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "npgpt" in r.output


def test_unknown_command_exits_nonzero():
    r = CliRunner().invoke(cli, ["no-such-command"])
    assert r.exit_code == 2 and "No such command" in r.output
