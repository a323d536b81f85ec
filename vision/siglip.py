"""SigLIP image encoder (ViT, no head) and the Gemma 3 projector to the text width.

Axis letters: B images, P patches, D vision width, N heads, H head dim, F MLP, M d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.dense import Einsum, normal_init
from vision.config import SigLIPConfig


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class EncoderBlock(nnx.Module):
    """x + attn(ln1(x)); x + mlp(ln2(x)), bidirectional attention over all patches."""

    def __init__(self, c: SigLIPConfig, *, dtype, rngs: nnx.Rngs):
        h = c.width // c.num_heads
        self.layer_norm1 = LayerNorm(c.width, c.eps, dtype)
        heads = ("vision_embed", "vision_heads", "vision_head_dim")
        self.q_proj = Einsum("BPD,DNH->BPNH", (c.width, c.num_heads, h), heads, dtype=dtype, rngs=rngs)
        self.k_proj = Einsum("BPD,DNH->BPNH", (c.width, c.num_heads, h), heads, dtype=dtype, rngs=rngs)
        self.v_proj = Einsum("BPD,DNH->BPNH", (c.width, c.num_heads, h), heads, dtype=dtype, rngs=rngs)
        self.q_bias = nnx.Param(jnp.zeros((c.num_heads, h), dtype))
        self.k_bias = nnx.Param(jnp.zeros((c.num_heads, h), dtype))
        self.v_bias = nnx.Param(jnp.zeros((c.num_heads, h), dtype))
        self.o_proj = Einsum("BPNH,NHD->BPD", (c.num_heads, h, c.width), heads[1:] + heads[:1], dtype=dtype,
                             rngs=rngs)
        self.o_bias = nnx.Param(jnp.zeros((c.width,), dtype))
        self.layer_norm2 = LayerNorm(c.width, c.eps, dtype)
        self.fc1 = Einsum("BPD,DF->BPF", (c.width, c.mlp_dim), ("vision_embed", "vision_mlp"), dtype=dtype,
                          rngs=rngs)
        self.fc1_bias = nnx.Param(jnp.zeros((c.mlp_dim,), dtype))
        self.fc2 = Einsum("BPF,FD->BPD", (c.mlp_dim, c.width), ("vision_mlp", "vision_embed"), dtype=dtype,
                          rngs=rngs)
        self.fc2_bias = nnx.Param(jnp.zeros((c.width,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.layer_norm1(x)
        q = self.q_proj(y) + self.q_bias[...]
        k = self.k_proj(y) + self.k_bias[...]
        v = self.v_proj(y) + self.v_bias[...]
        scores = jnp.einsum("BPNH,BSNH->BNPS", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        attn = jnp.einsum("BNPS,BSNH->BPNH", probs, v)
        x = x + self.o_proj(attn) + self.o_bias[...]
        y = self.layer_norm2(x)
        y = jax.nn.gelu(self.fc1(y) + self.fc1_bias[...], approximate=True)
        return x + self.fc2(y) + self.fc2_bias[...]


class SigLIPEncoder(nnx.Module):
    """images float [B, S, S, 3] in [-1, 1] -> patch features [B, (S/p)^2, D] (row-major patch grid)."""

    def __init__(self, c: SigLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = c
        self.patch_embedding = nnx.Param(normal_init(rngs, (c.patch_size, c.patch_size, 3, c.width), dtype))
        self.patch_bias = nnx.Param(jnp.zeros((c.width,), dtype))
        self.position_embedding = nnx.Param(normal_init(rngs, (c.num_patches, c.width), dtype))
        self.layers = nnx.List([EncoderBlock(c, dtype=dtype, rngs=rngs) for _ in range(c.depth)])
        self.post_layernorm = LayerNorm(c.width, c.eps, dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.config
        b, s, p = images.shape[0], c.patches_per_side, c.patch_size
        patches = images.astype(self.patch_embedding.dtype).reshape(b, s, p, s, p, 3)
        x = jnp.einsum("BYpXqC,pqCD->BYXD", patches, self.patch_embedding[...]) + self.patch_bias[...]
        x = x.reshape(b, s * s, c.width) + self.position_embedding[...]
        for block in self.layers:
            x = block(x)
        return self.post_layernorm(x)


class Projector(nnx.Module):
    """Patch features [B, P, D] -> soft tokens [B, T, M]: average-pool the row-major patch grid
    (pool x pool windows), RMSNorm with (1 + w), project to d_model."""

    def __init__(self, c: SigLIPConfig, d_model: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = c
        self.norm_scale = nnx.Param(jnp.zeros((c.width,), dtype))
        self.projection = Einsum("BTD,DM->BTM", (c.width, d_model), ("vision_embed", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        c = self.config
        b, s, k = features.shape[0], c.patches_per_side, c.pool
        grid = features.reshape(b, s // k, k, s // k, k, c.width).astype(jnp.float32)
        pooled = grid.mean(axis=(2, 4)).reshape(b, -1, c.width)  # [B, T, D], row-major token order
        normed = pooled * jax.lax.rsqrt(jnp.mean(pooled * pooled, -1, keepdims=True) + c.eps)
        normed = normed * (1.0 + self.norm_scale[...].astype(jnp.float32))
        return self.projection(normed.astype(features.dtype))


class VisionTower(nnx.Module):
    """SigLIP encoder + projector: images [B, S, S, 3] -> soft-token embeddings [B, tokens_per_image, d_model]."""

    def __init__(self, c: SigLIPConfig, d_model: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.encoder = SigLIPEncoder(c, dtype=dtype, rngs=rngs)
        self.projector = Projector(c, d_model, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.projector(self.encoder(images))
