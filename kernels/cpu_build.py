"""Builds and registers the CPU kernel libraries (cpu_dense.cc, cpu_decode.cc, cpu_quantized.cc) on first use.

Each library is compiled with the system C++ compiler into a cache directory ($GEMMA_CACHE,
default ~/.cache/gemma3-jax), named by a hash of its sources, flags, compiler, jax version and the CPU's
instruction sets, and its FFI handlers are registered with XLA for the CPU platform. `load` is the one
entry point the kernel modules use: the CPU check, GEMMA_NO_CPU_KERNELS, the build and the warning when
it fails.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings

import jax

HERE = os.path.dirname(__file__)
HEADERS = (os.path.join(HERE, "cpu_parallel.h"),)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (/proc/cpuinfo), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# XLA:CPU's default scheduler optimizes for concurrency: it hoists work that waits on nothing (every layer's
# widened quantized weights in a prefill) to run beside other work and holds all of it at once. The
# memory-minimizing one is no slower here and holds one layer's temporaries (benchmarks/RESULTS.md, Quantized).
# XLA reads the option from XLA_FLAGS only (a jit's compiler_options do not reach it), when a backend starts.
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def prefer_memory_scheduler() -> bool:
    """Adds SCHEDULER_FLAG to XLA_FLAGS for this process (the command line and benchmarks call it first) unless
    XLA_FLAGS already sets that option. True when it is in effect: False once a backend has started (the flag is
    then read already) or where XLA_FLAGS chose otherwise."""
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    name = SCHEDULER_FLAG.split("=")[0]
    if name in flags:
        return SCHEDULER_FLAG in flags.split()
    if xla_bridge.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}".strip()
    return True


def cache_dir() -> str:
    """The project's cache directory: $GEMMA_CACHE, default ~/.cache/gemma3-jax (kernel builds, compiled XLA
    programs, tokenizers built from GGUF vocabularies)."""
    return os.environ.get("GEMMA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gemma3-jax"))


def library_path(source: str, flags: tuple[str, ...], compiler: str) -> str:
    """Where the build of `source` lives in the cache: named by a hash of its sources, the flags, the
    compiler, jax's version and this CPU's instruction sets (a library built with -march=native on one CPU
    may hold instructions another lacks, and a home directory can be shared by machines of several CPUs)."""
    digest = hashlib.sha256(" ".join(flags).encode() + jax.__version__.encode() + compiler.encode())
    digest.update(" ".join(sorted(cpu_flags())).encode())
    for path in (source, *HEADERS):
        with open(path, "rb") as f:
            digest.update(f.read())
    name = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(cache_dir(), f"{name}-{digest.hexdigest()[:16]}.so")


def build(source: str, flags: tuple[str, ...], symbols: list[str]) -> None:
    """Compiles `source` with `flags` (cached) and registers `symbols` as XLA FFI targets for the CPU.
    Raises OSError or subprocess.SubprocessError when there is no compiler or the build fails."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise OSError("no C++ compiler (set CXX or install g++)")
    lib = library_path(source, flags, compiler)
    if not os.path.exists(lib):
        os.makedirs(os.path.dirname(lib), exist_ok=True)
        tmp = f"{lib}.{os.getpid()}.tmp"
        subprocess.run([compiler, "-O3", *flags, "-shared", "-fPIC", "-std=c++17", "-w", f"-I{HERE}",
                        f"-I{jax.ffi.include_dir()}", source, "-o", tmp], check=True, capture_output=True, timeout=300)
        os.replace(tmp, lib)
    handle = ctypes.cdll.LoadLibrary(lib)
    for symbol in symbols:
        jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")


def load(source: str, flags: tuple[str, ...], symbols: list[str], needs: set[str], what: str, fallback: str) -> bool:
    """True once `source` is built with `flags` and `symbols` are registered (see build); False without
    building where GEMMA_NO_CPU_KERNELS is set or the CPU lacks a flag of `needs`, and False with a warning
    naming `what` and the `fallback` callers take when there is no compiler or the build fails."""
    if os.environ.get("GEMMA_NO_CPU_KERNELS") or not set(needs) <= cpu_flags():
        return False
    try:
        build(source, flags, symbols)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        warnings.warn(f"{what} unavailable ({e} {detail[-400:].decode(errors='replace')}); {fallback}")
        return False
    return True
