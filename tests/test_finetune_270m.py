"""LoRA on the real Gemma 3 270M learns a small task it does not know (f32, CPU, about two minutes).

The task (tests/reference/make_finetune_task.py): "Record: <sentence about a trip>" -> the JSON record
{"name": ..., "city": ...}. The prompt never names the format, so the pretrained model does not follow it.
One run.finetune of a handful of steps must: cut the held-out eval loss to under 25% of step 0's, make
greedy replies to the held-out prompts (rendered as training renders them) follow the format on >= 80%
of them (the base model: ~0%), and write a model (checkpoints.load(DIR)) whose logits equal the
trainer's un-merged base + adapters (restored from the run's last checkpoint) within f32 rounding
(1e-5 of the logits' scale), its weights exactly lora.merge of those adapters.

Measured on the project's 2-core box (8 steps of 4 packed rows x 128 tokens, rank 8 on all seven
projections): eval loss 4.061 -> 0.301 (7%), format 0/32 -> 32/32, both fields right 32/32; merged vs
un-merged logits max |diff| 3.3e-4 with logits up to 105 (3e-6 relative); the test takes ~145 s.
"""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import checkpoints
import gemma
from conftest import FIXTURES
from gemma.chat import format_turn
from gemma.train import data, lora, run, trainer

sys.path.insert(0, str(FIXTURES.parent / "reference"))
from make_finetune_task import FORMAT  # noqa: E402

TASK = FIXTURES / "finetune"
CONFIG = trainer.TrainConfig(steps=8, batch_size=4, seq_len=128, learning_rate=2e-3, warmup_steps=1,
                             lora_rank=8, lora_alpha=16)


def _prompts(tokenizer, records):
    """Each held-out prompt as training renders it: BOS, then the first user turn's format_turn text."""
    return [[tokenizer.bos_id] + tokenizer.encode(format_turn(r["prompt"], first=True), add_bos=False)
            for r in records]


def _replies(model, tokenizer, prompts):
    return [t.strip() for t in gemma.Sampler(model, tokenizer).generate(prompts, max_new_tokens=24).text]


def _scores(replies, records):
    """(replies matching FORMAT, replies whose name and city are the sentence's), as fractions."""
    form = [re.fullmatch(FORMAT, r) for r in replies]
    right = [m is not None and json.loads(m.group(0)) == json.loads(rec["response"]) for m, rec in zip(form, records)]
    return sum(m is not None for m in form) / len(form), sum(right) / len(right)


@pytest.mark.real
def test_lora_learns_the_task_and_the_saved_model_equals_base_plus_adapters(tmp_path, model_270m, tokenizer_270m):
    tokenizer = tokenizer_270m
    held = data.read_jsonl(TASK / "task_eval.jsonl")
    prompts = _prompts(tokenizer, held)
    base_format, _ = _scores(_replies(model_270m, tokenizer, prompts), held)

    out = tmp_path / "run"
    result = run.finetune(checkpoints.load("gemma3-270m"), tokenizer, str(TASK / "task_train.jsonl"), str(out),
                          config=CONFIG, eval_path=str(TASK / "task_eval.jsonl"), eval_every=CONFIG.steps,
                          progress=False)
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = {r["step"]: r["eval_loss"] for r in metrics if "eval_loss" in r}
    assert sorted(evals) == [0, CONFIG.steps]
    tuned = checkpoints.load(out)
    replies = _replies(tuned, tokenizer, prompts)
    tuned_format, tuned_right = _scores(replies, held)
    print(f"eval loss {evals[0]:.3f} -> {evals[CONFIG.steps]:.3f}; format base {base_format:.0%}, tuned "
          f"{tuned_format:.0%} (both fields right {tuned_right:.0%}); e.g. {replies[0]!r}")
    assert evals[CONFIG.steps] < 0.25 * evals[0]
    assert base_format <= 0.1
    assert tuned_format >= 0.8
    assert tuned_right >= 0.6

    # the saved (merged) model vs the base + the adapters of the run's last checkpoint, un-merged
    unmerged = lora.apply(checkpoints.load("gemma3-270m"), CONFIG.lora_rank, CONFIG.lora_alpha,
                          CONFIG.lora_targets, seed=CONFIG.seed)
    adapters = nnx.state(unmerged, nnx.LoRAParam)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(out / "checkpoints" / str(CONFIG.steps) / "params", abstract)
    nnx.update(unmerged, restored)
    assert all(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(restored))  # every b moved off 0
    ids = jnp.asarray([p + [0] * (40 - len(p)) for p in prompts[:4]])  # right-padded: causal, pads come last
    ours, theirs = np.asarray(tuned(ids)), np.asarray(unmerged(ids))
    worst = np.abs(ours - theirs).max()
    print(f"merged vs un-merged logits: max |diff| {worst:.2e} (logits up to {np.abs(theirs).max():.1f})")
    assert worst <= 1e-5 * max(1.0, np.abs(theirs).max())  # f32 rounding through 18 layers: 3e-4 of 105
    # and its weights are exactly the merge of those adapters (lora.merge, as the run merges them)
    saved = nnx.to_flat_state(nnx.state(tuned, nnx.Param))
    merged = dict(nnx.to_flat_state(nnx.state(lora.merge(unmerged), nnx.Param)))
    assert len(saved) == len(merged)
    for path, value in saved:
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(merged[path][...]), err_msg=str(path))
    assert result["model"] is not None and result["eval_loss"] == evals[CONFIG.steps]
