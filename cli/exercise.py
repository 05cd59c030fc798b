"""`npgpt exercise`: copy out an exercise stub, grade the learner's file (npgpt.exercises)."""

from __future__ import annotations

import click


@click.group()
def exercise():
    """Exercises with hidden answers: write a backward, an update or a loop; get told which entry is wrong."""


@exercise.command("list")
def list_():
    """The exercises, in a sensible order."""
    # imported when the command runs: `npgpt --help` does not load the exercises
    from npgpt.exercises import EXERCISES
    for ex in EXERCISES.values():
        click.echo(f"{ex.name:22s} {ex.title}")
    click.echo("\nstart one with: npgpt exercise start NAME DIR")


@exercise.command()
@click.argument("name")
@click.argument("folder", type=click.Path())
@click.option("--force", is_flag=True, help="Overwrite FOLDER/NAME.py if it exists (your work there is lost).")
def start(name, folder, force):
    """Copy exercise NAME's stub to FOLDER/NAME.py, to edit."""
    from npgpt.exercises import start as start_exercise   # see list_
    path = start_exercise(name, folder, overwrite=force)
    click.echo(f"wrote {path}: read its docstring, write the functions, then\n"
               f"  npgpt exercise check {name} {path}")


@exercise.command()
@click.argument("name")
@click.argument("file", type=click.Path())
def check(name, file):
    """Grade FILE, your solution of exercise NAME; exit status 1 when a check fails."""
    from npgpt.exercises import check as check_exercise   # see list_
    report = check_exercise(name, file)
    click.echo(str(report))
    if not report.ok:
        raise SystemExit(1)


COMMANDS = (exercise,)
