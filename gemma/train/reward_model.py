"""Reward models: the Gemma 3 decoder with a scalar head on the last real token, trained on preferences or entailment.

    rm = RewardModel(Transformer(config, rngs=nnx.Rngs(0)))
    scores = rm(tokens, input_mask)                        # f32 [B]: w . h_last + b
    history = train(rm, batches, TrainConfig(steps=200, learning_rate=1e-3))   # Pairs or Labelled batches
    trainer = RewardTrainer(rm, config); trainer.step(batch); trainer.model()  # step by step (run directories)
    accuracy(rm, held_out)                                 # P(r_chosen > r_rejected), or P((s > 0) == label)
    r = entailment_reward(rm(tokens, mask))                # log P(entailed | document, summary)
    checkpoints.save(rm, DIR); checkpoints.load_reward_model(DIR)   # backbone and head, bit-exact

Losses: Bradley-Terry on preference pairs, -log sigmoid(r_chosen - r_rejected) (the reward-model loss of WARM,
Ramé et al. 2024); the entailment cross-entropy on (document, summary, entailed) triples with the score as the
logit of P(entailed) (a sigmoid; a two-logit softmax head is the same model with s = l_entailed - l_not), whose
log-probability is Roit et al. 2023's reward at EOS. The step is gemma.train.trainer's accumulated_step with
TrainConfig's optimizer (AdamW, warmup-cosine schedule, global-norm clipping); all parameters are trained.
"""

from __future__ import annotations

import functools
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma.train.trainer import TrainConfig, _cast, accumulated_step
from gemma.transformer import Transformer


class Pairs(NamedTuple):
    """Preference pairs: left- (or right-) padded token rows [B, T] with bool masks, chosen and rejected."""
    chosen: np.ndarray
    chosen_mask: np.ndarray
    rejected: np.ndarray
    rejected_mask: np.ndarray


class Labelled(NamedTuple):
    """Labelled rows (document <sep> summary): tokens [B, T], mask [B, T], labels [B] (1 entailed, 0 not)."""
    tokens: np.ndarray
    mask: np.ndarray
    labels: np.ndarray


def pad_rows(rows, length: int, *, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> int32 [N, length] and its bool mask, each row right- (or left-) padded: the head reads
    the last real token either way."""
    tokens, mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        cols = slice(length - len(r), length) if left else slice(0, len(r))
        tokens[i, cols], mask[i, cols] = r, True
    return tokens, mask


class ScalarHead(nnx.Module):
    """r = w . h + b on a [..., D] hidden state; w and b start at 0 (every reward 0 before training)."""

    def __init__(self, d_model: int):
        self.w = nnx.Param(jnp.zeros((d_model,), jnp.float32), logical_axes=("embed",))
        self.b = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, h: jax.Array) -> jax.Array:
        return jnp.einsum("...D,D->...", h.astype(jnp.float32), self.w[...]) + self.b[...]


class RewardModel(nnx.Module):
    def __init__(self, backbone: Transformer):
        self.backbone = backbone
        self.head = ScalarHead(backbone.config.d_model)

    def score(self, tokens: jax.Array, input_mask: jax.Array, remat: str | None = None) -> jax.Array:
        """Traceable: int [B, T], bool [B, T] -> f32 [B], the head on the final-normed hidden state of each
        row's last real token."""
        positions = jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0).astype(jnp.int32)
        h = self.backbone.forward(tokens, positions, input_mask, return_hidden=True, remat=remat)
        last = tokens.shape[1] - 1 - jnp.argmax(input_mask[:, ::-1], axis=1)
        return self.head(h[jnp.arange(tokens.shape[0]), last])

    def __call__(self, tokens, input_mask=None) -> jax.Array:
        tokens, input_mask = _check_rows(tokens, input_mask, self.backbone.config.vocab_size)
        graphdef, state = nnx.split(self)
        return _jit_score(graphdef, state, tokens, input_mask)


@functools.partial(jax.jit, static_argnums=0)
def _jit_score(graphdef, state, tokens, input_mask):
    return nnx.merge(graphdef, state).score(tokens, input_mask)


