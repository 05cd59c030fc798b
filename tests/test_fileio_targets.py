"""The atomic writer looks at its target first: modes follow the umask (or the replaced file), devices
and FIFOs are written through, links out of the folder and other special files are refused."""

import os
import stat
import threading

import pytest

from npgpt.errors import NpgptError
from npgpt.fileio import atomic_write_bytes, atomic_write_json, current_umask, write_files_atomically


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_the_umask_mode_not_0600(tmp_path, umask_022):
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    write_files_atomically(tmp_path / "tok", {"vocab.json": "{}"})
    assert mode_of(tmp_path / "a.bin") == 0o644
    assert mode_of(tmp_path / "tok" / "vocab.json") == 0o644
    os.umask(0o077)
    atomic_write_json(tmp_path / "b.json", {"a": 1})
    assert mode_of(tmp_path / "b.json") == 0o600
    assert current_umask() == 0o077


def test_replacing_keeps_the_files_mode(tmp_path, umask_022):
    target = tmp_path / "c.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and mode_of(target) == 0o640


def test_dev_null_is_written_through_not_replaced(tmp_path):
    atomic_write_bytes("/dev/null", b"hello")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_fifo_is_written_through(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    atomic_write_bytes(fifo, b"through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]           # no temporary file left


def test_link_inside_the_folder_replaces_its_target_and_stays_a_link(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to("real.json")
    atomic_write_json(link, {"n": 2})
    assert link.is_symlink() and '"n": 2' in real.read_text()


def test_link_out_of_the_folder_is_refused_and_its_target_kept(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").symlink_to(victim)
    with pytest.raises(NpgptError, match="symbolic link .* outside its folder"):
        atomic_write_json(out / "config.json", {})
    assert victim.read_text() == "keep me" and (out / "config.json").is_symlink()


def test_a_folder_or_socket_in_the_way_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(NpgptError, match="is a folder"):
        atomic_write_bytes(tmp_path / "d", b"x")
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "sock"))
    try:
        with pytest.raises(NpgptError, match="not a regular file"):
            atomic_write_bytes(tmp_path / "sock", b"x")
    finally:
        s.close()


def test_a_device_inside_a_file_set_is_refused_and_nothing_written(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    os.mkfifo(folder / "merges.txt")
    with pytest.raises(NpgptError, match="device or FIFO"):
        write_files_atomically(folder, {"vocab.json": "{}", "merges.txt": ""})
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt"]
