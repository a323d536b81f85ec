"""A fine-tuning run as a directory: metrics.jsonl, orbax checkpoints, the result; rerun to resume.

    finetune(model, tokenizer, "train.jsonl", "out/", config=TrainConfig(steps=200, lora_rank=8))
    checkpoints.load("out/")                       # the fine-tuned model (LoRA merged)

DIR/run.json names what the run is (model, LoRA settings, data, batch); DIR/checkpoints/<step> holds
the trainable parameters (the adapters only under LoRA), the optimizer state, the step, the data
iterator's position and the RNG, written asynchronously (orbax) every `save_every` steps and at the
end, the last `keep` kept; DIR/best holds the parameters of the lowest eval loss; a LoRA run's adapters
are also written in PEFT's layout to DIR/adapter (gemma.train.export.save_peft). A rerun with DIR
holding a checkpoint restores the newest complete one (onto any mesh) and continues, so its
parameters are bitwise those of an uninterrupted run; metrics.jsonl keeps each step once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from gemma.train import data as data_lib
from gemma.train.trainer import TrainConfig, Trainer

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
# run.json fields that must match for a rerun to continue a run (steps and cadences may change)
IDENTITY = ("model", "data", "lora", "compute_dtype", "seq_len", "batch_size", "grad_accum", "packing", "long",
            "seed", "learning_rate", "warmup_steps", "weight_decay", "quantize")


def quantization_of(model) -> str | None:
    """"int4" when the model holds 4-bit matrices (QLoRA over a GGUF keeps 8-bit ones beside them), "int8" when
    it holds only 8-bit ones, None for a float model: the `--quantize` a run was started with."""
    from flax import nnx

    from kernels.quantized import QuantizedEinsum

    bits = {m.bits for _, m in nnx.iter_graph(model) if isinstance(m, QuantizedEinsum)}
    return "int4" if 4 in bits else "int8" if bits else None


def run_identity(config: TrainConfig, model_source: str, data_path: str, packing: bool, long: str,
                 quantize: str | None = None) -> dict:
    lora = None if not config.lora else {"rank": config.lora_rank, "alpha": float(config.lora_alpha or
                                                                               config.lora_rank),
                                        "targets": list(config.lora_targets)}
    return {"model": model_source, "data": os.path.abspath(data_path), "lora": lora,
            "compute_dtype": config.compute_dtype, "seq_len": config.seq_len, "batch_size": config.batch_size,
            "grad_accum": config.grad_accum, "packing": bool(packing), "long": long, "seed": config.seed,
            "learning_rate": config.learning_rate, "warmup_steps": config.warmup_steps,
            "weight_decay": config.weight_decay, "quantize": quantize}


def check_run_args(save_every: int | None, eval_every: int | None, keep: int | None = None) -> None:
    """ValueError unless save_every / eval_every are ints >= 1 or None and keep (when given) an int >= 1."""
    for name, value in (("save_every", save_every), ("eval_every", eval_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")


def check_output(output: str, identity: dict, keys: tuple[str, ...] = ()) -> bool:
    """Whether `output` holds this run already (True: resume); raises if it holds anything else: another
    model, data or training settings (IDENTITY), or other values of a trainer's own `keys`.
    Nothing is written here."""
    if not os.path.exists(output):
        return False
    if not os.path.isdir(output):
        raise ValueError(f"--output {output} exists and is not a directory")
    run_file = os.path.join(output, RUN_FILE)
    if not os.path.isfile(run_file):
        if os.listdir(output):
            raise ValueError(f"--output {output} is not empty and holds no fine-tuning run ({RUN_FILE}); "
                             f"refusing to write into it: give a new or empty directory")
        return False
    with open(run_file) as f:
        theirs = json.load(f)
    diff = [f"{k}: {theirs.get(k)!r} there, {identity.get(k)!r} now" for k in IDENTITY + tuple(keys)
            if theirs.get(k) != identity.get(k)]
    if diff:
        raise ValueError(f"--output {output} holds another run ({'; '.join(diff)}); give another --output to "
                         f"start a new run, or the same settings to resume it")
    return True


def _read_metrics(path: str, last_step: int) -> list[dict]:
    """The lines of metrics.jsonl up to `last_step` (a line cut by a kill, or past the checkpoint, is dropped)."""
    kept = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                if record.get("step", math.inf) <= last_step:
                    kept.append(record)
    return kept


class _Metrics:
    """metrics.jsonl, written by process 0, one flushed line per record."""

    def __init__(self, path: str, last_step: int):
        self.primary = jax.process_index() == 0
        self.records = _read_metrics(path, last_step)
        if self.primary:
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            os.replace(path + ".tmp", path)
            self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.primary:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def has_eval(self, step: int) -> bool:
        return any(r.get("step") == step and "eval_loss" in r for r in self.records)

    def close(self):
        if self.primary:
            self._file.close()


def evaluate(trainer: Trainer, examples, packing: bool) -> float:
    """Token-weighted mean masked cross-entropy over every example once."""
    c = trainer.config
    it = data_lib.make_iterator(examples, batch_size=c.batch_size, seq_len=c.seq_len, seed=0, packing=packing,
                                shard_index=jax.process_index(), shard_count=jax.process_count(),
                                num_epochs=1, prefetch=0)
    total = count = 0.0
    for _ in range(it.steps_per_epoch):
        loss, n = trainer.loss_sums(next(it))
        total, count = total + loss, count + n
    return total / max(count, 1.0)


def finetune(model, tokenizer, data_path: str, output: str, *, config: TrainConfig, eval_path: str | None = None,
             packing: bool = True, long: str = "truncate", save_every: int | None = None,
             eval_every: int | None = None, keep: int = 3, mesh=None, model_source: str = "",
             epochs: float | None = None, progress: bool = True, log=None,
             quantize: str | None = None) -> dict[str, Any]:
    """Runs (or resumes) a fine-tuning run in directory `output`; returns {"step", "loss", "eval_loss", "path"}.

    `model` (a gemma.Transformer, float32) is taken over. `config.steps` optimizer steps of
    `config.grad_accum` batches each (or, with `epochs`, as many steps as that many passes over the data
    take). `log(str)` receives the data counts. With `eval_path`, the eval loss is measured at step 0, every
    `eval_every` steps and at the end. At the end the merged model and tokenizer are written to
    `output` itself (checkpoints.save), so `checkpoints.load(output)` gives the fine-tuned model; under
    LoRA the adapters also go to `output`/adapter in PEFT's layout. `quantize` names the base's quantization in
    run.json (the command line's --quantize; default: read off the model, quantization_of), so that a rerun over
    another base is refused.
    """
    check_run_args(save_every, eval_every, keep)
    output = os.path.abspath(output)
    identity = run_identity(config, model_source, data_path, packing, long,
                            quantize if quantize is not None else quantization_of(model))
    check_output(output, identity)
    examples, counts = data_lib.load_examples(data_path, tokenizer, config.seq_len, long)
    eval_examples = data_lib.load_examples(eval_path, tokenizer, config.seq_len, long)[0] if eval_path else None
    if log is not None:
        log(f"{data_path}: {counts['examples']} examples, {counts['tokens']} tokens ({counts['loss_tokens']} in the "
            f"loss); {counts['truncated']} truncated and {counts['dropped']} dropped at --seq-len {config.seq_len}")
    config = steps_for_epochs(config, epochs, examples, packing)
    primary = write_run_file(output, identity, config, counts)

    trainer = Trainer(model, config, mesh)
    it = data_lib.make_iterator(examples, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed,
                                packing=packing, shard_index=jax.process_index(),
                                shard_count=jax.process_count())
    manager, best = open_checkpoints(output, keep)
    rng = np.asarray(jax.random.key_data(jax.random.key(config.seed))).tolist()
    start, meta = restore(manager, trainer, it)
    if meta is not None:
        rng = meta["rng"]
    metrics = _Metrics(os.path.join(output, METRICS_FILE), start)

    def run_eval(step: int) -> float | None:
        if eval_examples is None or metrics.has_eval(step):
            return None
        return record_eval(trainer, best, metrics, step, evaluate(trainer, eval_examples, packing))

    if start == 0 and eval_every is not None:
        run_eval(0)
    bar = tqdm(total=config.steps, initial=start, desc="finetune", unit="step", disable=not (progress and primary))
    last = {}
    for step in range(start + 1, config.steps + 1):
        t0 = time.perf_counter()
        last = trainer.step([next(it) for _ in range(config.grad_accum)])
        seconds = time.perf_counter() - t0
        rng = np.asarray(jax.random.key_data(jax.random.split(jax.random.wrap_key_data(
            np.asarray(rng, np.uint32)))[0])).tolist()
        metrics.write({"step": step, "loss": last["loss"], "learning_rate": last["learning_rate"],
                       "tokens": last["tokens"], "tokens_per_s": last["tokens"] / seconds})
        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['learning_rate']:.2e}",
                        tok_s=f"{last['tokens'] / seconds:.0f}")
        bar.update(1)
        final = step == config.steps
        if eval_every is not None and (step % eval_every == 0 or final):
            run_eval(step)
        elif final and eval_examples is not None:
            run_eval(step)
        if (save_every is not None and step % save_every == 0) or final:
            save(manager, step, trainer, {"step": step, "data": it.get_state(), "rng": rng})
    bar.close()
    close(manager, best, metrics)
    if primary and config.lora:
        from gemma.train import export

        export.save_peft(trainer.model(), os.path.join(output, "adapter"), base_model=model_source or None)
    return save_result(trainer, tokenizer, output, metrics, primary)


# ---------------------------------------------------------------- the pieces every run directory shares

def steps_for_epochs(config: TrainConfig, epochs: float | None, examples, packing: bool) -> TrainConfig:
    """config, or with `epochs` config with as many steps as that many passes over `examples` take."""
    if epochs is None:
        return config
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs!r}")
    per_epoch = data_lib.steps_per_epoch(examples, config.batch_size, config.seq_len, config.seed, packing)
    return dataclasses.replace(config, steps=max(1, math.ceil(epochs * per_epoch / config.grad_accum)))


def write_run_file(output: str, identity: dict, config: TrainConfig, counts: dict) -> bool:
    """Writes DIR/run.json from process 0; returns whether this is process 0."""
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, RUN_FILE), "w") as f:
            json.dump({**identity, "steps": config.steps, "counts": counts}, f, indent=1)
    return primary


def open_checkpoints(output: str, keep: int):
    """(DIR/checkpoints: the last `keep` steps, async; DIR/best: the parameters of the lowest eval loss)."""
    manager = ocp.CheckpointManager(
        os.path.join(output, "checkpoints"), item_names=("params", "opt_state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True))
    best = ocp.CheckpointManager(
        os.path.join(output, "best"), item_names=("params",),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["eval_loss"], best_mode="min",
                                             enable_async_checkpointing=False, cleanup_tmp_directories=True))
    return manager, best


def restore(manager, trainer: Trainer, it) -> tuple[int, dict | None]:
    """(step, meta) of the newest complete checkpoint, its parameters, optimizer state and data position
    put into `trainer` and `it` (resharded onto the trainer's mesh); (0, None) when there is none."""
    start = manager.latest_step() or 0
    if not start:
        return 0, None
    restored = manager.restore(start, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(trainer.trainable)),
        opt_state=ocp.args.StandardRestore(_abstract(trainer.opt_state)),
        meta=ocp.args.JsonRestore()))
    trainer.trainable, trainer.opt_state = restored.params, restored.opt_state
    trainer.step_count = start
    it.set_state(restored.meta["data"])
    return start, restored.meta


