"""Every example is a program: `--help` prints its usage, exits 0 at once and writes nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# programs, not the modules lessons import (lesson_kit.py, scratch_engine.py: no main, no options)
SCRIPTS = sorted(p for p in (ROOT / "examples").rglob("*.py")
                 if not p.name.endswith("_kit.py") and ("__main__" in (text := p.read_text()) or "parse_args" in text))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_help_prints_usage_and_writes_nothing(script, tmp_path):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NPGPT_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout.lower(), r.stdout[:500]
    assert not [p.name for p in tmp_path.iterdir()], "--help wrote files"
