"""The policy-gradient trainer: rollouts through the serving Engine, REINFORCE with a group or a learned baseline,
KL to a frozen reference, and GKD's teacher term, on the fine-tuning stack.

    trainer = RLTrainer(policy, tokenizer, prompts, TrainConfig(steps=100, batch_size=8, seq_len=64),
                        RLConfig(samples_per_prompt=4, kl_alpha=0.05), reward=verifier, metric=true_metric)
    metrics = trainer.step()            # one optimizer step on batch_size prompts x samples_per_prompt rollouts
    trainer.evaluate(held_out)          # greedy completions through the engine: eval_reward, eval_metric, ...
    trainer.close()

Each step draws `batch_size` prompts (`PromptIterator`) and asks the serving Engine (gemma.serve.engine) for
`samples_per_prompt` completions of each at temperature 1 (one request per sample, its seed drawn from the
trainer's RNG, token logprobs and weights versions recorded); `reward(prompt, completion) -> float` (a verifier)
or a `reward_model.RewardModel` scores each completion at its end. A reward that raises or is not finite drops its
sample (counted in `reward_dropped`); the step goes on. The sequence KL to the frozen reference (exact over the
vocabulary, rl.token_kl, or the k3 estimate of the sampled tokens) gives the penalised reward
r - alpha KL (rl.penalized_reward); the advantage is that minus the group's leave-one-out mean (rl.rloo_advantages)
or minus a learned value of the prompt (`baseline="value"`: a RewardModel initialised from the policy, trained on
the penalised rewards by squared error: Roit et al. 2023's critic, one value per prompt). The loss is

    (1 - a) [reinforce_loss(logp, engine logp, advantages, versions) + alpha mean_b sum_t KL_bt] + a D(teacher || pi)

rl.reinforce_loss (importance ratio pi / mu of each rollout against the weights version that sampled it, rollouts
older than max_staleness versions dropped) for the score-function part, the differentiable per-token KL for its
pathwise part (together an unbiased gradient of E[r] - alpha KL(pi || ref)), and with a teacher and gkd_weight a > 0
the GKD paper's combination with distill.generalized_jsd_sum on the sampled responses. After each optimizer step
the weights go to the engine as version = step (Engine.update_weights). With rollout_lag L > 0 the completions
learned at step s were sampled under version s - 1 - L while step s - 1 trained (the engine's thread generates
while the learner computes); the ratio corrects them.

A completion is its tokens through the first stop id (included, so its logprob is learned; the engine runs with no
stop ids and the listener ends the request right after one), or max_new_tokens tokens (truncated). The reward and
the metric see the text before the stop id.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma.serve.engine import Engine, Request
from gemma.train import rl, sharding
from gemma.train.distill import check_divergence, generalized_jsd_sum
from gemma.train.distill_trainer import _hidden, shared_vocab
from gemma.train.loss import cross_entropy_sum
from gemma.train.reward_model import RewardModel, pad_rows
from gemma.train.trainer import Trainer, TrainConfig, _cast, _micro_sharding, accumulated_step

BASELINES = ("group", "value")
KL_ESTIMATORS = ("exact", "k3")
ENGINE_WAIT_MS = 1000.0  # an idle engine waits this long for a step's whole batch of requests (admitted together)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """What RL does on top of TrainConfig (batch_size: prompts per step; seq_len: prompt + completion tokens)."""

    samples_per_prompt: int = 4  # n completions of each prompt
    baseline: str = "group"  # "group": leave-one-out mean of the prompt's n rewards; "value": a learned V(prompt)
    kl_alpha: float = 0.0  # weight of KL(pi || reference)
    kl_estimator: str = "exact"  # "exact": over the vocabulary per token; "k3": from the sampled tokens
    max_new_tokens: int = 64
    stop_ids: tuple[int, ...] | None = None  # ids that end a completion (default: the tokenizer's eos, end_of_turn)
    gkd_weight: float = 0.0  # a of (1 - a) reward - a divergence to the teacher
    gkd_beta: float = 0.5  # the divergence: generalized JSD (0 forward KL, 1 reverse KL)
    rollout_lag: int = 0  # completions learned at step s sampled under version s - 1 - lag (0: on-policy)
    max_staleness: int | None = None  # rollouts more than this many versions old are dropped (None: never)
    max_ratio: float | None = None  # truncation of the importance ratio (None: none)
    value_learning_rate: float | None = None  # of the value baseline (default: TrainConfig's learning rate)

    def __post_init__(self):
        problems = []
        n = self.samples_per_prompt
        if not _is_int(n) or n < 1:
            problems.append(f"samples_per_prompt must be an int >= 1, got {n!r}")
        if self.baseline not in BASELINES:
            problems.append(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        elif self.baseline == "group" and _is_int(n) and n < 2:
            problems.append(f"the group baseline (the leave-one-out mean of a prompt's samples) needs "
                            f"samples_per_prompt >= 2, got {n}; give more samples or baseline='value'")
        if not _is_number(self.kl_alpha) or self.kl_alpha < 0:
            problems.append(f"kl_alpha (the KL weight) must be a finite number >= 0, got {self.kl_alpha!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            problems.append(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.gkd_weight) or not 0 <= self.gkd_weight <= 1:
            problems.append(f"gkd_weight must be a number in [0, 1], got {self.gkd_weight!r}")
        try:
            check_divergence(self.gkd_beta, 1.0)
        except ValueError as e:
            problems.append(f"gkd_beta: {e}")
        if not _is_int(self.rollout_lag) or self.rollout_lag < 0:
            problems.append(f"rollout_lag must be an int >= 0, got {self.rollout_lag!r}")
        if self.max_staleness is not None and (not _is_int(self.max_staleness) or self.max_staleness < 0):
            problems.append(f"max_staleness must be an int >= 0 or None, got {self.max_staleness!r}")
        elif (self.max_staleness is not None and _is_int(self.rollout_lag)
              and self.rollout_lag > self.max_staleness):
            problems.append(f"rollout_lag {self.rollout_lag} > max_staleness {self.max_staleness}: every rollout "
                            f"would be dropped as stale")
        if self.max_ratio is not None and not (_is_number(self.max_ratio) and self.max_ratio > 0):
            problems.append(f"max_ratio must be a number > 0 or None, got {self.max_ratio!r}")
        if self.value_learning_rate is not None and not (_is_number(self.value_learning_rate)
                                                         and self.value_learning_rate > 0):
            problems.append(f"value_learning_rate must be > 0 or None, got {self.value_learning_rate!r}")
        if self.stop_ids is not None and (not isinstance(self.stop_ids, (tuple, list)) or not self.stop_ids
                                          or not all(_is_int(i) and i >= 0 for i in self.stop_ids)):
            problems.append(f"stop_ids must be a non-empty tuple of ids or None, got {self.stop_ids!r}")
        if problems:
            raise ValueError("invalid RL settings: " + "; ".join(problems))
        if self.stop_ids is not None:
            object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


# ---------------------------------------------------------------- per-token log-probabilities


def token_logprobs(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, *, chunk_size: int,
                   softcap: float | None = None) -> jax.Array:
    """log softmax(hidden_t . embedding^T)[targets_t] per position [...]: -CE_t of loss.cross_entropy_sum (chunked
    over the vocabulary, never [tokens, V]), differentiable in hidden and embedding."""
    lead = hidden.shape[:-1]
    flat = _token_logp(hidden.reshape(-1, hidden.shape[-1]), embedding, targets.reshape(-1).astype(jnp.int32),
                       int(chunk_size), None if softcap is None else float(softcap))
    return flat.reshape(lead)


def _ce_sum(h, e, t, w, chunk, softcap):
    return cross_entropy_sum(h, e, t, w, chunk_size=chunk, softcap=softcap)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _token_logp(h, e, t, chunk, softcap):
    # d (sum_t w_t CE_t) / d w_t = CE_t: cross_entropy_sum's backward gives the per-token values
    return -jax.grad(_ce_sum, argnums=3)(h, e, t, jnp.ones(t.shape, jnp.float32), chunk, softcap)


def _token_logp_fwd(h, e, t, chunk, softcap):
    return _token_logp(h, e, t, chunk, softcap), (h, e, t)


def _token_logp_bwd(chunk, softcap, res, g):
    h, e, t = res  # d (sum_t g_t logp_t) = d (sum_t (-g_t) CE_t)
    dh, de = jax.grad(_ce_sum, argnums=(0, 1))(h, e, t, -g.astype(jnp.float32), chunk, softcap)
    return dh, de, np.zeros(t.shape, jax.dtypes.float0)


_token_logp.defvjp(_token_logp_fwd, _token_logp_bwd)


# ---------------------------------------------------------------- rollouts


@dataclasses.dataclass
class Rollout:
    """One sampled completion of prompt `prompt_index`: its tokens (through the stop id, when one came), the
    engine's logprob of each, the weights versions it was sampled under, its reward (None: dropped)."""

    prompt_index: int
    tokens: list[int]
    logprobs: list[float]
    version: int  # the oldest weights version that sampled a token of it
    last_version: int
    stopped: bool
    text: str = ""
    reward: float | None = None
    metric: float | None = None


