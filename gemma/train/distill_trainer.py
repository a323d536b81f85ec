"""The GKD trainer: on-policy distillation of a teacher into a student on the fine-tuning stack.

    trainer = DistillTrainer(student, teacher, tokenizer, TrainConfig(steps=100), DistillConfig(lmbda=1.0))
    metrics = trainer.step([batch])      # one optimizer step over grad_accum micro-batches (unpacked rows)

Each micro-batch: with `seq_kd` the teacher first writes the responses; then with probability `lmbda` the
student does (temperature `gen_temperature`, no gradient through sampling), else the batch's own responses
stay. The teacher scores them in the step and the student steps on the generalized JSD (gemma.train.distill,
chunked over the vocabulary) of its response tokens, normalised per token over the whole accumulated batch
(trainer.accumulated_step). With sparse targets (TargetBatch micro-batches, gemma.train.distill_targets) the
student steps on their cross-entropy instead, and the teacher is not run.

Each response is the prompt (the row up to its first loss token) + generated ids through <end_of_turn>
(included), or up to the row's length; an <eos> inside ends it (included). A row's coin and seeds come from
(seed, step, micro-batch), so a resumed run draws what an uninterrupted one drew. Responses are generated
through the serving engine (gemma.serve.Engine), one per model, kept across steps: the student's gets the
current weights by `update_weights(state, step)`, so nothing recompiles per step; `close()` ends them.
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

from gemma.serve.engine import Engine
from gemma.train import data as data_lib
from gemma.train import lora
from gemma.train import sharding
from gemma.train.distill import check_divergence, generalized_jsd_sum, sparse_cross_entropy_sum
from gemma.train.distill_targets import TargetBatch
from gemma.train.trainer import Trainer, TrainConfig, _cast, _micro_sharding, accumulated_step

TEXT_VOCAB = 262_144  # ids past it (multimodal checkpoints' image rows) are never targets


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What distillation does on top of TrainConfig (the `distill` command line's flags)."""

    lmbda: float = 0.5  # probability that a micro-batch's responses are the student's own
    beta: float = 0.5  # 0 forward KL, 1 reverse KL, between: generalized JSD
    temperature: float = 1.0  # of the divergence
    seq_kd: bool = False  # teacher-generated responses (before the lmbda coin)
    gen_temperature: float = 1.0  # of the student's / teacher's sampling
    max_new_tokens: int = 128

    def __post_init__(self):
        if isinstance(self.lmbda, bool) or not isinstance(self.lmbda, (int, float)) or not 0 <= self.lmbda <= 1:
            raise ValueError(f"lmbda must be a number in [0, 1] (the on-policy fraction), got {self.lmbda!r}")
        check_divergence(self.beta, self.temperature)
        if isinstance(self.gen_temperature, bool) or not isinstance(self.gen_temperature, (int, float)) or not (
                self.gen_temperature >= 0 and math.isfinite(self.gen_temperature)):
            raise ValueError(f"gen_temperature must be a finite number >= 0 (0 greedy), got {self.gen_temperature!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")

    @property
    def generates(self) -> bool:
        return self.seq_kd or self.lmbda > 0


def shared_vocab(student_config, teacher_config, student_tokenizer=None, teacher_tokenizer=None) -> int:
    """The vocabulary both heads are compared over; ValueError naming the difference when there is none.

    Equal table sizes are the vocabulary; a multimodal table (262208 rows) meets a text one (262144) on the
    first 262144. Tokenizers, when given, must agree on size and special ids."""
    vs, vt = student_config.vocab_size, teacher_config.vocab_size
    if vs == vt:
        vocab = vs
    elif min(vs, vt) >= TEXT_VOCAB:
        vocab = TEXT_VOCAB
    else:
        raise ValueError(f"teacher and student vocabularies differ: the teacher has {vt} ids, the student {vs}; "
                         f"distillation needs one tokenizer (Gemma 3 models share the 262144-id one)")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        sizes = [t.vocab_size for t in (teacher_tokenizer, student_tokenizer)]
        if sizes[0] != sizes[1]:
            raise ValueError(f"teacher and student tokenizers differ: {sizes[0]} vs {sizes[1]} pieces")
        for name in ("bos_id", "eos_id", "pad_id", "start_of_turn_id", "end_of_turn_id"):
            a, b = getattr(teacher_tokenizer, name), getattr(student_tokenizer, name)
            if a != b:
                raise ValueError(f"teacher and student tokenizers differ: {name} {a} vs {b}")
    return vocab


