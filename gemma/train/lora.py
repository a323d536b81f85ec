"""LoRA: low-rank adapters on the model's projections, attached by module path.

    lora.apply(model, rank=8, alpha=16, targets=("q", "v"))   # in place; returns the model
    nnx.state(model, nnx.LoRAParam)                            # the adapters: all the optimizer sees
    lora.merge(model)                                          # in place: plain Einsum modules again

Each targeted `kernels.dense.Einsum` (weight w, spec "x,w->y") becomes a `LoRAEinsum` holding it:
y = x.w + (alpha / rank) * (x.a).b, with a over w's contracted axes and b over its others, so
a [D, r] and b [r, N, H] for q_proj. As in PEFT, a starts Kaiming-uniform (bound 1/sqrt(fan_in))
and b at zero, so a fresh adapter changes nothing. We write LoRA ourselves rather than through
qwix: merging, PEFT export and the CPU decode path need the adapter as explicit parameters of a
module we own. QLoRA: the same adapters over a `kernels.quantized.QuantizedEinsum` (a model from
checkpoints.load(..., quantize="int4")); its integer weights are frozen state, not parameters.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gemma.layers import QuantizedEmbedder
from kernels.dense import Einsum, einsum_axes
from kernels.quantized import QuantizedEinsum

# --lora-targets names -> (sub-module, attribute) inside each decoder block
TARGETS = {"q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"), "o": ("attn", "o_proj"),
           "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj")}
_RANK = "r"  # the adapter's rank axis in the einsum specs (no projection spec uses a lowercase r)


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """"q,v" or ["q", "v"] -> ("q", "v") in TARGETS order; unknown names raise naming the valid ones."""
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"unknown LoRA target(s) {unknown or names!r}; expected a comma-separated subset of "
                         f"{','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


class LoRAEinsum(nnx.Module):
    """A frozen Einsum (or QuantizedEinsum: QLoRA) plus a trainable rank-r update (nnx.LoRAParam a, b)."""

    def __init__(self, base: Einsum | QuantizedEinsum, rank: int, alpha: float, *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        lhs, rhs, out, batch, contract, rest = einsum_axes(base.spec)
        shape, logical = _weight_shape(base)
        sizes = dict(zip(rhs, shape))
        fan_in = math.prod(sizes[a] for a in contract)
        bound = 1.0 / math.sqrt(fan_in)
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        self.a_spec = f"{lhs},{contract}{_RANK}->{batch}{_RANK}"
        self.delta_spec = f"{contract}{_RANK},{_RANK}{rest}->{rhs}"
        axes = dict(zip(rhs, logical))
        a_shape = tuple(sizes[c] for c in contract) + (self.rank,)
        self.a = nnx.LoRAParam(jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound).astype(dtype),
                               logical_axes=tuple(axes[c] for c in contract) + ("lora_rank",))
        self.b = nnx.LoRAParam(jnp.zeros((self.rank,) + tuple(sizes[r] for r in rest), dtype),
                               logical_axes=("lora_rank",) + tuple(axes[r] for r in rest))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: jax.Array, preferred_element_type=None) -> jax.Array:
        y = self.base(x, preferred_element_type)
        z = jnp.einsum(self.a_spec, x, self.a[...].astype(x.dtype))  # [batch..., r]
        b = self.b[...].astype(x.dtype)  # [r, rest...]
        update = low_rank(z.reshape(-1, self.rank), b.reshape(self.rank, -1)).reshape(z.shape[:-1] + b.shape[1:])
        return y + (self.scale * update).astype(y.dtype)

    def delta(self) -> jax.Array:
        """(alpha / rank) * a.b in w's layout and f32."""
        return self.scale * jnp.einsum(self.delta_spec, self.a[...].astype(jnp.float32),
                                       self.b[...].astype(jnp.float32))


def _weight_shape(base: Einsum | QuantizedEinsum) -> tuple[tuple[int, ...], tuple]:
    """(shape, logical axes) of the base's weight as its einsum spec reads it."""
    if isinstance(base, QuantizedEinsum):
        return base.shape, base.logical_axes
    if not isinstance(base, Einsum):
        raise TypeError(f"LoRA wraps an Einsum or a QuantizedEinsum, got {type(base).__name__}")
    return base.w.shape, base.w.get_metadata().get("logical_axes", (None,) * base.w.ndim)


@jax.custom_vjp
def low_rank(z: jax.Array, b: jax.Array) -> jax.Array:
    """z [M, r] @ b [r, N], whose b-gradient is the plain product z.T @ dy: differentiating the einsum
    instead, XLA CPU first copied each [M, N] output gradient into a transposed layout."""
    return z @ b


def _low_rank_fwd(z, b):
    return z @ b, (z, b)


def _low_rank_bwd(res, dy):
    z, b = res
    return dy @ b.T, z.T @ dy


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def _sites(model) -> list[tuple[str, object, str]]:
    """(target name, owning module, attribute) of every projection a target name covers, layer by layer."""
    sites = []
    for block in model.layers:
        for name, (sub, attr) in TARGETS.items():
            sites.append((name, getattr(block, sub), attr))
    return sites


def apply(model, rank: int, alpha: float | None = None, targets: Sequence[str] | str = ("q", "k", "v", "o"), *,
          seed: int = 0, dtype=jnp.float32):
    """Wraps the targeted projections of every decoder layer in LoRAEinsum (in place); returns the model.
    `alpha` defaults to rank (scale 1). Adapter parameters are `dtype` (f32: they are master weights)."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    chosen = set(parse_targets(targets))
    rngs = nnx.Rngs(seed)
    for name, owner, attr in _sites(model):
        layer = getattr(owner, attr)
        if name in chosen:
            if isinstance(layer, LoRAEinsum):
                raise ValueError(f"the model already has LoRA adapters on {name}; merge them first")
            setattr(owner, attr, LoRAEinsum(layer, rank, alpha, rngs=rngs, dtype=dtype))
    return model


def settings(model) -> dict | None:
    """{"rank", "alpha", "targets"} of the model's adapters, or None without any."""
    found = {}
    for name, owner, attr in _sites(model):
        layer = getattr(owner, attr)
        if isinstance(layer, LoRAEinsum):
            found.setdefault(name, (layer.rank, layer.alpha))
    if not found:
        return None
    (rank, alpha), = set(found.values())
    return {"rank": rank, "alpha": alpha, "targets": [t for t in TARGETS if t in found]}


def head_table(model) -> jax.Array:
    """The tied output head's table [V, D] for the training loss: a quantized one (QLoRA over a GGUF's 8-bit
    head) is dequantized inside the step, a constant to autodiff."""
    if isinstance(model.embedder, QuantizedEmbedder):
        return jax.lax.stop_gradient(model.embedder.table.dequantized())
    return model.embedder.embedding[...]


def merge(model):
    """Folds every adapter into its weight (w + (alpha / rank) a.b, in w's dtype) and removes it, in place;
    returns the model. Over a quantized base (QLoRA) the merged projection is a float32 Einsum of the
    dequantized weight plus the update (re-quantizing it would round the update away)."""
    for _, owner, attr in _sites(model):
        layer = getattr(owner, attr)
        if isinstance(layer, LoRAEinsum):
            base = layer.base
            if isinstance(base, QuantizedEinsum):
                merged = Einsum(base.spec, base.shape, base.logical_axes, rngs=nnx.Rngs(0))
                merged.w.set_value(base.dequantized() + layer.delta())
                base = merged
            else:
                base.w.set_value((base.w[...].astype(jnp.float32) + layer.delta()).astype(base.w.dtype))
            setattr(owner, attr, base)
    return model