class PromptIterator:
    """Indices of `batch` prompts at a time out of `count`, each epoch in a fresh order drawn from (seed, epoch)."""

    def __init__(self, count: int, batch: int, seed: int):
        if count < 1:
            raise ValueError("no prompts given")
        self.count, self.batch, self.seed = count, batch, seed
        self.epoch, self.index = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.count)

    def next(self) -> list[int]:
        out = []
        while len(out) < self.batch:
            order = self._order()
            take = order[self.index:self.index + self.batch - len(out)]
            out += take.tolist()
            self.index += len(take)
            if self.index == self.count:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class _EndAtStop:
    """An engine listener that cancels its request right after a stop id was sampled (recorded with its logprob)."""

    def __init__(self, stops):
        self.stops, self.gen, self.hit = frozenset(stops), None, False

    def __call__(self, event):
        if event.token in self.stops:
            self.hit = True
            if self.gen is not None:
                self.gen.cancel()

    def attach(self, gen):
        self.gen = gen
        if self.hit:
            gen.cancel()


class RolloutBatch(NamedTuple):
    """Rows [B, T] of prompt + completion (right-padded), what the step learns from them."""

    inputs: np.ndarray  # int32 [B, T]
    positions: np.ndarray  # int32 [B, T]
    segment_ids: np.ndarray  # int32 [B, T]: 1 real, 0 padding
    targets: np.ndarray  # int32 [B, T]: the next token
    mask: np.ndarray  # f32 [B, T]: 1 where the target is a completion token
    behavior: np.ndarray  # f32 [B, T]: the engine's logprob of that target
    advantages: np.ndarray  # f32 [B]
    valid: np.ndarray  # f32 [B]: 0 for a sample whose reward was dropped
    versions: np.ndarray  # int32 [B]
    current: np.ndarray  # int32 [B]: the learner's version (the same in every row)


