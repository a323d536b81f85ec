"""Sharding: a (data, fsdp, tensor) device mesh and one rule table from logical axis names to mesh axes.

Every parameter carries the logical names of its axes (nnx metadata `logical_axes`, set by the
modules that own them: kernels.dense.Einsum, the embedder, the norms, LoRA). `RULES` maps each
name to mesh axes; a dimension is split only where the mesh axes divide it, so the single KV head
of the 270M and 1B stays whole under tensor parallelism (its projection is split over fsdp on
the model width instead) while the 4B+'s 4-16 KV heads split over tensor. A matrix the rules leave
unsplit over fsdp (LoRA factors, or a model width fsdp does not divide) then takes fsdp on its largest
dimension fsdp divides, so on a pod every matrix and its optimizer moments are split over fsdp; only
vectors (norm scales) stay whole (benchmarks/lower_train_step.py: per-device bytes of parameters + AdamW
state within 1.04x of total / 256 for 4B-27B on fsdp=64 x tensor=4). Multi-host runs use the same code:
the mesh spans jax.devices() of every process after jax.distributed.initialize
(tests/test_train_sharding.py runs 2 processes x 4 CPU devices).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),  # activations: the batch is split over every data-parallel axis
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "norm": (),
    "lora_rank": (),
    "vision_embed": ("fsdp",),
    "vision_mlp": ("tensor",),
    "vision_heads": ("tensor",),
    "vision_head_dim": (),
}


def parse_mesh(text: str | dict | None) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" (any subset; missing axes are 1) -> {"data": 2, "fsdp": 2, "tensor": 2}."""
    if text is None:
        return {}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, value = part.partition("=")
            if not eq or not value.strip().isdigit():
                raise ValueError(f"--mesh {text!r}: expected name=size pairs like data=2,fsdp=2,tensor=2")
            items.append((name.strip(), int(value)))
    sizes = {}
    for name, size in items:
        if name not in MESH_AXES:
            raise ValueError(f"--mesh: unknown axis {name!r}; expected axes among {', '.join(MESH_AXES)}")
        if int(size) < 1:
            raise ValueError(f"--mesh: axis {name} must have size >= 1, got {size}")
        sizes[name] = int(size)
    return sizes


def make_mesh(sizes: dict[str, int] | str | None = None, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process).
    Unspecified axes are 1, except that with no sizes at all every device goes to fsdp."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(sizes)
    if not sizes:
        sizes = {"fsdp": len(devices)}
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(f"--mesh {','.join(f'{a}={n}' for a, n in zip(MESH_AXES, shape))} needs "
                         f"{math.prod(shape)} devices but there are {len(devices)} "
                         f"({jax.process_count()} process(es)); make the sizes multiply to {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def partition_spec(logical_axes, shape, mesh_shape: dict[str, int]) -> PartitionSpec:
    """PartitionSpec of an array whose axes have these logical names: each dimension takes its rule's mesh
    axes when they are unused so far and their product divides it; otherwise it stays whole.

    Then, for arrays of 2+ dimensions that the rules left unsplit over fsdp, fsdp goes to their largest
    dimension it divides (after that dimension's tensor split, if any): the LoRA b matrices ([r, heads,
    head_dim], [r, mlp]), whose named dimensions are all taken by tensor or unsplit, and any weight whose
    model width fsdp does not divide (d_model 640 on fsdp=256), so that no matrix or its optimizer moments
    stay whole on every fsdp device. Vectors (norm scales) stay as the rules leave them."""
    used, spec = set(), []
    for name, dim in zip(logical_axes, shape):
        axes = tuple(a for a in RULES.get(name, ()) if mesh_shape.get(a, 1) > 1 and a not in used)
        if axes and dim % math.prod(mesh_shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes)
        else:
            spec.append(())
    fsdp = mesh_shape.get("fsdp", 1)
    if len(shape) >= 2 and fsdp > 1 and "fsdp" not in used:
        fits = [i for i, dim in enumerate(shape) if dim % (fsdp * math.prod(mesh_shape[a] for a in spec[i])) == 0]
        if fits:
            i = max(fits, key=lambda i: shape[i] // math.prod(mesh_shape[a] for a in spec[i]))
            spec[i] = spec[i] + ("fsdp",)
    return PartitionSpec(*(None if not axes else axes[0] if len(axes) == 1 else axes for axes in spec))


def _mesh_shape(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def variable_sharding(variable: nnx.Variable, mesh) -> NamedSharding:
    axes = variable.get_metadata().get("logical_axes")
    value = variable.get_value()
    if axes is None or len(axes) != len(value.shape):
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, partition_spec(axes, value.shape, _mesh_shape(mesh)))


def state_shardings(state: nnx.State, mesh) -> Any:
    """`state` (an nnx.State of Variables) with each Variable's value replaced by its NamedSharding."""
    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh) -> NamedSharding:
    """[B, ...] arrays: rows split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(RULES["batch"]))


def put(tree, shardings):
    """Places host values (the same on every process) onto global arrays with these shardings; each process
    writes only the shards of its own devices."""
    def one(x, sharding):
        x = np.asarray(x) if not isinstance(x, jax.Array) or not x.is_fully_addressable else x
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(one, tree, shardings)


def put_batch(local_rows: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays split over data x fsdp."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_rows.items()}


def bytes_per_device(tree) -> int:
    """Bytes one device holds of the arrays (or ShapeDtypeStructs with shardings) in `tree`."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total
