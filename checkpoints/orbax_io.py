"""Our own checkpoints: orbax (params) + gemma_config.json (+ tokenizer.model).

The round trip is bit-exact and keeps each parameter's dtype. A reward model (gemma.train.reward_model:
a Transformer backbone with a scalar head) is saved the same way, its whole state (backbone and head) under
params/ and `"reward_head": "scalar"` in gemma_config.json; `load_orbax` reads a policy, `load_reward_orbax`
a reward model, and each names the other when given the wrong kind of directory.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from gemma.config import GemmaConfig
from gemma.tokenizer import Tokenizer
from gemma.transformer import Transformer

CONFIG_FILE = "gemma_config.json"
TOKENIZER_FILE = "tokenizer.model"
REWARD_HEAD = "scalar"  # gemma_config.json's "reward_head" of a reward model (ScalarHead)


def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def is_reward_dir(path: str) -> bool:
    """Whether `path` holds a reward model written by `save` (an orbax dir with a scalar head)."""
    return is_orbax_dir(path) and "reward_head" in _meta(path)


def save(model, path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> str:
    """Writes `model` (a Transformer or a reward_model.RewardModel) and optionally its tokenizer under
    directory `path`; returns the path."""
    from gemma.train.reward_model import RewardModel

    backbone = model.backbone if isinstance(model, RewardModel) else model
    if not isinstance(backbone, Transformer):
        raise TypeError(f"checkpoints.save takes a gemma.Transformer or a reward_model.RewardModel, got "
                        f"{type(model).__name__}")
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    import orbax.checkpoint as ocp  # here, not at import: inference never loads orbax and tensorstore

    _, state = nnx.split(model)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "params"), state, force=True)
    checkpointer.wait_until_finished()
    meta = {"config": backbone.config.to_dict(), "dtype": jnp.dtype(backbone.dtype).name}
    if backbone is not model:
        meta["reward_head"] = REWARD_HEAD
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, TOKENIZER_FILE))
    return path


def load_orbax(path: str | os.PathLike, dtype=None) -> Transformer:
    """Restores a Transformer from a directory written by `save`; `dtype` (default: as saved) casts on restore."""
    path = os.path.abspath(os.fspath(path))
    meta = _meta(path)
    if "reward_head" in meta:
        raise ValueError(f"{path} holds a reward model (a decoder with a scalar head), not a policy; load it with "
                         f"checkpoints.load_reward_model")
    return _restore(path, meta, dtype, lambda config, dt: Transformer(config, dtype=dt, rngs=nnx.Rngs(0)))


def load_reward_orbax(path: str | os.PathLike, dtype=None):
    """Restores a reward_model.RewardModel from a directory written by `save`; `dtype` (default: as saved)
    casts the backbone on restore; the head stays float32, as saved."""
    from gemma.train.reward_model import RewardModel

    path = os.path.abspath(os.fspath(path))
    meta = _meta(path)
    head = meta.get("reward_head")
    if head is None:
        raise ValueError(f"{path} holds a policy (a Transformer without a reward head), not a reward model; train "
                         f"one from it with `python -m gemma reward-model --model {path} ...`, or start one with "
                         f"reward_model.RewardModel(checkpoints.load(path))")
    if head != REWARD_HEAD:
        raise ValueError(f"{path}: unknown reward head {head!r} in {CONFIG_FILE} (this version reads "
                         f"{REWARD_HEAD!r})")
    return _restore(path, meta, dtype, lambda config, dt: RewardModel(Transformer(config, dtype=dt,
                                                                                  rngs=nnx.Rngs(0))))


def _meta(path: str) -> dict:
    with open(os.path.join(path, CONFIG_FILE)) as f:
        return json.load(f)


def _restore(path: str, meta: dict, dtype, build):
    config = GemmaConfig.from_dict(meta["config"])
    dtype = jnp.dtype(meta["dtype"] if dtype is None else dtype)
    abstract = nnx.eval_shape(lambda: build(config, dtype))
    graphdef, abstract_state = nnx.split(abstract)
    import orbax.checkpoint as ocp

    try:
        state = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), abstract_state)
    except Exception as e:  # orbax raises various types for a damaged or mismatched tree
        raise ValueError(f"{path}: cannot restore the orbax parameters for {config}: {e}") from e
    return nnx.merge(graphdef, state)
