"""Gemma 3 decoder: embed, 5 local : 1 global blocks, final norm, tied head."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma.attention import Attention
from gemma.cache import Cache
from gemma.config import GemmaConfig
from gemma.layers import Embedder, GeGLU, RMSNorm
from vision.siglip import VisionTower


class Block(nnx.Module):
    """x + post_attention_norm(attn(pre_attention_norm(x))), then the same around the MLP."""

    def __init__(self, config: GemmaConfig, layer_type: str, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.layer_type = layer_type
        self.sliding_window = c.sliding_window if layer_type == "local" else None
        self.pre_attention_norm = RMSNorm(c.d_model, eps=c.rms_eps, dtype=dtype)
        self.attn = Attention(c, layer_type, dtype=dtype, rngs=rngs)
        self.post_attention_norm = RMSNorm(c.d_model, eps=c.rms_eps, dtype=dtype)
        self.pre_ffw_norm = RMSNorm(c.d_model, eps=c.rms_eps, dtype=dtype)
        self.mlp = GeGLU(c.d_model, c.hidden_dim, dtype=dtype, rngs=rngs)
        self.post_ffw_norm = RMSNorm(c.d_model, eps=c.rms_eps, dtype=dtype)

    def __call__(self, x, positions, k_start, k_end, lookahead: int = 0):
        x = x + self.post_attention_norm(self.attn(self.pre_attention_norm(x), positions, k_start, k_end, lookahead))
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))

    def extend(self, x, positions, k_end, cache, length, fresh: bool = False):
        """The block over a chunk with a KV cache; returns (x, updated layer cache)."""
        h, cache = self.attn.extend(self.pre_attention_norm(x), positions, k_end, cache, length, self.sliding_window,
                                    fresh)
        x = x + self.post_attention_norm(h)
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x))), cache


def causal_intervals(input_mask: jax.Array, window: int | None,
                     block_end: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Key interval of each query for a left-padded batch.

    input_mask: bool [B, T], True on real tokens (padding only on the left).
    Query t sees keys j with first_real <= j <= t and, with a window W,
    t - W < j. Padding queries get an empty interval. `block_end` [B, T]
    (optional) extends a query's interval forward to the end of its image
    block: soft tokens of one image see each other in both directions.
    """
    t = jnp.arange(input_mask.shape[1], dtype=jnp.int32)[None, :]
    first_real = jnp.argmax(input_mask, axis=1).astype(jnp.int32)[:, None]
    k_start = jnp.broadcast_to(first_real, input_mask.shape)
    if window is not None:
        k_start = jnp.maximum(k_start, t - window + 1)
    end = t if block_end is None else jnp.maximum(t, block_end)
    k_end = jnp.where(input_mask, end, -1)
    return k_start, jnp.broadcast_to(k_end, input_mask.shape)


def segment_intervals(segment_ids: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array]:
    """Key interval of each query of a packed batch.

    segment_ids: int [B, T], one id > 0 per example (each a contiguous run), 0 on padding. Query t
    sees keys j of its own example with j <= t and, with a window W, t - W < j; padding queries get
    an empty interval.
    """
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    k_start = jax.lax.cummax(jnp.where(first, t, 0), axis=1)
    if window is not None:
        k_start = jnp.maximum(k_start, t - window + 1)
    return k_start, jnp.where(segment_ids > 0, t, -1)


REMAT_POLICIES = {  # what a rematerialised block keeps from its forward for the backward
    "full": jax.checkpoint_policies.nothing_saveable,  # nothing: every block is recomputed
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the projections' outputs
}


