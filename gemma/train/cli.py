"""`python -m gemma finetune`: the command line of gemma.train.run.finetune.

Every argument is checked (settings, mesh, model source, data file, output directory) before the
weights load; bad input exits with status 2 and one line naming what was wrong.
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "fine-tune a model on a JSONL file (full or LoRA); rerun the same command to resume"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help=HELP, description=HELP + ". Writes DIR/metrics.jsonl, orbax checkpoints "
                       "and, at the end, the fine-tuned model: checkpoints.load(DIR).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gemma3-270m", help="'gemma3-270m', a .gguf file, an HF dir or an orbax dir")
    p.add_argument("--quantize", default=None, choices=["int4", "int8"],
                   help="QLoRA: the base's matrices kept quantized and frozen (checkpoints.load(quantize=); a GGUF "
                        "as the file holds it); needs --lora-rank and float32 compute")
    training_flags(p, packing=True)
    return p


def training_flags(p: argparse.ArgumentParser, packing: bool) -> None:
    """The flags of a training run (finetune's; distill's too, without --packing)."""
    p.add_argument("--data", required=True, help="training JSONL: {messages}, {prompt, response} or {text} a line")
    p.add_argument("--output", required=True, help="run directory (created; holding this run: resumed)")
    p.add_argument("--eval-data", default=None, help="JSONL for the eval loss")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the data instead of --steps")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch (global, all devices)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="peak learning rate (default: 1e-4 with LoRA, 1e-5 full)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, then cosine decay to 0")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (omitted: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", help="projections that get adapters")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=2,tensor=2 (default: fsdp=all)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="compute dtype; weights and optimizer state stay float32 (default: float32 on CPU, "
                        "bfloat16 on TPU/GPU)")
    if packing:
        p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                       help="pack several examples per row (each attends to itself only)")
    p.add_argument("--long", default="truncate", choices=["truncate", "drop", "error"],
                   help="what to do with an example longer than --seq-len")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every K steps (and at the end)")
    p.add_argument("--eval-every", type=int, default=None, help="eval every K steps, at step 0 and at the end")
    p.add_argument("--remat", default=None, choices=["full", "dots"], help="recompute blocks in the backward")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=False,
                   help="run the blocks as a scan over their repeating 5 local : 1 global group (compile time "
                        "flat in depth, for the large models)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--seed", type=int, default=0)


def train_config(args):
    """The TrainConfig of training_flags' arguments (default learning rate and compute dtype filled in)."""
    import jax

    from gemma.train.trainer import TrainConfig

    lr = args.learning_rate if args.learning_rate is not None else (1e-4 if args.lora_rank else 1e-5)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    return TrainConfig(steps=args.steps or 1, batch_size=args.batch_size, seq_len=args.seq_len,
                       grad_accum=args.grad_accum, learning_rate=lr, warmup_steps=args.warmup_steps,
                       lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                       compute_dtype=dtype, remat=args.remat, scan_layers=args.scan_layers,
                       seed=args.seed)


def _distributed() -> None:
    """jax.distributed.initialize for multi-host runs (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID in the environment; on TPU pods jax finds them itself)."""
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))


def main(args) -> int:
    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        _distributed()
        import jax

        import checkpoints
        from gemma.train import run, sharding

        for flag, value in (("--save-every", args.save_every), ("--eval-every", args.eval_every)):
            if value is not None and value < 1:
                return fail(f"{flag} must be >= 1, got {value}")
        if args.steps is not None and args.steps < 1:
            return fail(f"--steps must be >= 1, got {args.steps}")
        if args.epochs is not None and not args.epochs > 0:
            return fail(f"--epochs must be > 0, got {args.epochs}")
        config = train_config(args)
        if args.quantize and (not args.lora_rank or config.compute_dtype != "float32"):
            return fail(f"--quantize {args.quantize} trains LoRA adapters over frozen quantized weights: it needs "
                        f"--lora-rank and --dtype float32 (bfloat16 would round the quantization scales)")
        mesh = sharding.make_mesh(args.mesh)
        for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
            if path is not None and not os.path.isfile(path):
                return fail(f"{flag} {path}: no such file")
        checkpoints.resolve(args.model)
        source = args.model if not os.path.exists(args.model) else os.path.abspath(args.model)
        identity = run.run_identity(config, source, args.data, args.packing, args.long, args.quantize)
        run.check_output(os.path.abspath(args.output), identity)
        tokenizer = checkpoints.load_tokenizer(args.model)
        from gemma.train import data

        data.load_examples(args.data, tokenizer, args.seq_len, args.long)  # bad records fail before the load
        if args.eval_data:
            data.load_examples(args.eval_data, tokenizer, args.seq_len, args.long)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        return fail(str(e).splitlines()[0] if "\n" in str(e) and len(str(e)) > 400 else str(e))
    model = checkpoints.load(args.model, quantize=args.quantize)
    epochs = args.epochs if args.epochs is not None else (None if args.steps is not None else 1.0)
    result = run.finetune(model, tokenizer, args.data, args.output, config=config, eval_path=args.eval_data,
                          packing=args.packing, long=args.long, save_every=args.save_every,
                          eval_every=args.eval_every, keep=args.keep, mesh=mesh, model_source=source,
                          epochs=epochs, log=lambda line: print(line, file=sys.stderr), quantize=args.quantize)
    if jax.process_index() == 0:
        evals = f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"] is not None else ""
        print(f"step {result['step']}: loss {result['loss']:.4f}{evals}; the fine-tuned model is in "
              f"{result['path']} (checkpoints.load)", file=sys.stderr)
    return 0


