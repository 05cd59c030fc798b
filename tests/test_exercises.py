"""npgpt.exercises: a correct solution passes, a wrong one is reported with the entry that is wrong,
the stubs hold no answer, and `npgpt exercise start / check / list` behave on good and bad input.

tests/exercise_solutions/ holds one solution per exercise, written in plain NumPy apart from the
library; each marks one line `# MUTATE: OLD -> NEW`, a typical slip, which the wrong-solution test
applies."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from npgpt import exercises
from npgpt.cli.main import cli
from npgpt.errors import NpgptError

SOLUTIONS = Path(__file__).resolve().parent / "exercise_solutions"
NAMES = exercises.names()


def test_every_exercise_has_a_stub_and_a_solution():
    assert NAMES == ["tanh", "gelu", "softmax_cross_entropy", "layernorm", "rmsnorm", "attention", "embedding_tied",
                     "adamw", "muon", "bpe", "top_p"]
    for name in NAMES:
        assert (exercises.STUBS / f"{name}.py").is_file() and (SOLUTIONS / f"{name}.py").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_a_correct_solution_passes(name):
    report = exercises.check(name, SOLUTIONS / f"{name}.py")
    assert report.ok, str(report)
    assert len(report.findings) >= 2


def mutated(name, tmp_path):
    text = (SOLUTIONS / f"{name}.py").read_text()
    lines = text.splitlines()
    (i, line), = [(i, x) for i, x in enumerate(lines) if "# MUTATE:" in x]
    code, rule = line.split("# MUTATE:")
    old, new = (s.strip() for s in rule.split("->"))
    assert old in code, (name, old)
    lines[i] = code.replace(old, new, 1) if new else code.replace(old, "", 1)
    if new == "pass":                                   # drop the statement: keep the indentation valid
        lines[i] = code[:len(code) - len(code.lstrip())] + "pass"
    f = tmp_path / f"{name}.py"
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.mark.parametrize("name", NAMES)
def test_a_wrong_solution_is_reported_with_the_entry(name, tmp_path):
    report = exercises.check(name, mutated(name, tmp_path))
    assert not report.ok
    wrong = report.wrong()
    text = str(report)
    assert "WRONG" in text and "checks failed" in text
    if name == "bpe":
        assert any(re.search(r"merge \d+ is \(\d+, \d+\) \(.*\), expected \(\d+, \d+\)", f.detail) for f in wrong), text
    else:
        assert any(re.search(r"entry \[[\d, ]+\] is -?[\d.e+-]+, expected -?[\d.e+-]+ \(\d+ of \d+ entries off\)",
                             f.detail) for f in wrong), text


@pytest.mark.parametrize("name", ["tanh", "gelu", "layernorm", "attention", "embedding_tied"])
def test_a_wrong_backward_leaves_the_forward_ok_and_fails_gradcheck(name, tmp_path):
    report = exercises.check(name, mutated(name, tmp_path))
    by_what = {f.what: f for f in report.findings}
    assert by_what["forward"].ok
    assert not by_what["gradcheck: your backward against finite differences of your forward"].ok
    assert any(f.what.startswith("backward: d") and not f.ok for f in report.findings)


@pytest.mark.parametrize("name", NAMES)
def test_the_stubs_hold_no_answer(name, tmp_path):
    path = exercises.start(name, tmp_path)
    report = exercises.check(name, path)
    assert not report.ok and "not written yet" in str(report)


def test_the_cli_starts_checks_and_lists(tmp_path):
    r = CliRunner().invoke(cli, ["exercise", "list"])
    assert r.exit_code == 0 and all(n in r.output for n in NAMES)
    r = CliRunner().invoke(cli, ["exercise", "start", "gelu", str(tmp_path / "work")])
    assert r.exit_code == 0 and (tmp_path / "work" / "gelu.py").is_file()
    mine = tmp_path / "work" / "gelu.py"
    mine.write_text((SOLUTIONS / "gelu.py").read_text())
    r = CliRunner().invoke(cli, ["exercise", "check", "gelu", str(mine)])
    assert r.exit_code == 0 and "all checks passed" in r.output
    # starting again never overwrites the learner's work without --force
    r = CliRunner().invoke(cli, ["exercise", "start", "gelu", str(tmp_path / "work")])
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
    assert mine.read_text() == (SOLUTIONS / "gelu.py").read_text()
    r = CliRunner().invoke(cli, ["exercise", "start", "gelu", str(tmp_path / "work"), "--force"])
    assert r.exit_code == 0 and "NotImplementedError" in mine.read_text()
    r = CliRunner().invoke(cli, ["exercise", "check", "gelu", str(mine)])
    assert r.exit_code == 1 and "not written yet" in r.output


def test_bad_input_is_one_clean_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["exercise", "check", "nope", str(tmp_path)])
    assert r.exit_code == 1 and "no exercise named 'nope'" in r.output and "gelu" in r.output
    r = runner.invoke(cli, ["exercise", "check", "gelu", str(tmp_path / "missing.py")])
    assert r.exit_code == 1 and "is not a file" in r.output
    broken = tmp_path / "broken.py"
    broken.write_text("def forward(x):\n    return x x\n")
    r = runner.invoke(cli, ["exercise", "check", "gelu", str(broken)])
    assert r.exit_code == 1 and "did not run: SyntaxError" in r.output and "Traceback" not in r.output
    partial = tmp_path / "partial.py"
    partial.write_text("def forward(x):\n    return x, None\n")
    r = runner.invoke(cli, ["exercise", "check", "gelu", str(partial)])
    assert r.exit_code == 1 and "has no function backward" in r.output
    crashing = tmp_path / "crash.py"
    crashing.write_text("def forward(x):\n    return x, None\n\ndef backward(dy, cache):\n    return cache[0]\n")
    report = exercises.check("gelu", crashing)
    assert not report.ok and "backward raised TypeError" in str(report) and "(line 5)" in str(report)
    odd = tmp_path / "odd.py"
    odd.write_text("def forward(x):\n    return x\n\ndef backward(dy, cache):\n    return dy\n")
    report = exercises.check("gelu", odd)
    assert not report.ok and "forward must return (out, cache)" in str(report)
    shapes = tmp_path / "shapes.py"
    shapes.write_text("import numpy as np\ndef forward(x):\n    return np.tanh(x), x\n\n"
                      "def backward(dy, cache):\n    return dy[:1]\n")
    report = exercises.check("tanh", shapes)
    assert not report.ok and "shape (1, 5), expected (3, 5)" in str(report)
    (tmp_path / "file").write_text("")
    with pytest.raises(NpgptError, match="is a file"):
        exercises.start("gelu", tmp_path / "file")


def test_the_stubs_ship_as_package_data():
    """pyproject's package-data carries the stubs into a wheel (a wheel built from this tree was
    checked by hand to hold npgpt/exercises/stubs/*.py; this keeps the declaration in place)."""
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"npgpt.exercises"' in text and '"npgpt.exercises" = ["stubs/*.py"]' in text
