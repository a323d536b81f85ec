"""The fine-tuning trainer: full or LoRA, sharded over a (data, fsdp, tensor) mesh, accumulated, resumable.

    trainer = Trainer(model, TrainConfig(steps=100, lora_rank=8))
    metrics = trainer.step([batch_1, batch_2])        # one optimizer step over grad_accum micro-batches

One optimizer step sums the masked cross-entropy (gemma.train.loss, chunked over the vocabulary) and its
gradient over k micro-batches and divides by their loss tokens, so k micro-batches of B rows equal one
batch of k * B rows. Parameters and optimizer state stay float32 (master weights); the forward and
backward run in `compute_dtype`. With LoRA only the adapters (nnx.LoRAParam) are trained and held by
the optimizer; the frozen weights keep their dtype and are cast to the compute dtype inside the step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gemma.train import lora, sharding
from gemma.train.loss import cross_entropy_sum
from gemma.transformer import REMAT_POLICIES, Transformer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What a fine-tuning run does (the command line's flags; see `python -m gemma finetune --help`)."""

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 512
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    end_learning_rate: float = 0.0  # the cosine decay's floor, reached at the last step
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0  # global-norm gradient clipping (None: off)
    b1: float = 0.9
    b2: float = 0.999
    lora_rank: int | None = None  # None: full fine-tuning
    lora_alpha: float | None = None  # default: the rank
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    compute_dtype: str = "float32"
    remat: str | None = None  # a gemma.transformer.REMAT_POLICIES name
    scan_layers: bool = False  # the blocks as a scan over their repeating group: compile time flat in depth
    loss_chunk: int = 16384  # vocabulary chunk of the cross-entropy
    seed: int = 0

    def __post_init__(self):
        problems = []
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                problems.append(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.warmup_steps, (int, np.integer)) or self.warmup_steps < 0:
            problems.append(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            problems.append(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            problems.append(f"clip_norm must be > 0 or None, got {self.clip_norm!r}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, (int, np.integer)) or self.lora_rank < 1):
            problems.append(f"lora_rank must be an int >= 1 (or None for full fine-tuning), got {self.lora_rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            problems.append(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            problems.append(f"compute dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        if self.remat is not None and self.remat not in REMAT_POLICIES:
            problems.append(f"remat must be one of {sorted(REMAT_POLICIES)} or None, got {self.remat!r}")
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))
        object.__setattr__(self, "lora_targets", lora.parse_targets(self.lora_targets))

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None

    def schedule(self) -> optax.Schedule:
        """Linear warmup from 0 to learning_rate, then cosine decay to end_learning_rate at `steps`."""
        warmup = min(self.warmup_steps, self.steps - 1)
        return optax.warmup_cosine_decay_schedule(0.0 if warmup else self.learning_rate, self.learning_rate,
                                                  warmup, max(self.steps, warmup + 1), self.end_learning_rate)

    def optimizer(self) -> optax.GradientTransformation:
        adamw = optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, weight_decay=self.weight_decay)
        return adamw if self.clip_norm is None else optax.chain(optax.clip_by_global_norm(self.clip_norm), adamw)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def loss_sums(graphdef, trainable, frozen, batch, compute_dtype, remat, chunk, scan=False):
    """(sum of weighted token cross-entropies, sum of weights) of one micro-batch (a data.Batch of arrays)."""
    model = nnx.merge(graphdef, _cast(trainable, compute_dtype), _cast(frozen, compute_dtype))
    model.dtype = jnp.dtype(compute_dtype)
    hidden = model.forward(batch.inputs, batch.positions, None, return_hidden=True, segment_ids=batch.segment_ids,
                           remat=remat, scan=scan)
    return cross_entropy_sum(hidden, lora.head_table(model), batch.targets, batch.weights,
                             chunk_size=chunk, softcap=model.config.final_logit_softcap)


def _train_step(graphdef, optimizer, compute_dtype, remat, chunk, scan, trainable, frozen, opt_state, batches):
    """One optimizer step over micro-batches stacked on a leading axis [k, B, L]."""
    return accumulated_step(lambda t, b: loss_sums(graphdef, t, frozen, b, compute_dtype, remat, chunk, scan),
                            optimizer, trainable, opt_state, batches)


def accumulated_step(loss, optimizer, trainable, opt_state, batches):
    """One optimizer step of `loss(trainable, micro_batch) -> (sum, weight sum)` over micro-batches stacked on a
    leading axis, normalised by the weight sum of all of them."""
    def micro(carry, batch):
        grads, loss_sum, count = carry
        (l, n), g = jax.value_and_grad(lambda t: loss(t, batch), has_aux=True)(trainable)  # the weight sum: aux
        return (jax.tree.map(jnp.add, grads, g), loss_sum + l, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, loss_sum, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batches)
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss_sum / jnp.maximum(count, 1.0), "tokens": count,
                                  "grad_norm": optax.tree.norm(grads)}


