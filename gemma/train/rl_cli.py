"""`python -m gemma rl`: the command line of gemma.train.rl_run.rl, with finetune's flags and conventions.

    python -m gemma rl --model SFT_DIR --data prompts.jsonl --output out/ --reward my_rewards:verifier \\
        --samples-per-prompt 4 --kl-alpha 0.05 --steps 200

Every argument is checked (settings, the reward and metric functions, model sources, prompts, output directory)
before the weights load; bad input exits with status 2 and one line naming what was wrong.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

HELP = "reinforcement learning of a model on prompts with a reward function (REINFORCE, KL to the start)"


def add_parser(sub) -> argparse.ArgumentParser:
    from gemma.train import cli as train_cli

    p = sub.add_parser("rl", help=HELP, description=HELP + "; rerun the same command to resume. Writes "
                       "DIR/metrics.jsonl (reward, kl, metric, length, distinct a step), orbax checkpoints and, at "
                       "the end, the trained policy: checkpoints.load(DIR).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gemma3-270m", help="the policy's start (and the KL reference): "
                   "'gemma3-270m', a .gguf file, an HF dir or an orbax dir")
    p.add_argument("--reward", default=None, metavar="MODULE:FUNCTION",
                   help="reward(prompt, completion) -> float; MODULE is importable or a path to a .py file")
    p.add_argument("--reward-model", default=None, metavar="DIR", help="a reward model instead of --reward")
    p.add_argument("--metric", default=None, metavar="MODULE:FUNCTION",
                   help="the true metric(prompt, completion) -> float, measured on each step's samples and the "
                        "eval prompts, never optimised")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="completions of each prompt a step")
    p.add_argument("--baseline", default="group", choices=["group", "value"],
                   help="group: the leave-one-out mean of the prompt's rewards; value: a learned value head")
    p.add_argument("--kl-alpha", type=float, default=0.0, help="weight of KL(policy || the starting model)")
    p.add_argument("--kl-estimator", default="exact", choices=["exact", "k3"],
                   help="exact over the vocabulary per token, or k3 from the sampled tokens")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest completion")
    p.add_argument("--teacher", default=None, help="GKD: a teacher (same tokenizer) for --gkd-weight")
    p.add_argument("--gkd-weight", type=float, default=0.0, help="a of (1 - a) reward - a divergence to the teacher")
    p.add_argument("--gkd-beta", type=float, default=0.5, help="the divergence: 0 forward KL, 1 reverse KL")
    p.add_argument("--rollout-lag", type=int, default=0,
                   help="learn on completions sampled this many versions back (sampling overlaps the step)")
    p.add_argument("--max-staleness", type=int, default=None, help="drop completions older than this many versions")
    p.add_argument("--max-ratio", type=float, default=None, help="truncate the importance ratio at this")
    p.add_argument("--hacking-margin", type=float, default=0.05,
                   help="the eval monitor flags reward hacking when the eval reward is this far above its start "
                        "while the metric is this far below its best")
    train_cli.training_flags(p, packing=False)
    p._option_string_actions["--data"].help = "prompts JSONL: {prompt} (a user turn) or {text} a line"
    p._option_string_actions["--eval-data"].help = "prompts JSONL whose greedy completions are scored"
    p._option_string_actions["--batch-size"].help = "prompts a step (each with --samples-per-prompt completions)"
    p._option_string_actions["--seq-len"].help = "prompt + completion tokens"
    p.set_defaults(long="error")
    return p


def load_function(spec: str, flag: str):
    """MODULE:FUNCTION (MODULE importable, or a path to a .py file) -> the function; ValueError naming it."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise ValueError(f"{flag} {spec!r}: expected MODULE:FUNCTION")
    try:
        if module.endswith(".py"):
            if not os.path.isfile(module):
                raise ValueError(f"{flag} {spec}: no such file {module}")
            loaded = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module))[0], module)
            mod = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{flag} {spec}: cannot import {module}: {e}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"{flag} {spec}: {module} has no function {name}")
    return fn


