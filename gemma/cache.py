"""Compact KV cache: global layers hold max_len slots, local layers a ring of W slots.

A key at position p lives in slot p (global) or p mod W (local). The cache
keeps only the number of tokens written per row (`length`); the position held
by each slot is derived from it. Bytes, one sequence, bf16, compact vs full:
4B at 32K 0.74 vs 4.25 GiB; 27B at 128K 10.4 vs 62.0 GiB.

An int8 cache (dtype jnp.int8) holds k, v as symmetric int8 with one float32 scale per token and
head (k_scale, v_scale [B, S, K]: max|x| / 127 over the head's H values); attention reads them
dequantized to float32 (`read`), and a chunk's own keys are rounded the same way (`rounded`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gemma.config import GemmaConfig
from kernels.blocks import EMPTY  # position of an empty slot or a padding token: outside every interval


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., H] -> int8 values [..., H] and float32 scales [...] (symmetric, max|x| / 127 per vector)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    q = jnp.round(x / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def dequantize_int8(q: jax.Array, scale: jax.Array) -> jax.Array:
    return q.astype(jnp.float32) * scale[..., None]


def _scatter(dst: jax.Array, rows: jax.Array, slots: jax.Array, x: jax.Array) -> jax.Array:
    """dst.at[rows, slots].set(x, mode="drop") (slots == S: dropped). On CPU through kernels.cpu_decode.write,
    in place: XLA:CPU widens a bf16 scatter to f32, converting the whole cache there and back on every
    write (most of the 270M's 16-row bf16 decode step over a 512-slot cache)."""
    from kernels import cpu_decode

    if cpu_decode.usable():
        return cpu_decode.write(dst, x, jnp.broadcast_to(slots, x.shape[:2]))
    return dst.at[rows, slots].set(x, mode="drop")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "k_scale", "v_scale"],
                   meta_fields=["ring"])
@dataclasses.dataclass
class LayerCache:
    """Keys and values of one layer, [B, S, K, H]; a ring (S = W) or linear (S = max_len). An int8
    cache also holds per-token, per-head scales k_scale, v_scale [B, S, K] (None otherwise)."""

    k: jax.Array
    v: jax.Array
    ring: bool
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def read(self) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, S, K, H] as attention sees them (int8: dequantized to float32)."""
        if self.quantized:
            return dequantize_int8(self.k, self.k_scale), dequantize_int8(self.v, self.v_scale)
        return self.k, self.v

    def rounded(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """k, v [B, T, K, H] as they read back once written (the cache's rounding)."""
        if self.quantized:
            return dequantize_int8(*quantize_int8(k)), dequantize_int8(*quantize_int8(v))
        return k.astype(self.k.dtype), v.astype(self.v.dtype)

    def select(self, fn) -> "LayerCache":
        """The same layer with fn applied to each of its arrays (k, v and any scales)."""
        scales = (None, None) if not self.quantized else (fn(self.k_scale), fn(self.v_scale))
        return LayerCache(fn(self.k), fn(self.v), self.ring, *scales)

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    def slot_positions(self, length: jax.Array) -> jax.Array:
        """int [B, S]: the position each slot holds after `length` [B] tokens (EMPTY if none)."""
        s = jnp.arange(self.num_slots, dtype=jnp.int32)[None, :]
        last = length[:, None] - 1
        if self.ring:  # the largest p <= last with p = s (mod S)
            pos = s + self.num_slots * jnp.floor_divide(last - s, self.num_slots)
        else:
            pos = s
        return jnp.where(s <= last, pos, EMPTY)

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> "LayerCache":
        """Stores k, v [B, T, K, H] at `positions` [B, T] (negative: padding, not stored).

        In a ring only the last S positions of the chunk are stored, so no two
        tokens of a chunk longer than the ring compete for a slot.
        """
        s = self.num_slots
        keep = positions >= 0
        if self.ring:
            newest = jnp.max(positions, axis=1, keepdims=True)
            keep &= positions > newest - s
            slots = positions % s
        else:
            keep &= positions < s
            slots = positions
        slots = jnp.where(keep, slots, s)  # index s is out of range: dropped
        rows = jnp.arange(k.shape[0])[:, None]
        put = lambda dst, x: _scatter(dst, rows, slots, x.astype(dst.dtype))
        if self.quantized:
            (qk, sk), (qv, sv) = quantize_int8(k), quantize_int8(v)
            return LayerCache(put(self.k, qk), put(self.v, qv), self.ring, put(self.k_scale, sk),
                              put(self.v_scale, sv))
        return LayerCache(put(self.k, k), put(self.v, v), self.ring)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["layers", "length"], meta_fields=[])
