"""Array backends: NumPy on the CPU, CuPy on the GPU.

This is the only module in npgpt that imports cupy. Everything else asks for the array module of
the array it holds (`xp = get_xp(x)`, the first line of most ops), so one code path serves both.

Devices are named by strings: `cpu`, `gpu` / `cuda` (GPU 0) and `cuda:N`. The `NPGPT_DEVICE`
environment variable sets the default. Asking for a GPU that cannot be used raises an
`NpgptError` naming the fix, never a traceback from CuPy's internals.
"""

from __future__ import annotations

import os
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from npgpt.errors import NpgptError

GPU_HINT = "install CuPy with `pip install 'npgpt[gpu]'` (CUDA 12) or `pip install 'npgpt[gpu-cuda13]'`"

_cupy = None          # the cupy module once imported successfully
_cupy_error = None    # why importing it failed, if it did


def _import_cupy():
    """Import cupy once; remember the failure so repeated asks stay cheap."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy  # the one cupy import in npgpt

            _cupy = cupy
        except Exception as e:  # ImportError, or a broken CUDA install raising anything
            _cupy_error = e
    return _cupy


@contextmanager
def substitute_cupy(module):
    """Test seam: within the block, npgpt takes `module` for cupy (`cupy_module()`, `get_xp`,
    `is_gpu_array`, ...). The test suite passes tests/cuda_emu's emulated cupy, so the wrappers
    of npgpt.ops.cuda_kernels run unmodified with their raw kernels compiled by g++ on the CPU.
    Process-wide while the block runs (not for use beside other threads); the previous module,
    or the failure to import one, is back afterwards."""
    global _cupy, _cupy_error
    prev = _cupy, _cupy_error
    _cupy, _cupy_error = module, None
    try:
        yield module
    finally:
        _cupy, _cupy_error = prev


@dataclass(frozen=True)
class Device:
    """A parsed device: kind 'cpu' or 'cuda', and the GPU index."""

    kind: str
    index: int = 0
    given: str = field(default="", compare=False)   # as the user spelled it ("gpu"), for messages

    def __str__(self):
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def option(self):
        """How error messages name it: the user's own words (`--device gpu`), else the canonical form."""
        return self.given or str(self)

    @property
    def is_gpu(self):
        return self.kind == "cuda"


def parse_device(device: str | Device | None = None) -> Device:
    """Turn 'cpu', 'gpu', 'cuda', 'cuda:N' (or None: $NPGPT_DEVICE, else cpu) into a Device."""
    if isinstance(device, Device):
        return device
    if device is None:
        device = os.environ.get("NPGPT_DEVICE", "cpu") or "cpu"
    s = str(device).strip().lower()
    if s == "cpu":
        return Device("cpu")
    if s in ("gpu", "cuda"):
        return Device("cuda", 0, given=str(device).strip())
    m = re.fullmatch(r"(?:cuda|gpu):(\d+)", s)
    if m:
        return Device("cuda", int(m.group(1)))
    raise NpgptError(f"unknown device {device!r}: use cpu, gpu, cuda or cuda:N")


def require_gpu(device: Device):
    """Return cupy after checking that `device`'s GPU is usable; else a clear NpgptError."""
    cp = _import_cupy()
    if cp is None:
        raise NpgptError(f"--device {device.option} needs CuPy, which is not usable here ({_cupy_error.__class__.__name__}): {GPU_HINT}")
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise NpgptError(f"--device {device.option}: CuPy found no usable CUDA GPU ({str(e).splitlines()[0][:120]}); "
                         f"check the NVIDIA driver, or use --device cpu") from None
    if device.index >= n:
        raise NpgptError(f"--device {device.option}: only {n} GPU(s) visible (cuda:0..cuda:{n - 1})")
    return cp


def cupy_module():
    """The imported cupy module (for code that builds GPU kernels or calls cuBLAS), or a clear
    NpgptError when CuPy is not usable here. Other modules never `import cupy` themselves."""
    cp = _import_cupy()
    if cp is None:
        raise NpgptError(f"this needs CuPy, which is not usable here "
                         f"({_cupy_error.__class__.__name__}): {GPU_HINT}")
    return cp


def free_memory(device: str | Device | None = "cpu") -> int | None:
    """Bytes that can still be allocated on `device`, or None where it cannot be told. The host's is
    MemAvailable (/proc/meminfo), lowered to a cgroup's remaining limit (a container); a GPU's is the
    driver's free memory plus what CuPy's pool holds unused."""
    dev = parse_device(device)
    if dev.is_gpu:
        cp = cupy_module()
        with cp.cuda.Device(dev.index):
            free = cp.cuda.runtime.memGetInfo()[0]
            pool = cp.get_default_memory_pool()
            return int(free + pool.total_bytes() - pool.used_bytes())
    sizes = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    sizes.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = open("/sys/fs/cgroup/memory.current").read().strip()
        if limit.isdigit() and used.isdigit():
            sizes.append(max(0, int(limit) - int(used)))
    except OSError:
        pass
    return min(sizes) if sizes else None


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:,.1f} GiB" if n < 2 ** 50 else f"{float(n):.3g} bytes"


def check_fits(n_bytes: int, what: str, device: str | Device | None = "cpu", hint: str = "") -> None:
    """NpgptError when `n_bytes` (what is about to be allocated) exceeds the device's free memory, so
    an impossible size (`--set n_embd=10**18`) is one line before NumPy or CuPy is asked for it."""
    free = free_memory(device)
    if free is not None and n_bytes > free:
        raise NpgptError(f"{what} needs about {_gib(n_bytes)} but {parse_device(device)} has {_gib(free)} free"
                         + (f"; {hint}" if hint else ""))


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one GPU (used to skip GPU tests)."""
    try:
        require_gpu(Device("cuda", 0))
        return True
    except NpgptError:
        return False


def get_xp(*arrays):
    """The array module (numpy or cupy) that owns these arrays. NumPy for plain Python values."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def is_gpu_array(a) -> bool:
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def device_of(a) -> Device:
    """The Device an array lives on."""
    if is_gpu_array(a):
        return Device("cuda", a.device.id)
    return Device("cpu")


def to_device(a, device: str | Device | None):
    """Copy (or pass through) array `a` onto `device`."""
    dev = parse_device(device)
    if not dev.is_gpu:
        return asnumpy(a)
    cp = require_gpu(dev)
    with cp.cuda.Device(dev.index):
        if isinstance(a, cp.ndarray) and a.device.id == dev.index:
            return a
        return cp.asarray(a)


def asnumpy(a):
    """A NumPy array from a NumPy or CuPy array (a device->host copy for CuPy)."""
    if is_gpu_array(a):
        return a.get()
    return np.asarray(a)


def xp_for(device: str | Device | None):
    """The array module for a device."""
    dev = parse_device(device)
    return require_gpu(dev) if dev.is_gpu else np


def seed_everything(seed: int):
    """Seed Python's, NumPy's global and (if present) CuPy's random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if _cupy is not None:
        try:
            _cupy.random.seed(seed % 2**32)
        except Exception:  # no GPU: nothing to seed
            pass


def synchronize(a=None):
    """Wait for queued GPU work (a no-op on the CPU). Use only at timing and log points."""
    # The current stream, not the null stream: work queued on a non-default stream (CuPy's
    # `with stream:`) is what the caller timed. Errors pass through, so an asynchronous CUDA fault
    # (an illegal address in a kernel) surfaces here instead of as a silently short timing.
    if _cupy is not None and (a is None or is_gpu_array(a)):
        _cupy.cuda.get_current_stream().synchronize()
