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


class _FakeStream:
    def __init__(self, fail=False):
        self.calls, self.fail = 0, fail

    def synchronize(self):
        self.calls += 1
        if self.fail:
            raise RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")


def _fake_cupy(stream):
    import types
    null = _FakeStream()
    cuda = types.SimpleNamespace(get_current_stream=lambda: stream, Stream=types.SimpleNamespace(null=null))
    return types.SimpleNamespace(cuda=cuda, ndarray=type("FakeArray", (), {})), null


def test_synchronize_waits_on_the_current_stream(monkeypatch):
    stream = _FakeStream()
    fake, null = _fake_cupy(stream)
    monkeypatch.setattr(backend, "_cupy", fake)
    backend.synchronize()
    assert stream.calls == 1 and null.calls == 0       # the stream the work was queued on
    backend.synchronize(np.zeros(2))                    # a NumPy array: nothing to wait for
    assert stream.calls == 1


def test_synchronize_lets_asynchronous_cuda_errors_through(monkeypatch):
    fake, _ = _fake_cupy(_FakeStream(fail=True))
    monkeypatch.setattr(backend, "_cupy", fake)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        backend.synchronize()
