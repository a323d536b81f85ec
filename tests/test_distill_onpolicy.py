"""The cheap pieces of benchmarks/distill_onpolicy.py (GKD's claim on permutations of the prompt's digits): the
task generator, the validity metric, and one on-policy DistillTrainer step on the digit ids. The claim itself
(minutes) is measured by the script; benchmarks/RESULTS.md holds its numbers."""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import distill_onpolicy as B  # noqa: E402


def test_task_examples_and_split():
    task = B.Task(n=4, digits=8, seed=3)
    assert task.seq_len == 11 and task.tok.vocab_size == 14 and task.tok.end_of_turn_id == 13
    held, train = set(task.heldout_sets), set(task.train_sets)
    assert not held & train and len(held) + len(train) == 70 and len(held) == 21  # C(8, 4), 30% held out
    rng = np.random.default_rng(0)
    prompts = task.prompts("heldout", 50, rng)
    answers = set()
    for p in prompts:
        assert p[0] == B.BOS and p[-1] == B.SEP and len(p) == 6
        assert tuple(sorted(d - B.FIRST_DIGIT for d in p[1:-1])) in held
        ex = task.example(p, rng)
        assert ex.ids[:6].tolist() == p and ex.ids[-1] == task.tok.end_of_turn_id
        assert ex.loss_mask.tolist() == [False] * 6 + [True] * 5
        assert task.valid(p, ex.ids[6:-1].tolist())
        answers.add(tuple(ex.ids[6:-1]))
    assert len(answers) > 40  # random right answers, not one per prompt
    for p in task.prompts("train", 20, rng):
        assert tuple(sorted(d - B.FIRST_DIGIT for d in p[1:-1])) in train
    batch = task.batch([task.example(p, rng) for p in prompts[:3]])
    assert batch.inputs.shape == (3, 11) and batch.weights.sum() == 3 * 5  # sep and 4 digits predict 5 ids
    np.testing.assert_array_equal(B.DT.prompts_of(batch), [p for p in prompts[:3]])


def test_validity_metric():
    task = B.Task(n=3, digits=5)
    p = [B.BOS, 4, 6, 8, B.SEP]
    assert task.valid(p, [8, 4, 6]) and task.valid(p, [4, 6, 8])
    assert not task.valid(p, [4, 6])  # stopped early
    assert not task.valid(p, [4, 6, 8, 8])  # no <end_of_turn> within n + 1 tokens
    assert not task.valid(p, [4, 4, 8])  # a repeat
    assert not task.valid(p, [4, 6, 7])  # a digit not in the prompt
    assert not task.valid(p, [4, 6, B.EOS])


def test_one_on_policy_step_on_the_digit_ids():
    task = B.Task(n=3, digits=6)
    teacher, student = B.make_model(task, (1, 16, 2, 8, 32), 1), B.make_model(task, (1, 16, 2, 8, 32), 0)
    rng = np.random.default_rng(0)
    prompts = task.prompts("heldout", 4, rng)
    model = B.distill(student, teacher, task, lmbda=1.0, beta=1.0, steps=1, batch=4, lr=1e-3, seed=0)
    out = B.generate(model, task, prompts)
    assert all(len(ids) <= task.n + 1 for ids in out)
    assert B.validity(model, task, prompts) == np.mean([task.valid(p, ids) for p, ids in zip(prompts, out)])
    batch = task.batch([task.example(p, rng) for p in prompts])
    d = B.divergences(model, teacher, task, batch)
    assert d["forward_kl"] >= 0 and d["reverse_kl"] >= 0