def _copy(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(np.array, state))


def _rl_sums(graphdef, ref_graphdef, teacher_graphdef, c: TrainConfig, rc: RLConfig, vocab, trainable, frozen, ref,
             teacher, b: RolloutBatch):
    """(loss x B, B) of one rollout batch for accumulated_step (the loss is a mean over rows)."""
    h, table, cap = _hidden(graphdef, (trainable, frozen), b, c.compute_dtype, c.remat, vocab, c.scan_layers)
    logp = token_logprobs(h, table, b.targets, chunk_size=c.loss_chunk, softcap=cap)
    staleness = {} if rc.max_staleness is None else dict(versions=b.versions, current_version=b.current[0],
                                                           max_staleness=rc.max_staleness)
    pg, _ = rl.reinforce_loss(logp, b.behavior, b.mask, b.advantages, max_ratio=rc.max_ratio, **staleness)
    rows = b.valid
    if rc.max_staleness is not None:
        rows = rows * (b.current - b.versions <= rc.max_staleness)
    w = b.mask * rows[:, None]
    n = b.inputs.shape[0]
    loss = pg
    if rc.kl_alpha > 0:
        rh, r_table, r_cap = _hidden(ref_graphdef, (ref,), b, c.compute_dtype, None, vocab, c.scan_layers)
        if rc.kl_estimator == "exact":
            kl, _ = rl.kl_sum(h, table, rh, r_table, w, chunk_size=c.loss_chunk, softcap=cap, ref_softcap=r_cap)
        else:
            ref_logp = token_logprobs(rh, r_table, b.targets, chunk_size=c.loss_chunk, softcap=r_cap)
            kl = jnp.sum(w * rl.k3(logp, jax.lax.stop_gradient(ref_logp)))
        loss = loss + rc.kl_alpha * kl / n
    if rc.gkd_weight > 0:
        th, t_table, t_cap = _hidden(teacher_graphdef, (teacher,), b, c.compute_dtype, None, vocab, c.scan_layers)
        div, count = generalized_jsd_sum(h, table, th, t_table, w, beta=rc.gkd_beta, chunk_size=c.loss_chunk,
                                         softcap=cap, teacher_softcap=t_cap)
        loss = (1 - rc.gkd_weight) * loss + rc.gkd_weight * div / jnp.maximum(count, 1.0)
    return loss * n, jnp.float32(n)