# ---------------------------------------------------------------- losses


def bradley_terry_loss(r_chosen: jax.Array, r_rejected: jax.Array) -> jax.Array:
    """mean over pairs of -log sigmoid(r_chosen - r_rejected)."""
    return jnp.mean(-jax.nn.log_sigmoid(r_chosen - r_rejected))


def entailment_loss(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """mean binary cross-entropy of P(entailed) = sigmoid(score) against labels in {0, 1}."""
    return jnp.mean(-(labels * jax.nn.log_sigmoid(scores) + (1 - labels) * jax.nn.log_sigmoid(-scores)))


def entailment_reward(scores: jax.Array) -> jax.Array:
    """Roit et al.'s reward: r = log P(entailed | document, summary) = log sigmoid(score), <= 0."""
    return jax.nn.log_sigmoid(scores)


def _loss_sum(graphdef, compute_dtype, remat, trainable, batch):
    """(sum of the batch's losses, number of pairs or rows) for accumulated_step."""
    model = nnx.merge(graphdef, _cast(trainable, compute_dtype))
    model.backbone.dtype = jnp.dtype(compute_dtype)
    if isinstance(batch, Pairs):
        n = batch.chosen.shape[0]  # one forward over chosen and rejected rows together
        both = model.score(jnp.concatenate([batch.chosen, batch.rejected]),
                           jnp.concatenate([batch.chosen_mask, batch.rejected_mask]), remat)
        return n * bradley_terry_loss(both[:n], both[n:]), jnp.float32(n)
    n = batch.tokens.shape[0]
    return n * entailment_loss(model.score(batch.tokens, batch.mask, remat), batch.labels), jnp.float32(n)


# ---------------------------------------------------------------- training and evaluation


class RewardTrainer:
    """One reward model's parameters, optimizer state and jitted step: what `train` loops, and what a run
    directory (gemma.train.reward_run) checkpoints. `trainable`, `opt_state` and `step_count` are named as
    gemma.train.trainer.Trainer's, so gemma.train.run's checkpoint helpers save and restore them. The
    trainable state is donated to each step; `model()` is a copy on the host."""

    def __init__(self, model: RewardModel, config: TrainConfig):
        if not isinstance(model, RewardModel):
            raise TypeError(f"train takes a RewardModel, got {type(model).__name__}")
        if config.lora:
            raise ValueError("reward-model training trains every parameter; give lora_rank=None")
        if config.grad_accum != 1:
            raise ValueError(f"reward-model training takes one batch a step; give grad_accum=1, got "
                             f"{config.grad_accum}")
        self.config = config
        self.vocab_size = model.backbone.config.vocab_size
        self.graphdef, trainable = nnx.split(model, nnx.Param)
        self.optimizer, self._step = _step(self.graphdef, config)
        self.trainable = jax.tree.map(jnp.array, trainable)  # a copy: the step donates it
        self.opt_state = self.optimizer.init(self.trainable)
        self.step_count = 0

    def step(self, batch) -> dict[str, float]:
        """One AdamW step on one Pairs or Labelled batch: {"loss", "grad_norm", "learning_rate"}."""
        batch = _check_batch(batch, self.vocab_size)
        lr = float(self.config.schedule()(self.step_count))
        self.trainable, self.opt_state, metrics = self._step(self.trainable, self.opt_state,
                                                             jax.tree.map(lambda x: x[None], batch))
        self.step_count += 1
        return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]), "learning_rate": lr}

    def model(self) -> RewardModel:
        """The current reward model, parameters copied to the host."""
        return nnx.merge(self.graphdef, jax.device_get(self.trainable))


def train(model: RewardModel, batches: Iterable, config: TrainConfig) -> list[dict[str, float]]:
    """config.steps AdamW steps of the Bradley-Terry (Pairs) or entailment (Labelled) loss, one batch each, on
    every parameter of `model` (updated in place). Returns each step's {"loss", "grad_norm"}."""
    trainer = RewardTrainer(model, config)
    history, it = [], iter(batches)
    for i in range(config.steps):
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(f"batches ran out after {i} of config.steps={config.steps} steps") from None
        m = trainer.step(batch)
        history.append({"loss": m["loss"], "grad_norm": m["grad_norm"]})
    nnx.update(model, trainer.trainable)
    return history


