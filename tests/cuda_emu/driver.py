"""Compile a CUDA kernel string with g++ against cuda_emu.h and launch it on NumPy memory.

    kern = compile_kernel(source, "npgpt_layernorm_forward")            # cached by hash
    kern.launch(grid=(N,), block=(128,), args=(x, w, b, y, mean, rstd, np.int32(N), ...))

Array arguments are `DeviceArray`s (the emulated cupy's ndarray: NumPy memory playing device
memory). Each launch first checks every Python argument against the kernel's C parameter list, as
real CuPy does not: a pointer parameter takes a C-contiguous DeviceArray of exactly the pointee's
dtype (a host NumPy array, a Python number or a float64 array where `float*` is declared is an
error); a scalar parameter takes a NumPy scalar of exactly its type (`np.int32` for `int`,
`np.int64` for `long long`, `np.float32` for `float`). Real CuPy checks none of this: it passes a
Python int as an int64 and a Python float as a double whatever the kernel declares (a `float`
parameter then reads half a double), and an int given for a pointer becomes an address. Two arrays
that overlap where either is `__restrict__` and one is written is an error too.

A launch runs in a child process (the compiled program): a crash, a deadlock report or a
sanitizer's report comes back as a `KernelError` instead of taking the test run down. The arrays
travel on its stdin/stdout: arrays that overlap (an in-place kernel) are sent as one region, so
they still alias in the child. Arrays the kernel only reads (through `const` pointers) are
checked to be unchanged afterwards.

`sanitize="thread"` or `"address"` builds with g++'s ThreadSanitizer / AddressSanitizer: a race on
shared memory (a missing `__syncthreads`) or a read past an array's end is then a `KernelError`
carrying the sanitizer's report.

Compiled programs are cached by a hash of header, source, name, flags and compiler version in
$NPGPT_CUDA_EMU_CACHE, else <tmp>/npgpt-cuda-emu-<uid> (outside the repository).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEADER = Path(__file__).with_name("cuda_emu.h")
RUNTIME = Path(__file__).with_name("cuda_emu_runtime.cpp")
MIN_GCC = 12
WATCHDOG_S = 120.0        # the child reports no barrier progress for this long (an endless loop)
HARD_LIMIT_S = 1200.0     # the parent's last resort; a slow launch on a loaded machine is not a hang
SANITIZERS = {None: [], "thread": ["-fsanitize=thread"], "address": ["-fsanitize=address"]}


class LaunchError(TypeError):
    """The launch's Python arguments do not match the kernel (types, counts, dims)."""


class KernelError(RuntimeError):
    """The kernel failed while running: a deadlock, undefined warp use, a crash, a sanitizer report."""


class CompileError(RuntimeError):
    """g++ rejected the kernel source."""


class DeviceArray(np.ndarray):
    """A NumPy array playing a CuPy device array: results of device operations stay DeviceArrays,
    reductions and indexing give 0-d arrays (not Python scalars), `.get()` copies to the host."""

    def __array_wrap__(self, obj, context=None, return_scalar=False):
        return super().__array_wrap__(obj, context, False)

    def __getitem__(self, key):
        out = super().__getitem__(key)
        return np.asarray(out).view(DeviceArray) if isinstance(out, np.generic) else out

    def get(self):
        """Device -> host: a NumPy copy."""
        return np.array(self.view(np.ndarray), copy=True)

    @property
    def device(self):
        return _DEVICE0


class _Device:
    id = 0


_DEVICE0 = _Device()


