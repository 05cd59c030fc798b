"""Checkpoint files and folders: round trips, atomic swaps, crashes (injected and SIGKILL), tampering."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from npgpt.checkpoint import (atomic_write_bytes, atomic_write_json, atomic_write_text, checkpoint_writer,
                              find_checkpoint, has_checkpoint, load_tensors,
                              save_tensors, verify_checkpoint)
from npgpt.errors import NpgptError


def write_fake_checkpoint(folder, version, n=1000):
    """The files a trainer writes, each stamped with `version` so a mix of two saves is detectable."""
    atomic_write_json(folder / "config.json", {"version": version})
    save_tensors(folder / "model.safetensors", {"w": np.full((n,), version, np.float32)})
    save_tensors(folder / "optimizer.safetensors", {"exp_avg.w": np.full((n,), -version, np.float32)})
    atomic_write_json(folder / "state.json", {"iter": version})


def read_version(folder):
    """The version of a checkpoint, asserting every file agrees on it."""
    v = json.loads((folder / "config.json").read_text())["version"]
    assert load_tensors(folder / "model.safetensors")["w"][0] == v
    assert load_tensors(folder / "optimizer.safetensors")["exp_avg.w"][0] == -v
    assert json.loads((folder / "state.json").read_text())["iter"] == v
    return v


def test_atomic_writes_round_trip(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "sub" / "b.txt", "héllo\r\n")
    atomic_write_json(tmp_path / "c.json", {"x": np.float32(1.5), "big": 2**100, "inf": float("inf"),
                                            "arr": np.arange(3)})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_bytes() == "héllo\r\n".encode()
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1.5, "big": 2**100, "inf": float("inf"),
                                                             "arr": [0, 1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "c.json", "sub"]   # no temp files left


def test_failed_atomic_write_keeps_old_file(tmp_path):
    p = tmp_path / "c.json"
    atomic_write_json(p, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"v": object()})
    assert json.loads(p.read_text()) == {"v": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["c.json"]


def test_tensors_round_trip_and_metadata(tmp_path):
    t = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, 2], np.int64)}
    save_tensors(tmp_path / "t.safetensors", t, metadata={"format": "pt", "step": 3})
    back = load_tensors(tmp_path / "t.safetensors")
    assert set(back) == {"a", "b"}
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
        assert back[k].dtype == t[k].dtype


def test_load_tensors_missing_truncated_corrupt(tmp_path):
    with pytest.raises(NpgptError, match="does not exist"):
        load_tensors(tmp_path / "nope.safetensors")
    p = tmp_path / "t.safetensors"
    save_tensors(p, {"a": np.zeros(100, np.float32)})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 10])
    with pytest.raises(NpgptError, match="truncated or corrupt"):
        load_tensors(p)
    p.write_bytes(b"\xff" * 64)
    with pytest.raises(NpgptError, match="truncated or corrupt"):
        load_tensors(p)


def test_checkpoint_writer_round_trip_and_replace(tmp_path):
    run = tmp_path / "run"
    assert not has_checkpoint(run)
    with pytest.raises(NpgptError, match="no checkpoint in .*npgpt train --out"):
        find_checkpoint(run)
    with checkpoint_writer(run) as tmp:
        assert tmp == run / "ckpt.tmp" and not any(tmp.iterdir())
        write_fake_checkpoint(tmp, 1)
    assert has_checkpoint(run)
    ckpt = find_checkpoint(run)
    assert ckpt == run / "ckpt" and find_checkpoint(ckpt) == ckpt
    assert verify_checkpoint(ckpt) is True and read_version(ckpt) == 1
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "optimizer.safetensors", "state.json"}
    with checkpoint_writer(run) as tmp:
        write_fake_checkpoint(tmp, 2)
    assert read_version(find_checkpoint(run)) == 2
    assert sorted(p.name for p in run.iterdir()) == ["ckpt"]


def test_exception_inside_writer_leaves_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    with checkpoint_writer(run) as tmp:
        write_fake_checkpoint(tmp, 1)
    before = {p.name: p.read_bytes() for p in (run / "ckpt").iterdir()}
    with pytest.raises(RuntimeError, match="disk on fire"):
        with checkpoint_writer(run) as tmp:
            atomic_write_json(tmp / "config.json", {"version": 2})
            save_tensors(tmp / "model.safetensors", {"w": np.full(1000, 2, np.float32)})
            raise RuntimeError("disk on fire")
    assert sorted(p.name for p in run.iterdir()) == ["ckpt"]
    assert {p.name: p.read_bytes() for p in (run / "ckpt").iterdir()} == before
    assert verify_checkpoint(find_checkpoint(run)) and read_version(run / "ckpt") == 1


def test_leftover_tmp_is_ignored_and_cleared(tmp_path):
    run = tmp_path / "run"
    with checkpoint_writer(run) as tmp:
        write_fake_checkpoint(tmp, 1)
    (run / "ckpt.tmp").mkdir()
    (run / "ckpt.tmp" / "config.json").write_text("{half")
    assert read_version(find_checkpoint(run)) == 1
    with checkpoint_writer(run) as tmp:
        assert not any(tmp.iterdir())
        write_fake_checkpoint(tmp, 2)
    assert read_version(find_checkpoint(run)) == 2


def test_crash_between_the_two_renames_is_recovered(tmp_path):
    run = tmp_path / "run"
    with checkpoint_writer(run) as tmp:
        write_fake_checkpoint(tmp, 1)
    os.rename(run / "ckpt", run / "ckpt.old")        # first rename done, second never happened
    (run / "ckpt.tmp").mkdir()
    assert has_checkpoint(run)
    ckpt = find_checkpoint(run)
    assert ckpt == run / "ckpt" and not (run / "ckpt.old").exists()
    assert verify_checkpoint(ckpt) and read_version(ckpt) == 1
    # passing the (missing) ckpt folder itself works too
    os.rename(run / "ckpt", run / "ckpt.old")
    assert find_checkpoint(run / "ckpt") == run / "ckpt"
    # and a later save with both ckpt and a stale ckpt.old present still swaps cleanly
    (run / "ckpt.old").mkdir()
    with checkpoint_writer(run) as tmp:
        write_fake_checkpoint(tmp, 2)
    assert read_version(find_checkpoint(run)) == 2 and not (run / "ckpt.old").exists()


def test_plain_model_folder_without_manifest_is_accepted(tmp_path):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    save_tensors(hf / "model.safetensors", {"w": np.zeros(3, np.float32)})
    assert find_checkpoint(hf) == hf
    assert verify_checkpoint(hf) is False


def test_truncated_or_tampered_file_is_detected(tmp_path):
    run = tmp_path / "run"
    with checkpoint_writer(run) as tmp:
        write_fake_checkpoint(tmp, 1)
    ckpt = run / "ckpt"
    model = ckpt / "model.safetensors"
    good = model.read_bytes()
    tampered = bytearray(good)
    tampered[-1] ^= 0xFF                             # same size, one flipped byte
    model.write_bytes(bytes(tampered))
    with pytest.raises(NpgptError, match="model.safetensors is truncated or modified since it was saved"):
        verify_checkpoint(ckpt)
    model.write_bytes(good[:-4])
    with pytest.raises(NpgptError, match="truncated or modified"):
        verify_checkpoint(ckpt)
    model.unlink()
    with pytest.raises(NpgptError, match="missing"):
        verify_checkpoint(ckpt)
    (ckpt / "manifest.json").write_text("{not json")
    with pytest.raises(NpgptError, match="damaged"):
        verify_checkpoint(ckpt)


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint import write_fake_checkpoint
    from npgpt.checkpoint import checkpoint_writer, atomic_write_json

    run = Path(sys.argv[1])
    mode = sys.argv[2]
    with checkpoint_writer(run) as tmp:
        write_fake_checkpoint(tmp, 1)
    version = 2
    while True:
        with checkpoint_writer(run) as tmp:
            if mode == "slow":
                atomic_write_json(tmp / "config.json", {{"version": version}})
                print("mid-save", flush=True)
                for i in range(1000):                       # a slow writer, killed in here
                    atomic_write_json(tmp / f"part{{i}}.json", {{"i": i}})
                    time.sleep(0.01)
            else:
                print("saving", flush=True)
                write_fake_checkpoint(tmp, version, n=200_000)
        version += 1
""")


def _start_child(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=os.path.dirname(__file__)))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), mode],
                            stdout=subprocess.PIPE, text=True)


def test_sigkill_mid_save_leaves_previous_checkpoint(tmp_path):
    child = _start_child(tmp_path, "slow")
    try:
        assert child.stdout.readline().strip() == "mid-save"
        time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (tmp_path / "run" / "ckpt.tmp").exists()        # the kill really hit mid-save
    ckpt = find_checkpoint(tmp_path / "run")
    assert verify_checkpoint(ckpt) and read_version(ckpt) == 1


def test_sigkill_at_random_moments_always_leaves_one_complete_checkpoint(tmp_path):
    """Saves in a loop (writes, manifest, renames), killed at varied moments: always one whole save."""
    for delay in (0.02, 0.11, 0.23, 0.37):
        child = _start_child(tmp_path, "loop")
        try:
            assert child.stdout.readline().strip() == "saving"
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        ckpt = find_checkpoint(tmp_path / "run")
        assert verify_checkpoint(ckpt)
        assert read_version(ckpt) >= 1
