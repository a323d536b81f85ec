"""`python -m gemma reward-model`: the command line of gemma.train.reward_run.train_reward_model.

    python -m gemma reward-model --model SFT_DIR --data pairs.jsonl --output rm/ --eval-data held_out.jsonl
    python -m gemma reward-model --model SFT_DIR --data triples.jsonl --output warm/ --members 3
    checkpoints.load_reward_model("rm/")

Every argument is checked (settings, model source, data files, output directory) before the weights load;
bad input exits with status 2 and one line naming what was wrong. --model is a policy (the head starts at
zero) or a reward-model directory (training continues from its head too).
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "train a reward model (Bradley-Terry on preference pairs, or entailment); rerun the same command to resume"


# reward_run's OBJECTIVES, LONG and FORMATS (tests/test_reward_cli.py checks), here so that building the
# parser (every `python -m gemma` command does) imports no jax
OBJECTIVES = ("bradley-terry", "entailment")
LONG = ("drop", "error")
FORMATS = ("{'prompt', 'chosen', 'rejected'} (preference pairs) or {'document', 'summary', 'entailed'} "
           "(labelled triples)")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("reward-model", help=HELP, description=HELP + ". Data: one JSON object a line, "
                       f"{FORMATS}. Writes DIR/metrics.jsonl, orbax checkpoints and, at the end, the reward "
                       "model (with --members M > 1 the WARM average of M members, each also in "
                       "DIR/members/<k>): checkpoints.load_reward_model(DIR).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gemma3-270m",
                   help="the initialisation: a policy ('gemma3-270m', .gguf, HF or orbax dir) or a reward-model dir")
    p.add_argument("--data", required=True, help="training JSONL of preference pairs or labelled triples")
    p.add_argument("--output", required=True, help="run directory (created; holding this run: resumed)")
    p.add_argument("--eval-data", default=None, help="held-out JSONL of the same kind: eval accuracy and loss")
    p.add_argument("--objective", default=None, choices=OBJECTIVES,
                   help="the loss (default: the data's: bradley-terry for pairs, entailment for triples)")
    p.add_argument("--members", type=int, default=1,
                   help="WARM: members fine-tuned from --model on their own data orders, then averaged")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps per member (default: one epoch)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the data per member instead")
    p.add_argument("--batch-size", type=int, default=8, help="pairs or rows per step")
    p.add_argument("--seq-len", type=int, default=512, help="longest example, in tokens")
    p.add_argument("--long", default="drop", choices=LONG, help="what to do with an example longer than --seq-len")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, then cosine decay to 0")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="compute dtype; weights and optimizer state stay float32 (default: float32 on CPU, "
                        "bfloat16 on TPU/GPU)")
    p.add_argument("--remat", default=None, choices=["full", "dots"], help="recompute blocks in the backward")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every K steps (and at each member's end)")
    p.add_argument("--eval-every", type=int, default=None, help="eval every K steps, at step 0 and at the end")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--seed", type=int, default=0, help="member k's data order is seeded by (seed, k)")
    return p


def _load_init(source: str):
    """The initial RewardModel: a reward-model directory as saved, or a policy with a zero head."""
    import checkpoints
    from checkpoints.orbax_io import is_reward_dir
    from gemma.train.reward_model import RewardModel

    kind, path = checkpoints.resolve(source)
    if kind == "orbax" and is_reward_dir(path):
        return checkpoints.load_reward_model(path)
    return RewardModel(checkpoints.load(source))


def main(args) -> int:
    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        import jax

        import checkpoints
        from gemma.train import reward_run
        from gemma.train.trainer import TrainConfig

        for flag, value in (("--save-every", args.save_every), ("--eval-every", args.eval_every),
                            ("--steps", args.steps), ("--members", args.members), ("--keep", args.keep)):
            if value is not None and value < 1:
                return fail(f"{flag} must be >= 1, got {value}")
        if args.epochs is not None and not args.epochs > 0:
            return fail(f"--epochs must be > 0, got {args.epochs}")
        if args.seq_len < 2:
            return fail(f"--seq-len must be >= 2, got {args.seq_len}")
        dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        config = TrainConfig(steps=args.steps or 1, batch_size=args.batch_size, seq_len=args.seq_len,
                             learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                             weight_decay=args.weight_decay, compute_dtype=dtype, remat=args.remat, seed=args.seed)
        for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
            if path is not None and not os.path.isfile(path):
                return fail(f"{flag} {path}: no such file")
        checkpoints.resolve(args.model)
        source = args.model if not os.path.exists(args.model) else os.path.abspath(args.model)
        tokenizer = checkpoints.load_tokenizer(args.model)
        epochs = args.epochs if args.epochs is not None else (None if args.steps is not None else 1.0)
        objective, _, _, _, config = reward_run.prepare(args.data, tokenizer, config, objective=args.objective,
                                                        eval_path=args.eval_data, long=args.long,
                                                        members=args.members, epochs=epochs)
        identity = reward_run.run_identity(config, source, args.data, args.long, objective, args.members)
        reward_run.check_output(os.path.abspath(args.output), identity)
        init = _load_init(args.model)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        return fail(str(e).splitlines()[0] if "\n" in str(e) and len(str(e)) > 400 else str(e))
    result = reward_run.train_reward_model(init, tokenizer, args.data, args.output, config=config,
                                           objective=objective, members=args.members, eval_path=args.eval_data,
                                           long=args.long, save_every=args.save_every, eval_every=args.eval_every,
                                           keep=args.keep, model_source=source,
                                           log=lambda line: print(line, file=sys.stderr))
    evals = f", eval accuracy {result['eval_accuracy']:.4f}" if result["eval_accuracy"] is not None else ""
    what = f"the WARM average of {args.members} members" if args.members > 1 else "the reward model"
    print(f"step {result['step']}: loss {result['loss']:.4f}{evals}; {what} is in {result['path']} "
          f"(checkpoints.load_reward_model)", file=sys.stderr)
    return 0