def rematerialized(block: Block, x, positions, k_start, k_end, lookahead: int = 0, *, policy: str):
    """block(x, ...) keeping for the backward only what REMAT_POLICIES[policy] saves, and recomputing
    the rest once the block's output cotangent exists: what the backward recomputes from (the block's
    input, saved values; not its weights) takes a data dependence on the cotangent (0 * one of its
    entries, which XLA does not fold for floats). jax.checkpoint alone does not order the recompute on
    XLA CPU: its optimization barrier is expanded before scheduling, every layer's recompute ran early,
    and the step held all of their activations at once."""
    graphdef, state = nnx.split(block)

    def run(state, x, positions, k_start, k_end):
        return nnx.merge(graphdef, state)(x, positions, k_start, k_end, lookahead)

    saving = jax.checkpoint(run, policy=REMAT_POLICIES[policy])
    weights = []  # per residual leaf: is it one of the block's weights (set while tracing fwd, read in bwd)

    @jax.custom_vjp
    def f(state, x, positions, k_start, k_end):
        return run(state, x, positions, k_start, k_end)

    def fwd(state, x, *ints):
        out, vjp = jax.vjp(lambda s, h: saving(s, h, *ints), state, x)
        params = jax.tree.leaves(state)
        weights[:] = [any(r is p for p in params) for r in jax.tree.leaves(vjp)]
        return out, vjp

    def bwd(vjp, g):
        dep = 0 * g.reshape(-1)[0]
        leaves, tree = jax.tree.flatten(vjp)
        leaves = [r if w or not jnp.issubdtype(r.dtype, jnp.floating) else r + dep.astype(r.dtype)
                  for r, w in zip(leaves, weights)]
        return *jax.tree.unflatten(tree, leaves)(g), None, None, None

    f.defvjp(fwd, bwd)
    return f(state, x, positions, k_start, k_end)


def layer_period(layer_types) -> int:
    """The shortest p with layer_types[i] == layer_types[i % p] for every i (6 for Gemma 3's 5 local : 1
    global): the group of blocks that repeats."""
    n = len(layer_types)
    return next(p for p in range(1, n + 1) if all(layer_types[i] == layer_types[i % p] for i in range(n)))


def scanned_blocks(blocks, x, call):
    """x through `blocks` in order, `call(block, x)` each, as a jax.lax.scan over the repeating group of
    blocks (layer_period of their types) with the groups' parameters stacked on a leading axis, so the
    step traces and compiles one group whatever the depth; the last len % period blocks run unrolled.
    Every block keeps its own parameters and module path (the stacked copies exist only inside the
    step). Blocks whose structure differs within a group position (e.g. adapters on some layers only,
    mixed quantized formats) run unrolled."""
    period = layer_period([b.layer_type for b in blocks])
    groups = len(blocks) // period
    splits = [nnx.split(b) for b in blocks[:groups * period]]
    graphdefs = [splits[j][0] for j in range(period)]
    if groups < 2 or any(splits[g * period + j][0] != graphdefs[j] for g in range(groups) for j in range(period)):
        for block in blocks:
            x = call(block, x)
        return x
    stacked = tuple(jax.tree.map(lambda *leaves: jnp.stack(leaves), *(splits[g * period + j][1] for g in range(groups)))
                    for j in range(period))

    def group(x, states):
        for graphdef, state in zip(graphdefs, states):
            x = call(nnx.merge(graphdef, state), x)
        return x, None

    x, _ = jax.lax.scan(group, x, stacked)
    for block in blocks[groups * period:]:
        x = call(block, x)
    return x


def image_block_end(is_soft: jax.Array) -> jax.Array:
    """int [B, T]: for a soft token, the index of the last soft token of its contiguous block; else -1."""
    t = jnp.arange(is_soft.shape[1], dtype=jnp.int32)
    next_text = jax.lax.cummin(jnp.where(is_soft, is_soft.shape[1], t[None, :]), axis=1, reverse=True)
    return jnp.where(is_soft, next_text - 1, -1)