# ---- the compiler -----------------------------------------------------------------------------
@functools.cache
def compiler_problem() -> str | None:
    """None when g++ >= 12 (C++20 <barrier>, std::source_location) is here, else why not."""
    gxx = shutil.which(os.environ.get("CXX", "g++"))
    if gxx is None:
        return "the CUDA emulator needs g++ >= 12 (C++20), and g++ is not on PATH"
    try:
        out = subprocess.run([gxx, "-dumpversion"], capture_output=True, text=True, timeout=30).stdout
        major = int(out.strip().split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return f"the CUDA emulator needs g++ >= 12; `g++ -dumpversion` failed ({e})"
    if major < MIN_GCC:
        return f"the CUDA emulator needs g++ >= {MIN_GCC} (C++20 <barrier>), found g++ {major}"
    return None


def cache_dir() -> Path:
    d = os.environ.get("NPGPT_CUDA_EMU_CACHE") or os.path.join(tempfile.gettempdir(), f"npgpt-cuda-emu-{os.getuid()}")
    path = Path(d)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:     # we run what is in there
        raise CompileError(f"the kernel cache {path} is not yours alone (owner or permissions); "
                           f"set NPGPT_CUDA_EMU_CACHE to a folder of your own")
    return path


# ---- the kernel's C parameters ---------------------------------------------------------------------
_SCALAR_TYPES = {
    "float": np.float32, "double": np.float64,
    "int": np.int32, "signed int": np.int32, "unsigned int": np.uint32, "unsigned": np.uint32,
    "long long": np.int64, "long long int": np.int64, "unsigned long long": np.uint64,
    "unsigned long long int": np.uint64, "int64_t": np.int64, "uint64_t": np.uint64,
    "int32_t": np.int32, "uint32_t": np.uint32, "size_t": np.uint64, "long": np.int64,
    "short": np.int16, "unsigned short": np.uint16, "char": np.int8, "signed char": np.int8,
    "unsigned char": np.uint8, "bool": np.bool_, "void": None,
}


@dataclass(frozen=True)
class Param:
    """One C parameter: `const float* __restrict__ x` -> Param('x', 'float', ptr=True, const=True, restrict=True)."""

    name: str
    base: str            # the C base type, e.g. "float", "long long"
    ptr: bool
    const: bool          # pointee const (pointers) or a const scalar
    restrict: bool

    @property
    def dtype(self):
        return None if _SCALAR_TYPES[self.base] is None else np.dtype(_SCALAR_TYPES[self.base])

    @property
    def ctype(self):
        """The type main() passes: `const float*`, `int` (a scalar's top-level const dropped)."""
        return (("const " if self.const else "") + self.base + "*") if self.ptr else self.base

    def __str__(self):
        return f"{self.ctype}{' __restrict__' if self.restrict else ''} {self.name}"


def parse_params(source: str, name: str) -> list[Param]:
    """The C parameters of `extern "C" __global__ void name(...)` in source."""
    m = re.search(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?' + re.escape(name) + r"\s*\(",
                  source)
    if m is None:
        raise CompileError(f'no `extern "C" __global__ void {name}(...)` in the kernel source')
    depth, i = 1, m.end()
    while depth:
        if i >= len(source):
            raise CompileError(f"unbalanced parentheses in the parameter list of {name}")
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        i += 1
    text = re.sub(r"//[^\n]*|/\*.*?\*/", " ", source[m.end():i - 1], flags=re.S).strip()
    params = []
    for raw in ([] if text in ("", "void") else text.split(",")):
        words = raw.replace("*", " * ").split()
        if len(words) < 2 or not re.fullmatch(r"[A-Za-z_]\w*", words[-1]):
            raise CompileError(f"{name}: cannot read parameter {raw.strip()!r}")
        pname, rest = words[-1], words[:-1]
        nptr = rest.count("*")
        if nptr > 1:
            raise CompileError(f"{name}: parameter {pname!r} is a pointer to a pointer (not emulated)")
        stars = [k for k, w in enumerate(rest) if w == "*"]
        before = rest[:stars[0]] if stars else rest
        after = rest[stars[0] + 1:] if stars else []
        restrict = "__restrict__" in rest or "__restrict" in rest
        const = "const" in before
        base = " ".join(w for w in before if w not in ("const", "volatile"))
        if any(w not in ("const", "__restrict__", "__restrict") for w in after):
            raise CompileError(f"{name}: cannot read parameter {raw.strip()!r}")
        if base not in _SCALAR_TYPES or (base == "void" and not nptr):
            raise CompileError(f"{name}: parameter type {base!r} of {pname!r} is not emulated")
        params.append(Param(pname, base, bool(nptr), const, restrict))
    return params


# ---- compiling -----------------------------------------------------------------------------------
@functools.cache
def _gxx_version(gxx):
    return subprocess.run([gxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]


def program_source(source: str, name: str, params: list[Param]) -> str:
    """The kernel's translation unit: the header, the kernel source unchanged (lines numbered as in
    the string), and the call the runtime makes once per CUDA thread."""
    call = ", ".join(f"cuda_emu::arg<{p.ctype}>({i})" for i, p in enumerate(params))
    return (f'#include "cuda_emu.h"\n#line 1 "{name}.cu"\n{source}\n#line 1 "cuda_emu_call"\n'
            f"void cuda_emu::call_kernel() {{ {name}({call}); }}\n")


def _build(gxx, args, what):
    proc = subprocess.run([gxx, *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise CompileError(f"g++ could not compile {what}:\n{proc.stderr[-4000:]}")


def _cached(stem, key_parts, build):
    """The cached file for these inputs, built by build(tmp_path) when missing (atomic rename:
    parallel test workers may build the same file)."""
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:20]
    path = cache_dir() / f"{stem}-{key}"
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            out = Path(tmp) / "out"
            build(out)
            os.replace(out, path)
    return path


def _flags(sanitize):
    if sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be one of {sorted(k for k in SANITIZERS if k)} or None, got {sanitize!r}")
    flags = ["-std=c++20", "-pthread", "-w", "-I", str(HEADER.parent)]
    return flags + (["-O1", "-g", "-fno-omit-frame-pointer"] if sanitize else ["-O1"]) + SANITIZERS[sanitize]


def _gxx():
    problem = compiler_problem()
    if problem:
        raise CompileError(problem)
    return shutil.which(os.environ.get("CXX", "g++"))


@functools.cache
def _runtime(sanitize):
    """The runtime's object file for this sanitizer mode (built once, cached)."""
    gxx, flags = _gxx(), _flags(sanitize)
    return _cached(f"runtime{'-' + sanitize if sanitize else ''}.o",
                   [HEADER.read_text(), " ".join(flags), _gxx_version(gxx), RUNTIME.read_text()],
                   lambda out: _build(gxx, [*flags, "-c", str(RUNTIME), "-o", str(out)], "the emulator runtime"))


@functools.cache
def compile_kernel(source: str, name: str, sanitize: str | None = None) -> "Kernel":
    """Compile kernel `name` from a CUDA source string (cached) -> a launchable Kernel."""
    flags, gxx = _flags(sanitize), _gxx()
    if re.search(r"extern\s+__shared__", source):
        raise CompileError(f"{name}: dynamic shared memory (extern __shared__) is not emulated")
    params = parse_params(source, name)
    runtime = _runtime(sanitize)
    program = program_source(source, name, params)

    def build(out):
        src = out.with_name(f"{name}.cpp")
        src.write_text(program)
        _build(gxx, [*flags, str(src), str(runtime), "-o", str(out)], name)

    key = [HEADER.read_text(), " ".join(flags), _gxx_version(gxx), program, runtime.name]
    exe = _cached(f"{name}{'-' + sanitize if sanitize else ''}", key, build)
    return Kernel(name, params, exe, sanitize)


def compile_all(jobs, workers=None):
    """compile_kernel over (source, name, sanitize) jobs, several g++ at once (one per CPU):
    warms the caches before tests launch the kernels one by one."""
    jobs = list(jobs)
    for sanitize in {j[2] for j in jobs}:
        _runtime(sanitize)
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda j: compile_kernel(*j), jobs))


# ---- launching -----------------------------------------------------------------------------------
def _dims(d, what):
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        d = (d,)
    if not isinstance(d, tuple) or not 1 <= len(d) <= 3 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in d):
        raise LaunchError(f"{what} must be an int or a tuple of 1 to 3 ints, got {d!r}")
    d = tuple(int(v) for v in d) + (1,) * (3 - len(d))
    if min(d) < 1:
        raise LaunchError(f"{what} {d} has a zero or negative dimension (CUDA: invalid configuration)")
    return d


