"""kernels.cpu_build: where a kernel library is cached, and that a build from another CPU is never reused."""

from __future__ import annotations

import os

from kernels import cpu_build, cpu_decode


def test_a_library_is_named_by_the_cpu_it_was_built_for(monkeypatch, tmp_path):
    """-march=native builds for the CPU at hand: a cache shared by machines of two CPUs (one home directory)
    holds one library per CPU, and the same CPU, sources and flags find the same one."""
    monkeypatch.setenv("GEMMA_CACHE", str(tmp_path))
    flags = ("-march=native",)

    def path(cpu: set[str], compiler: str = "/usr/bin/g++") -> str:
        monkeypatch.setattr(cpu_build, "cpu_flags", lambda: frozenset(cpu))
        return cpu_build.library_path(cpu_decode.SOURCE, flags, compiler)

    zen = path({"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"})
    xeon = path({"avx512f", "avx512bw"})
    assert zen != xeon
    assert path({"avx512_vnni", "avx512_bf16", "avx512bw", "avx512f"}) == zen  # flag order does not matter
    assert path({"avx512f", "avx512bw"}, "/opt/gcc-14/bin/g++") != xeon
    assert cpu_build.library_path(cpu_decode.SOURCE, ("-march=native", "-O2"), "/usr/bin/g++") != xeon
    assert os.path.dirname(zen) == str(tmp_path) and os.path.basename(zen).startswith("cpu_decode-")
