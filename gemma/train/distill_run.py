"""A distillation run as a directory, with fine-tuning's conventions (gemma.train.run): rerun to resume.

    distill(student, teacher, tokenizer, "train.jsonl", "out/", config=TrainConfig(steps=200),
            distill=DistillConfig(lmbda=1.0, beta=1.0))
    checkpoints.load("out/")                       # the distilled student

DIR/run.json (the fine-tuning identity plus the teacher and the distillation settings), metrics.jsonl (one
line per step: loss, on_policy, ...; eval lines: eval_loss, the divergence on the eval data's responses),
DIR/checkpoints/<step> (orbax: trainable params, optimizer state, data position), DIR/best, and the student at
the end (checkpoints.save). With `targets` = (mode, K) the teacher's sparse targets are written once to
DIR/targets (gemma.train.distill_targets) and the student trains on them (lmbda 0, no seq_kd).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
from tqdm.auto import tqdm

from gemma.train import data as data_lib
from gemma.train import run as run_lib
from gemma.train.distill import TARGET_MODES
from gemma.train.distill_targets import TargetStore, write_targets
from gemma.train.distill_trainer import DistillConfig, DistillTrainer
from gemma.train.trainer import TrainConfig

IDENTITY = ("teacher", "lmbda", "beta", "temperature", "seq_kd", "gen_temperature", "max_new_tokens", "targets")


def run_identity(config: TrainConfig, dc: DistillConfig, student_source: str, teacher_source: str, data_path: str,
                 long: str, targets: tuple[str, int] | None) -> dict:
    return {**run_lib.run_identity(config, student_source, data_path, targets is not None, long),
            "teacher": teacher_source, "lmbda": dc.lmbda, "beta": dc.beta, "temperature": dc.temperature,
            "seq_kd": dc.seq_kd, "gen_temperature": dc.gen_temperature, "max_new_tokens": dc.max_new_tokens,
            "targets": None if targets is None else list(targets)}


def check_targets(targets, dc: DistillConfig) -> None:
    if targets is None:
        return
    mode, k = targets
    if mode not in TARGET_MODES:
        raise ValueError(f"target mode must be one of {', '.join(TARGET_MODES)}, got {mode!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"K (teacher ids per position) must be an int >= 1, got {k!r}")
    if dc.lmbda > 0 or dc.seq_kd:
        raise ValueError("precomputed teacher targets score the dataset's responses: they need lmbda 0 and no "
                         f"seq_kd (got lmbda {dc.lmbda}, seq_kd {dc.seq_kd})")


def check_output(output: str, identity: dict) -> bool:
    """run.check_output, and the distillation settings of a run already there must match."""
    return run_lib.check_output(output, identity, IDENTITY)


def distill(student, teacher, tokenizer, data_path: str, output: str, *, config: TrainConfig,
            distill: DistillConfig = DistillConfig(), targets: tuple[str, int] | None = None,
            eval_path: str | None = None, long: str = "truncate", save_every: int | None = None,
            eval_every: int | None = None, keep: int = 3, mesh=None, student_source: str = "",
            teacher_source: str = "", teacher_tokenizer=None, epochs: float | None = None, progress: bool = True,
            log=None) -> dict[str, Any]:
    """Runs (or resumes) a distillation run in `output`; returns {"step", "loss", "eval_loss", "path", "model"}.
    `student` and `teacher` (gemma.Transformer) are taken over; `epochs` (instead of config.steps) as finetune's."""
    run_lib.check_run_args(save_every, eval_every)
    check_targets(targets, distill)
    output = os.path.abspath(output)
    identity = run_identity(config, distill, student_source, teacher_source, data_path, long, targets)
    check_output(output, identity)
    examples, counts = data_lib.load_examples(data_path, tokenizer, config.seq_len, long)
    eval_examples = data_lib.load_examples(eval_path, tokenizer, config.seq_len, long)[0] if eval_path else None
    if log is not None:
        log(f"{data_path}: {counts['examples']} examples, {counts['loss_tokens']} response tokens; "
            f"{counts['truncated']} truncated and {counts['dropped']} dropped at --seq-len {config.seq_len}")
    config = run_lib.steps_for_epochs(config, epochs, examples, targets is not None)
    primary = run_lib.write_run_file(output, identity, config, counts)

    trainer = DistillTrainer(student, teacher, tokenizer, config, distill, mesh, teacher_tokenizer=teacher_tokenizer)
    batch_fn = None
    if targets is not None:
        path = os.path.join(output, "targets")
        if not os.path.isfile(os.path.join(path, "meta.json")):  # once per run (a kill mid-write starts over)
            tmp = path + ".tmp"
            if os.path.isdir(tmp):
                import shutil

                shutil.rmtree(tmp)
            meta = write_targets(trainer.teacher(), examples, tmp, k=targets[1], mode=targets[0],
                                 temperature=distill.temperature, seed=config.seed, seq_len=config.seq_len,
                                 progress=progress and primary)
            os.replace(tmp, path)
            if log is not None:
                log(f"teacher targets ({targets[0]}, K = {targets[1]}): {meta['entries']} entries for "
                    f"{meta['positions']} positions in {TargetStore(path).nbytes} bytes")
        store = TargetStore(path)
        store.check(examples)
        batch_fn = store.batch_fn()
    it = data_lib.make_iterator(examples, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed,
                                packing=targets is not None, shard_index=jax.process_index(),
                                shard_count=jax.process_count(), batch_fn=batch_fn)
    manager, best = run_lib.open_checkpoints(output, keep)
    start, _ = run_lib.restore(manager, trainer, it)
    metrics = run_lib._Metrics(os.path.join(output, run_lib.METRICS_FILE), start)

    def run_eval(step: int) -> None:
        if eval_examples is None or metrics.has_eval(step):
            return
        run_lib.record_eval(trainer, best, metrics, step, run_lib.evaluate(trainer, eval_examples, False))

    if start == 0 and eval_every is not None:
        run_eval(0)
    bar = tqdm(total=config.steps, initial=start, desc="distill", unit="step", disable=not (progress and primary))
    with trainer:  # closes its generation engines
        for step in range(start + 1, config.steps + 1):
            t0 = time.perf_counter()
            last = trainer.step([next(it) for _ in range(config.grad_accum)])
            seconds = time.perf_counter() - t0
            metrics.write({"step": step, "loss": last["loss"], "on_policy": last["on_policy"],
                           "learning_rate": last["learning_rate"], "tokens": last["tokens"],
                           "tokens_per_s": last["tokens"] / seconds})
            bar.set_postfix(loss=f"{last['loss']:.4f}", on_policy=f"{last['on_policy']:.2f}")
            bar.update(1)
            final = step == config.steps
            if eval_examples is not None and (final or (eval_every is not None and step % eval_every == 0)):
                run_eval(step)
            if (save_every is not None and step % save_every == 0) or final:
                run_lib.save(manager, step, trainer, {"step": step, "data": it.get_state()})
    bar.close()
    run_lib.close(manager, best, metrics)
    return run_lib.save_result(trainer, tokenizer, output, metrics, primary)
