"""A CUDA emulator for npgpt's raw kernels: they run on the CPU in every CI run.

    cuda_emu.h     the CUDA built-ins (threadIdx, __shared__, __syncthreads, warp shuffles, ...)
                   for g++ -std=c++20, included before the kernel source
    cuda_emu_runtime.cpp   one std::thread per CUDA thread, barriers as std::barrier, deadlock
                   reports, the watchdog, main(); compiled once per sanitizer mode and linked in
    driver.py      compiles a kernel string (cached by hash), checks each launch's Python arguments
                   against the kernel's C parameters, runs it on NumPy memory in a child process
    fake_cupy.py   an emulated cupy module, installed with npgpt.backend.substitute_cupy

What it cannot tell: timing, memory coalescing, the GPU's own float rounding (expf and friends
differ by ulps), CuPy's ElementwiseKernel/ReductionKernel code generation, cuBLAS.
"""

from .driver import (CompileError, DeviceArray, KernelError, LaunchError, compile_all, compile_kernel,
                     compiler_problem, parse_params)
from .fake_cupy import FakeCupy

__all__ = ["CompileError", "DeviceArray", "FakeCupy", "KernelError", "LaunchError", "compile_all", "compile_kernel",
           "compiler_problem", "parse_params"]
