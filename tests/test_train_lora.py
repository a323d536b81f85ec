"""LoRA modules, the trainer's step (accumulation, adapters-only optimizer state), packed forwards, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma import config
from gemma.train import data, lora, trainer
from gemma.transformer import Transformer

TINY = config.tiny()


def _model(seed=0):
    return Transformer(TINY, rngs=nnx.Rngs(seed))


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, shape), jnp.int32)


def _randomize_adapters(model, seed=1):
    state = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape), state))


def test_fresh_adapters_change_nothing_and_merge_gives_base_plus_adapters():
    model, tokens = _model(), _tokens((2, 13))
    base = model(tokens)
    lora.apply(model, 4, 8.0, "q,k,v,o,gate,up,down")
    np.testing.assert_array_equal(model(tokens), base)  # b starts at zero
    _randomize_adapters(model)
    adapted = model(tokens)
    assert float(jnp.abs(adapted - base).max()) > 0.1
    assert lora.settings(model) == {"rank": 4, "alpha": 8.0, "targets": list(lora.TARGETS)}
    lora.merge(model)
    assert lora.settings(model) is None
    np.testing.assert_allclose(model(tokens), adapted, atol=1e-5, rtol=0)


def test_adapter_shapes_follow_the_projection_axes():
    model = lora.apply(_model(), 3, None, ["q", "o", "down"])
    attn = model.layers[0].attn
    c = TINY
    assert attn.q_proj.a.shape == (c.d_model, 3) and attn.q_proj.b.shape == (3, c.num_heads, c.head_dim)
    assert attn.o_proj.a.shape == (c.num_heads, c.head_dim, 3) and attn.o_proj.b.shape == (3, c.d_model)
    assert model.layers[0].mlp.down_proj.a.shape == (c.hidden_dim, 3)
    assert attn.q_proj.a.get_metadata()["logical_axes"] == ("embed", "lora_rank")
    assert not isinstance(attn.k_proj, lora.LoRAEinsum)


@pytest.mark.parametrize("bad, match", [("q,embed", "embed"), ("", "unknown LoRA target"), (["x"], "x")])
def test_unknown_targets_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        lora.apply(_model(), 2, None, bad)
    with pytest.raises(ValueError, match=match):
        trainer.TrainConfig(lora_rank=2, lora_targets=bad)


@pytest.mark.parametrize("kw, match", [(dict(steps=0), "steps must be an int >= 1"),
                                       (dict(learning_rate=-1e-3), "learning_rate must be > 0"),
                                       (dict(lora_rank=0), "lora_rank"), (dict(remat="some"), "remat"),
                                       (dict(compute_dtype="float16"), "compute dtype")])
def test_bad_training_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        trainer.TrainConfig(**kw)


def test_packed_rows_equal_separate_forwards_and_remat_keeps_gradients():
    model = _model()
    a, b = _tokens((1, 11), 1), _tokens((1, 9), 2)
    tokens = jnp.zeros((1, 24), jnp.int32).at[0, :11].set(a[0]).at[0, 11:20].set(b[0])
    seg = jnp.zeros((1, 24), jnp.int32).at[0, :11].set(1).at[0, 11:20].set(2)
    pos = jnp.zeros((1, 24), jnp.int32).at[0, :11].set(jnp.arange(11)).at[0, 11:20].set(jnp.arange(9))
    packed = model.forward(tokens, pos, None, segment_ids=seg)
    np.testing.assert_allclose(packed[0, :11], model(a)[0], atol=2e-5, rtol=0)  # window 8 < 11: windows apply
    np.testing.assert_allclose(packed[0, 11:20], model(b)[0], atol=2e-5, rtol=0)

    def loss(m, remat):
        return m.forward(tokens, pos, None, segment_ids=seg, remat=remat).sum()
    plain = nnx.grad(lambda m: loss(m, None))(model)
    for policy in ("full", "dots"):
        again = nnx.grad(lambda m: loss(m, policy))(model)
        for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(again)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)



def test_remat_policies_lower_the_compiled_steps_temporaries():
    """remat must lower the compiled backward's temporaries on this backend ("full" keeps only each
    block's input, "dots" also the projections' outputs): XLA CPU scheduled jax.checkpoint's recomputes
    early, so every layer's activations stayed alive at once (534,761,472 bytes under each policy)."""
    cfg = config.tiny(num_layers=12, layer_types=None, d_model=128, hidden_dim=1024)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32)

    def temp(remat):
        def loss(state, tokens):
            m = nnx.merge(graphdef, state)
            return m.forward(tokens, jnp.broadcast_to(jnp.arange(256), (4, 256)), None, return_hidden=True,
                             segment_ids=jnp.ones((4, 256), jnp.int32), remat=remat).sum()
        return jax.jit(jax.grad(loss)).trace(state, tokens).lower().compile().memory_analysis().temp_size_in_bytes
    plain, full, dots = temp(None), temp("full"), temp("dots")
    assert full < dots < 0.4 * plain, (full, dots, plain)

def _batches(n, rows=4, seq=32):
    rng = np.random.default_rng(0)
    ex = [data.Example(rng.integers(3, TINY.vocab_size, k).astype(np.int32), np.r_[False, rng.random(k - 1) < 0.7])
          for k in rng.integers(5, 30, 40)]
    it = data.make_iterator(ex, batch_size=rows, seq_len=seq, seed=0, prefetch=0)
    return [next(it) for _ in range(n)]


def _rows(batch, lo, hi):
    return type(batch)(*(x[lo:hi] for x in batch))


def _rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(la, lb)) / sum(float(jnp.sum(x ** 2)) for x in la)) ** .5


@pytest.mark.parametrize("rank", [None, 4])
def test_k_micro_batches_equal_one_k_times_batch(rank):
    batches = _batches(3)
    whole = trainer.Trainer(_model(), trainer.TrainConfig(steps=3, batch_size=4, seq_len=32, learning_rate=1e-2,
                                                          warmup_steps=1, lora_rank=rank))
    split = trainer.Trainer(_model(), trainer.TrainConfig(steps=3, batch_size=2, grad_accum=2, seq_len=32,
                                                          learning_rate=1e-2, warmup_steps=1, lora_rank=rank))
    for i, batch in enumerate(batches):
        a = whole.step([batch])
        b = split.step([_rows(batch, 0, 2), _rows(batch, 2, 4)])
        assert a["tokens"] == b["tokens"] == int(batch.weights.sum())
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"]
        if i == 0:  # one update: the parameters agree (later Adam steps amplify rounding in near-zero gradients)
            assert _rel(whole.trainable, split.trainable) <= 1e-6


def test_lora_trains_only_the_adapters():
    t = trainer.Trainer(_model(), trainer.TrainConfig(steps=2, batch_size=4, seq_len=32, lora_rank=2,
                                                      lora_targets=("q", "v")))
    frozen_before = [np.asarray(x) for x in jax.tree.leaves(t.frozen)]
    n_adapter = sum(x.size for x in jax.tree.leaves(t.trainable))
    c, r = TINY, 2
    assert n_adapter == c.num_layers * (2 * c.d_model * r + r * c.num_heads * c.head_dim + r * c.num_kv_heads * c.head_dim)
    opt_leaves = [x for x in jax.tree.leaves(t.opt_state) if x.ndim > 0]
    assert sum(x.size for x in opt_leaves) == 2 * n_adapter  # Adam's two moments, of the adapters only
    for batch in _batches(2):
        t.step([batch])
    for x, y in zip(frozen_before, jax.tree.leaves(t.frozen)):
        np.testing.assert_array_equal(x, y)
