"""GKD's claim on a task with many right answers: on-policy distillation against supervised KD (issue 17).

    python benchmarks/distill_onpolicy.py --json out.json       # 2 seeds: 370 s on the 2-core CPU at load 1-4
    python benchmarks/distill_onpolicy.py --methods supervised-fkl,supervised-rkl --baseline-steps 3000
                                                                # supervised KD given 3x the steps

The task: a prompt is n distinct digits (of `digits` symbols) in random order, a right answer is any
permutation of them followed by <end_of_turn>: n! right answers per prompt. Prompts are split by their digit
set: held-out prompts have sets never seen in training. Token ids are the interface (no tokenizer): pad 0,
eos 1, bos 2, a separator 3, the digits from 4, then <start_of_turn> and <end_of_turn>.

Per seed (the seed draws the split, the teacher, the student and every batch):
1. teacher: a 2-layer tiny Gemma 3 trained by cross-entropy on uniformly random permutations (multimodal:
   ~uniform over the remaining digits at each position);
2. student: a 1-layer one, warmed up briefly by cross-entropy on the same data;
3. from the warm-up weights, each method runs the same steps through `DistillTrainer`:
   on-policy (lmbda 1) reverse KL (beta 1), on-policy forward KL (beta 0), and supervised KD (lmbda 0, the
   dataset's random permutations) with forward KL (beta 0) and with reverse KL (beta 1).
Measured: greedy validity (the response is a permutation of the prompt's digits, then <end_of_turn>) on
held-out and training prompts, validity of temperature-1 samples, and the student's divergence from the
teacher on the data's prefixes and on its own samples' (where the supervised students drift), with each
run's wall time and the load average. Prints a markdown table; --json writes everything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gemma import config as config_lib  # noqa: E402
from gemma.sampler import Sampler  # noqa: E402
from gemma.train import data as data_lib  # noqa: E402
from gemma.train import distill_trainer as DT  # noqa: E402
from gemma.train import trainer as T  # noqa: E402
from gemma.transformer import Transformer  # noqa: E402

PAD, EOS, BOS, SEP = 0, 1, 2, 3
FIRST_DIGIT = 4

# name: (lmbda, beta, label); the claim compares the first with the last two
METHODS = {
    "onpolicy-rkl": (1.0, 1.0, "on-policy, reverse KL"),
    "onpolicy-fkl": (1.0, 0.0, "on-policy, forward KL"),
    "supervised-fkl": (0.0, 0.0, "supervised KD, forward KL"),
    "supervised-rkl": (0.0, 1.0, "supervised KD, reverse KL"),
}

# (layers, d_model, heads, head_dim, hidden)
TEACHER = (2, 64, 4, 16, 256)
STUDENT = (1, 64, 4, 16, 256)


class DigitTokenizer:
    """What DistillTrainer and Sampler read of a tokenizer: the special ids, the size, decode."""

    def __init__(self, digits: int):
        self.pad_id, self.eos_id, self.bos_id = PAD, EOS, BOS
        self.start_of_turn_id = FIRST_DIGIT + digits
        self.end_of_turn_id = FIRST_DIGIT + digits + 1
        self.vocab_size = FIRST_DIGIT + digits + 2

    def decode(self, ids):
        return " ".join(map(str, ids))


class Task:
    """Prompts [bos, n distinct digits, sep]; a response is any permutation of the digits, then <end_of_turn>.
    Training and held-out prompts come from disjoint digit sets (`heldout` of them held out)."""

    def __init__(self, n: int = 6, digits: int = 12, seed: int = 0, heldout: float = 0.3):
        if not 1 <= n <= digits:
            raise ValueError(f"need 1 <= n <= digits, got n {n}, digits {digits}")
        self.n, self.digits = n, digits
        self.tok = DigitTokenizer(digits)
        sets = list(itertools.combinations(range(digits), n))
        order = np.random.default_rng([seed, 0]).permutation(len(sets))
        cut = max(1, int(len(sets) * heldout))
        self.heldout_sets = [sets[i] for i in order[:cut]]
        self.train_sets = [sets[i] for i in order[cut:]]
        self.seq_len = 2 * n + 3  # bos, n digits, sep, n digits, <end_of_turn>

    def prompts(self, which: str, count: int, rng) -> list[list[int]]:
        sets = self.train_sets if which == "train" else self.heldout_sets
        return [[BOS] + [FIRST_DIGIT + int(d) for d in rng.permutation(sets[i])] + [SEP]
                for i in rng.integers(len(sets), size=count)]

    def example(self, prompt: list[int], rng) -> data_lib.Example:
        """The prompt and a uniformly random right answer, loss on the answer (with its <end_of_turn>)."""
        response = [int(d) for d in rng.permutation(prompt[1:-1])] + [self.tok.end_of_turn_id]
        ids = np.asarray(prompt + response, np.int32)
        return data_lib.Example(ids, np.arange(len(ids)) >= len(prompt))

    def batch(self, examples) -> data_lib.Batch:
        """One example per row (what DistillTrainer's generation needs)."""
        return data_lib._make_batch([(i,) for i in range(len(examples))], examples=examples, seq_len=self.seq_len,
                                    lo=0, hi=len(examples))

    def valid(self, prompt: list[int], generated: list[int]) -> bool:
        """`generated`: the ids before the stop id, as the sampler returns them (stopped at <end_of_turn>
        within n + 1 tokens: exactly n ids); right when they are the prompt's digits in any order."""
        return len(generated) == self.n and sorted(generated) == sorted(prompt[1:-1])


def generate(model, task: Task, prompts, temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    sampler = Sampler(model, task.tok, max_len=task.seq_len)
    sampler.stop_ids = (task.tok.end_of_turn_id,)  # an <eos> is a wrong token here, not a stop
    return sampler.generate(prompts, max_new_tokens=task.n + 1, temperature=temperature, seed=seed).tokens


def validity(model, task: Task, prompts, temperature: float = 0.0, seed: int = 0) -> float:
    out = generate(model, task, prompts, temperature, seed)
    return float(np.mean([task.valid(p, ids) for p, ids in zip(prompts, out)]))


def make_model(task: Task, size, seed: int) -> Transformer:
    layers, d, heads, head_dim, hidden = size
    c = config_lib.tiny(vocab_size=task.tok.vocab_size, num_layers=layers, d_model=d, num_heads=heads,
                        num_kv_heads=1, head_dim=head_dim, hidden_dim=hidden, sliding_window=task.seq_len,
                        query_pre_attn_scalar=head_dim, layer_types=("global",) * layers)
    return Transformer(c, rngs=nnx.Rngs(seed))


def param_count(model) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def supervised(model, task: Task, steps: int, batch: int, lr: float, seed: int) -> Transformer:
    """Cross-entropy on fresh random right answers of training prompts (trainer.Trainer)."""
    cfg = T.TrainConfig(steps=steps, batch_size=batch, seq_len=task.seq_len, learning_rate=lr,
                        warmup_steps=min(20, steps // 10), end_learning_rate=lr / 10, seed=seed)
    tr = T.Trainer(model, cfg)
    rng = np.random.default_rng([seed, 1])
    for _ in range(steps):
        tr.step([task.batch([task.example(p, rng) for p in task.prompts("train", batch, rng)])])
    return tr.model()


def divergences(student, teacher, task: Task, batch) -> dict[str, float]:
    """Means over a batch's response positions: KL(teacher || student), KL(student || teacher)."""
    def logp(m):
        x = m.forward(jnp.asarray(batch.inputs), jnp.asarray(batch.positions), None,
                      segment_ids=jnp.asarray(batch.segment_ids))
        return np.asarray(jax.nn.log_softmax(x, -1))

    s, t = logp(student), logp(teacher)
    w = batch.weights
    mean = lambda x: float((x * w).sum() / w.sum())  # noqa: E731
    return {"forward_kl": mean((np.exp(t) * (t - s)).sum(-1)), "reverse_kl": mean((np.exp(s) * (s - t)).sum(-1))}


def distill(student, teacher, task: Task, lmbda: float, beta: float, steps: int, batch: int, lr: float,
            seed: int) -> Transformer:
    """`steps` DistillTrainer steps; each batch: training prompts with random right answers (which lmbda 1
    replaces by the student's own samples, temperature 1)."""
    cfg = T.TrainConfig(steps=steps, batch_size=batch, seq_len=task.seq_len, learning_rate=lr, seed=seed)
    rng = np.random.default_rng([seed, 2])
    with DT.DistillTrainer(student, teacher, task.tok, cfg,
                           DT.DistillConfig(lmbda=lmbda, beta=beta, max_new_tokens=task.n + 1)) as tr:
        for _ in range(steps):
            tr.step([task.batch([task.example(p, rng) for p in task.prompts("train", batch, rng)])])
    return tr.student()


def copy_of(model) -> Transformer:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(np.array, state))


def run_seed(seed: int, a, log) -> dict:
    task = Task(a.n, a.digits, seed)
    held = task.prompts("heldout", a.eval, np.random.default_rng([seed, 3]))
    train = task.prompts("train", a.eval, np.random.default_rng([seed, 4]))
    data_rng = np.random.default_rng([seed, 5])
    held_data = task.batch([task.example(p, data_rng) for p in held])

    def measure(model, teacher=None) -> dict:
        out = {"heldout": validity(model, task, held), "train": validity(model, task, train),
               "sampled": validity(model, task, held, temperature=1.0, seed=seed)}
        if teacher is not None:
            own = DT.generate_responses(model, task.tok, held_data, max_new_tokens=task.n + 1, temperature=1.0,
                                        seed=seed)
            out["on_data"] = divergences(model, teacher, task, held_data)
            out["on_own_samples"] = divergences(model, teacher, task, own)
        return out

    result = {"seed": seed, "heldout_prompts": len(held), "train_sets": len(task.train_sets),
              "heldout_sets": len(task.heldout_sets)}
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    teacher = supervised(make_model(task, TEACHER, 1000 + seed), task, a.teacher_steps, a.teacher_batch, a.lr,
                         1000 + seed)
    result["teacher"] = {"params": param_count(teacher), "seconds": time.perf_counter() - t0, "load": load0,
                         **measure(teacher)}
    log(f"seed {seed} teacher: {json.dumps(result['teacher'])}")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    warm = supervised(make_model(task, STUDENT, seed), task, a.warmup_steps, a.batch, a.lr, seed)
    result["warmup"] = {"params": param_count(warm), "seconds": time.perf_counter() - t0, "load": load0,
                        **measure(warm, teacher)}
    log(f"seed {seed} warm-up student: {json.dumps(result['warmup'])}")
    result["methods"] = {}
    for name in a.methods:
        lmbda, beta, _ = METHODS[name]
        steps = a.steps if lmbda > 0 else (a.baseline_steps or a.steps)
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        student = distill(copy_of(warm), teacher, task, lmbda, beta, steps, a.batch, a.lr, seed)
        seconds = time.perf_counter() - t0
        r = {"lmbda": lmbda, "beta": beta, "steps": steps, "seconds": seconds, "load": load0,
             "load_after": os.getloadavg()[0], **measure(student, teacher)}
        r["examples"] = [[[d - FIRST_DIGIT for d in p[1:-1]], [d - FIRST_DIGIT for d in ids]]
                         for p, ids in zip(held[:4], generate(student, task, held[:4]))]
        result["methods"][name] = r
        log(f"seed {seed} {name}: {json.dumps(r)}")
    return result


def table(results) -> str:
    names = list(results[0]["methods"])
    lines = ["| seed | teacher | warm-up student | " + " | ".join(METHODS[n][2] for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in results:
        cells = [f"{r['methods'][n]['heldout']:.3f} ({r['methods'][n]['seconds']:.0f} s)" for n in names]
        lines.append(f"| {r['seed']} | {r['teacher']['heldout']:.3f} ({r['teacher']['seconds']:.0f} s) | "
                     f"{r['warmup']['heldout']:.3f} ({r['warmup']['seconds']:.0f} s) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--n", type=int, default=6, help="digits per prompt")
    p.add_argument("--digits", type=int, default=12, help="digit symbols")
    p.add_argument("--teacher-steps", type=int, default=2500)
    p.add_argument("--teacher-batch", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=1000, help="distillation steps of each method")
    p.add_argument("--baseline-steps", type=int, default=None, help="supervised KD's steps (default: --steps)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval", type=int, default=256, help="held-out (and training) prompts measured")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",")]
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus, load {os.getloadavg()}")
    t0 = time.perf_counter()
    results = [run_seed(int(s), a, log) for s in a.seeds.split(",")]
    log(f"total {time.perf_counter() - t0:.0f} s, load {os.getloadavg()}")
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