def _hidden(graphdef, states, batch, compute_dtype, remat, vocab, scan=False):
    model = nnx.merge(graphdef, *(_cast(s, compute_dtype) for s in states))
    model.dtype = jnp.dtype(compute_dtype)
    h = model.forward(batch.inputs, batch.positions, None, return_hidden=True, segment_ids=batch.segment_ids,
                      remat=remat, scan=scan)
    return h, lora.head_table(model)[:vocab], model.config.final_logit_softcap


def distill_sums(graphdef, teacher_graphdef, compute_dtype, remat, chunk, dc: DistillConfig, vocab,
                 trainable, frozen, teacher, batch, scan=False):
    """(sum of weighted token divergences, sum of weights) of one micro-batch."""
    h, table, cap = _hidden(graphdef, (trainable, frozen), batch, compute_dtype, remat, vocab, scan)
    if isinstance(batch, TargetBatch):
        return sparse_cross_entropy_sum(h, table, batch.target_ids, batch.target_probs, batch.weights,
                                        temperature=dc.temperature, chunk_size=chunk, softcap=cap)
    th, t_table, t_cap = _hidden(teacher_graphdef, (teacher,), batch, compute_dtype, None, vocab, scan)
    return generalized_jsd_sum(h, table, th, t_table, batch.weights, beta=dc.beta, temperature=dc.temperature,
                               chunk_size=chunk, softcap=cap, teacher_softcap=t_cap)


def _step(graphdef, teacher_graphdef, optimizer, c: TrainConfig, dc, vocab, trainable, frozen, teacher, opt_state,
          batches):
    loss = functools.partial(distill_sums, graphdef, teacher_graphdef, c.compute_dtype, c.remat, c.loss_chunk, dc,
                             vocab)
    return accumulated_step(lambda t, b: loss(t, frozen, teacher, b, c.scan_layers), optimizer, trainable, opt_state,
                            batches)


class DistillTrainer(Trainer):
    """A Trainer of `student` (taken over; full or LoRA) against a frozen `teacher`."""

    def __init__(self, student, teacher, tokenizer, config: TrainConfig, distill: DistillConfig, mesh=None, *,
                 teacher_tokenizer=None):
        self.vocab = shared_vocab(student.config, teacher.config, tokenizer, teacher_tokenizer)
        if distill.generates and tokenizer is None:
            raise ValueError("generating responses (lmbda > 0 or seq_kd) needs the tokenizer (its stop ids)")
        self.distill = distill
        self.tokenizer = tokenizer
        super().__init__(student, config, mesh)
        self.teacher_graphdef, teacher_state = nnx.split(teacher)
        self.teacher_shardings = sharding.state_shardings(teacher_state, self.mesh)
        self.teacher_state = sharding.put(teacher_state, self.teacher_shardings)
        jitted = jax.jit(
            functools.partial(_step, self.graphdef, self.teacher_graphdef, self.optimizer, config, distill, self.vocab),
            in_shardings=(self.trainable_shardings, self.frozen_shardings, self.teacher_shardings, self.opt_shardings,
                          _micro_sharding(self.mesh)),
            out_shardings=(self.trainable_shardings, self.opt_shardings, None), donate_argnums=(0, 3))
        self._step = lambda trainable, frozen, opt_state, batches: jitted(trainable, frozen, self.teacher_state,
                                                                          opt_state, batches)
        evaluate = jax.jit(functools.partial(distill_sums, self.graphdef, self.teacher_graphdef, config.compute_dtype,
                                             None, config.loss_chunk, distill, self.vocab))
        self._eval = lambda trainable, frozen, batch: evaluate(trainable, frozen, self.teacher_state, batch)
        self._engines: dict[str, Engine] = {}

    def teacher(self):
        return nnx.merge(self.teacher_graphdef, self.teacher_state)

    def student(self):
        return nnx.merge(self.graphdef, self.trainable, self.frozen)

    def step(self, micro_batches: Sequence) -> dict[str, float]:
        """One optimizer step; the micro-batches' responses replaced by generated ones as DistillConfig says."""
        dc, c = self.distill, self.config
        rng = np.random.default_rng([c.seed, self.step_count])
        batches, on_policy = [], 0
        for m, batch in enumerate(micro_batches):
            seed = int(rng.integers(2**31))
            if dc.seq_kd and not isinstance(batch, TargetBatch):
                batch = generate_responses(self.engine("teacher", batch), self.tokenizer, batch,
                                           max_new_tokens=dc.max_new_tokens, temperature=dc.gen_temperature, seed=seed)
            coin = rng.random() < dc.lmbda
            if coin and not isinstance(batch, TargetBatch):
                batch = generate_responses(self.engine("student", batch), self.tokenizer, batch,
                                           max_new_tokens=dc.max_new_tokens, temperature=dc.gen_temperature,
                                           seed=seed + 1)
                on_policy += 1
            batches.append(batch)
        metrics = super().step(batches)
        return {**metrics, "on_policy": on_policy / len(batches)}

    def engine(self, which: str, batch) -> Engine:
        """The engine that generates `which` ("student" or "teacher") model's responses for batches like `batch`,
        made on first use (a slot per row, the row length as max_len) and kept; the student's holds the
        current weights (pushed with the step count as their version)."""
        rows, seq_len = batch.inputs.shape
        engine = self._engines.get(which)
        if engine is not None and (engine.max_batch < rows or engine.max_len < seq_len):
            engine.close()
            engine = None
        if engine is None:
            if which == "teacher":
                model = self.teacher()
            else:  # its own copy of the trained weights: the step donates the trainer's
                model = nnx.merge(self.graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), self.trainable),
                                  self.frozen)
            engine = self._engines[which] = Engine(model, self.tokenizer, max_batch=rows, max_len=seq_len,
                                                   max_wait_ms=0, weights_version=self.step_count)
        elif which == "student" and engine.weights_version < self.step_count:
            engine.update_weights(self.student(), self.step_count)
        return engine

    def close(self) -> None:
        """Ends the generation engines' threads (a later step makes new ones)."""
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def prompts_of(batch) -> list[list[int]]:
    """Each row's prompt (an unpacked row: its ids up to and including the one before its first loss token);
    [] for an empty row."""
    out = []
    for inputs, weights, segments in zip(batch.inputs, batch.weights, batch.segment_ids):
        if segments.max() > 1:
            raise ValueError("generated responses need one example per row: make the iterator with packing=False")
        hits = np.flatnonzero(weights > 0)
        out.append([] if not len(hits) else inputs[:hits[0] + 1].tolist())
    return out


