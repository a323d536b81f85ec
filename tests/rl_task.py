"""The RL tests' task on token ids: benchmarks/distill_onpolicy.py's permutations (a prompt is n distinct digits,
a right answer any permutation of them, then <end_of_turn>), its verifiers, and a warm-up policy that solves a
chosen share of held-out prompts.

    task = Task(n=3, digits=6, seed=0)
    policy, validity = warm_up(task, seed=0, band=(0.2, 0.5))     # greedy held-out validity inside the band
    dense(prompt, completion), proxy(prompt, completion), valid(prompt, completion)

Prompts go to the trainer as (ids, ids) pairs: the reward sees the prompt's ids and the completion's text, the
digit tokenizer's decode (ids joined by spaces) of the tokens before <end_of_turn>.
"""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import distill_onpolicy as B  # noqa: E402

from gemma.train import trainer as T  # noqa: E402

Task = B.Task
SIZE = (1, 64, 4, 16, 256)  # layers, d_model, heads, head_dim, hidden: distill_onpolicy.STUDENT


def _ids(completion: str) -> list[int]:
    return [int(x) for x in completion.split()]


def _digits(prompt) -> list[int]:
    return [int(x) for x in prompt[1:-1]]


def valid(prompt, completion: str) -> float:
    """The true metric: the completion is the prompt's digits in some order (then <end_of_turn>, which the
    trainer cut: a completion that did not stop has n + 1 ids here)."""
    got, want = _ids(completion), _digits(prompt)
    return float(len(got) == len(want) and sorted(got) == sorted(want))


def dense(prompt, completion: str) -> float:
    """Partial credit, one part per position: each of the first n ids that is a prompt digit not given before, and
    stopping right after the n-th (a completion that did not stop has n + 1 ids); 1 exactly when valid."""
    got, want = _ids(completion), _digits(prompt)
    credit = sum(g in want and g not in got[:i] for i, g in enumerate(got[:len(want)]))
    return (credit + (len(got) == len(want))) / (len(want) + 1)


def proxy(prompt, completion: str) -> float:
    """A hackable verifier: the precision of the completion (its share of distinct right digits among its ids),
    which a one-digit answer maximises as well as a right one (Roit et al.'s short-summary hack)."""
    got, want = _ids(completion), _digits(prompt)
    if not got:
        return 0.0
    return len(set(got) & set(want)) / len(got)


def pairs(prompts) -> list[tuple[list[int], list[int]]]:
    return [(list(p), list(p)) for p in prompts]


def warm_up(task: Task, seed: int, band=(0.2, 0.5), *, batch: int = 16, lr: float = 3e-3, check_every: int = 5,
            max_steps: int = 600, eval_prompts: int = 64):
    """A SIZE policy trained by cross-entropy on random right answers of training prompts until its greedy
    validity on `eval_prompts` held-out prompts is inside `band`; (policy, validity, steps)."""
    model = B.make_model(task, SIZE, seed)
    cfg = T.TrainConfig(steps=max_steps, batch_size=batch, seq_len=task.seq_len, learning_rate=lr,
                        end_learning_rate=lr, seed=seed)
    tr = T.Trainer(model, cfg)
    rng = np.random.default_rng([seed, 1])
    held = task.prompts("heldout", eval_prompts, np.random.default_rng([seed, 3]))
    score = 0.0
    for step in range(1, max_steps + 1):
        tr.step([task.batch([task.example(p, rng) for p in task.prompts("train", batch, rng)])])
        if step % check_every == 0:
            score = B.validity(tr.model(), task, held)
            if band[0] <= score <= band[1]:
                return tr.model(), score, step
            if score > band[1]:
                raise RuntimeError(f"warm-up of seed {seed} jumped over the band {band} to {score} at step {step}")
    raise RuntimeError(f"warm-up of seed {seed} reached {score} in {max_steps} steps, not the band {band}")