DISTILL_HELP = "distill a teacher into a student (GKD: on-policy, generalized JSD); rerun to resume"


def add_distill_parser(sub) -> argparse.ArgumentParser:
    """`python -m gemma distill`: finetune's flags (less --model and --packing) plus the teacher and GKD's."""
    p = sub.add_parser("distill", help=DISTILL_HELP, description=DISTILL_HELP + ". Writes DIR/metrics.jsonl, "
                       "orbax checkpoints and, at the end, the student: checkpoints.load(DIR).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="the teacher: 'gemma3-270m', a .gguf file, an HF or orbax dir")
    p.add_argument("--student", required=True, help="the student (same tokenizer), initial weights")
    p.add_argument("--lmbda", type=float, default=0.5, help="probability a batch's responses are the student's own")
    p.add_argument("--beta", type=float, default=0.5, help="generalized JSD: 0 forward KL, 1 reverse KL")
    p.add_argument("--temperature", type=float, default=1.0, help="of the divergence (logits / T)")
    p.add_argument("--gen-temperature", type=float, default=1.0, help="of the generation (0 greedy)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest generated response")
    p.add_argument("--seq-kd", action="store_true", help="teacher-generated responses (before the lmbda coin)")
    sparse = p.add_mutually_exclusive_group()
    sparse.add_argument("--sampled-teacher", type=int, default=None, metavar="K",
                        help="precompute K teacher draws per position (frequency-weighted) and train on them")
    sparse.add_argument("--renormalized-teacher", type=int, default=None, metavar="K",
                        help="K draws, the teacher's probabilities renormalised over them (Gemma 3's; biased)")
    sparse.add_argument("--top-k-teacher", type=int, default=None, metavar="K",
                        help="the teacher's K most probable ids per position, renormalised")
    training_flags(p, packing=False)
    return p


def distill_main(args) -> int:
    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        _distributed()
        import jax

        import checkpoints
        from gemma.train import distill_run, distill_trainer, run, sharding

        for flag, value in (("--save-every", args.save_every), ("--eval-every", args.eval_every),
                            ("--steps", args.steps), ("--max-new-tokens", args.max_new_tokens)):
            if value is not None and value < 1:
                return fail(f"{flag} must be >= 1, got {value}")
        for flag, value in (("--lmbda", args.lmbda), ("--beta", args.beta)):
            if not 0 <= value <= 1:
                return fail(f"{flag} must be in [0, 1], got {value}")
        if not args.temperature > 0:
            return fail(f"--temperature must be > 0, got {args.temperature}")
        targets = None
        for flag, mode in (("sampled_teacher", "sampled"), ("renormalized_teacher", "renormalized"),
                           ("top_k_teacher", "top_k")):
            k = getattr(args, flag)
            if k is not None:
                if k < 1:
                    return fail(f"--{flag.replace('_', '-')} K must be >= 1, got {k}")
                targets = (mode, k)
        if args.epochs is not None and not args.epochs > 0:
            return fail(f"--epochs must be > 0, got {args.epochs}")
        dc = distill_trainer.DistillConfig(lmbda=args.lmbda, beta=args.beta, temperature=args.temperature,
                                           seq_kd=args.seq_kd, gen_temperature=args.gen_temperature,
                                           max_new_tokens=args.max_new_tokens)
        distill_run.check_targets(targets, dc)
        config = train_config(args)
        mesh = sharding.make_mesh(args.mesh)
        for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
            if path is not None and not os.path.isfile(path):
                return fail(f"{flag} {path}: no such file")
        sources = []
        for src in (args.student, args.teacher):
            checkpoints.resolve(src)
            sources.append(src if not os.path.exists(src) else os.path.abspath(src))
        identity = distill_run.run_identity(config, dc, sources[0], sources[1], args.data, args.long, targets)
        distill_run.check_output(os.path.abspath(args.output), identity)
        tokenizer = checkpoints.load_tokenizer(args.student)
        teacher_tokenizer = checkpoints.load_tokenizer(args.teacher)
        from gemma.train import data

        data.load_examples(args.data, tokenizer, args.seq_len, args.long)
        if args.eval_data:
            data.load_examples(args.eval_data, tokenizer, args.seq_len, args.long)
        student, teacher = checkpoints.load(args.student), checkpoints.load(args.teacher)
        distill_trainer.shared_vocab(student.config, teacher.config, tokenizer, teacher_tokenizer)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        return fail(str(e).splitlines()[0] if "\n" in str(e) and len(str(e)) > 400 else str(e))
    epochs = args.epochs if args.epochs is not None else (None if args.steps is not None else 1.0)
    result = distill_run.distill(student, teacher, tokenizer, args.data, args.output, config=config, distill=dc,
                                 targets=targets, eval_path=args.eval_data, long=args.long,
                                 save_every=args.save_every, eval_every=args.eval_every, keep=args.keep, mesh=mesh,
                                 student_source=sources[0], teacher_source=sources[1],
                                 teacher_tokenizer=teacher_tokenizer, epochs=epochs, log=lambda line: print(line, file=sys.stderr))
    if jax.process_index() == 0:
        evals = f", eval divergence {result['eval_loss']:.4f}" if result["eval_loss"] is not None else ""
        print(f"step {result['step']}: loss {result['loss']:.4f}{evals}; the student is in {result['path']} "
              f"(checkpoints.load)", file=sys.stderr)
    return 0