def save(manager, step: int, trainer: Trainer, meta: dict) -> None:
    """An asynchronous checkpoint of the trainer's parameters and optimizer state, with `meta` (JSON)."""
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(trainer.trainable), opt_state=ocp.args.StandardSave(trainer.opt_state),
        meta=ocp.args.JsonSave(meta)))


def record_eval(trainer: Trainer, best, metrics, step: int, loss: float) -> float:
    """Writes an eval line to metrics.jsonl and offers the parameters to DIR/best."""
    metrics.write({"step": step, "eval_loss": loss})
    best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(trainer.trainable)),
              metrics={"eval_loss": loss})
    return loss


def close(manager, best, metrics) -> None:
    manager.wait_until_finished()
    manager.close()
    best.close()
    metrics.close()


def save_result(trainer: Trainer, tokenizer, output: str, metrics, primary: bool) -> dict[str, Any]:
    """Writes the merged model and tokenizer to `output` (process 0); returns the run's summary."""
    result = trainer.merged_model()
    if primary:
        import checkpoints

        checkpoints.save(result, output, tokenizer=tokenizer)
    evals = [r["eval_loss"] for r in metrics.records if "eval_loss" in r]
    losses = [r["loss"] for r in metrics.records if "loss" in r]
    return {"step": trainer.config.steps, "loss": losses[-1] if losses else None,
            "eval_loss": evals[-1] if evals else None, "path": output, "model": result}


def _abstract(tree):
    """ShapeDtypeStructs with the arrays' shardings: the restore target (orbax reshards onto them)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
