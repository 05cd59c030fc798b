"""Device strings, array helpers and the clear errors for unusable GPUs."""

import numpy as np
import pytest

from npgpt import backend
from npgpt.backend import Device, asnumpy, get_xp, parse_device, to_device
from npgpt.errors import NpgptError


@pytest.mark.parametrize("s, expected", [
    ("cpu", Device("cpu")), ("CPU", Device("cpu")), ("gpu", Device("cuda", 0)), ("cuda", Device("cuda", 0)),
    ("cuda:3", Device("cuda", 3)), ("gpu:1", Device("cuda", 1)),
])
def test_parse_device(s, expected):
    assert parse_device(s) == expected


@pytest.mark.parametrize("s", ["tpu", "cuda:x", "cuda:-1", "", "mps"])
def test_unknown_device_is_a_clear_error(s, monkeypatch):
    monkeypatch.delenv("NPGPT_DEVICE", raising=False)
    with pytest.raises(NpgptError, match="unknown device"):
        parse_device(s)


def test_env_var_sets_default(monkeypatch):
    monkeypatch.setenv("NPGPT_DEVICE", "cuda:2")
    assert parse_device(None) == Device("cuda", 2)
    monkeypatch.setenv("NPGPT_DEVICE", "cpu")
    assert parse_device(None) == Device("cpu")


def test_numpy_helpers():
    a = np.arange(3.0)
    assert get_xp(a) is np and get_xp(1.0) is np
    assert to_device(a, "cpu") is a or np.array_equal(to_device(a, "cpu"), a)
    assert isinstance(asnumpy(a), np.ndarray)


def test_gpu_without_cupy_names_the_fix(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_error", ImportError("No module named 'cupy'"))
    with pytest.raises(NpgptError, match=r"pip install 'npgpt\[gpu\]'"):
        to_device(np.ones(2), "gpu")


def test_gpu_without_a_device_is_clear(monkeypatch):
    class FakeRuntime:
        @staticmethod
        def getDeviceCount():
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    class FakeCupy:
        class cuda:
            runtime = FakeRuntime

    monkeypatch.setattr(backend, "_cupy", FakeCupy)
    with pytest.raises(NpgptError, match="no usable CUDA GPU"):
        backend.require_gpu(Device("cuda", 0))


def test_seed_everything_reproduces_numpy_draws():
    backend.seed_everything(7)
    a = np.random.rand(3)
    backend.seed_everything(7)
    np.testing.assert_array_equal(a, np.random.rand(3))
