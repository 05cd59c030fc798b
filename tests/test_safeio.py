"""npgpt.safeio, the one place untrusted files are read: JSON/TOML limits, schemas, paths, locks,
safetensors headers and the bfloat16 upcast."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

from npgpt.errors import NpgptError
from npgpt.safeio import (Float, Int, List, Obj, Str, bf16_to_f32, check, check_finite_tensors, inside,
                          load_safetensors, parse_json, read_json, read_limited, read_safetensors_header, read_toml,
                          run_lock)


# ------------------------------------------------------------------------------------------ JSON

@pytest.mark.parametrize("text, message", [
    ("[" * 5000 + "]" * 5000, "nests deeper"), ('{"a": ' + "9" * 41 + "}", "41 digits"),
    ('{"a": 1e999}', "out of range"), ('{"a": -1e400}', "out of range"), ('{"a": NaN}', "NaN"),
    ('{"a": Infinity}', "Infinity"), ('{"a": 1, "a": 2}', "appears twice"), ('{"a": "\\ud800"}', "surrogate"),
    ("{", "not valid JSON"), (b"\xff\xfe", "not UTF-8")])
def test_hostile_json_is_one_npgpt_error_naming_the_file(text, message):
    with pytest.raises(NpgptError, match=message) as e:
        parse_json(text, "x/config.json")
    assert str(e.value).startswith("x/config.json")


def test_ordinary_json_parses_as_python_does():
    text = '{"a": [1, 2.5, -3, true, null, "[[[{{{"], "b": {"c": "\\ud83d\\ude00"}, "big": 123456789012345678901234567890}'
    assert parse_json(text, "f") == json.loads(text)
    assert parse_json('{"x": Infinity}', "f", allow_infinity=True) == {"x": math.inf}
    with pytest.raises(NpgptError, match="NaN"):
        parse_json('{"x": NaN}', "f", allow_infinity=True)


@given(st.recursive(st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=False,
                    allow_infinity=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                    max_leaves=20))
def test_any_finite_json_document_round_trips(doc):
    assert parse_json(json.dumps(doc), "f") == doc


def test_size_limit_is_checked_before_reading(tmp_path):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * 2000 + b"{}")
    with pytest.raises(NpgptError, match="2,002 bytes, more than the 1,000 allowed"):
        read_json(p, max_bytes=1000)
    assert read_json(p, max_bytes=5000) == {}
    with pytest.raises(NpgptError, match="does not exist"):
        read_limited(tmp_path / "nope")
    with pytest.raises(NpgptError, match="is a folder"):
        read_limited(tmp_path)


def test_toml_reader_refuses_non_finite_numbers(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nlr = 0.1\n")
    assert read_toml(p) == {"train": {"lr": 0.1}}
    for bad, message in [("lr = nan\n", "finite"), ("lr = inf\n", "finite"), ("lr = [\n", "not valid TOML"),
                         ("x = " + "[" * 5000 + "]" * 5000 + "\n", "TOML|deeper")]:
        p.write_text(bad)
        with pytest.raises(NpgptError, match=message):
            read_toml(p)


# --------------------------------------------------------------------------------------- schemas

def test_schema_checks_types_ranges_and_names_the_field():
    spec = {"step": Int(lo=0), "lr": Float(lo=0, lo_open=True), "kind": Str(("a", "b")),
            "opt": Obj({"bits": Int(default=8)}, default=None), "ids": List(Int(lo=0), default=[])}
    assert check({"step": 3, "lr": 1, "kind": "a"}, spec, "s.json") == {
        "step": 3, "lr": 1.0, "kind": "a", "opt": None, "ids": []}
    assert check({"step": 0, "lr": 0.5, "kind": "b", "opt": {}}, spec, "s.json")["opt"] == {"bits": 8}
    for bad, message in [({"lr": 1, "kind": "a"}, "field 'step' is missing"),
                         ({"step": True, "lr": 1, "kind": "a"}, "'step' must be an integer"),
                         ({"step": 1.0, "lr": 1, "kind": "a"}, "'step' must be an integer"),
                         ({"step": -1, "lr": 1, "kind": "a"}, "'step' must be >= 0"),
                         ({"step": 1, "lr": 0, "kind": "a"}, "'lr' must be > 0"),
                         ({"step": 1, "lr": "x", "kind": "a"}, "'lr' must be a number"),
                         ({"step": 1, "lr": 1, "kind": "c"}, "'kind' must be one of"),
                         ({"step": 1, "lr": 1, "kind": "a", "opt": {"bits": "8"}}, "'opt.bits' must be an integer"),
                         ({"step": 1, "lr": 1, "kind": "a", "ids": [1, -2]}, "'ids' entry 1 must be >= 0"),
                         ([1], "must be a JSON object")]:
        with pytest.raises(NpgptError, match=message) as e:
            check(bad, spec, "s.json")
        assert str(e.value).startswith("s.json")


# ----------------------------------------------------------------------------------------- paths

def test_inside_keeps_names_in_the_folder_symlinks_included(tmp_path):
    root = tmp_path / "ckpt"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    assert inside(root, "sub/a.json") == root / "sub" / "a.json"
    os.symlink(tmp_path / "secret", root / "link")
    for bad in ["../secret", "/etc/hostname", "sub/../../secret", "link", "", "a\x00b"]:
        with pytest.raises(NpgptError):
            inside(root, bad)


# ----------------------------------------------------------------------------------------- locks

def test_lock_is_exclusive_names_the_holder_and_leaves_nothing(tmp_path):
    with run_lock(tmp_path / "run", "train") as path:
        assert path.read_text().split()[:3] == [str(os.getpid()), "npgpt", "train"]
        with pytest.raises(NpgptError, match=f"in use by PID {os.getpid()} \\(npgpt train\\)"):
            with run_lock(tmp_path / "run", "prepare"):
                pass
    assert not list((tmp_path / "run").iterdir())                   # the lock file goes with the lock
    with run_lock(tmp_path / "run"):                                 # free again
        pass


def test_lock_dies_with_its_process(tmp_path):
    child = textwrap.dedent("""
        import os, sys
        from npgpt.safeio import run_lock
        with run_lock(sys.argv[1], "train"):
            print("locked", flush=True)
            os._exit(9)                                  # no cleanup: like kill -9
    """)
    p = subprocess.run([sys.executable, "-c", child, str(tmp_path / "run")], capture_output=True, text=True)
    assert p.stdout.strip() == "locked" and p.returncode == 9
    with run_lock(tmp_path / "run"):                                 # the OS released it
        pass


# ----------------------------------------------------------------------------------- safetensors

def _raw(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + body


def test_header_is_checked_against_the_file_before_reading(tmp_path):
    p = tmp_path / "m.safetensors"
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_file({"a": a, "b": np.ones(4, np.int8)}, str(p), metadata={"format": "pt"})
    h = read_safetensors_header(p)
    assert h.shapes() == {"a": (2, 3), "b": (4,)} and h.metadata == {"format": "pt"}
    assert np.array_equal(load_safetensors(p)["a"], a)
    body = a.tobytes()
    cases = [({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24 * 10**9]}}, "outside"),
             ({"a": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 24]}}, "does not match"),
             ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
               "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}}, "overlap"),
             ({"a": {"dtype": "C64", "shape": [3], "data_offsets": [0, 24]}}, "dtype"),
             ({"a": {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}}, "shape"),
             ({"a": [1, 2]}, "not an object"), ({"__metadata__": {"a": 1}}, "__metadata__")]
    for header, message in cases:
        p.write_bytes(_raw(header, body))
        with pytest.raises(NpgptError, match=message):
            read_safetensors_header(p)
    p.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    with pytest.raises(NpgptError, match="header length"):
        read_safetensors_header(p)
    p.write_bytes(b"\x01\x02")
    with pytest.raises(NpgptError, match="too short"):
        read_safetensors_header(p)


def test_bf16_and_f16_upcast_exactly(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)           # truncate to bfloat16
    expect = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(bf16_to_f32(bits), expect) and np.abs(expect - x).max() < 0.01 * np.abs(x).max()
    p = tmp_path / "b.safetensors"
    h16 = x.astype(np.float16)
    p.write_bytes(_raw({"b": {"dtype": "BF16", "shape": [1000], "data_offsets": [0, 2000]},
                        "h": {"dtype": "F16", "shape": [1000], "data_offsets": [2000, 4000]}},
                       bits.tobytes() + h16.tobytes()))
    t = load_safetensors(p)
    assert t["b"].dtype == np.float32 and np.array_equal(t["b"], expect)
    assert t["h"].dtype == np.float32 and np.array_equal(t["h"], h16.astype(np.float32))


def test_non_finite_tensors_are_named():
    check_finite_tensors({"a": np.ones(3), "ids": np.array([1, 2])}, "f")
    with pytest.raises(NpgptError, match="tensor w holds NaN"):
        check_finite_tensors({"w": np.array([1.0, np.nan])}, "f")
    with pytest.raises(NpgptError, match="tensor w holds infinity"):
        check_finite_tensors({"w": np.array([np.inf], np.float32)}, "f")


@pytest.mark.parametrize("bias", [True, False])
def test_config_param_shapes_are_the_models_without_building_it(bias):
    from npgpt.model import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=bias, n_inner=12)
    assert cfg.param_shapes() == {n: tuple(p.shape) for n, p in GPT(cfg).named_parameters()}
