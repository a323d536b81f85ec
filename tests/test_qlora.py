"""QLoRA: LoRA adapters over the quantized 270M (checkpoints.load(quantize="int4"): the GGUF as the file
holds it, Q4_K as int4, the rest and the head 8-bit), the quantized weights frozen state.

On the fine-tuning task of tests/test_finetune_270m.py (its data, a shorter run), QLoRA must lower the
held-out loss as LoRA over the bf16 weights does (f32 compute both): the final eval loss within 10% of
LoRA's and the relative drop within 10% of LoRA's. A tiny model checks the parts: the adapter sits on a
QuantizedEinsum, the integer weights are neither trained nor saved as a widened residual for the
backward, and merge folds the update into the dequantized weight.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import checkpoints
from checkpoints.quantize import quantize_model
from conftest import FIXTURES
from gemma import config as C
from gemma.train import data, lora, run, trainer
from gemma.transformer import Transformer
from kernels.quantized import QuantizedData, QuantizedEinsum

TASK = FIXTURES / "finetune"
CONFIG = trainer.TrainConfig(steps=4, batch_size=4, seq_len=128, learning_rate=2e-3, warmup_steps=1,
                             lora_rank=8, lora_alpha=16)


def _tiny_int4():
    model = Transformer(C.tiny(), rngs=nnx.Rngs(0))
    return quantize_model(model, "int4")


def test_adapters_over_quantized_projections_train_and_merge():
    model = lora.apply(_tiny_int4(), 4, 8, ("q", "o", "down"))
    wrapped = model.layers[0].attn.q_proj
    assert isinstance(wrapped, lora.LoRAEinsum) and isinstance(wrapped.base, QuantizedEinsum)
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
    # every matrix is quantized frozen state: besides the adapters only the norms' 1-D scales are Params
    assert all(x.ndim == 1 for x in jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))
    assert jax.tree.leaves(nnx.state(model, QuantizedData))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 24)))

    def loss(adapters, x):
        return jnp.mean(nnx.merge(graphdef, adapters, frozen)(x) ** 2)

    # b = 0 at the start, so only b moves in the first step; give b a value to see a's gradient too
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)
    value, vjp = jax.vjp(lambda a: loss(a, tokens), adapters)
    grads = vjp(jnp.ones(()))[0]
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
    # the backward's residuals hold no dequantized weight: the widened matrices are rebuilt, not stored
    floats = [x for x in jax.tree.leaves(vjp) if jnp.issubdtype(x.dtype, jnp.floating)]
    weights = {tuple(m.weight().flat().shape) for _, m in nnx.iter_graph(model) if isinstance(m, QuantizedEinsum)}
    assert not [x.shape for x in floats if tuple(x.shape) in weights], "a dequantized weight was kept for the backward"

    # merge: float Einsums of dequantized weight + update, the same function
    nnx.update(model, adapters)
    want = model(tokens)
    merged = lora.merge(model)
    assert not isinstance(merged.layers[0].attn.q_proj, (lora.LoRAEinsum, QuantizedEinsum))
    np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(want), atol=2e-4 * float(jnp.abs(want).max()))


def _eval_drop(model, tokenizer, train, held) -> tuple[float, float]:
    t = trainer.Trainer(model, CONFIG)
    it = data.make_iterator(train, batch_size=CONFIG.batch_size, seq_len=CONFIG.seq_len, seed=CONFIG.seed,
                            packing=True)
    before = run.evaluate(t, held, True)
    for _ in range(CONFIG.steps):
        t.step([next(it)])
    return before, run.evaluate(t, held, True)


@pytest.mark.real
def test_qlora_lowers_the_held_out_loss_as_lora_over_bf16(tokenizer_270m):
    train, _ = data.load_examples(str(TASK / "task_train.jsonl"), tokenizer_270m, CONFIG.seq_len, "truncate")
    held, _ = data.load_examples(str(TASK / "task_eval.jsonl"), tokenizer_270m, CONFIG.seq_len, "truncate")
    b0, b1 = _eval_drop(checkpoints.load("gemma3-270m", dtype=jnp.bfloat16), tokenizer_270m, train, held)
    q0, q1 = _eval_drop(checkpoints.load("gemma3-270m", quantize="int4"), tokenizer_270m, train, held)
    print(f"held-out loss: LoRA over bf16 {b0:.3f} -> {b1:.3f}, QLoRA over int4 {q0:.3f} -> {q1:.3f}")
    assert b1 < 0.5 * b0  # the run is long enough to learn
    assert abs(q1 - b1) <= 0.1 * b1
    assert abs((q0 - q1) / q0 - (b0 - b1) / b0) <= 0.1 * (b0 - b1) / b0


def test_cli_quantize_needs_lora_and_float32(tmp_path, monkeypatch, capsys):
    from gemma.__main__ import main

    monkeypatch.setattr(checkpoints, "load", lambda *a, **k: pytest.fail("weights loaded"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    base = ["finetune", "--quantize", "int4", "--data", str(data), "--output", str(tmp_path / "out")]
    for extra in ([], ["--lora-rank", "4", "--dtype", "bfloat16"]):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --quantize int4") and "--lora-rank and --dtype float32" in err, err
    assert not (tmp_path / "out").exists()
