"""Quantized weights: int8 and int4 in groups along the contraction, and the module that owns one.

A weight is stored as rows x contraction, `data` [*R, K] (the output axes R, then the
contracted axes flattened to K, which is how GGUF and HF store a matrix), with one scale per
group of `group` consecutive contracted values:

    int8:  w[r, k] = scale[r, k // group] * q[r, k]                       q int8
    int4:  w[r, k] = scale[r, k // 32] * q[r, k] - minimum[r, k // 32]    q in 0..15

int4 packs a group of 32 values in 16 bytes: byte j holds value j (low nibble) and value
j + 16 (high nibble). Scales are float16 or float32 (float32 where a format's scale is a
product, as Q4_K's and Q6_K's sub-block scales). Every GGUF type these hold is held exactly
(checkpoints/gguf_quant.py). Dequantization is plain float32 arithmetic, s * q (- m).

qwix (`qwix.QArray`) represents w = (q - zero_point) * scale; Q4_K's s * q - m is not that
bitwise (zero_point = m / s rounds), so the exact format is ours; off the CPU kernels the product
dequantizes in the activation dtype and lets XLA fuse it into the dot.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MODES = ("int8", "int4")
INT4_GROUP = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized weight [*R, K] (see the module docstring): data, scale, minimum (int4 only)."""

    data: jax.Array
    scale: jax.Array
    minimum: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical weight shape [*R, K]."""
        *rows, k = self.data.shape
        return (*rows, k * 2 if self.bits == 4 else k)

    def flat(self) -> "QArray":
        """The same weight as a matrix [prod(R), K]."""
        two_d = lambda a: None if a is None else a.reshape(-1, a.shape[-1])
        return QArray(two_d(self.data), two_d(self.scale), two_d(self.minimum), self.bits, self.group)

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in (self.data, self.scale, self.minimum) if a is not None)


def check_group(name: str, k: int, group: int) -> None:
    """A contraction of k values must be whole groups (the kernels take groups of 16 lanes)."""
    if group % 16 or k % group:
        raise ValueError(f"{name}: contraction of {k} values is not a multiple of the quantization group size "
                         f"{group} (groups must be a multiple of 16 that divides the contracted size)")


def unpack_int4(data: jax.Array) -> jax.Array:
    """uint8 [*R, K // 2] -> uint8 [*R, K] values 0..15 (per group of 32: low nibbles, then high)."""
    *rows, half = data.shape
    g = data.reshape(*rows, half // 16, 16)
    return jnp.concatenate([g & 0x0F, g >> 4], axis=-1).reshape(*rows, half * 2)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 [*R, K] -> uint8 [*R, K // 2] in the layout unpack_int4 reads."""
    *rows, k = q.shape
    g = q.reshape(*rows, k // 32, 2, 16).astype(np.uint8)
    return (g[..., 0, :] | (g[..., 1, :] << 4)).reshape(*rows, k // 2)


def dequantize(w: QArray, dtype=jnp.float32) -> jax.Array:
    """The weight [*R, K]: s * q (- m) in float32, then cast to `dtype`."""
    *rows, k = w.shape
    q = unpack_int4(w.data) if w.bits == 4 else w.data
    q = q.astype(jnp.float32).reshape(*rows, k // w.group, w.group)
    out = w.scale.astype(jnp.float32)[..., None] * q
    if w.minimum is not None:
        out = out - w.minimum.astype(jnp.float32)[..., None]
    return out.reshape(*rows, k).astype(dtype)


def select_rows(w: QArray, index: jax.Array) -> QArray:
    """The rows w[index], still quantized: [*index.shape, K]."""
    pick = lambda a: None if a is None else jnp.take(a, index, axis=0)
    return QArray(pick(w.data), pick(w.scale), pick(w.minimum), w.bits, w.group)


def take_rows(w: QArray, index: jax.Array) -> jax.Array:
    """Dequantized float32 rows w[index] (an embedding lookup): [*index.shape, K]."""
    return dequantize(select_rows(w, index))


def quantize(w, bits: int, group: int = 32, name: str = "weight") -> QArray:
    """A float weight [*R, K] (contraction last) -> QArray, with float16 scales (numpy on the host).

    int8: symmetric, scale = max|w| / 127 per group. int4: asymmetric groups of 32, scale =
    (max - min) / 15 and minimum = -min, so q = round((w + minimum) / scale) in 0..15.
    """
    w = np.asarray(w, np.float32)
    *rows, k = w.shape
    if bits == 4 and group != INT4_GROUP:
        raise ValueError(f"{name}: int4 uses groups of {INT4_GROUP}, got {group}")
    check_group(name, k, group)
    g = w.reshape(*rows, k // group, group)
    if bits == 8:
        scale = (np.abs(g).max(-1) / 127.0).astype(np.float16)
        s = scale.astype(np.float32)[..., None]
        q = np.clip(np.rint(g / np.where(s == 0, 1, s)), -127, 127).astype(np.int8)
        return QArray(q.reshape(*rows, k), scale, None, 8, group)
    if bits == 4:
        lo, hi = g.min(-1), g.max(-1)
        scale = ((hi - lo) / 15.0).astype(np.float16)
        minimum = (-lo).astype(np.float16)
        s, m = scale.astype(np.float32)[..., None], minimum.astype(np.float32)[..., None]
        q = np.clip(np.rint((g + m) / np.where(s == 0, 1, s)), 0, 15).astype(np.uint8)
        return QArray(pack_int4(q.reshape(*rows, k)), scale, minimum, 4, group)
    raise ValueError(f"{name}: bits must be 8 or 4, got {bits!r}")


def matmul(x: jax.Array, w: QArray) -> jax.Array:
    """float32 [M, R] = x [M, K] . w[R, K]^T for a 2-D QArray. Decode-sized products on an x86 CPU
    go to kernels.cpu_quantized (the weights are read once, widened in registers); others
    dequantize in x's dtype inside the jitted product. The weights are constants to autodiff."""
    from kernels import cpu_quantized

    w = jax.lax.stop_gradient(w)
    if cpu_quantized.usable(x.shape[0]):
        return _kernel_matmul(x, w)
    dtype = x.dtype if x.dtype in (jnp.bfloat16, jnp.float32) else jnp.float32
    return _dequantized_matmul(x.astype(dtype), w)


@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
def _dequantized_matmul(x: jax.Array, w: QArray) -> jax.Array:
    """x . dequantize(w)^T in x's dtype; rematerialized, so a backward pass (QLoRA) keeps the quantized
    weight as its residual and dequantizes it again, never holding the widened matrix between passes."""
    return jnp.einsum("MK,RK->MR", x, dequantize(w, x.dtype), preferred_element_type=jnp.float32)


@jax.custom_jvp
def _kernel_matmul(x: jax.Array, w: QArray) -> jax.Array:
    from kernels import cpu_quantized

    return cpu_quantized.matmul(x, w)


@_kernel_matmul.defjvp
def _kernel_matmul_jvp(primals, tangents):
    x, w = primals
    dx = tangents[0]  # the weights are constants (matmul stops their gradient)
    return _kernel_matmul(x, w), jnp.einsum("MK,RK->MR", dx.astype(jnp.float32), dequantize(w))


class QuantizedData(nnx.Variable):
    """Integer data and scales of a quantized weight: state, but not a trainable nnx.Param."""


class QuantizedEinsum(nnx.Module):
    """A kernels.dense.Einsum whose weight is a QArray: y = einsum(spec, x, w) through the one dense path.

    The weight of spec "lhs,rhs->out" is stored rows x contraction: the weight's non-contracted
    axes in rhs order, then its contracted axes flattened. `shape` is the float weight's shape."""

    def __init__(self, spec: str, shape: Sequence[int], w: QArray, logical_axes: Sequence[str | None] = ()):
        from kernels.dense import einsum_axes

        lhs, rhs, out, batch, contract, rest = einsum_axes(spec)
        sizes = dict(zip(rhs, shape))
        want = tuple(sizes[a] for a in rest) + (math.prod(sizes[a] for a in contract),)
        if tuple(w.shape) != want:
            raise ValueError(f"QuantizedEinsum {spec!r}: weight {tuple(shape)} is stored as {want}, "
                             f"got a QArray of shape {tuple(w.shape)}")
        self.spec, self.shape, self.bits, self.group = spec, tuple(shape), w.bits, w.group
        self.logical_axes = tuple(logical_axes) if logical_axes else (None,) * len(rhs)  # of the float weight
        axes = dict(zip(rhs, logical_axes)) if logical_axes else {}
        meta = dict(logical_axes=tuple(axes.get(a) for a in rest) + (None,))
        self.data = QuantizedData(w.data, **meta)
        self.scale = QuantizedData(w.scale, **meta)
        self.minimum = None if w.minimum is None else QuantizedData(w.minimum, **meta)

    @classmethod
    def from_float(cls, spec: str, w, bits: int, name: str, logical_axes: Sequence[str | None] = ()):
        """Quantizes a float weight in the Einsum's layout (`w` as jnp.einsum(spec) reads it)."""
        from kernels.dense import einsum_axes

        lhs, rhs, out, batch, contract, rest = einsum_axes(spec)
        w = np.asarray(w, np.float32)
        order = [rhs.index(a) for a in rest + contract]
        rows = w.transpose(order).reshape(*(w.shape[rhs.index(a)] for a in rest), -1)
        return cls(spec, w.shape, quantize(rows, bits, name=name), logical_axes)

    def weight(self) -> QArray:
        minimum = None if self.minimum is None else self.minimum[...]
        return QArray(self.data[...], self.scale[...], minimum, self.bits, self.group)

    def dequantized(self) -> jax.Array:
        """The float32 weight in the Einsum's layout (`shape`, as jnp.einsum(spec) reads it)."""
        from kernels.dense import einsum_axes

        lhs, rhs, out, batch, contract, rest = einsum_axes(self.spec)
        sizes = dict(zip(rhs, self.shape))
        w = dequantize(self.weight()).reshape(tuple(sizes[a] for a in rest + contract))
        return w.transpose([(rest + contract).index(a) for a in rhs])

    def __call__(self, x: jax.Array, preferred_element_type=None) -> jax.Array:
        from kernels.dense import dense

        return dense(self.spec, x, self.weight(), preferred_element_type)
