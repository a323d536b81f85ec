"""Gemma 3 in JAX / Flax NNX.

    import checkpoints, gemma
    model = checkpoints.load("gemma3-270m")
    tokenizer = checkpoints.load_tokenizer("gemma3-270m")
    logits = model(jnp.asarray([tokenizer.encode("Hello")]))
"""

from gemma import cache, config
from gemma.chat import ChatSampler
from gemma.config import GemmaConfig
from gemma.sampler import Sampler, SamplerOutput
from gemma.tokenizer import Tokenizer
from gemma.transformer import Transformer

__all__ = ["ChatSampler", "GemmaConfig", "Sampler", "SamplerOutput", "Tokenizer", "Transformer", "cache", "config",
           "load", "load_tokenizer"]


def load(source: str = "gemma3-270m", **kwargs) -> Transformer:
    """Shortcut for `checkpoints.load` (imported lazily: checkpoints sits above gemma)."""
    import checkpoints

    return checkpoints.load(source, **kwargs)


def load_tokenizer(source: str = "gemma3-270m") -> Tokenizer:
    """Shortcut for `checkpoints.load_tokenizer`."""
    import checkpoints

    return checkpoints.load_tokenizer(source)
