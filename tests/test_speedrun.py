"""examples/speedrun.py: Student's t written out (checked against numerical integration and known
critical values), the statistics of the table, and the fast run end to end."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("speedrun", ROOT / "examples" / "speedrun.py")
speedrun = importlib.util.module_from_spec(spec)
sys.modules["speedrun"] = speedrun
spec.loader.exec_module(speedrun)


def t_sf_numeric(t, df, n=400_001):
    """P(T > t) by integrating Student's density with the trapezoid rule (an independent check)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    # substitute x = tan(u) to integrate over an infinite range on a finite grid
    u = np.linspace(math.atan(t), math.pi / 2, n)[:-1]
    x = np.tan(u)
    f = c * (1 + x * x / df) ** (-(df + 1) / 2) / np.cos(u) ** 2
    return float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(u)))


@pytest.mark.parametrize("t,df", [(0.0, 3), (1.0, 4), (2.015, 5), (-1.5, 8), (3.3, 2), (0.7, 30), (2.5, 6.7)])
def test_t_sf_matches_numerical_integration(t, df):
    assert speedrun.t_sf(t, df) == pytest.approx(t_sf_numeric(t, df), abs=2e-6)


@pytest.mark.parametrize("t,df,p", [(2.015, 5, 0.05), (1.833, 9, 0.05), (2.353, 3, 0.05), (3.365, 5, 0.01),
                                    (6.314, 1, 0.05)])
def test_t_sf_reproduces_table_critical_values(t, df, p):
    assert speedrun.t_sf(t, df) == pytest.approx(p, abs=5e-4)


def test_one_sample_and_welch_tests():
    t, p = speedrun.t_test_below([1.85, 1.86, 1.84, 1.87, 1.85], 1.88)
    assert t < 0 and p < 0.01
    _, p = speedrun.t_test_below([1.87, 1.90, 1.86, 1.91, 1.88], 1.88)
    assert p > 0.3
    assert math.isnan(speedrun.t_test_below([1.8], 1.88)[1])
    t, df, p = speedrun.welch_less([500, 520, 480], [1000, 1100, 950, 1050, 1020])
    assert t < 0 and p < 0.001 and 2 < df < 7
    _, _, p = speedrun.welch_less([1000, 1100, 950], [500, 520, 480])
    assert p > 0.99


def test_summary_and_table_from_records():
    recs = [{"variant": v, "seed": s, "target": 1.88, "reached": True, "steps": st, "tokens": st * 768,
             "train_cpu_s": st * 0.2, "train_wall_s": st * 1.0, "load_start": 10, "load_end": 12,
             "confirm_loss": c} for v, s, st, c in
            [("baseline", 0, 2000, 1.87), ("baseline", 1, 1900, 1.875), ("full", 0, 900, 1.86), ("full", 1, 1000, 1.87)]]
    stats = speedrun.summarise(recs, 1.88)
    assert stats["full"]["steps_ratio"] == pytest.approx(950 / 1950)
    assert stats["full"]["p_fewer_steps"] < 0.05
    text = speedrun.table(stats, 1.88)
    assert "| full | 2 (2) | 950 ± 71 |" in text and "0.49×" in text


def test_rank_test_is_exact_and_censored_runs_enter_at_their_bound():
    u, p = speedrun.rank_test_less([1, 2, 3], [4, 5, 6, 7, 8])
    assert u == 15 and p == pytest.approx(1 / 56)                   # the one most extreme split of C(8, 3)
    assert speedrun.rank_test_less([4, 5, 6], [1, 2, 3])[1] == 1.0
    _, p = speedrun.rank_test_less([1, 3], [2, 4])                  # U = 3 of 4: splits with U >= 3 are 2 of 6
    assert p == pytest.approx(2 / 6)
    rec = dict(target=1.88, tokens=None, train_wall_s=100.0, load_start=1, load_end=1, confirm_loss=1.9)
    recs = [{**rec, "variant": "baseline", "seed": s, "reached": False, "steps": None, "last_step": 2000,
             "train_cpu_s": 400.0 + s} for s in range(3)]
    recs += [{**rec, "variant": "full", "seed": s, "reached": True, "steps": 500, "last_step": 500, "tokens": 384000,
              "train_cpu_s": 140.0 + s, "confirm_loss": 1.87} for s in range(3)]
    stats = speedrun.summarise(recs, 1.88)
    assert stats["full"]["p_rank_cpu"] == pytest.approx(1 / 20) and stats["full"]["cpu_bound"] == "≤"
    text = speedrun.table(stats, 1.88)
    assert "| baseline | 3 (0) | 3 not by > 2000 |" in text and "≤0.25× / ≤0.35×" in text, text


def test_fast_speedrun_runs_and_reports(tmp_path):
    stats = speedrun.main(["--fast", "--out", str(tmp_path)])
    assert set(stats) == {"baseline", "full"} and all(s["n"] == 2 for s in stats.values())
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    again = speedrun.main(["--fast", "--out", str(tmp_path)])      # resumes: nothing left to run
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    assert again["full"]["confirm"] == stats["full"]["confirm"]
