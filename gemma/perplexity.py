"""Perplexity of a model on a token sequence: exp(mean over t >= 1 of -log p(ids[t] | ids[:t]))."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=0)
def _chunk_nll(graphdef, state, hidden: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Summed -log p(target) of a chunk of final-normed hidden states [C, D] through the tied head."""
    logits = nnx.merge(graphdef, state).decode(hidden[None])[0]  # [C, V] float32
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(mask, nll, 0.0))


def perplexity(model, ids: Sequence[int], chunk: int = 256) -> float:
    """One causal forward over `ids` (BOS first), then the head `chunk` positions at a time (the full
    [T, V] logits of a 262k vocabulary are never held; a chunk of 256 is 256 MiB of float32 logits)."""
    tokens = jnp.asarray(ids, jnp.int32)[None]
    n = tokens.shape[1] - 1
    hidden = model(tokens, return_hidden=True)[0, :-1]
    targets = tokens[0, 1:]
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, (0, pad))
    mask = jnp.arange(n + pad) < n
    graphdef, state = nnx.split(model.embedder)
    total = sum(float(_chunk_nll(graphdef, state, hidden[i:i + chunk], targets[i:i + chunk], mask[i:i + chunk]))
                for i in range(0, n + pad, chunk))
    return math.exp(total / n)
