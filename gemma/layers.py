"""Gemma 3 building blocks: RMSNorm, embedder, GeGLU MLP, RoPE.

Axis letters: B batch, T query positions, D d_model, F MLP hidden, V vocab,
N query heads, K kv heads, H head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.dense import Einsum, dense, normal_init
from kernels.quantized import QuantizedEinsum, select_rows, take_rows


class RMSNorm(nnx.Module):
    """y = x / rms(x) * (1 + scale), computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((dim,), dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class Embedder(nnx.Module):
    """Token embedding table E [V, D], tied to the output head."""

    def __init__(self, vocab_size: int, d_model: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = nnx.Param(normal_init(rngs, (vocab_size, d_model), dtype), logical_axes=("vocab", "embed"))

    def encode(self, tokens: jax.Array) -> jax.Array:
        """int [B, T] -> [B, T, D], scaled by sqrt(D) cast to the table's dtype."""
        table = self.embedding[...]
        scale = jnp.asarray(table.shape[1] ** 0.5, table.dtype)
        return jnp.take(table, tokens, axis=0) * scale

    def decode(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 logits [B, T, V] through the tied table (einsum over E's stored layout)."""
        return dense("BTD,VD->BTV", x, self.embedding[...], preferred_element_type=jnp.float32)

    def rows(self, ids: jax.Array) -> jax.Array:
        """The head's rows E[ids] [*ids.shape, D], as stored (a sub-vocabulary head: dense(x, rows(ids)))."""
        return jnp.take(self.embedding[...], ids, axis=0)


class QuantizedEmbedder(nnx.Module):
    """The Embedder with its table E [V, D] quantized: `table` is a QuantizedEinsum "BTD,VD->BTV".
    Looked-up rows are dequantized to float32; the tied head reads the quantized table."""

    def __init__(self, table: QuantizedEinsum):
        self.table = table

    def encode(self, tokens: jax.Array) -> jax.Array:
        """int [B, T] -> float32 [B, T, D], scaled by sqrt(D)."""
        rows = take_rows(self.table.weight(), tokens)
        return rows * jnp.asarray(rows.shape[-1] ** 0.5, rows.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 logits [B, T, V]."""
        return self.table(x, preferred_element_type=jnp.float32)

    def rows(self, ids: jax.Array):
        """The head's rows E[ids], still quantized (a QArray [*ids.shape, D])."""
        return select_rows(self.table.weight(), ids)


class GeGLU(nnx.Module):
    """down(gelu_tanh(x @ gate) * (x @ up))."""

    def __init__(self, d_model: int, hidden_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.gate_proj = Einsum("BTD,DF->BTF", (d_model, hidden_dim), ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Einsum("BTD,DF->BTF", (d_model, hidden_dim), ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Einsum("BTF,FD->BTD", (hidden_dim, d_model), ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


def rope(x: jax.Array, positions: jax.Array, *, base: float, scale: float = 1.0) -> jax.Array:
    """Rotary embedding on split halves (not interleaved pairs).

    x: [B, T, heads, H]; positions: int [B, T]. Global layers of 4B+ divide
    positions by `scale` (linear scaling); local layers use scale 1.
    """
    h = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    angles = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
