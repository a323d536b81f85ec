"""Gemma 3 self-attention: projections, QK-norm, RoPE, GQA through kernels.attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from gemma.cache import EMPTY, LayerCache
from gemma.config import GemmaConfig
from gemma.layers import RMSNorm, rope
from kernels import cpu_decode
from kernels.dense import Einsum


class Attention(nnx.Module):
    """One attention block. `layer_type` picks window and RoPE base.

    Projections (Einsum modules, weight `w`): q_proj [D, N, H], k_proj / v_proj [D, K, H],
    o_proj [N, H, D]; q_norm / k_norm [H].
    """

    def __init__(self, config: GemmaConfig, layer_type: str, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.layer_type = layer_type
        self.num_kv_heads = c.num_kv_heads
        self.scale = c.query_pre_attn_scalar ** -0.5
        self.softcap = c.attn_logit_softcap
        self.impl = c.attention_impl
        self.window = c.sliding_window if layer_type == "local" else None
        if layer_type == "global":
            self.rope_base, self.rope_scale = c.rope_global_base, c.rope_global_scale
        else:
            self.rope_base, self.rope_scale = c.rope_local_base, 1.0
        d, n, k, h = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = Einsum("BTD,DNH->BTNH", (d, n, h), ("embed", "q_heads", "head_dim"), dtype=dtype, rngs=rngs)
        self.k_proj = Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), dtype=dtype, rngs=rngs)
        self.v_proj = Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), dtype=dtype, rngs=rngs)
        self.o_proj = Einsum("BTNH,NHD->BTD", (n, h, d), ("q_heads", "head_dim", "embed"), dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(c.head_dim, eps=c.rms_eps, dtype=dtype)
        self.k_norm = RMSNorm(c.head_dim, eps=c.rms_eps, dtype=dtype)

    def project_kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, T, D] -> keys (normed, rotated) and values, each [B, T, K, H]."""
        k = self.k_norm(self.k_proj(x))
        k = rope(k, positions, base=self.rope_base, scale=self.rope_scale)
        v = self.v_proj(x)
        return k, v

    def project_q(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """[B, T, D] -> queries (normed, rotated) [B, T, N, H]."""
        q = self.q_norm(self.q_proj(x))
        return rope(q, positions, base=self.rope_base, scale=self.rope_scale)

    def __call__(self, x: jax.Array, positions: jax.Array, k_start: jax.Array, k_end: jax.Array,
                 lookahead: int = 0) -> jax.Array:
        """x [B, T, D]; positions int [B, T]; key interval [k_start, k_end] per query, int [B, T].

        `lookahead` (static): how far past itself a query may see (image blocks); 0 is causal.
        """
        q = self.project_q(x, positions)
        k, v = self.project_kv(x, positions)
        out = kernels.attention(q, k, v, k_start, k_end, scale=self.scale, softcap=self.softcap, impl=self.impl,
                                window=self.window, lookahead=lookahead)
        return self.o_proj(out)

    def extend(self, x: jax.Array, positions: jax.Array, k_end: jax.Array, cache: LayerCache, length: jax.Array,
               window: int | None, fresh: bool = False) -> tuple[jax.Array, LayerCache]:
        """Attention of a chunk over the cache plus itself, then the chunk is written.

        x [B, T, D]; positions int [B, T] (negative on padding); k_end [B, T]: the
        last position each query sees (its own, or its image block's end; -1 on
        padding); `length` [B]: tokens already in the cache. A single decode token is written first and
        attends over the cache alone (its ring slot held position p - W, which
        the window excludes); a longer chunk attends over cache + chunk keys
        before writing, so chunks longer than the ring are exact. `fresh` (static): the cache
        holds nothing yet, so a chunk attends over its own keys alone (half the work of a first
        prefill chunk, which would otherwise score every empty slot).
        """
        q = self.project_q(x, positions)
        k, v = self.project_kv(x, positions)
        valid = positions >= 0
        k_start = positions - window + 1 if window is not None else jnp.zeros_like(positions)
        new_cache = cache.write(k, v, positions)
        if x.shape[1] == 1:
            keys, values = new_cache.read()
            k_pos = new_cache.slot_positions(length + valid.sum(axis=1, dtype=jnp.int32))
        else:  # the chunk's own keys (rounded to the cache's dtype), after the cache's slots unless it is empty
            keys, values = cache.rounded(k, v)
            k_pos = jnp.where(valid, positions, EMPTY)
            if not fresh:
                old_k, old_v = cache.read()
                keys = jnp.concatenate([old_k, keys], axis=1)
                values = jnp.concatenate([old_v, values], axis=1)
                k_pos = jnp.concatenate([cache.slot_positions(length), k_pos], axis=1)
        if x.shape[1] == 1 and kernels.resolve(self.impl) == "xla" and cpu_decode.usable():
            # one token per row on CPU: XLA's einsums copy the values transposed every step
            out = cpu_decode.attention(q, keys, values, k_start, k_end, k_pos, scale=self.scale, softcap=self.softcap)
        else:
            out = kernels.attention(q, keys, values, k_start, k_end, scale=self.scale, softcap=self.softcap,
                                    k_pos=k_pos, impl=self.impl)
        return self.o_proj(out), new_cache
