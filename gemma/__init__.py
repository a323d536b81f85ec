"""Gemma 3 in JAX / Flax NNX.

    import checkpoints, gemma
    model = checkpoints.load("gemma3-270m")
    tokenizer = checkpoints.load_tokenizer("gemma3-270m")
    logits = model(jnp.asarray([tokenizer.encode("Hello")]))
"""

import importlib

# Each name loads its module on first use: `from gemma.config import GemmaConfig` imports no jax or flax.
_HOMES = {"ChatSampler": "gemma.chat", "GemmaConfig": "gemma.config", "Sampler": "gemma.sampler",
          "SamplerOutput": "gemma.sampler", "Tokenizer": "gemma.tokenizer", "Transformer": "gemma.transformer"}

__all__ = ["ChatSampler", "GemmaConfig", "Sampler", "SamplerOutput", "Tokenizer", "Transformer", "cache", "config",
           "load", "load_tokenizer"]


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    try:
        return importlib.import_module(f"gemma.{name}")  # a submodule: gemma.cache, gemma.speculative, ...
    except ModuleNotFoundError as e:
        if e.name != f"gemma.{name}":
            raise
        raise AttributeError(f"module 'gemma' has no attribute {name!r}") from None


def load(source: str = "gemma3-270m", **kwargs) -> "Transformer":
    """Shortcut for `checkpoints.load` (imported lazily: checkpoints sits above gemma)."""
    import checkpoints

    return checkpoints.load(source, **kwargs)


def load_tokenizer(source: str = "gemma3-270m") -> "Tokenizer":
    """Shortcut for `checkpoints.load_tokenizer`."""
    import checkpoints

    return checkpoints.load_tokenizer(source)