class Transformer(nnx.Module):
    """The Gemma 3 text decoder.

    `model(tokens)` on int [B, T] returns float32 logits [B, T, V] of the plain
    causal forward (windows applied, no cache).
    """

    def __init__(self, config: GemmaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embedder = Embedder(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(config, t, dtype=dtype, rngs=rngs) for t in config.layer_types])
        self.final_norm = RMSNorm(config.d_model, eps=config.rms_eps, dtype=dtype)
        self.vision = VisionTower(config.vision, config.d_model, dtype=dtype, rngs=rngs) if config.vision else None

    def with_attention_impl(self, impl: str) -> "Transformer":
        """The same model (parameters shared, not copied) running attention through `impl`
        (one of kernels.IMPLS or "auto")."""
        config = self.config.replace(attention_impl=impl)
        graphdef, state = nnx.split(self)
        model = nnx.merge(graphdef, state)
        model.config = config
        for block in model.layers:
            block.attn.impl = impl
        return model

    def embed(self, tokens: jax.Array, images: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, T, D]; with `images` [I, S, S, 3], the image soft tokens (in order of
        appearance, tokens_per_image per image) take the vision tower's output, unscaled."""
        x = self.embedder.encode(tokens).astype(self.dtype)
        if images is None:
            return x
        soft = self.vision(images.astype(self.dtype)).reshape(-1, x.shape[-1])  # [I * tokens_per_image, D]
        is_soft = (tokens == self.config.image_token_id).reshape(-1)
        index = jnp.clip(jnp.cumsum(is_soft) - 1, 0, soft.shape[0] - 1)
        merged = jnp.where(is_soft[:, None], soft[index].astype(x.dtype), x.reshape(-1, x.shape[-1]))
        return merged.reshape(x.shape)
    def forward(self, tokens: jax.Array, positions: jax.Array, input_mask: jax.Array | None,
                last_only: bool = False, return_hidden: bool = False, images: jax.Array | None = None,
                segment_ids: jax.Array | None = None, remat: str | None = None, scan: bool = False) -> jax.Array:
        """Traceable forward: tokens, positions int [B, T], input_mask bool [B, T] -> f32 logits
        (or, with return_hidden, the final-normed hidden states [B, T, D] that the tied head reads).
        With `images`, soft tokens take the vision tower's output and attend bidirectionally per image.
        `segment_ids` int [B, T] (packed examples, 0 on padding) replaces input_mask: each example
        attends to itself only. `remat` (static): a REMAT_POLICIES name, recomputing each block in the
        backward instead of keeping its activations. `scan` (static): run the blocks as scanned_blocks
        does (compile time flat in depth; the same numbers)."""
        x = self.embed(tokens, images)
        block_end = None if images is None else image_block_end(tokens == self.config.image_token_id)
        windows = {b.sliding_window for b in self.layers}
        if segment_ids is not None:
            if images is not None:
                raise ValueError("packed segments with images are not supported; give input_mask")
            intervals = {w: segment_intervals(segment_ids, w) for w in windows}
        else:
            intervals = {w: causal_intervals(input_mask, w, block_end) for w in windows}
        lookahead = 0 if images is None else self.config.vision.tokens_per_image - 1
        call = Block.__call__
        if remat is not None:
            if remat not in REMAT_POLICIES:
                raise ValueError(f"unknown remat policy {remat!r}; expected one of {sorted(REMAT_POLICIES)} or None")
            call = functools.partial(rematerialized, policy=remat)
        def run(block, x):
            return call(block, x, positions, *intervals[block.sliding_window], lookahead)

        if scan:
            x = scanned_blocks(list(self.layers), x, run)
        else:
            for block in self.layers:
                x = run(block, x)
        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        return x if return_hidden else self.logits(x)

    def extend(self, tokens: jax.Array, positions: jax.Array, cache: Cache, last_only: bool = True,
               images: jax.Array | None = None, fresh: bool = False,
               return_hidden: bool = False) -> tuple[jax.Array, Cache]:
        """Traceable cached forward of a chunk: prefill (T > 1) or one decode step (T = 1).

        tokens int [B, T]; positions int [B, T], negative on (left) padding;
        `images` for the soft tokens of this chunk (whole image blocks only).
        `fresh` (static) promises an empty cache: the chunk then attends over itself only.
        Returns f32 logits [B, 1, V] of the last column (or [B, T, V]) and the cache; with `return_hidden`
        the final-normed hidden states [B, 1 or T, D] that `logits` reads instead.
        """
        x = self.embed(tokens, images)
        k_end = jnp.where(positions >= 0, positions, -1)
        if images is not None:
            block_end = image_block_end(tokens == self.config.image_token_id)
            end_pos = jnp.take_along_axis(positions, jnp.maximum(block_end, 0), axis=1)
            k_end = jnp.where(block_end >= 0, jnp.maximum(k_end, end_pos), k_end)
        layers = []
        for block, layer_cache in zip(self.layers, cache.layers):
            x, layer_cache = block.extend(x, positions, k_end, layer_cache, cache.length, fresh)
            layers.append(layer_cache)
        length = cache.length + jnp.sum(positions >= 0, axis=1, dtype=jnp.int32)
        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        return x if return_hidden else self.logits(x), Cache(tuple(layers), length)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final-normed hidden [B, T, D] -> f32 logits [B, T, V] (tied head, optional soft-cap)."""
        logits = self.embedder.decode(x)
        if self.config.final_logit_softcap is not None:
            cap = self.config.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def __call__(self, tokens, *, images=None, positions=None, input_mask=None, last_only: bool = False,
                 return_hidden: bool = False) -> jax.Array:
        """Logits of the plain causal forward.

        Args:
          tokens: int [B, T] token ids in [0, vocab_size); each image is a contiguous
            run of tokens_per_image `config.image_token_id` placeholders.
          images: float32 [num_images, S, S, 3], preprocessed (vision.preprocess),
            in order of appearance in the batch (row by row).
          positions: optional int [B, T]; default counts real tokens from 0
            (so left padding does not shift positions).
          input_mask: optional bool [B, T], True on real tokens; padding must be
            on the left. Default: all True.
          last_only: return logits of the last position only, [B, 1, V].
          return_hidden: return the final-normed hidden states [B, T, D] instead
            of logits (`model.embedder.decode(h)` turns them into logits).

        Returns:
          float32 logits [B, T, V] (or [B, 1, V]).
        """
        tokens = _check_tokens(tokens, self.config.vocab_size)
        if input_mask is None:
            input_mask = jnp.ones(tokens.shape, bool)
        input_mask = _check_like(input_mask, tokens, "input_mask").astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0)
        positions = _check_like(positions, tokens, "positions").astype(jnp.int32)
        images = _check_images(images, tokens, self.config)
        graphdef, state = nnx.split(self)
        return _jit_forward(graphdef, state, tokens, positions, input_mask, images, last_only, return_hidden)


class ModelKey:
    """The static half of a split model (its GraphDef and the state's tree structure) as a jit static argument
    hashed once: hashing a real model's GraphDef takes milliseconds, paid on every call of a function that takes
    the GraphDef itself. Jitted decode steps take this key and the state's leaves (a flat list)."""

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, ModelKey) and self._hash == other._hash
                                 and self.graphdef == other.graphdef and self.treedef == other.treedef)

    def merge(self, leaves) -> Transformer:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _jit_forward(graphdef, state, tokens, positions, input_mask, images, last_only, return_hidden):
    # jax.jit over the split state (not nnx.jit over the module): no second copy of the parameters
    return nnx.merge(graphdef, state).forward(tokens, positions, input_mask, last_only, return_hidden, images)