def main(args) -> int:
    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        from gemma.train import cli as train_cli

        train_cli._distributed()
        import jax

        import checkpoints
        from gemma.train import rl_run, rl_trainer, sharding

        for flag, value in (("--save-every", args.save_every), ("--eval-every", args.eval_every),
                            ("--steps", args.steps), ("--max-new-tokens", args.max_new_tokens)):
            if value is not None and value < 1:
                return fail(f"{flag} must be >= 1, got {value}")
        if args.grad_accum != 1:
            return fail(f"--grad-accum {args.grad_accum}: an RL step learns its rollouts in one micro-batch; "
                        f"give --batch-size (prompts a step) instead")
        if args.epochs is not None and not args.epochs > 0:
            return fail(f"--epochs must be > 0, got {args.epochs}")
        if (args.reward is None) == (args.reward_model is None):
            return fail("give one of --reward MODULE:FUNCTION or --reward-model DIR")
        if args.gkd_weight > 0 and args.teacher is None:
            return fail(f"--gkd-weight {args.gkd_weight} needs --teacher")
        rc = rl_trainer.RLConfig(samples_per_prompt=args.samples_per_prompt, baseline=args.baseline,
                                 kl_alpha=args.kl_alpha, kl_estimator=args.kl_estimator,
                                 max_new_tokens=args.max_new_tokens, gkd_weight=args.gkd_weight,
                                 gkd_beta=args.gkd_beta, rollout_lag=args.rollout_lag,
                                 max_staleness=args.max_staleness, max_ratio=args.max_ratio)
        config = train_cli.train_config(args)
        mesh = sharding.make_mesh(args.mesh)
        for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
            if path is not None and not os.path.isfile(path):
                return fail(f"{flag} {path}: no such file")
        if args.reward is not None:
            reward, reward_source = load_function(args.reward, "--reward"), args.reward
        else:
            if not os.path.isdir(args.reward_model):
                return fail(f"--reward-model {args.reward_model}: no such directory (the output of "
                            f"`python -m gemma reward-model`)")
            reward, reward_source = None, os.path.abspath(args.reward_model)
        metric = load_function(args.metric, "--metric") if args.metric else None
        sources = {}
        for flag, src in (("model", args.model), ("teacher", args.teacher)):
            if src is not None:
                checkpoints.resolve(src)
                sources[flag] = src if not os.path.exists(src) else os.path.abspath(src)
        identity = rl_run.run_identity(config, rc, sources["model"], os.path.abspath(args.data), reward_source,
                                       sources.get("teacher"), None, args.long)
        rl_run.check_output(os.path.abspath(args.output), identity)
        tokenizer = checkpoints.load_tokenizer(args.model)
        rl_run.load_prompts(args.data, tokenizer, args.seq_len - args.max_new_tokens, args.long)
        if args.eval_data:
            rl_run.load_prompts(args.eval_data, tokenizer, args.seq_len - args.max_new_tokens, args.long)
        policy = checkpoints.load(args.model)
        teacher = teacher_tokenizer = None
        if args.teacher is not None:
            from gemma.train import distill_trainer

            teacher_tokenizer = checkpoints.load_tokenizer(args.teacher)
            teacher = checkpoints.load(args.teacher)
            distill_trainer.shared_vocab(policy.config, teacher.config, tokenizer, teacher_tokenizer)
        if reward is None:
            reward = checkpoints.load_reward_model(args.reward_model)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        return fail(str(e).splitlines()[0] if "\n" in str(e) and len(str(e)) > 400 else str(e))
    epochs = args.epochs if args.epochs is not None else (None if args.steps is not None else 1.0)
    result = rl_run.rl(policy, tokenizer, args.data, args.output, config=config, rl_config=rc, reward=reward,
                       metric=metric, eval_prompts=args.eval_data, eval_every=args.eval_every,
                       save_every=args.save_every, keep=args.keep, mesh=mesh, model_source=sources["model"],
                       reward_source=reward_source, teacher=teacher, teacher_source=sources.get("teacher"),
                       teacher_tokenizer=teacher_tokenizer, hacking_margin=args.hacking_margin, long=args.long,
                       epochs=epochs, log=lambda line: print(line, file=sys.stderr))
    if jax.process_index() == 0:
        evals = f", eval reward {result['eval_reward']:.4f}" if result["eval_reward"] is not None else ""
        print(f"step {result['step']}: reward {result['reward']:.4f}{evals}; the policy is in {result['path']} "
              f"(checkpoints.load)", file=sys.stderr)
    return 0