@functools.lru_cache(maxsize=16)
def _step(graphdef, config: TrainConfig):
    """(optimizer, jitted step) per model structure and settings: models of one structure (WARM's members)
    share one compilation."""
    optimizer = config.optimizer()
    loss = functools.partial(_loss_sum, graphdef, config.compute_dtype, config.remat)
    return optimizer, jax.jit(lambda t, o, b: accumulated_step(loss, optimizer, t, o, b), donate_argnums=(0, 1))


def evaluate(model: RewardModel, batches: Iterable) -> dict[str, float]:
    """{"accuracy", "loss"} over every pair or row of `batches`: accuracy as `accuracy`'s, loss the mean
    Bradley-Terry or entailment loss (as training's, without updating anything)."""
    right = total = 0
    loss_sum = 0.0
    for batch in batches:
        batch = _check_batch(batch, model.backbone.config.vocab_size)
        if isinstance(batch, Pairs):
            chosen, rejected = np.asarray(model(batch.chosen, batch.chosen_mask)), np.asarray(
                model(batch.rejected, batch.rejected_mask))
            hit, loss = chosen > rejected, bradley_terry_loss(chosen, rejected)
        else:
            scores = np.asarray(model(batch.tokens, batch.mask))
            hit, loss = (scores > 0) == (np.asarray(batch.labels) > 0.5), entailment_loss(scores, batch.labels)
        right, total, loss_sum = right + int(hit.sum()), total + hit.size, loss_sum + float(loss) * hit.size
    if total == 0:
        raise ValueError("accuracy needs at least one example")
    return {"accuracy": right / total, "loss": loss_sum / total}


def accuracy(model: RewardModel, batches: Iterable) -> float:
    """Pairs: the share with r_chosen > r_rejected; Labelled: the share with (score > 0) == label."""
    return evaluate(model, batches)["accuracy"]


# ---------------------------------------------------------------- input checks


def _check_rows(tokens, mask, vocab_size, name="tokens"):
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name} must be int [B, T], got {tokens.dtype} {tokens.shape}")
    mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask)
    if mask.shape != tokens.shape:
        raise ValueError(f"the mask of {name} must have its shape {tokens.shape}, got {mask.shape}")
    mask = mask.astype(bool)
    if not mask.any(axis=1).all():
        raise ValueError(f"row {int(np.argmin(mask.any(axis=1)))} of {name} has no real token")
    used = tokens[mask]
    if used.min() < 0 or used.max() >= vocab_size:
        raise ValueError(f"{name} holds id {int(used.max() if used.max() >= vocab_size else used.min())}, "
                         f"outside the vocabulary [0, {vocab_size})")
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


def _check_batch(batch, vocab_size):
    if isinstance(batch, Pairs):
        c, cm = _check_rows(batch.chosen, batch.chosen_mask, vocab_size, "chosen")
        r, rm = _check_rows(batch.rejected, batch.rejected_mask, vocab_size, "rejected")
        if c.shape != r.shape:
            raise ValueError(f"chosen and rejected rows must have one shape (pad them to one length), got "
                             f"{c.shape} and {r.shape}")
        return Pairs(c, cm, r, rm)
    if isinstance(batch, Labelled):
        t, m = _check_rows(batch.tokens, batch.mask, vocab_size)
        labels = np.asarray(batch.labels, np.float32)
        if labels.shape != (t.shape[0],) or not np.isin(labels, (0.0, 1.0)).all():
            raise ValueError(f"labels must be [B] = [{t.shape[0]}] of 0 / 1, got shape {labels.shape}")
        return Labelled(t, m, jnp.asarray(labels))
    raise TypeError(f"a batch must be reward_model.Pairs or reward_model.Labelled, got {type(batch).__name__}")
