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


_PROBE = """
import json, os, sys
import jax, jax.numpy as jnp
from kernels import cpu_build
if sys.argv[1] == "late":
    jax.devices()  # a backend starts first: too late for the flag
took = cpu_build.prefer_memory_scheduler()

def layers(x, ws):  # every layer's widened weight waits on nothing: the concurrency scheduler hoists them all
    for w in ws:
        x = jnp.tanh(x @ (w.astype(jnp.float32) * 0.01))
    return x

ws = [jnp.ones((512, 512), jnp.int8) for _ in range(8)]
temp = jax.jit(layers).lower(jnp.ones((4, 512)), ws).compile().memory_analysis().temp_size_in_bytes
print(json.dumps(dict(took=took, flags=os.environ.get("XLA_FLAGS", ""), temp=temp)))
"""


def _probe(flags: str | None, when: str = "first") -> dict:
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if flags is not None:
        env["XLA_FLAGS"] = flags
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _PROBE, when], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_memory_scheduler_is_chosen_before_the_backend_starts():
    """The command line's first step: XLA_FLAGS gains the scheduler flag and compiled programs hold one layer's
    widened weight (1 MiB) instead of all eight; once a backend runs the call changes nothing; a user's own
    setting of the option is kept, and other flags stay."""
    ours = _probe(None)
    assert ours["took"] and ours["flags"] == cpu_build.SCHEDULER_FLAG
    concurrent = _probe("--xla_cpu_enable_concurrency_optimized_scheduler=true")
    assert not concurrent["took"] and concurrent["flags"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    assert ours["temp"] <= 2 * 2**20 < 6 * 2**20 <= concurrent["temp"], (ours["temp"], concurrent["temp"])
    late = _probe(None, "late")
    assert not late["took"] and late["flags"] == "" and late["temp"] == concurrent["temp"]
    kept = _probe("--xla_force_host_platform_device_count=2")
    assert kept["took"] and kept["flags"] == f"--xla_force_host_platform_device_count=2 {cpu_build.SCHEDULER_FLAG}"
