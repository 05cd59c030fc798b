"""An emulated `cupy`: just wide enough that npgpt.ops.cuda_kernels' wrappers run unmodified.

Arrays are `DeviceArray`s (NumPy memory playing device memory); array functions are NumPy's,
with their results kept on the "device"; `RawKernel` compiles the CUDA source with g++ against
cuda_emu.h and launches it through the driver, which checks every argument against the kernel's
C parameters. Install it with npgpt's test seam, never through sys.modules:

    from npgpt.backend import substitute_cupy
    with substitute_cupy(FakeCupy(seed=3)) as cp:
        y, mean, rstd = cuda_kernels.layernorm_forward(cp.asarray(x), cp.asarray(w), None)

Like CuPy, device functions refuse host NumPy arrays (a TypeError), so a wrapper that forgets to
move an input fails here too. `ElementwiseKernel` and `ReductionKernel` are not emulated: CuPy
generates their code, and reproducing that generator would test the reproduction, not CuPy.
"""

from __future__ import annotations

import types

import numpy as np

from .driver import DeviceArray, compile_kernel


def _to_device(out):
    """A NumPy result of a device operation -> a DeviceArray (0-d for scalars, as CuPy)."""
    if isinstance(out, DeviceArray):
        return out
    if isinstance(out, (np.ndarray, np.generic)):
        return np.asarray(out).view(DeviceArray)
    if isinstance(out, tuple):
        return tuple(_to_device(o) for o in out)
    return out


def _refuse_host(args, kwargs, name):
    for a in list(args) + list(kwargs.values()):
        if type(a) is np.ndarray:
            raise TypeError(f"cupy.{name}: unsupported type numpy.ndarray (a host array; use cupy.asarray)")


class RawKernel:
    """cupy.RawKernel(code, name): compiled on first call; call as kernel(grid, block, args)."""

    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False, *, _emu=None):
        self.code, self.name, self.options, self._emu = code, name, options, _emu
        self._kernel = None

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False):
        if shared_mem:
            raise NotImplementedError("cuda_emu: dynamic shared memory (shared_mem > 0) is not emulated")
        if self._kernel is None:
            self._kernel = compile_kernel(self.code, self.name, sanitize=self._emu.sanitize)
        self._emu.launched.append(self.name)
        for hook in self._emu.before_launch:
            hook(self.name, args)
        self._kernel.launch(grid, block, args, seed=self._emu.next_seed())


class _NotEmulated:
    def __init__(self, what):
        self.what = what

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"cuda_emu: cupy.{self.what} is not emulated (CuPy generates its code; "
                                  f"only RawKernel sources run on the emulator)")


class _Stream:
    def synchronize(self):
        pass


class FakeCupy:
    """The emulated cupy module. seed: block order of the first launch (each launch takes the next
    seed); sanitize: None, "thread" or "address" (g++'s sanitizers for every kernel compiled)."""

    ndarray = DeviceArray

    def __init__(self, seed=0, sanitize=None):
        self.seed, self.sanitize = int(seed), sanitize
        self.launched: list[str] = []          # kernel names, in launch order
        self.before_launch: list = []          # hooks f(name, args) run just before each launch
        self.cuda = types.SimpleNamespace(
            get_current_stream=lambda: _Stream(),
            Device=lambda i=0: types.SimpleNamespace(id=i, __enter__=lambda s: s, __exit__=lambda *a: None),
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
        self.ElementwiseKernel = _NotEmulated("ElementwiseKernel")
        self.ReductionKernel = _NotEmulated("ReductionKernel")

    def __repr__(self):
        return f"<emulated cupy (tests/cuda_emu), seed {self.seed}, sanitize {self.sanitize}>"

    def next_seed(self):
        s = self.seed
        self.seed += 1
        return s

    def RawKernel(self, code, name, options=(), **kw):
        return RawKernel(code, name, options, _emu=self, **kw)

    # ---- host <-> device ----
    def asarray(self, a, dtype=None, order=None):
        if isinstance(a, DeviceArray):
            return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
        return np.array(a, dtype=dtype, order=order or "K", copy=True).view(DeviceArray)   # host -> device

    def array(self, a, dtype=None, copy=True, order="K"):
        return np.array(a, dtype=dtype, copy=copy, order=order).view(DeviceArray)

    def ascontiguousarray(self, a, dtype=None):
        if not isinstance(a, DeviceArray):
            a = self.asarray(a)
        return np.ascontiguousarray(a, dtype=dtype).view(DeviceArray)

    def asnumpy(self, a):
        return a.get() if isinstance(a, DeviceArray) else np.asarray(a)

    def may_share_memory(self, a, b, max_work=None):
        return np.may_share_memory(a, b)

    def get_array_module(self, *arrays):
        return self if any(isinstance(a, DeviceArray) for a in arrays) else np

    # ---- everything else: NumPy's function, its result kept on the device ----
    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, types.ModuleType):       # numpy.random, numpy.linalg: not a device's
            raise AttributeError(f"cuda_emu: cupy.{name} is not emulated")
        if isinstance(attr, type) or not callable(attr):
            return attr                        # dtypes (float32, int64), constants (nan, pi)

        def device_fn(*args, **kwargs):
            _refuse_host(args, kwargs, name)
            return _to_device(attr(*args, **kwargs))

        device_fn.__name__ = name
        return device_fn