def generate_responses(model, tokenizer, batch, *, max_new_tokens: int, temperature: float, seed: int):
    """The batch with each row's response replaced by `model`'s continuation of its prompt (a data.Batch of
    the same shape). `model`: a gemma.serve.Engine with max_len >= the row length (a trainer's, kept across
    steps), or a Transformer (a one-off engine). Row i draws from seed + i; greedy ids are Sampler.generate's."""
    seq_len = batch.inputs.shape[1]
    prompts = prompts_of(batch)
    live = [i for i, p in enumerate(prompts) if p and len(p) < seq_len]
    examples = [data_lib.Example(np.zeros(1, np.int32), np.zeros(1, bool))] * len(prompts)
    if live:
        longest = max(len(prompts[i]) for i in live)
        new = min(max_new_tokens, seq_len - longest)
        engine = model if isinstance(model, Engine) else Engine(model, tokenizer, max_batch=len(live),
                                                                max_len=seq_len, max_wait_ms=0)
        try:  # an <eos> is cut below, so <end_of_turn> alone stops a row and each row's stop id is known
            out = engine.generate_batch([prompts[i] for i in live], max_tokens=new, temperature=temperature,
                                        seed=seed, stop_ids=(tokenizer.end_of_turn_id,))
        finally:
            if engine is not model:
                engine.close()
        for i, ids in zip(live, (choice.tokens for choice in out)):
            if len(ids) < new:
                ids = ids + [tokenizer.end_of_turn_id]
            if tokenizer.eos_id in ids:
                ids = ids[:ids.index(tokenizer.eos_id) + 1]
            p = prompts[i]
            full = np.asarray(p + ids, np.int32)[:seq_len]
            examples[i] = data_lib.Example(full, np.arange(len(full)) >= len(p))
    batch_rows = [(i,) for i in range(len(prompts))]
    made = data_lib._make_batch(batch_rows, examples=examples, seq_len=seq_len, lo=0, hi=len(prompts))
    empty = [i for i in range(len(prompts)) if i not in live]
    for name, field in zip(made._fields, made):  # rows with no prompt, or a prompt filling the row, stay
        field[empty] = getattr(batch, name)[empty]
    return made