def _eval_step(graphdef, compute_dtype, chunk, scan, trainable, frozen, batch):
    return loss_sums(graphdef, trainable, frozen, batch, compute_dtype, None, chunk, scan)


def _trainable_type(config: TrainConfig):
    return nnx.LoRAParam if config.lora else nnx.Param


def _shardings(optimizer, trainable, frozen, mesh):
    """NamedShardings of the trainable and frozen states (by sharding.RULES) and of the optimizer state
    (each moment as its parameter; counts replicated). The states may be abstract (ShapeDtypeStructs)."""
    trainable_shardings = sharding.state_shardings(trainable, mesh)
    frozen_shardings = sharding.state_shardings(frozen, mesh)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, trainable),
                                          trainable_shardings,
                                          transform_non_params=lambda _: sharding.replicated(mesh),
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    return trainable_shardings, frozen_shardings, opt_shardings


def _micro_sharding(mesh):
    """Micro-batches stacked [k, B, L]: rows split over data x fsdp."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *sharding.batch_sharding(mesh).spec))


def _jit_step(graphdef, optimizer, config: TrainConfig, mesh, trainable_shardings, frozen_shardings, opt_shardings):
    """The jitted _train_step: (trainable, frozen, opt_state, batches [k, B, L]) -> (trainable, opt_state,
    metrics), trainable and optimizer state donated."""
    return jax.jit(
        functools.partial(_train_step, graphdef, optimizer, config.compute_dtype, config.remat, config.loss_chunk,
                          config.scan_layers),
        in_shardings=(trainable_shardings, frozen_shardings, opt_shardings, _micro_sharding(mesh)),
        out_shardings=(trainable_shardings, opt_shardings, None), donate_argnums=(0, 2))


def abstract_step(model_config, config: TrainConfig, mesh, *, param_dtype=jnp.float32):
    """The Trainer's jitted step for `model_config` on `mesh` and its abstract inputs; nothing is allocated.

        step, args = abstract_step(gemma3_27b().text_only(), TrainConfig(lora_rank=8), mesh)
        with jax.sharding.use_abstract_mesh(mesh):
            step.trace(*args).lower(lowering_platforms=("tpu",))

    `mesh` may be a jax.sharding.AbstractMesh with the axes of sharding.MESH_AXES (a TPU pod seen from a
    CPU). `args` = (trainable, frozen, opt_state, batches): nnx.States and a data.Batch of
    jax.ShapeDtypeStructs carrying the shardings the Trainer would give them (parameters from
    nnx.eval_shape of the model in `param_dtype`, LoRA applied as the Trainer applies it; batches
    [grad_accum, batch_size, seq_len]), so sharding.bytes_per_device(args[:3]) is what one device holds
    of parameters and optimizer state."""
    from gemma.train.data import Batch

    model = nnx.eval_shape(lambda: Transformer(model_config, dtype=param_dtype, rngs=nnx.Rngs(config.seed)))
    if config.lora:  # a second eval_shape: inside the first, each rngs draw cost flax 0.12 a walk of the
        # whole trace so far (13 s instead of 1.3 for the 4B's 238 adapters)
        model = nnx.eval_shape(lambda m: lora.apply(m, config.lora_rank, config.lora_alpha, config.lora_targets,
                                                    seed=config.seed), model)
    graphdef, trainable, frozen = nnx.split(model, _trainable_type(config), ...)
    optimizer = config.optimizer()
    shardings = _shardings(optimizer, trainable, frozen, mesh)
    opt_state = jax.eval_shape(optimizer.init, trainable)

    def place(tree, tree_shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, tree_shardings)

    shape, micro = (config.grad_accum, config.batch_size, config.seq_len), _micro_sharding(mesh)
    batches = Batch(*(jax.ShapeDtypeStruct(shape, dtype, sharding=micro)
                      for dtype in (jnp.int32, jnp.int32, jnp.float32, jnp.int32, jnp.int32)))
    step = _jit_step(graphdef, optimizer, config, mesh, *shardings)
    return step, (place(trainable, shardings[0]), place(frozen, shardings[1]), place(opt_state, shardings[2]),
                  batches)


class Trainer:
    """Holds the split model (trainable / frozen parameter states), the optimizer state and the jitted step.

    `model` is taken over (LoRA is applied to it in place). `mesh` (default: every device on fsdp)
    shards parameters and optimizer state by `sharding.RULES` and batches over data x fsdp.
    """

    def __init__(self, model: Transformer, config: TrainConfig, mesh=None):
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        if config.lora:
            lora.apply(model, config.lora_rank, config.lora_alpha, config.lora_targets, seed=config.seed)
        self.model_config = model.config
        self.graphdef, trainable, frozen = nnx.split(model, _trainable_type(config), ...)
        self.optimizer = config.optimizer()
        self.trainable_shardings, self.frozen_shardings, self.opt_shardings = _shardings(
            self.optimizer, trainable, frozen, self.mesh)
        self.trainable = sharding.put(trainable, self.trainable_shardings)
        self.frozen = sharding.put(frozen, self.frozen_shardings)
        self.opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(self.trainable)
        self.step_count = 0
        self._batch = sharding.batch_sharding(self.mesh)
        self._step = _jit_step(self.graphdef, self.optimizer, config, self.mesh, self.trainable_shardings,
                               self.frozen_shardings, self.opt_shardings)
        self._eval = jax.jit(functools.partial(_eval_step, self.graphdef, config.compute_dtype, config.loss_chunk,
                                               config.scan_layers),
                             in_shardings=(self.trainable_shardings, self.frozen_shardings, self._batch))

    # ----------------------------------------------------------------------------------- steps
    def _global(self, batch, stacked: bool):
        """Process-local rows (numpy) -> global arrays split over the batch axes."""
        named = _micro_sharding(self.mesh) if stacked else self._batch
        return type(batch)(*(jax.make_array_from_process_local_data(named, np.asarray(x)) for x in batch))

    def step(self, micro_batches: Sequence) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches (data.Batch of this process's rows)."""
        if len(micro_batches) != self.config.grad_accum:
            raise ValueError(f"a step takes grad_accum={self.config.grad_accum} micro-batches, got {len(micro_batches)}")
        stacked = type(micro_batches[0])(*(np.stack(xs) for xs in zip(*micro_batches)))
        lr = float(self.config.schedule()(self.step_count))
        self.trainable, self.opt_state, metrics = self._step(self.trainable, self.frozen, self.opt_state,
                                                             self._global(stacked, True))
        self.step_count += 1
        return {"loss": float(metrics["loss"]), "tokens": int(metrics["tokens"]), "learning_rate": lr,
                "grad_norm": float(metrics["grad_norm"])}

    def loss_sums(self, batch) -> tuple[float, float]:
        """(sum of weighted cross-entropies, sum of weights) of one batch, without updating anything."""
        loss, count = self._eval(self.trainable, self.frozen, self._global(batch, False))
        return float(loss), float(count)

    # ----------------------------------------------------------------------------------- results
    def model(self) -> Transformer:
        """The current model (float32 trainable weights; LoRA still attached)."""
        return nnx.merge(self.graphdef, jax.device_get(self.trainable), jax.device_get(self.frozen))

    def merged_model(self, dtype=jnp.float32) -> Transformer:
        """The fine-tuned model with adapters folded into their weights (in f32), on the host, in `dtype`."""
        model = lora.merge(self.model())
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, _cast(state, dtype))
        model.dtype = jnp.dtype(dtype)
        return model