def _score(graphdef, ref_graphdef, c: TrainConfig, rc: RLConfig, vocab, trainable, frozen, ref, b: RolloutBatch):
    """The current policy's logprob of each target and the per-token KL estimate to the reference [B, T]."""
    h, table, cap = _hidden(graphdef, (trainable, frozen), b, c.compute_dtype, None, vocab, c.scan_layers)
    rh, r_table, r_cap = _hidden(ref_graphdef, (ref,), b, c.compute_dtype, None, vocab, c.scan_layers)
    logp = token_logprobs(h, table, b.targets, chunk_size=c.loss_chunk, softcap=cap)
    if rc.kl_estimator == "exact":
        kl = rl.token_kl(h, table, rh, r_table, b.mask, chunk_size=c.loss_chunk, softcap=cap, ref_softcap=r_cap)
    else:
        kl = rl.k3(logp, token_logprobs(rh, r_table, b.targets, chunk_size=c.loss_chunk, softcap=r_cap))
    return logp, kl * b.mask


def _value_sums(graphdef, compute_dtype, trainable, batch):
    """(sum of 0.5 (V(prompt) - target)^2, rows) over the rows with weight 1."""
    tokens, mask, targets, weights = batch
    model = nnx.merge(graphdef, _cast(trainable, compute_dtype))
    model.backbone.dtype = jnp.dtype(compute_dtype)
    v = model.score(tokens, mask)
    return jnp.sum(weights * 0.5 * jnp.square(v - targets)), jnp.sum(weights)


