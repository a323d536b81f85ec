"""The one dense path: `dense(spec, x, w)` and `Einsum`, the module that owns a weight and its product.

Every projection of the models (attention q/k/v/o, the MLP, the vision tower) is an `Einsum`: its
weight `w`, the einsum spec that reads it and the logical name of each weight axis. LoRA,
quantization and sharding attach to these modules by their path in the model; the product goes
through `dense`, which sends decode-sized CPU products to kernels.cpu_dense.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import cpu_dense
from kernels.quantized import QArray, matmul


def normal_init(rngs: nnx.Rngs, shape, dtype, scale: float = 0.02) -> jax.Array:
    """N(0, scale^2) parameters, drawn in f32 and cast (the random init of every matrix of the models)."""
    return (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def einsum_axes(spec: str) -> tuple[str, str, str, str, str, str]:
    """(lhs, rhs, out, batch, contract, rest) letters of "lhs,rhs->out" for an activation and a weight:
    batch axes are the activation's own, contract axes are shared, rest are the weight's others."""
    (lhs, rhs), out = spec.split("->")[0].split(","), spec.split("->")[1]
    batch = "".join(a for a in lhs if a not in rhs)
    contract = "".join(a for a in lhs if a in rhs)
    rest = "".join(a for a in rhs if a not in lhs)
    return lhs, rhs, out, batch, contract, rest


def dense(spec: str, x: jax.Array, w: jax.Array | QArray, preferred_element_type=None) -> jax.Array:
    """jnp.einsum(spec, x, w) for an activation x and a weight w, e.g. "BTD,DNH->BTNH".

    A quantized weight (kernels.quantized.QArray, stored rows x contraction) goes to
    quantized.matmul; its result is float32, returned in x's dtype unless told otherwise.

    Decode-sized products (cpu_dense.usable: <= 16 rows f32, <= 32 bf16) with f32 or bf16 weights on CPU go to
    kernels.cpu_dense, which streams the weights at memory speed where XLA's few-row dots do not;
    the result is the same product accumulated in f32, returned in einsum's dtype.
    """
    lhs, rhs, out, batch, contract, rest = einsum_axes(spec)
    rows = math.prod(x.shape[:len(batch)])
    if isinstance(w, QArray):
        *rest_shape, k = w.shape
        if math.prod(x.shape[len(batch):]) != k:
            raise ValueError(f"dense {spec!r}: activation {x.shape} contracts {math.prod(x.shape[len(batch):])} "
                             f"values, the quantized weight {tuple(w.shape)} holds {k}")
        y = matmul(x.reshape(rows, k), w.flat())
        return y.reshape(*x.shape[:len(batch)], *rest_shape).astype(preferred_element_type or x.dtype)
    layout = "major" if rhs == contract + rest else "minor" if rhs == rest + contract else None
    if layout is None or lhs != batch + contract or out != batch + rest:
        return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
    k = math.prod(x.shape[len(batch):])
    x2, w2 = x.reshape(rows, k), (w.reshape(k, -1) if layout == "major" else w.reshape(-1, k))
    rest_shape = w.shape[len(contract):] if layout == "major" else w.shape[:len(rest)]
    if cpu_dense.usable(x, w, rows):
        dtype = preferred_element_type or jnp.result_type(x.dtype, w.dtype)
        y = cpu_dense.dense(x2, w2, layout).astype(dtype)
    else:
        # one [rows, k] product, not the einsum over (batch..., contract...): differentiating the einsum,
        # XLA CPU wrote each weight gradient's [rows, out] operand transposed (a strided copy per product)
        y = jnp.matmul(x2, w2 if layout == "major" else w2.T, preferred_element_type=preferred_element_type)
    return y.reshape(*x.shape[:len(batch)], *rest_shape)


class Einsum(nnx.Module):
    """y = einsum(spec, x, w) through `dense`; `w` is an nnx.Param whose metadata `logical_axes` names
    each of its axes (e.g. ("embed", "q_heads", "head_dim")) for the sharding rules."""

    def __init__(self, spec: str, shape: Sequence[int], logical_axes: Sequence[str], *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        lhs, rhs, out, batch, contract, rest = einsum_axes(spec)
        if lhs != batch + contract or out != batch + rest:
            raise ValueError(f"Einsum {spec!r}: expected activation axes (batch..., contracted...) and output "
                             f"axes (batch..., the weight's others...)")
        if len(shape) != len(rhs) or len(logical_axes) != len(rhs):
            raise ValueError(f"Einsum {spec!r}: the weight has {len(rhs)} axes, got shape {tuple(shape)} and "
                             f"logical axes {tuple(logical_axes)}")
        self.spec = spec
        self.w = nnx.Param(normal_init(rngs, tuple(shape), dtype), logical_axes=tuple(logical_axes))

    def __call__(self, x: jax.Array, preferred_element_type=None) -> jax.Array:
        return dense(self.spec, x, self.w[...], preferred_element_type)
