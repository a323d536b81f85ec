"""An RL run as a directory, with fine-tuning's conventions (gemma.train.run): rerun the same call to resume.

    rl(policy, tokenizer, "prompts.jsonl", "out/", config=TrainConfig(steps=200, batch_size=8, seq_len=256),
       rl_config=RLConfig(samples_per_prompt=4, kl_alpha=0.05), reward=verifier, metric=true_metric)
    checkpoints.load("out/")                       # the trained policy

DIR/run.json (the fine-tuning identity plus the RL settings and the reward's name), metrics.jsonl (one line per
step: reward, penalized_reward, kl, metric, length, distinct, reward_dropped, ...; eval lines: eval_reward,
eval_metric, eval_length and `hacking`, the step where rl_trainer.reward_hacking flagged the reward against the
metric, or null), DIR/checkpoints/<step> (orbax: the policy's trainable parameters and the value baseline's, their
optimizer states; meta: the step, the prompt order's position, the sampling RNG and the rollouts sampled but not
learned yet), so a run killed at any point and rerun draws the same samples and ends bitwise where an uninterrupted
one ends. At the end the policy (LoRA merged) and tokenizer are written to DIR itself (checkpoints.save).

Prompts JSONL: {"prompt": str} a line (a user turn, rendered with gemma.chat.format_turn as the chat sampler and
the fine-tuning data render it; the model's reply is the completion) or {"text": str} (continued as it is).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from gemma.chat import format_turn
from gemma.train import data as data_lib
from gemma.train import run as run_lib
from gemma.train.rl_trainer import RLConfig, Rollout, RLTrainer, reward_hacking
from gemma.train.trainer import TrainConfig

# run.json fields (besides fine-tuning's run.IDENTITY) that must match for a rerun to continue a run
IDENTITY = ("samples_per_prompt", "baseline", "kl_alpha", "kl_estimator", "max_new_tokens", "stop_ids",
            "gkd_weight", "gkd_beta", "rollout_lag", "max_staleness", "max_ratio", "value_learning_rate",
            "reward", "teacher", "reference")


PROMPT_FORMATS = "{'prompt': str} or {'text': str}"


def _check_prompt(record, where: str) -> None:
    if not isinstance(record, dict) or set(record) not in ({"prompt"}, {"text"}):
        raise ValueError(f"{where}: expected {PROMPT_FORMATS}, got {str(record)[:80]}")


def load_prompts(path: str, tokenizer, max_len: int | None = None, long: str = "error"
                 ) -> tuple[list[tuple[list[int], str]], dict]:
    """(ids, prompt text) of each record of a prompts JSONL, and counts {"prompts", "truncated", "dropped"}: a
    prompt over `max_len` tokens is cut to it ("truncate"), left out ("drop") or an error ("error").
    ValueError naming FILE:LINE on a bad record."""
    if long not in data_lib._LONG:
        raise ValueError(f"long={long!r}; expected one of {', '.join(map(repr, data_lib._LONG))}")
    out, truncated, dropped = [], 0, 0
    for lineno, record in data_lib._read(path, _check_prompt, PROMPT_FORMATS):
        where = f"{os.fspath(path)}:{lineno}"
        if "prompt" in record:
            text = data_lib._text(record["prompt"], "'prompt'", where)
            ids = [tokenizer.bos_id] + tokenizer.encode(format_turn(text, first=True), add_bos=False)
        else:
            text = data_lib._text(record["text"], "'text'", where)
            ids = [tokenizer.bos_id] + tokenizer.encode(text, add_bos=False)
        if max_len is not None and len(ids) > max_len:
            if long == "error":
                raise ValueError(f"{where}: the prompt has {len(ids)} tokens, more than the {max_len} that "
                                 f"--seq-len minus --max-new-tokens leaves (use --long truncate or drop)")
            if long == "drop":
                dropped += 1
                continue
            ids, truncated = ids[:max_len], truncated + 1
        out.append((ids, text))
    if not out:
        raise ValueError(f"{os.fspath(path)}: no prompts left ({dropped} dropped as too long)")
    return out, {"prompts": len(out), "truncated": truncated, "dropped": dropped}


def run_identity(config: TrainConfig, rc: RLConfig, model_source: str, data: str, reward: str,
                 teacher_source: str | None = None, reference_source: str | None = None, long: str = "error") -> dict:
    settings = dataclasses.asdict(rc)
    settings["stop_ids"] = None if rc.stop_ids is None else list(rc.stop_ids)
    return {**run_lib.run_identity(config, model_source, data, False, long), "data": data, **settings, "reward": reward,
            "teacher": teacher_source, "reference": reference_source}


def check_output(output: str, identity: dict) -> bool:
    """run.check_output, and the RL settings of a run already there must match."""
    return run_lib.check_output(output, identity, IDENTITY)


class _Checkpointed:
    """What run.save / run.restore see of an RLTrainer: the policy's and the value baseline's parameters and
    optimizer states as one tree each."""

    def __init__(self, trainer: RLTrainer):
        self.trainer = trainer

    @property
    def trainable(self):
        t = self.trainer
        return {"policy": t.trainable, **({"value": t.value_trainable} if t.value_trainable is not None else {})}

    @trainable.setter
    def trainable(self, tree):
        self.trainer.trainable = tree["policy"]
        if "value" in tree:
            self.trainer.value_trainable = tree["value"]

    @property
    def opt_state(self):
        t = self.trainer
        return {"policy": t.opt_state, **({"value": t.value_opt_state} if t.value_opt_state is not None else {})}

    @opt_state.setter
    def opt_state(self, tree):
        self.trainer.opt_state = tree["policy"]
        if "value" in tree:
            self.trainer.value_opt_state = tree["value"]

    @property
    def step_count(self):
        return self.trainer.step_count

    @step_count.setter
    def step_count(self, value):
        self.trainer.step_count = value


def rl(policy, tokenizer, prompts: str | Sequence, output: str, *, config: TrainConfig,
       rl_config: RLConfig = RLConfig(), reward: Callable | Any, metric: Callable | None = None,
       eval_prompts: str | Sequence | None = None, eval_every: int | None = None, save_every: int | None = None,
       keep: int = 3, mesh=None, model_source: str = "", data_source: str | None = None,
       reward_source: str | None = None, teacher=None, teacher_source: str | None = None, teacher_tokenizer=None,
       reference=None, reference_source: str | None = None, hacking_margin: float = 0.05, long: str = "error",
       epochs: float | None = None, progress: bool = True, log=None) -> dict[str, Any]:
    """Runs (or resumes) an RL run in `output`; returns {"step", "reward", "eval_reward", "eval_metric", "hacking",
    "path", "model"}.

    `policy` (gemma.Transformer, float32) is taken over; `prompts` and `eval_prompts`: a prompts JSONL path or
    (ids, prompt) pairs (then `data_source` names them in run.json). `reward`: a function (prompt, completion) ->
    float or a RewardModel (`reward_source` names it in run.json; default: its module:qualname). `metric`: the
    true metric, measured, never optimised. With `eval_prompts` the greedy completions are scored at step 0, every
    `eval_every` steps and at the end. `long`: what to do with a prompt JSONL's prompt over seq_len -
    max_new_tokens tokens (load_prompts). `epochs` (instead of config.steps): passes over the prompts.
    """
    run_lib.check_run_args(save_every, eval_every, keep)
    output = os.path.abspath(output)
    room = config.seq_len - rl_config.max_new_tokens
    counts = {"prompts": len(prompts) if not isinstance(prompts, (str, os.PathLike)) else None}
    if isinstance(prompts, (str, os.PathLike)):
        data_source = data_source or os.path.abspath(prompts)
        prompts, counts = load_prompts(prompts, tokenizer, room, long)
    elif data_source is None:
        raise ValueError("prompts given as (ids, prompt) pairs need data_source, their name in run.json")
    if isinstance(eval_prompts, (str, os.PathLike)):
        eval_prompts = load_prompts(eval_prompts, tokenizer, room, long)[0]
    if epochs is not None:
        if not epochs > 0:
            raise ValueError(f"epochs must be > 0, got {epochs!r}")
        config = dataclasses.replace(config, steps=max(1, math.ceil(epochs * len(prompts) / config.batch_size)))
    if reward_source is None:
        reward_source = f"{getattr(reward, '__module__', '?')}:{getattr(reward, '__qualname__', type(reward).__name__)}"
    identity = run_identity(config, rl_config, model_source, data_source, reward_source, teacher_source,
                            reference_source, long)
    check_output(output, identity)
    if log is not None:
        log(f"{data_source}: {len(prompts)} prompts; {config.batch_size} x {rl_config.samples_per_prompt} "
            f"completions a step")
    primary = run_lib.write_run_file(output, identity, config, counts)

    trainer = RLTrainer(policy, tokenizer, prompts, config, rl_config, reward, metric=metric, reference=reference,
                        teacher=teacher, teacher_tokenizer=teacher_tokenizer, mesh=mesh)
    try:
        manager, best = run_lib.open_checkpoints(output, keep)
        start, meta = run_lib.restore(manager, _Checkpointed(trainer), trainer.iterator)
        if meta is not None:
            trainer.rng = meta["rng"]
            trainer.pending = [[Rollout(**r) for r in batch] for batch in meta["pending"]]
            trainer.engine.update_weights(trainer.merged_model(), trainer.version)
        metrics = run_lib._Metrics(os.path.join(output, run_lib.METRICS_FILE), start)

        def run_eval(step: int) -> None:
            if eval_prompts is None or any(r.get("step") == step and "eval_reward" in r for r in metrics.records):
                return
            record = {"step": step, **trainer.evaluate(eval_prompts)}
            record["hacking"] = reward_hacking([*metrics.records, record], margin=hacking_margin)
            metrics.write(record)

        if start == 0 and eval_every is not None:
            run_eval(0)
        bar = tqdm(total=config.steps, initial=start, desc="rl", unit="step", disable=not (progress and primary))
        for step in range(start + 1, config.steps + 1):
            t0 = time.perf_counter()
            last = trainer.step()
            metrics.write({"step": step, **last, "seconds": time.perf_counter() - t0})
            bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last['kl']:.3f}")
            bar.update(1)
            final = step == config.steps
            if eval_prompts is not None and (final or (eval_every is not None and step % eval_every == 0)):
                run_eval(step)
            if (save_every is not None and step % save_every == 0) or final:
                run_lib.save(manager, step, _Checkpointed(trainer), {
                    "step": step, "data": trainer.iterator.get_state(), "rng": trainer.rng,
                    "pending": [[dataclasses.asdict(r) for r in batch] for batch in trainer.pending]})
        bar.close()
        run_lib.close(manager, best, metrics)
    finally:
        trainer.close()
    saved = tokenizer if hasattr(tokenizer, "save") else None  # a test's id-level tokenizer is not written
    result = run_lib.save_result(trainer, saved, output, metrics, primary)
    evals = [r for r in metrics.records if "eval_reward" in r]
    steps = [r for r in metrics.records if "reward" in r]
    return {**result, "reward": steps[-1]["reward"] if steps else None,
            "eval_reward": evals[-1]["eval_reward"] if evals else None,
            "eval_metric": evals[-1].get("eval_metric") if evals else None,
            "hacking": evals[-1]["hacking"] if evals else None}