@dataclasses.dataclass
class Cache:
    """Per-layer caches plus `length` [B]: tokens written per row (padding excluded)."""

    layers: tuple[LayerCache, ...]
    length: jax.Array

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]

    @property
    def max_len(self) -> int:
        return max(c.num_slots for c in self.layers if not c.ring) if any(not c.ring for c in self.layers) else 0

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (and an int8 cache's scales)."""
        return sum(a.nbytes for c in self.layers for a in (c.k, c.v, c.k_scale, c.v_scale) if a is not None)


def init_cache(config: GemmaConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
    """An empty cache for `batch_size` sequences of up to `max_len` tokens; dtype int8 quantizes it."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
    check_dtype(dtype)
    layers = []
    for layer_type in config.layer_types:
        ring = layer_type == "local" and config.sliding_window < max_len
        slots = config.sliding_window if ring else max_len
        shape = (batch_size, slots, config.num_kv_heads, config.head_dim)
        scales = tuple(jnp.zeros(shape[:-1], jnp.float32) for _ in range(2)) if jnp.dtype(dtype) == jnp.int8 else ()
        layers.append(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), ring, *scales))
    return Cache(tuple(layers), jnp.zeros((batch_size,), jnp.int32))


def cache_nbytes(config: GemmaConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> int:
    """The formula: 2 * B * K * (H * bytes + scale bytes) * (n_global * max_len + n_local * min(W, max_len)),
    scale bytes 4 (a float32 per token and head) for int8, 0 otherwise."""
    check_dtype(dtype)
    scale = 4 if jnp.dtype(dtype) == jnp.int8 else 0
    per_token = 2 * batch_size * config.num_kv_heads * (config.head_dim * jnp.dtype(dtype).itemsize + scale)
    return per_token * (config.num_global_layers * max_len
                        + config.num_local_layers * min(config.sliding_window, max_len))


CACHE_DTYPES = ("float32", "bfloat16", "float16", "int8")


def check_dtype(dtype) -> None:
    if jnp.dtype(dtype).name not in CACHE_DTYPES:
        raise ValueError(f"KV cache dtype {jnp.dtype(dtype).name!r} is not served; expected one of "
                         f"{', '.join(CACHE_DTYPES)}")


def ring_snapshot(cache: Cache, positions: jax.Array) -> tuple:
    """Per layer, the ring slots that writing `positions` [B, T] will overwrite (each array gathered
    [B, T, ...]; None for linear layers): what `rollback` puts back."""
    rows = jnp.arange(positions.shape[0])[:, None]
    return tuple(c.select(lambda a, c=c: a[rows, positions % c.num_slots]) if c.ring else None for c in cache.layers)


def rollback(cache: Cache, snapshot: tuple, positions: jax.Array, length: jax.Array) -> Cache:
    """The cache after a chunk at `positions` [B, T] was written, cut back to `length` [B] tokens: ring
    slots of positions >= length get their snapshot back (linear slots past `length` are never read; padding
    positions, negative, are left alone)."""
    rows = jnp.arange(positions.shape[0])[:, None]
    undo = positions >= length[:, None]
    layers = []
    for c, saved in zip(cache.layers, snapshot):
        if c.ring:
            slots = jnp.where(undo, positions % c.num_slots, c.num_slots)  # the rest dropped (out of range)
            arrays = [(a, s) for a, s in zip((c.k, c.v, c.k_scale, c.v_scale),
                                              (saved.k, saved.v, saved.k_scale, saved.v_scale)) if a is not None]
            put = [_scatter(a, rows, slots, s) for a, s in arrays]
            c = LayerCache(put[0], put[1], True, *put[2:])
        layers.append(c)
    return Cache(tuple(layers), length)
