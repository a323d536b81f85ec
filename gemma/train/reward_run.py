"""A reward-model run as a directory, with fine-tuning's conventions (gemma.train.run): rerun to resume.

    train_reward_model(init, tokenizer, "pairs.jsonl", "out/", config=TrainConfig(steps=200), members=3)
    checkpoints.load_reward_model("out/")            # the reward model (members > 1: their WARM average)
    checkpoints.load_reward_model("out/members/0")   # one member (members > 1)
    ids = encode(tokenizer, prompt, completion)      # a (prompt, response) as the reward model reads it

Data, one JSON object a line, one kind per file:

    {"prompt": str, "chosen": str, "rejected": str}        preference pairs: the Bradley-Terry loss
    {"document": str, "summary": str, "entailed": bool}    labelled triples: the entailment cross-entropy

Each (prompt, response) and (document, summary) is one chat exchange, as gemma.train.data.render lays out
{"prompt", "response"}: <bos>, the user turn, the opening of the model's turn, the response, <end_of_turn>.
The head reads that closing <end_of_turn>; `encode` lays out an RL completion the same way.

Members (WARM, Ramé et al. 2024): M reward models fine-tuned from the one initialisation `init`, member k on
its own data order (seeded by (seed, k)). They train one after another, their steps numbered in one sequence
(member k's step s is step k * steps + s of metrics.jsonl and DIR/checkpoints), so a rerun resumes inside
the member where the run stopped, bitwise. DIR/members/<k> holds each finished member (checkpoints.save);
DIR itself holds the uniform average of the members' parameters (merges.average) or, with M = 1, the model.

DIR/run.json: fine-tuning's identity plus objective, members and steps (a DIR holding another run is
refused). DIR/metrics.jsonl: {"step", "member", "member_step", "loss", "grad_norm", "learning_rate",
"rows_per_s"} per step; {"step", "member", "eval_accuracy", "eval_loss"} at evals (step 0 of member 0,
every eval_every steps of a member, its end); with M > 1 finally {"step", "warm_eval_accuracy", "warm_eval_loss",
"members_eval_accuracy"}. DIR/checkpoints/<step>: the member's parameters, optimizer state and data position.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from gemma.chat import format_turn
from gemma.train import data as data_lib
from gemma.train import merges
from gemma.train import reward_model as R
from gemma.train import run as run_lib
from gemma.train.trainer import TrainConfig

OBJECTIVES = ("bradley-terry", "entailment")
_FIELDS = {"bradley-terry": ("prompt", "chosen", "rejected"), "entailment": ("document", "summary", "entailed")}
FORMATS = ("{'prompt', 'chosen', 'rejected'} (preference pairs) or {'document', 'summary', 'entailed'} "
           "(labelled triples)")
LONG = ("drop", "error")
IDENTITY = ("kind", "objective", "members", "steps")


# ---------------------------------------------------------------- data


def encode(tokenizer, prompt: str, response: str) -> np.ndarray:
    """int32 ids of one exchange as the reward model reads it (gemma.train.data.render's layout of
    {"prompt", "response"}; here an empty response is allowed: an RL completion may be empty)."""
    ids = [tokenizer.bos_id] + tokenizer.encode(format_turn(prompt, first=True), add_bos=False)
    return np.asarray(ids + tokenizer.encode(response, add_bos=False) + [tokenizer.end_of_turn_id], np.int32)


def _objective(record, where: str) -> str:
    """The objective a record's fields are for; ValueError naming `where` (FILE:LINE) on a bad record."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with the fields {FORMATS}, got {type(record).__name__}")
    for objective, fields in _FIELDS.items():
        if set(record) == set(fields):
            for name in fields[:2] if objective == "entailment" else fields:
                data_lib._text(record[name], repr(name), where)
            if objective == "entailment" and not isinstance(record["entailed"], bool):
                raise ValueError(f"{where}: 'entailed' must be true or false, got {record['entailed']!r:.60}")
            return objective
    known = {f for fields in _FIELDS.values() for f in fields}
    unknown = [k for k in record if k not in known]
    if unknown:
        raise ValueError(f"{where}: unknown field {', '.join(map(repr, unknown))}; expected the fields {FORMATS}")
    raise ValueError(f"{where}: the fields {sorted(record)} match no format; expected {FORMATS}")