class Kernel:
    """A compiled kernel: launch(grid, block, args) checks the arguments and runs it."""

    def __init__(self, name, params, exe, sanitize):
        self.name, self.params, self.exe, self.sanitize = name, params, exe, sanitize

    def signature(self):
        return f"{self.name}({', '.join(str(p) for p in self.params)})"

    def check_args(self, args):
        """Every Python argument against its C parameter; returns nothing, raises LaunchError."""
        if not isinstance(args, tuple):
            raise LaunchError(f"{self.name}: args must be a tuple (as CuPy's RawKernel takes), got {type(args).__name__}")
        if len(args) != len(self.params):
            raise LaunchError(f"{self.name}: {len(args)} arguments for {len(self.params)} parameters: {self.signature()}")
        for i, (a, p) in enumerate(zip(args, self.params)):
            where = f"{self.name}: argument {i} ({p})"
            if p.ptr:
                if not isinstance(a, DeviceArray):
                    kind = "a host NumPy array" if isinstance(a, np.ndarray) else f"a {type(a).__name__}"
                    raise LaunchError(f"{where} is {kind}; it takes a device array")
                if p.dtype is not None and a.dtype != p.dtype:
                    raise LaunchError(f"{where} takes {p.dtype} elements, got a {a.dtype} array")
                if not a.flags.c_contiguous:
                    raise LaunchError(f"{where}: the array is not C-contiguous (the kernel indexes it densely)")
                if not p.const and not a.flags.writeable:
                    raise LaunchError(f"{where}: the kernel writes it, but the array is read-only")
            else:
                if isinstance(a, np.ndarray):
                    raise LaunchError(f"{where} is a scalar parameter, got an array")
                if not isinstance(a, np.generic) or a.dtype != p.dtype:
                    got = f"{type(a).__name__} {a!r}" if not isinstance(a, np.generic) else f"np.{a.dtype}"
                    raise LaunchError(f"{where} takes np.{p.dtype}(...), got {got} "
                                      f"(CuPy would pass a Python int as an int64, a float as a double, unchecked)")

    def _regions(self, args):
        """Pointer arguments -> regions (merged overlapping byte ranges), each arg -> (region, offset)."""
        spans = [(i, a.ctypes.data, a.ctypes.data + a.nbytes) for i, a in enumerate(args) if self.params[i].ptr]
        for x in range(len(spans)):
            for y in range(x + 1, len(spans)):
                (i, s1, e1), (j, s2, e2) = spans[x], spans[y]
                if s1 < e2 and s2 < e1:
                    pi, pj = self.params[i], self.params[j]
                    if (pi.restrict or pj.restrict) and not (pi.const and pj.const):
                        raise LaunchError(f"{self.name}: arguments {i} ({pi}) and {j} ({pj}) overlap in memory, "
                                          f"but one is __restrict__ and one is written")
        regions = []        # [start, end, writable]
        where = {}
        for i, s, e in sorted(spans, key=lambda t: t[1]):
            if regions and s < regions[-1][1]:
                regions[-1][1] = max(regions[-1][1], e)
            else:
                regions.append([s, e, False])
            regions[-1][2] |= not self.params[i].const
            where[i] = (len(regions) - 1, s)
        return regions, {i: (r, s - regions[r][0]) for i, (r, s) in where.items()}

    def launch(self, grid, block, args, seed=0, watchdog_s=WATCHDOG_S):
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        if block[0] * block[1] * block[2] > 1024 or block[0] > 1024 or block[1] > 1024 or block[2] > 64:
            raise LaunchError(f"{self.name}: block {block} exceeds CUDA's limits (1024 threads; z <= 64)")
        if grid[0] > 2**31 - 1 or grid[1] > 65535 or grid[2] > 65535:
            raise LaunchError(f"{self.name}: grid {grid} exceeds CUDA's limits")
        self.check_args(args)
        regions, loc = self._regions(args)
        words = []
        for i, (a, p) in enumerate(zip(args, self.params)):
            if p.ptr:
                r, off = loc[i]
                words.append(f"r{r}+{off}")
            else:
                words.append(format(int.from_bytes(a.tobytes(), "little"), "x"))
        data = b"".join(ctypes.string_at(s, e - s) for s, e, _ in regions)
        argv = [str(self.exe), ",".join(map(str, grid)), ",".join(map(str, block)), str(int(seed)),
                str(float(watchdog_s)), ",".join(str(e - s) for s, e, _ in regions) or "-", *words]
        env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0",
                   ASAN_OPTIONS="detect_leaks=0 halt_on_error=1")
        try:
            proc = subprocess.run(argv, input=data, capture_output=True, timeout=max(HARD_LIMIT_S, 2 * watchdog_s), env=env)
        except subprocess.TimeoutExpired:
            raise KernelError(f"{self.name}: the launch did not finish in {max(HARD_LIMIT_S, 2 * watchdog_s):.0f} s") from None
        err = proc.stderr.decode(errors="replace")
        if proc.returncode != 0 or "Sanitizer" in err:
            what = {86: "failed", 66: "raced (ThreadSanitizer)"}.get(proc.returncode, f"exited with status {proc.returncode}")
            if proc.returncode in (-11, -7):    # SIGSEGV, SIGBUS
                what = "crashed on an invalid address (rerun with sanitize='address' to see which access)"
            raise KernelError(f"{self.name} {what} (grid {grid}, block {block}, seed {seed}):\n{err[-6000:]}")
        if err:                                   # a kernel's printf: shown with the test's output
            sys.stderr.write(err)
        out = proc.stdout
        if len(out) != len(data):
            raise KernelError(f"{self.name}: the child returned {len(out)} bytes of {len(data)}")
        pos = 0
        for s, e, writable in regions:
            n = e - s
            chunk = out[pos:pos + n]
            if writable:
                ctypes.memmove(s, chunk, n)
            elif chunk != data[pos:pos + n]:
                raise KernelError(f"{self.name} wrote into an array it takes through a const pointer")
            pos += n
