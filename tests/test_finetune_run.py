"""A fine-tuning run directory: kill and resume to the bit, metrics.jsonl, the result, refusals."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import checkpoints

WORKER = os.path.join(os.path.dirname(__file__), "finetune_worker.py")


def _run(out, *flags, killed=False):
    r = subprocess.run([sys.executable, WORKER, str(out), *flags], capture_output=True, text=True, timeout=600)
    if killed:
        assert r.returncode == -9, r.stderr[-2000:]
    else:
        assert r.returncode == 0, r.stderr[-3000:]


def _params(path):
    """Every parameter of the run's result (checkpoints.load of its directory), as numpy."""
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(checkpoints.load(path)))]


def _metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = {}
    for lora in (None, 2):
        path = tmp_path_factory.mktemp(f"whole_{lora}")
        _run(path, *(["--lora-rank", str(lora)] if lora else []))
        out[lora] = path
    return out


@pytest.mark.parametrize("lora, kill", [(None, "--kill-at-step"), (2, "--kill-in-save")])
def test_killed_run_resumes_to_the_bit(tmp_path, uninterrupted, lora, kill):
    flags = ["--lora-rank", str(lora)] if lora else []
    at = "3" if kill == "--kill-at-step" else "4"  # step 3: between the checkpoints of 2 and 4
    _run(tmp_path, kill, at, *flags, killed=True)
    assert not os.path.exists(tmp_path / "gemma_config.json")  # it did not finish
    done = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert done and max(done) <= int(at)
    _run(tmp_path, *flags)
    ours, theirs = _params(tmp_path), _params(uninterrupted[lora])
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    lines = _metrics(tmp_path)
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in lines if "eval_loss" in r] == [0, 3, 6]
    whole = _metrics(uninterrupted[lora])
    assert [r["loss"] for r in lines if "loss" in r] == [r["loss"] for r in whole if "loss" in r]
    assert set(lines[1]) == {"step", "loss", "learning_rate", "tokens", "tokens_per_s"}


def test_rerun_of_a_finished_run_and_refusals(tmp_path, uninterrupted):
    from gemma.train import run, trainer

    path = uninterrupted[None]
    identity = json.load(open(path / "run.json"))
    cfg = trainer.TrainConfig(steps=6, batch_size=2, seq_len=64, learning_rate=1e-3, warmup_steps=1,
                              grad_accum=2, lora_rank=2)
    ident = run.run_identity(cfg, "tiny", identity["data"], True, "truncate")
    with pytest.raises(ValueError, match="holds another run .*lora: None there, .*'rank': 2"):
        run.check_output(str(path), ident)
    before = sorted(os.listdir(path))
    other = run.run_identity(cfg.__class__(**{**cfg.__dict__, "lora_rank": None}), "other-model",
                             identity["data"], True, "truncate")
    with pytest.raises(ValueError, match="model: 'tiny' there, 'other-model' now"):
        run.check_output(str(path), other)
    qlora = run.run_identity(cfg.__class__(**{**cfg.__dict__, "lora_rank": None}), "tiny", identity["data"], True,
                             "truncate", "int4")  # the same run over a quantized base (QLoRA) is another run
    with pytest.raises(ValueError, match="quantize: None there, 'int4' now"):
        run.check_output(str(path), qlora)
    assert sorted(os.listdir(path)) == before
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no fine-tuning run"):
        run.check_output(str(tmp_path), ident)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_run_names_the_quantization_of_its_base():
    """run.json's quantize is read off the model when the caller does not name it: int4 where 4-bit matrices are
    held (the head stays 8-bit), int8 where only 8-bit ones are, None for a float model."""
    from checkpoints.quantize import quantize_model
    from gemma import config as C
    from gemma.train import run
    from gemma.transformer import Transformer

    def tiny():
        return Transformer(C.tiny(), rngs=nnx.Rngs(0))

    assert run.quantization_of(tiny()) is None
    assert run.quantization_of(quantize_model(tiny(), "int8")) == "int8"
    assert run.quantization_of(quantize_model(tiny(), "int4")) == "int4"