class RLTrainer(Trainer):
    """A Trainer of `policy` (taken over; full or LoRA) by reinforcement, with its own serving Engine.

    prompts: a sequence of (token ids, prompt) pairs: the ids are what the policy continues, `prompt` (any
    object: the JSONL's text, the ids) is what `reward(prompt, completion)` and `metric` receive.
    reward: a function (prompt, completion text) -> float, or a reward_model.RewardModel (its score of prompt +
    completion ids). metric: the true metric (prompt, completion text) -> float, reported, never optimised.
    reference: the frozen KL reference (default: a copy of `policy` as given). teacher: GKD's teacher.
    """

    def __init__(self, policy, tokenizer, prompts: Sequence, config: TrainConfig, rl_config: RLConfig = RLConfig(),
                 reward: Callable[[object, str], float] | RewardModel | None = None, *,
                 metric: Callable[[object, str], float] | None = None, reference=None, teacher=None,
                 teacher_tokenizer=None, mesh=None):
        rc = rl_config
        if reward is None or not (callable(reward) or isinstance(reward, RewardModel)):
            raise TypeError(f"reward must be a function (prompt, completion) -> float or a RewardModel, got "
                            f"{type(reward).__name__}")
        if metric is not None and not callable(metric):
            raise TypeError(f"metric must be a function (prompt, completion) -> float, got {type(metric).__name__}")
        if rc.gkd_weight > 0 and teacher is None:
            raise ValueError(f"gkd_weight {rc.gkd_weight} needs a teacher")
        self.rl, self.tokenizer, self.reward, self.metric = rc, tokenizer, reward, metric
        self.stop_ids = rc.stop_ids or (tokenizer.eos_id, tokenizer.end_of_turn_id)
        self.prompts = [(self._check_prompt(i, ids, policy.config.vocab_size, config.seq_len, rc), obj)
                        for i, (ids, obj) in enumerate(prompts)]
        reference = _copy(policy) if reference is None else reference
        self.vocab = shared_vocab(policy.config, reference.config)
        value = RewardModel(_copy(policy)) if rc.baseline == "value" else None
        super().__init__(policy, config, mesh)
        self.ref_graphdef, ref_state = nnx.split(reference)
        ref_shardings = sharding.state_shardings(ref_state, self.mesh)
        self.ref_state = sharding.put(ref_state, ref_shardings)
        self.teacher_graphdef, self.teacher_state, teacher_shardings = None, None, None
        if teacher is not None:
            self.vocab = shared_vocab(policy.config, teacher.config, tokenizer, teacher_tokenizer)
            self.teacher_graphdef, teacher_state = nnx.split(teacher)
            teacher_shardings = sharding.state_shardings(teacher_state, self.mesh)
            self.teacher_state = sharding.put(teacher_state, teacher_shardings)
        self.iterator = PromptIterator(len(self.prompts), config.batch_size, config.seed)
        self.rng = np.asarray(jax.random.key_data(jax.random.key(config.seed)), np.uint32).tolist()
        self.pending: list[list[Rollout]] = []  # rollouts sampled, not learned yet (rollout_lag > 0)
        jitted = jax.jit(functools.partial(self._step_fn, self.graphdef, self.ref_graphdef, self.teacher_graphdef,
                                           self.optimizer, config, rc, self.vocab),
                         in_shardings=(self.trainable_shardings, self.frozen_shardings, ref_shardings,
                                       teacher_shardings,
                                       self.opt_shardings, _micro_sharding(self.mesh)),
                         out_shardings=(self.trainable_shardings, self.opt_shardings, None), donate_argnums=(0, 4))
        self._rl_step = lambda trainable, frozen, opt_state, batches: jitted(
            trainable, frozen, self.ref_state, self.teacher_state, opt_state, batches)
        self._score = jax.jit(functools.partial(_score, self.graphdef, self.ref_graphdef, config, rc, self.vocab))
        self.value_graphdef = self.value_trainable = self.value_opt_state = None
        if value is not None:
            self.value_graphdef, value_trainable = nnx.split(value, nnx.Param)
            self.value_trainable = sharding.put(value_trainable, sharding.state_shardings(value_trainable,
                                                                                          self.mesh))
            lr = rc.value_learning_rate or config.learning_rate
            self.value_optimizer = dataclasses.replace(config, learning_rate=lr, lora_rank=None).optimizer()
            self.value_opt_state = self.value_optimizer.init(self.value_trainable)
            loss = functools.partial(_value_sums, self.value_graphdef, config.compute_dtype)
            self._value_step = jax.jit(lambda t, o, b: accumulated_step(loss, self.value_optimizer, t, o, b),
                                       donate_argnums=(0, 1))
            self._value_of = jax.jit(lambda t, tokens, mask: nnx.merge(self.value_graphdef, t).score(tokens, mask))
        self.engine = Engine(self.merged_model(), tokenizer, max_batch=config.batch_size * rc.samples_per_prompt,
                             max_len=config.seq_len, max_wait_ms=ENGINE_WAIT_MS, weights_version=0)

    @staticmethod
    def _step_fn(graphdef, ref_graphdef, teacher_graphdef, optimizer, c, rc, vocab, trainable, frozen, ref, teacher,
                 opt_state, batches):
        loss = functools.partial(_rl_sums, graphdef, ref_graphdef, teacher_graphdef, c, rc, vocab)
        return accumulated_step(lambda t, b: loss(t, frozen, ref, teacher, b), optimizer, trainable, opt_state,
                                batches)

    @staticmethod
    def _check_prompt(i, ids, vocab_size, seq_len, rc):
        ids = [int(x) for x in ids]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"prompt {i} holds id {max(ids) if max(ids) >= vocab_size else min(ids)}, outside the "
                             f"vocabulary [0, {vocab_size})")
        if len(ids) + rc.max_new_tokens > seq_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens: with max_new_tokens {rc.max_new_tokens} that is "
                             f"over seq_len {seq_len} (shorten it or raise seq_len)")
        return ids

    # ----------------------------------------------------------------------------------- rollouts
    def _draw_seeds(self, count: int) -> list[int]:
        key, sub = jax.random.split(jax.random.wrap_key_data(np.asarray(self.rng, np.uint32)))
        self.rng = np.asarray(jax.random.key_data(key), np.uint32).tolist()
        return np.asarray(jax.random.randint(sub, (count,), 0, 2**31 - 1)).tolist()

    def submit(self, prompts: Sequence, indices: Sequence[int], *, samples: int, temperature: float,
               seeds: Sequence[int]) -> list:
        """Requests `samples` completions of each of prompts[indices] from the engine (one request each, all queued
        before the engine admits them: an idle engine waits for its whole batch); the handles for `collect`."""
        jobs = []
        for j, i in enumerate(indices):
            ids, obj = prompts[i]
            for k in range(samples):
                stop = _EndAtStop(self.stop_ids)
                request = Request(tuple(ids), max_tokens=self.rl.max_new_tokens, temperature=temperature,
                                  seed=int(seeds[j * samples + k]), stop_ids=(), weights_version=self.version)
                gen = self.engine.submit(request, listener=stop)
                stop.attach(gen)
                jobs.append((i, ids, obj, gen))
        return jobs

    def collect(self, jobs, timeout: float | None = 600.0) -> list[Rollout]:
        """The rollouts of `submit`'s handles, scored by the reward (and the metric)."""
        out = []
        for i, _, _, gen in jobs:
            choice = gen.wait(timeout)[0]
            tokens, logprobs = list(choice.tokens), list(choice.logprobs)
            cut = next((k for k, t in enumerate(tokens) if t in self.stop_ids), None)
            if cut is not None:
                tokens, logprobs = tokens[:cut + 1], logprobs[:cut + 1]
            text = self.tokenizer.decode(tokens[:cut] if cut is not None else tokens)
            out.append(Rollout(i, tokens, logprobs, int(choice.first_version), int(choice.last_version),
                               cut is not None, text))
        self._score_rewards(out, [(ids, obj) for _, ids, obj, _ in jobs])
        return out

    def _score_rewards(self, rollouts: list[Rollout], prompts: list) -> None:
        if isinstance(self.reward, RewardModel):
            rows = [list(ids) + r.tokens for r, (ids, _) in zip(rollouts, prompts)]
            tokens, mask = pad_rows(rows, max(map(len, rows)))
            scores = np.asarray(self.reward(tokens, mask), np.float64)
            for r, s in zip(rollouts, scores):
                r.reward = float(s) if math.isfinite(s) else None
        else:
            for r, (_, obj) in zip(rollouts, prompts):
                try:
                    value = float(self.reward(obj, r.text))
                except Exception:  # a failing verifier drops its sample (counted), the run goes on
                    value = math.nan
                r.reward = value if math.isfinite(value) else None
        if self.metric is not None:
            for r, (_, obj) in zip(rollouts, prompts):
                r.metric = float(self.metric(obj, r.text))

    @property
    def version(self) -> int:
        """The learner's weights version: its optimizer steps (the engine's after each push)."""
        return self.step_count

    # ----------------------------------------------------------------------------------- steps
    def step(self, micro_batches=None) -> dict[str, float]:
        """One optimizer step: samples the next batch_size prompts x samples_per_prompt, learns on the rollouts
        due (this step's, or with rollout_lag L those sampled L steps ago), pushes the weights to the engine."""
        if micro_batches is not None:
            raise TypeError("RLTrainer.step draws its own prompts; it takes no batches")
        rc, n = self.rl, self.rl.samples_per_prompt
        def sample():
            indices = self.iterator.next()
            return self.submit(self.prompts, indices, samples=n, temperature=1.0,
                               seeds=self._draw_seeds(len(indices) * n))

        jobs = sample()
        if rc.rollout_lag == 0:
            rollouts = self.collect(jobs)
        else:
            while len(self.pending) < rc.rollout_lag:  # the first steps (or a resume without any): lag < L
                self.pending.append(self.collect(jobs))
                jobs = sample()
            rollouts = self.pending.pop(0)
        metrics = self.learn(rollouts)
        if rc.rollout_lag > 0:
            self.pending.append(self.collect(jobs))  # sampled under the old weights while the step ran
        self.engine.update_weights(self.merged_model(), self.version)
        return metrics

    def learn(self, rollouts: list[Rollout]) -> dict[str, float]:
        """One optimizer step on `rollouts` (batch_size x samples_per_prompt, grouped by prompt)."""
        c, rc, n = self.config, self.rl, self.rl.samples_per_prompt
        b = len(rollouts)
        if b != c.batch_size * n:
            raise ValueError(f"a step learns batch_size x samples_per_prompt = {c.batch_size * n} rollouts, got {b}")
        batch = self._rows(rollouts)
        valid = batch.valid > 0
        logp, kl = map(np.asarray, self._score(self.trainable, self.frozen, self.ref_state, self._global(batch, False)))
        kl_seq = kl.sum(axis=1)
        rewards = np.asarray([r.reward if r.reward is not None else 0.0 for r in rollouts], np.float32)
        penalized = np.asarray(rl.penalized_reward(rewards, kl_seq, rc.kl_alpha))
        metrics = {}
        if rc.baseline == "group":
            adv = np.asarray(rl.rloo_advantages(penalized.reshape(-1, n), valid.reshape(-1, n))).reshape(-1)
        else:
            baseline = self._values(rollouts)
            adv = np.where(valid, penalized - baseline, 0.0).astype(np.float32)
            metrics["value"] = float(baseline[valid].mean()) if valid.any() else math.nan
        batch = batch._replace(advantages=adv.astype(np.float32))
        lr = float(c.schedule()(self.step_count))
        self.trainable, self.opt_state, out = self._rl_step(self.trainable, self.frozen, self.opt_state,
                                                            self._global(RolloutBatch(*(x[None] for x in batch)), True))
        if rc.baseline == "value":
            metrics["value_loss"] = self._learn_values(rollouts, penalized, valid)
        self.step_count += 1
        lag = batch.current - batch.versions
        stale = int(((lag > rc.max_staleness) if rc.max_staleness is not None else np.zeros(b, bool)).sum())
        log_ratio = ((logp - batch.behavior) * batch.mask).sum(axis=1)
        lengths = [len(r.tokens) - r.stopped for r in rollouts]
        distinct = [len({tuple(r.tokens) for r in rollouts[g:g + n]}) for g in range(0, b, n)]
        metrics.update({
            "loss": float(out["loss"]), "grad_norm": float(out["grad_norm"]), "learning_rate": lr,
            "reward": float(rewards[valid].mean()) if valid.any() else math.nan,
            "penalized_reward": float(penalized[valid].mean()) if valid.any() else math.nan,
            "kl": float(kl_seq.mean()), "length": float(np.mean(lengths)), "distinct": float(np.mean(distinct)),
            "truncated": float(np.mean([not r.stopped for r in rollouts])),
            "reward_dropped": int((~valid).sum()), "stale_dropped": stale,
            "staleness": float(lag.mean()), "log_ratio": float(np.abs(log_ratio).mean()),
            "version": int(batch.current[0])})
        if self.metric is not None:
            metrics["metric"] = float(np.mean([r.metric for r in rollouts]))
        return metrics

    def _rows(self, rollouts: list[Rollout]) -> RolloutBatch:
        t = self.config.seq_len
        rows = [self.prompts[r.prompt_index][0] + r.tokens for r in rollouts]
        b = len(rows)
        inputs, mask = np.zeros((b, t), np.int32), np.zeros((b, t), np.float32)
        targets, behavior = np.zeros((b, t), np.int32), np.zeros((b, t), np.float32)
        segments = np.zeros((b, t), np.int32)
        for k, (row, r) in enumerate(zip(rows, rollouts)):
            p = len(row) - len(r.tokens)
            inputs[k, :len(row) - 1] = row[:-1]
            segments[k, :len(row) - 1] = 1
            targets[k, :len(row) - 1] = row[1:]
            mask[k, p - 1:len(row) - 1] = 1.0
            behavior[k, p - 1:len(row) - 1] = r.logprobs
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
        valid = np.asarray([r.reward is not None for r in rollouts], np.float32)
        versions = np.asarray([r.version for r in rollouts], np.int32)
        return RolloutBatch(inputs, positions, segments, targets, mask, behavior, np.zeros(b, np.float32), valid,
                            versions, np.full(b, self.version, np.int32))

    def _prompt_rows(self, rollouts: list[Rollout]):
        n = self.rl.samples_per_prompt
        return pad_rows([self.prompts[rollouts[g].prompt_index][0] for g in range(0, len(rollouts), n)],
                          self.config.seq_len)

    def _values(self, rollouts: list[Rollout]) -> np.ndarray:
        tokens, mask = self._prompt_rows(rollouts)
        v = np.asarray(self._value_of(self.value_trainable, jnp.asarray(tokens), jnp.asarray(mask)))
        return np.repeat(v, self.rl.samples_per_prompt).astype(np.float32)

    def _learn_values(self, rollouts, penalized, valid) -> float:
        """One step of the value baseline toward each prompt's mean penalised reward."""
        n = self.rl.samples_per_prompt
        tokens, mask = self._prompt_rows(rollouts)
        v, p = valid.reshape(-1, n), penalized.reshape(-1, n)
        counts = v.sum(axis=1)
        targets = np.where(counts > 0, (p * v).sum(axis=1) / np.maximum(counts, 1), 0.0).astype(np.float32)
        batch = (tokens[None], mask[None], targets[None], (counts > 0).astype(np.float32)[None])
        self.value_trainable, self.value_opt_state, out = self._value_step(self.value_trainable,
                                                                           self.value_opt_state, batch)
        return float(out["loss"])

    # ----------------------------------------------------------------------------------- evaluation
    def evaluate(self, prompts: Sequence, temperature: float = 0.0, seed: int = 0) -> dict[str, float]:
        """Greedy (or sampled) completions of held-out (ids, prompt) pairs through the engine, with the current
        weights: mean reward, metric and length (a failed reward is left out of the mean and counted)."""
        prompts = [(self._check_prompt(i, ids, self.model_config.vocab_size, self.config.seq_len, self.rl), obj)
                   for i, (ids, obj) in enumerate(prompts)]
        wait, self.engine.max_wait_s = self.engine.max_wait_s, 0.0  # a partial batch need not wait
        try:
            out = []
            size = self.engine.max_batch
            for start in range(0, len(prompts), size):
                indices = range(start, min(start + size, len(prompts)))
                out += self.collect(self.submit(prompts, indices, samples=1, temperature=temperature,
                                                seeds=[seed + i for i in indices]))
        finally:
            self.engine.max_wait_s = wait
        rewards = [r.reward for r in out if r.reward is not None]
        result = {"eval_reward": float(np.mean(rewards)) if rewards else math.nan,
                  "eval_length": float(np.mean([len(r.tokens) - r.stopped for r in out])),
                  "eval_reward_dropped": len(out) - len(rewards)}
        if self.metric is not None:
            result["eval_metric"] = float(np.mean([r.metric for r in out]))
        return result

    # ----------------------------------------------------------------------------------- results
    def policy(self):
        return self.model()

    def value_model(self) -> RewardModel | None:
        if self.value_graphdef is None:
            return None
        return nnx.merge(self.value_graphdef, jax.device_get(self.value_trainable))

    def close(self) -> None:
        self.engine.close()


def reward_hacking(records: Sequence[dict], reward: str = "eval_reward", metric: str = "eval_metric", *,
                   margin: float = 0.05) -> int | None:
    """The monitor of a proxy reward against the true metric: the first record's step where the reward stands more
    than `margin` above its first value while the metric stands more than `margin` below its best so far (the
    policy gains reward by losing what the reward stood for); None when that never happens."""
    rows = [r for r in records if reward in r and metric in r
            and math.isfinite(r[reward]) and math.isfinite(r[metric])]
    if not rows:
        return None
    first, best = rows[0][reward], -math.inf
    for r in rows:
        best = max(best, r[metric])
        if r[reward] > first + margin and r[metric] < best - margin:
            return int(r["step"])
    return None
