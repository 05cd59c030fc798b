"""Every JSON Lines file and adapter config goes through npgpt.safeio's limits (issue 13's rule):
a hostile file is one NpgptError naming it, never a RecursionError or a 5,000-digit integer."""

import json

import pytest

from npgpt.errors import NpgptError
from npgpt.lora import read_adapter
from npgpt.safeio import read_jsonl
from npgpt.sft import read_records
from npgpt.tasks import read_task
from npgpt.viz import read_metrics

NESTED = "[" * 5000 + "]" * 5000
HUGE_INT = "9" * 5000


def test_read_jsonl_names_each_line_and_skips_blank_ones(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n  \n[2]\n', encoding="utf-8")
    assert read_jsonl(p) == [(f"{p} line 1", {"a": 1}), (f"{p} line 4", [2])]
    p.write_text('{"a": 1}\n' + NESTED + "\n", encoding="utf-8")
    with pytest.raises(NpgptError, match="line 2 is damaged: it nests deeper"):
        read_jsonl(p)
    p.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(NpgptError, match="not UTF-8"):
        read_jsonl(p, "task file")


@pytest.mark.parametrize("line", [NESTED, '{"ctx": "a", "endings": ["b", "c"], "label": ' + HUGE_INT + "}"])
def test_task_and_sft_files_refuse_hostile_lines(tmp_path, line):
    p = tmp_path / "t.jsonl"
    p.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(NpgptError, match="line 2"):
        read_task(p)
    p.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(NpgptError, match="line 2"):
        read_records(p)


def test_adapter_config_goes_through_the_safe_reader(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": ' + HUGE_INT + "}", encoding="utf-8")
    with pytest.raises(NpgptError, match="adapter_config.json"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(NESTED, encoding="utf-8")
    with pytest.raises(NpgptError, match="nests deeper"):
        read_adapter(tmp_path)


def test_plot_skips_hostile_metrics_lines(tmp_path):
    good = {"kind": "train", "iter": 10, "loss": 2.5, "lr": 1e-3}
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps(good) + "\n" + NESTED + "\n" + '{"iter": ' + HUGE_INT + "}\n", encoding="utf-8")
    series = read_metrics(tmp_path)
    assert series["train_loss"] == [(10, 2.5)]
