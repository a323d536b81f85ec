"""Our own checkpoints: orbax (params) + gemma_config.json (+ tokenizer.model).

The round trip is bit-exact and keeps each parameter's dtype.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from gemma.config import GemmaConfig
from gemma.tokenizer import Tokenizer
from gemma.transformer import Transformer

CONFIG_FILE = "gemma_config.json"
TOKENIZER_FILE = "tokenizer.model"


def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save(model: Transformer, path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> str:
    """Writes `model` (and optionally its tokenizer) under directory `path`; returns the path."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    _, state = nnx.split(model)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "params"), state, force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"config": model.config.to_dict(), "dtype": jnp.dtype(model.dtype).name}, f, indent=1)
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, TOKENIZER_FILE))
    return path


def load_orbax(path: str | os.PathLike, dtype=None) -> Transformer:
    """Restores a directory written by `save`; `dtype` (default: as saved) casts on restore."""
    path = os.path.abspath(os.fspath(path))
    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    config = GemmaConfig.from_dict(meta["config"])
    dtype = jnp.dtype(meta["dtype"] if dtype is None else dtype)
    abstract = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    try:
        state = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), abstract_state)
    except Exception as e:  # orbax raises various types for a damaged or mismatched tree
        raise ValueError(f"{path}: cannot restore the orbax parameters for {config}: {e}") from e
    return nnx.merge(graphdef, state)

