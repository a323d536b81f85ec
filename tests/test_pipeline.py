"""SFT -> GKD -> RL through the command line on tiny models: each stage starts from the previous stage's output
directory (`finetune --model`, `distill --student`, `rl --model`), and a pipeline whose every stage is SIGKILLed
mid-run (finetune between checkpoints, distill while its last checkpoint is written, RL between checkpoints with
rollouts pending) and rerun ends bitwise where an uninterrupted pipeline ends, stage by stage."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import checkpoints
from gemma import config
from gemma.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "fixtures", "finetune", "sample.jsonl")

# `python -m gemma STAGE ...` in a process that SIGKILLs itself: KILL_STEP N > 0 before the stage's step N + 1
# runs (step N done and logged), KILL_SAVE N > 0 right after step N's checkpoint went to orbax's async writer.
WORKER = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import orbax.checkpoint as ocp
from gemma.__main__ import main
from gemma.train import distill_trainer, rl_trainer, trainer
kill_step, kill_save, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
if kill_step:
    cls = {{"finetune": trainer.Trainer, "distill": distill_trainer.DistillTrainer, "rl": rl_trainer.RLTrainer}}[argv[0]]
    step = cls.step
    def killing_step(self, *a, **kw):
        if self.step_count == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *a, **kw)
    cls.step = killing_step
if kill_save:
    save = ocp.CheckpointManager.save
    def killing_save(self, step, *a, **kw):
        result = save(self, step, *a, **kw)
        if step == kill_save and self.directory.name == "checkpoints":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    ocp.CheckpointManager.save = killing_save
sys.exit(main(argv))
"""


def _tiny(d_model, seed):
    c = config.tiny(vocab_size=262_144, d_model=d_model, hidden_dim=32, head_dim=8, num_heads=2, num_kv_heads=1,
                    num_layers=2, layer_types=("local", "global"))
    return Transformer(c, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer_270m):
    """The SFT start and the GKD teacher (tiny, the real tokenizer, orbax dirs), RL prompts, a reward file, and one
    persistent compilation cache for every stage's process (the reruns load the first runs' programs)."""
    d = tmp_path_factory.mktemp("pipeline")
    checkpoints.save(_tiny(16, 0), d / "base", tokenizer=tokenizer_270m)
    checkpoints.save(_tiny(24, 1), d / "teacher", tokenizer=tokenizer_270m)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                             for p in ["Say yes.", "Count to 3.", "Name a colour.", "Hi!"]))
    (d / "rewards.py").write_text("def short(prompt, completion):\n    return -len(completion) / 10\n")
    return d


def _argv(d, out, stage):
    """The stage's command line; its input is the previous stage's output in `out`."""
    common = ["--steps", "4", "--batch-size", "2", "--learning-rate", "1e-3", "--save-every", "2"]
    if stage == "finetune":
        return ["finetune", "--model", str(d / "base"), "--data", DATA, "--output", str(out / "sft"),
                "--seq-len", "48", "--lora-rank", "2", "--warmup-steps", "1", *common]
    if stage == "distill":
        return ["distill", "--student", str(out / "sft"), "--teacher", str(d / "teacher"), "--data", DATA,
                "--output", str(out / "gkd"), "--seq-len", "48", "--lmbda", "0.5", "--max-new-tokens", "6", *common]
    return ["rl", "--model", str(out / "gkd"), "--data", str(d / "prompts.jsonl"), "--output", str(out / "rl"),
            "--reward", f"{d / 'rewards.py'}:short", "--samples-per-prompt", "2", "--seq-len", "40",
            "--max-new-tokens", "6", "--kl-alpha", "0.1", "--rollout-lag", "1", "--eval-data",
            str(d / "prompts.jsonl"), "--eval-every", "2", *common]


def _env(d):
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "JAX_COMPILATION_CACHE_DIR": str(d / "xla"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run(d, out, stage, kill_step=0, kill_save=0):
    env = _env(d)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WORKER.format(root=ROOT), str(kill_step), str(kill_save),
                        *_argv(d, out, stage)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    killed = bool(kill_step or kill_save)
    print(f"{out.name} {stage}{' killed' if killed else ''}: {time.perf_counter() - t0:.1f} s")
    assert r.returncode == (-9 if killed else 0), r.stderr[-3000:]
    return r


def _params(path):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(checkpoints.load(str(path))))]


def _steps(path):
    """metrics.jsonl less its timings."""
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "tokens_per_s")} for line in f]


STAGES = (("finetune", "sft"), ("distill", "gkd"), ("rl", "rl"))
KILLS = {"finetune": dict(kill_step=3), "distill": dict(kill_save=4), "rl": dict(kill_step=3)}


def test_sft_gkd_rl_killed_at_every_stage_resumes_to_the_bit(inputs, tmp_path):
    d, whole, cut = inputs, tmp_path / "whole", tmp_path / "cut"
    for stage, _ in STAGES:
        _run(d, whole, stage)
    for stage, name in STAGES:
        _run(d, cut, stage, **KILLS[stage])
        assert not os.path.exists(cut / name / "gemma_config.json")  # the stage's result is not written yet
        if stage != "rl":  # the next stage refuses the unfinished directory, writing nothing
            nxt = STAGES[[s for s, _ in STAGES].index(stage) + 1]
            r = subprocess.run([sys.executable, "-m", "gemma", *_argv(d, cut, nxt[0])], capture_output=True,
                               text=True, timeout=600, cwd=ROOT, env=_env(d))
            assert r.returncode == 2 and r.stderr.strip().splitlines() == [
                f"error: {cut / name} holds an unfinished training run (run.json, but no model yet: a run writes its "
                f"model when it ends); rerun that run's command to finish it"], r.stderr[-2000:]
            assert not os.path.exists(cut / nxt[1])
        _run(d, cut, stage)

    before = _params(d / "base")
    for stage, name in STAGES:
        run = json.load(open(cut / name / "run.json"))
        assert run["model"] == {"finetune": str(d / "base"), "distill": str(cut / "sft"),
                                "rl": str(cut / "gkd")}[stage]  # each stage started from the one before
        after = _params(cut / name)
        assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)), stage  # it trained
        for a, b in zip(after, _params(whole / name), strict=True):
            np.testing.assert_array_equal(a, b)
        assert _steps(cut / name) == _steps(whole / name), stage
        assert checkpoints.load_tokenizer(str(cut / name)).encode("Hi") == \
            checkpoints.load_tokenizer(str(d / "base")).encode("Hi")
        before = after
    lines = _steps(cut / "rl")
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "eval_reward" in r] == [0, 2, 4]
    assert [r["staleness"] for r in lines if "loss" in r] == [0, 1, 1, 1]  # pending rollouts crossed the kill
    gkd = _steps(cut / "gkd")
    assert [r["step"] for r in gkd if "loss" in r] == [1, 2, 3, 4]