def load_examples(path, tokenizer, seq_len: int, long: str = "drop",
                  objective: str | None = None) -> tuple[str, list, dict]:
    """Reads, validates and renders a JSONL file of one kind of record -> (objective, examples, counts).

    Examples: (chosen ids, rejected ids) pairs, or (ids, label) with label 1.0 entailed / 0.0 not. An example
    (either side of a pair) longer than `seq_len` tokens is dropped ("drop", counted) or raises ("error");
    truncating would cut the response the head reads. `objective` (default: the file's) must match the file."""
    if long not in LONG:
        raise ValueError(f"long={long!r}; expected one of {', '.join(map(repr, LONG))}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    records = data_lib._read(path, parse=_objective, formats=FORMATS)
    first_line = records[0][0]
    kind = _objective(records[0][1], f"{os.fspath(path)}:{first_line}")
    if objective is not None and kind != objective:
        raise ValueError(f"{os.fspath(path)}:{first_line}: --objective {objective} needs records with the fields "
                         f"{sorted(_FIELDS[objective])}, this one has {sorted(records[0][1])}")
    examples, dropped = [], 0
    for lineno, record in records:
        where = f"{os.fspath(path)}:{lineno}"
        this = _objective(record, where)
        if this != kind:
            raise ValueError(f"{where}: a record of {sorted(_FIELDS[this])} in a file of {sorted(_FIELDS[kind])} "
                             f"records (line {first_line}); one file holds one kind")
        if kind == "bradley-terry":
            ex = (encode(tokenizer, record["prompt"], record["chosen"]),
                  encode(tokenizer, record["prompt"], record["rejected"]))
            n = max(len(ex[0]), len(ex[1]))
        else:
            ex = (encode(tokenizer, record["document"], record["summary"]), float(record["entailed"]))
            n = len(ex[0])
        if n > seq_len:
            if long == "error":
                raise ValueError(f"{where}: the example has {n} tokens, more than --seq-len {seq_len} (raise "
                                 f"--seq-len, or --long drop)")
            dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise ValueError(f"{os.fspath(path)}: no example fits --seq-len {seq_len} ({dropped} dropped)")
    rows = [r for ex in examples for r in (ex if kind == "bradley-terry" else ex[:1])]
    counts = {"examples": len(examples), "dropped": dropped, "tokens": int(sum(len(r) for r in rows)),
              "longest": max(len(r) for r in rows)}
    if kind == "entailment":
        counts["entailed"] = int(sum(label for _, label in examples))
    return kind, examples, counts


def make_batch(examples, objective: str, length: int) -> R.Pairs | R.Labelled:
    """Examples (as load_examples gives them) -> one batch, every row left-padded to `length`."""
    if objective == "bradley-terry":
        return R.Pairs(*R.pad_rows([c for c, _ in examples], length, left=True),
                       *R.pad_rows([r for _, r in examples], length, left=True))
    return R.Labelled(*R.pad_rows([ids for ids, _ in examples], length, left=True),
                      np.asarray([y for _, y in examples], np.float32))


def eval_batches(examples, objective: str, batch_size: int) -> list:
    """Every example once, in order, in batches of `batch_size` padded to the longest example."""
    length = max(len(r) for ex in examples for r in (ex if objective == "bradley-terry" else ex[:1]))
    return [make_batch(examples[i:i + batch_size], objective, length) for i in range(0, len(examples), batch_size)]


class Order:
    """Which examples each batch of member `member` takes: batch i is positions i*B .. (i+1)*B - 1 of the
    concatenated per-epoch permutations of the N examples, epoch e's seeded by (seed, member, e). The
    state (batches taken so far) is what a checkpoint stores (`get_state` / `set_state`)."""

    def __init__(self, n: int, batch_size: int, seed: int, member: int):
        self.n, self.batch_size, self.seed, self.member = n, batch_size, seed, member
        self.position = 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, self.member, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def next(self) -> list[int]:
        start = self.position * self.batch_size
        self.position += 1
        return [int(self._perm(j // self.n)[j % self.n]) for j in range(start, start + self.batch_size)]

    def _fingerprint(self) -> dict:
        return {"examples": self.n, "batch_size": self.batch_size, "seed": self.seed, "member": self.member}

    def get_state(self) -> dict:
        return {"position": self.position, **self._fingerprint()}

    def set_state(self, state: dict) -> None:
        theirs = {k: state.get(k) for k in self._fingerprint()}
        if theirs != self._fingerprint():
            raise ValueError(f"the data state was taken from other data or settings: {theirs} (now "
                             f"{self._fingerprint()})")
        self.position = int(state["position"])


# ---------------------------------------------------------------- the run


def run_identity(config: TrainConfig, model_source: str, data_path: str, long: str, objective: str,
                 members: int) -> dict:
    return {**run_lib.run_identity(config, model_source, data_path, False, long), "kind": "reward-model",
            "objective": objective, "members": members, "steps": config.steps}


def check_output(output: str, identity: dict) -> bool:
    """run.check_output, and a run already there must have this objective, members and steps."""
    return run_lib.check_output(output, identity, IDENTITY)


def prepare(data_path: str, tokenizer, config: TrainConfig, *, objective: str | None = None,
            eval_path: str | None = None, long: str = "drop", members: int = 1, epochs: float | None = None):
    """Everything checkable before the weights load: (objective, examples, counts, eval examples, config with
    the steps `epochs` passes take, when given)."""
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise ValueError(f"members must be an int >= 1, got {members!r}")
    objective, examples, counts = load_examples(data_path, tokenizer, config.seq_len, long, objective)
    held_out = None
    if eval_path is not None:
        held_out = load_examples(eval_path, tokenizer, config.seq_len, long, objective)[1]
    if epochs is not None:
        if not epochs > 0:
            raise ValueError(f"epochs must be > 0, got {epochs!r}")
        import dataclasses

        config = dataclasses.replace(config, steps=max(1, math.ceil(epochs * len(examples) / config.batch_size)))
    return objective, examples, counts, held_out, config


def train_reward_model(init: R.RewardModel, tokenizer, data_path: str, output: str, *, config: TrainConfig,
                       objective: str | None = None, members: int = 1, eval_path: str | None = None,
                       long: str = "drop", save_every: int | None = None, eval_every: int | None = None,
                       keep: int = 3, model_source: str = "", epochs: float | None = None, progress: bool = True,
                       log=None) -> dict[str, Any]:
    """Runs (or resumes) a reward-model run in `output`; returns {"step", "loss", "eval_accuracy", "path",
    "model"} (the final RewardModel: the members' average when members > 1). `init` is not changed.
    `config.steps` steps per member (or, with `epochs`, as many as that many passes over the data take)."""
    import checkpoints

    run_lib.check_run_args(save_every, eval_every, keep)
    if not isinstance(init, R.RewardModel):
        raise TypeError(f"init must be a reward_model.RewardModel, got {type(init).__name__}")
    output = os.path.abspath(output)
    objective, examples, counts, held_out, config = prepare(data_path, tokenizer, config, objective=objective,
                                                            eval_path=eval_path, long=long, members=members,
                                                            epochs=epochs)
    identity = run_identity(config, model_source, data_path, long, objective, members)
    check_output(output, identity)
    if log is not None:
        log(f"{data_path}: {counts['examples']} {objective} examples ({counts['dropped']} dropped at --seq-len "
            f"{config.seq_len}); {members} member(s) x {config.steps} steps")
    primary = run_lib.write_run_file(output, identity, config, counts)
    length = counts["longest"]  # every training batch has one shape: one compilation
    evals = eval_batches(held_out, objective, config.batch_size) if held_out else None
    steps, total = config.steps, members * config.steps
    manager = ocp.CheckpointManager(
        os.path.join(output, "checkpoints"), item_names=("params", "opt_state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True))
    done = manager.latest_step() or 0
    metrics = run_lib._Metrics(os.path.join(output, run_lib.METRICS_FILE), done)

    def member_dir(k: int) -> str:
        return output if members == 1 else os.path.join(output, "members", str(k))

    def run_eval(k: int, step: int, model) -> None:
        if evals is None or any(r.get("step") == step and r.get("member") == k and "eval_accuracy" in r
                                for r in metrics.records):
            return
        e = R.evaluate(model, evals)
        metrics.write({"step": step, "member": k, "eval_accuracy": e["accuracy"], "eval_loss": e["loss"]})

    bar = tqdm(total=total, initial=done, desc="reward-model", unit="step", disable=not (progress and primary))
    trained: list = []
    try:
        for k in range(members):
            first = k * steps
            if done >= first + steps:  # finished in an earlier run: its model is in member_dir(k)
                trained.append(None)
                continue
            trainer = R.RewardTrainer(init, config)
            order = Order(len(examples), config.batch_size, config.seed, k)
            start = 0
            if done > first:
                start = run_lib.restore(manager, trainer, order)[0] - first
                trainer.step_count = start  # the member's own step: its learning-rate schedule
            elif eval_every is not None and k == 0:  # every member starts from init: one step-0 eval
                run_eval(k, first, trainer.model())
            for s in range(start + 1, steps + 1):
                batch = make_batch([examples[i] for i in order.next()], objective, length)
                t0 = time.perf_counter()
                m = trainer.step(batch)
                seconds = time.perf_counter() - t0
                metrics.write({"step": first + s, "member": k, "member_step": s, "loss": m["loss"],
                               "grad_norm": m["grad_norm"], "learning_rate": m["learning_rate"],
                               "rows_per_s": config.batch_size / seconds})
                bar.set_postfix(member=k, loss=f"{m['loss']:.4f}")
                bar.update(1)
                final = s == steps
                if evals is not None and (final or (eval_every is not None and s % eval_every == 0)):
                    run_eval(k, first + s, trainer.model())
                if final:
                    model = trainer.model()
                    trained.append(model)
                    if primary:  # before the checkpoint that marks the member finished
                        checkpoints.save(model, member_dir(k), tokenizer=tokenizer)
                if final or (save_every is not None and s % save_every == 0):
                    run_lib.save(manager, first + s, trainer, {"step": first + s, "member": k,
                                                               "data": order.get_state()})
    finally:  # an interrupted run (Ctrl-C, an error) still finishes the checkpoint it was writing
        bar.close()
        manager.wait_until_finished()
        manager.close()
    trained = [m if m is not None else checkpoints.load_reward_model(member_dir(k), dtype=None)
               for k, m in enumerate(trained)]
    result, accuracy = trained[0], None
    if members > 1:
        graphdef, _ = nnx.split(init)
        result = nnx.merge(graphdef, merges.average([nnx.state(m, nnx.Param) for m in trained]))
        if primary:
            checkpoints.save(result, output, tokenizer=tokenizer)
        if evals is not None:
            warm = [r for r in metrics.records if "warm_eval_accuracy" in r]
            if not warm:
                e = R.evaluate(result, evals)
                each = [r["eval_accuracy"] for k in range(members) for r in metrics.records
                        if r.get("member") == k and r.get("step") == (k + 1) * steps and "eval_accuracy" in r]
                warm = [{"step": total, "warm_eval_accuracy": e["accuracy"], "warm_eval_loss": e["loss"],
                         "members_eval_accuracy": each}]
                metrics.write(warm[0])
            accuracy = warm[-1]["warm_eval_accuracy"]
    elif evals is not None:
        accuracy = [r["eval_accuracy"] for r in metrics.records if "eval_accuracy" in r][-1]
    metrics.close()
    losses = [r["loss"] for r in metrics.records if "loss" in r]
    return {"step": total, "loss": losses[-1] if losses else None, "eval_accuracy": accuracy, "path": output,
            "model": result}