def _check_images(images, tokens: jax.Array, config: GemmaConfig) -> jax.Array | None:
    """Validates images against the model and the soft-token placeholders in `tokens`."""
    ids = _concrete(tokens)
    n_soft = None if ids is None else int((ids == config.image_token_id).sum())
    if images is None:
        if n_soft and config.vision is not None:
            raise ValueError(f"tokens hold {n_soft} image soft tokens (id {config.image_token_id}) but no images "
                             f"were given; pass images=[num_images, S, S, 3]")
        return None
    if config.vision is None:
        raise ValueError("images were given but this model has no vision tower (text-only config)")
    v = config.vision
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (v.image_size, v.image_size, 3):
        raise ValueError(f"images must be float [num_images, {v.image_size}, {v.image_size}, 3] "
                         f"(see vision.preprocess), got shape {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be preprocessed floats in [-1, 1], got dtype {images.dtype}")
    if n_soft is not None:
        expected = images.shape[0] * v.tokens_per_image
        if n_soft != expected:
            raise ValueError(f"{images.shape[0]} image(s) need {expected} soft tokens ({v.tokens_per_image} each) "
                             f"but tokens hold {n_soft}: more images than placeholders or fewer")
        runs = np.diff(np.concatenate([np.zeros((ids.shape[0], 1), int), (ids == config.image_token_id).astype(int),
                                       np.zeros((ids.shape[0], 1), int)], axis=1), axis=1)
        lengths = np.nonzero(runs == -1)[1] - np.nonzero(runs == 1)[1]
        if np.any(lengths != v.tokens_per_image):
            raise ValueError(f"each image needs one contiguous run of {v.tokens_per_image} soft tokens; found runs "
                             f"of lengths {lengths.tolist()}")
    return images


def _concrete(x) -> np.ndarray | None:
    """The value of x as numpy, or None when x is abstract (inside a trace)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_tokens(tokens, vocab_size: int) -> jax.Array:
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens)
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
        raise TypeError(f"tokens must be an int array [B, T], got {type(tokens).__name__}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have rank 2 [batch, time], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens is empty (shape {tuple(tokens.shape)}); need at least one token per row")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    value = _concrete(tokens)
    if value is not None:
        lo, hi = int(value.min()), int(value.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return jnp.asarray(tokens, jnp.int32)


def _check_like(x, tokens: jax.Array, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.shape != tokens.shape:
        raise ValueError(f"{name} must have the shape of tokens {tuple(tokens.shape)}, got {tuple(x.shape)}")
    return x
