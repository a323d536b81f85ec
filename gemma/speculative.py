"""Speculative decoding with prompt-lookup drafts: n-grams copied from the context, checked by the target
in one extend over the compact cache.

Each step feeds [last, d1 .. dk] (last: the newest token, not yet in the cache; d: the draft) in one
chunk, so the target's weights are read once for up to k + 1 tokens. Greedy: the longest draft prefix
equal to the target's argmaxes is kept, plus the target's own next token, so the ids are the target's
alone. Sampled: each draft token d_i is kept with probability p_i(d_i) (the draft is a point mass), and
the first rejected one is replaced by a draw from p_i without d_i, renormalized; a fully kept draft
adds a draw from p_k. That is rejection sampling (Leviathan et al. 2023; Chen et al. 2023): every
emitted token is distributed as the target's. Ring slots the rejected tokens overwrote are restored
(gemma.cache.ring_snapshot / rollback); the cache length is cut back to the kept tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma.cache import ring_snapshot, rollback
from gemma.config import VOCAB_SIZE
from gemma.sampler import SamplingParams, _bucket, _nucleus


def prompt_lookup(context: Sequence[int], draft_len: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to `draft_len` tokens that followed the latest earlier occurrence of the context's last n-gram,
    longest n first (max_ngram down to min_ngram); [] when none recurs."""
    ctx = np.asarray(context, np.int64)
    n_ctx = len(ctx)
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        tail = ctx[n_ctx - n:]
        windows = np.lib.stride_tricks.sliding_window_view(ctx[:n_ctx - 1], n)  # starts 0 .. n_ctx - 1 - n
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if len(hits):
            start = hits[-1] + n
            return ctx[start:start + draft_len].tolist()
    return []


def target_probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """float32 probabilities [T, V] the Sampler draws from (temperature, top-k, top-p; ids >= 262144 never)."""
    logits = logits[:, :VOCAB_SIZE] / params.temperature
    if params.top_k is not None or params.top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        values = jnp.take_along_axis(logits, order, axis=-1)
        if params.top_k is not None:
            values = jnp.where(jnp.arange(values.shape[-1]) < params.top_k, values, -jnp.inf)
        if params.top_p is not None:
            values = _nucleus(values, params.top_p)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(values)
    return jax.nn.softmax(logits, axis=-1)


def accept(probs: jax.Array, draft: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rejection sampling of a point-mass draft [k] against target probs [k + 1, V]: returns (the number of
    draft tokens kept, the next token: the replacement of the first rejected one or a draw from p_k)."""
    k = draft.shape[0]
    u_key, draw_key = jax.random.split(key)
    p_draft = jnp.take_along_axis(probs[:k], draft[:, None], axis=1)[:, 0]
    kept = jax.random.uniform(u_key, (k,)) < p_draft
    n = jnp.argmin(jnp.concatenate([kept, jnp.zeros((1,), bool)])).astype(jnp.int32)  # first rejection (or k)
    p = probs[n]
    residual = jnp.where(jnp.arange(p.shape[0]) == jnp.concatenate([draft, jnp.full((1,), -1, draft.dtype)])[n], 0.0, p)
    return n, jax.random.categorical(draw_key, jnp.log(residual)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _verify(graphdef, state, tokens, positions, cache):
    """The target over the chunk tokens [1, T] at positions [1, T]: logits [T, V], cache, ring snapshot."""
    snapshot = ring_snapshot(cache, positions)
    logits, cache = nnx.merge(graphdef, state).extend(tokens, positions, cache, last_only=False)
    return logits[0], cache, snapshot


@functools.partial(jax.jit, donate_argnums=(0,))
def _rollback(cache, snapshot, positions, length):
    return rollback(cache, snapshot, positions, length)


@functools.partial(jax.jit, static_argnums=(3,))
def _choose(logits, draft, key, params: SamplingParams):
    """(draft tokens kept, next token) from verify logits [k + 1, V]."""
    if params.greedy:
        target = jnp.argmax(logits[:, :VOCAB_SIZE], axis=-1).astype(jnp.int32)
        n = jnp.argmin(jnp.concatenate([target[:-1] == draft, jnp.zeros((1,), bool)])).astype(jnp.int32)
        return n, target[n]
    return accept(target_probs(logits, params), draft, key)


@dataclasses.dataclass
class SpeculativeStats:
    steps: int = 0  # target passes after the prefill
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    draft_seconds: float = 0.0  # time spent proposing drafts (prompt lookup on the host)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def generate(sampler, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, draft_len: int = 4,
             max_ngram: int = 3) -> tuple[list[int], SpeculativeStats]:
    """Continues one prompt with speculative decoding on `sampler`'s model and cache layout; returns the
    generated ids (stop id excluded, as Sampler.generate) and the draft statistics."""
    params = SamplingParams(temperature, top_k, top_p)
    if not isinstance(draft_len, int) or not 1 <= draft_len < sampler.config.sliding_window:
        raise ValueError(f"draft_len must be an int in [1, {sampler.config.sliding_window}), got {draft_len!r}")
    row = sampler.encode_prompt(prompt)
    sampler._check_room([len(row)], max_new_tokens)
    room = _bucket(len(row), sampler.prefill_chunk) + _bucket(max_new_tokens + draft_len + 1, 1 << 30)
    cache = sampler.new_cache(1, min(sampler.max_len, room))  # bucketed as Sampler.generate: few shapes
    logits, cache = sampler.prefill([row], cache)
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    first = _choose(logits, jnp.zeros((0,), jnp.int32), sub, params)[1]
    out, stats, context = [int(first)], SpeculativeStats(), list(row) + [int(first)]
    while out[-1] not in sampler.stop_ids and len(out) < max_new_tokens:
        t0 = time.perf_counter()
        draft = prompt_lookup(context, draft_len, max_ngram)
        stats.draft_seconds += time.perf_counter() - t0
        start = len(context) - 1
        # one chunk shape whatever the draft's length: padded with the last token (a CPU pass costs about
        # the same for 1 or draft_len + 1 tokens: the weights are read once), the padding rolled back
        chunk = [context[-1]] + draft + [context[-1]] * (draft_len - len(draft))
        positions = jnp.arange(start, start + len(chunk), dtype=jnp.int32)[None]
        logits, cache, snapshot = _verify(sampler._graphdef, sampler._state, jnp.asarray([chunk], jnp.int32),
                                          positions, cache)
        key, sub = jax.random.split(key)
        n, nxt = (int(x) for x in _choose(logits[:len(draft) + 1], jnp.asarray(draft, jnp.int32), sub, params))
        if n < draft_len:
            cache = _rollback(cache, snapshot, positions, jnp.asarray([start + 1 + n], jnp.int32))
        stats.steps, stats.drafted, stats.accepted = stats.steps + 1, stats.drafted + len(draft), stats.accepted + n
        new = draft[:n] + [nxt]
        for t in new:
            if len(out) >= max_new_tokens or out[-1] in sampler.stop_ids:
                break
            out.append(t)
            context.append(t)
    if out[-1] in sampler.stop_ids:
        out.pop()
    return out, stats
