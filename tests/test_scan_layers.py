"""gemma.transformer.scanned_blocks (`scan=True`, TrainConfig.scan_layers): the same numbers as the unrolled
blocks (forward and gradients, with remat, packed segments and LoRA), a traced program that does not grow
with depth, the unrolled fallback for blocks of differing structure, and the Trainer's steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma import config
from gemma.train import data, lora, trainer
from gemma.transformer import Transformer, layer_period

# scanned vs unrolled, f32: the same products in the same order per block; XLA fuses the unrolled
# program's elementwise tails differently (measured <= 6.1e-7 relative on 14-layer gradients).
RTOL = 2e-6


def _cfg(layers):
    """A tiny model repeating (local, global): groups of 2 keep the tests' compile times short."""
    return config.tiny(num_layers=layers, layer_types=tuple("local" if i % 2 == 0 else "global" for i in range(layers)))


def _rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(float(jnp.linalg.norm((x - y).ravel()) / max(float(jnp.linalg.norm(y.ravel())), 1e-30))
               for x, y in zip(la, lb))


def test_layer_period():
    assert layer_period(config.gemma3_270m().layer_types) == 6
    assert layer_period(config.gemma3_1b().layer_types) == 6  # 26 layers: 4 groups + 2 local blocks unrolled
    assert layer_period(_cfg(5).layer_types) == 2
    assert layer_period(("global",) * 4) == 1
    assert layer_period(("local", "global", "local")) == 2
    assert layer_period(("local", "local", "global")) == 3


def _value_and_grad(model, scan, remat, tokens, segments=None):
    graphdef, state = nnx.split(model)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def loss(state):
        h = nnx.merge(graphdef, state).forward(tokens, positions, jnp.ones(tokens.shape, bool), return_hidden=True,
                                               segment_ids=segments, remat=remat, scan=scan)
        return jnp.sum(jnp.sin(h))

    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.parametrize("layers,remat,packed,adapters", [
    (5, None, False, False),   # 2 groups of 2 + 1 unrolled
    (4, "full", True, False),  # remat inside the scan, packed segments
    (5, "dots", False, True),  # LoRA adapters on every block
])
def test_scanned_equals_unrolled(layers, remat, packed, adapters):
    model = Transformer(_cfg(layers), rngs=nnx.Rngs(0))
    if adapters:
        lora.apply(model, 2, 4.0, "q,k,v,o,gate,up,down", seed=3)
        state = nnx.state(model, nnx.LoRAParam)
        keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
        nnx.update(model, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape), state))
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, model.config.vocab_size)
    segments = jnp.asarray(np.repeat([[1] * 10 + [2] * 10 + [0] * 4], 2, 0)) if packed else None
    (v0, g0), (v1, g1) = (_value_and_grad(model, scan, remat, tokens, segments) for scan in (False, True))
    assert abs(float(v1) - float(v0)) <= RTOL * abs(float(v0))
    assert _rel(g1, g0) <= RTOL


def _dots(layers, scan):
    model = Transformer(_cfg(layers), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8), tokens.shape)
    f = lambda s: jnp.sum(nnx.merge(graphdef, s).forward(tokens, positions, jnp.ones(tokens.shape, bool),  # noqa: E731
                                                          return_hidden=True, scan=scan))
    return jax.jit(jax.grad(f)).lower(state).as_text().count("dot_general")


def test_scanned_program_does_not_grow_with_depth():
    """The traced step holds one group's products whatever the number of groups; unrolled it holds each
    block's (the cause of compile time linear in depth)."""
    assert _dots(4, True) == _dots(8, True) == _dots(16, True)
    assert _dots(16, False) == 2 * _dots(8, False) > _dots(8, True)


def test_blocks_of_differing_structure_run_unrolled():
    model = Transformer(_cfg(4), rngs=nnx.Rngs(0))
    lora.apply(model, 2, 4.0, "q", seed=0)
    name, owner, attr = lora._sites(model)[0]  # layer 0's q: back to the plain projection
    setattr(owner, attr, getattr(owner, attr).base)
    tokens = jax.random.randint(jax.random.key(2), (1, 16), 0, model.config.vocab_size)
    (v0, g0), (v1, g1) = (_value_and_grad(model, scan, None, tokens) for scan in (False, True))
    assert float(v1) == float(v0)
    assert _rel(g1, g0) == 0.0


def test_trainer_scan_layers_takes_the_same_steps(rank=2):
    cfg = _cfg(4)
    rng = np.random.default_rng(0)
    ex = [data.Example(rng.integers(3, cfg.vocab_size, k).astype(np.int32), np.r_[False, rng.random(k - 1) < 0.7])
          for k in rng.integers(5, 30, 20)]
    it = data.make_iterator(ex, batch_size=2, seq_len=32, seed=0, prefetch=0)
    batches = [next(it) for _ in range(2)]
    runs = []
    for scan in (False, True):
        t = trainer.Trainer(Transformer(cfg, rngs=nnx.Rngs(0)),
                            trainer.TrainConfig(steps=2, batch_size=2, seq_len=32, learning_rate=1e-2, lora_rank=rank,
                                                remat="full", scan_layers=scan))
        runs.append(([t.step([b])["loss"] for b in batches], t.loss_sums(batches[0]), t.trainable))
    (l0, e0, p0), (l1, e1, p1) = runs
    np.testing.assert_allclose(l1, l0, rtol=RTOL)
    np.testing.assert_allclose(e1, e0, rtol=RTOL)
    assert _rel(p1, p0) <= 1e-5  # two Adam steps amplify rounding in near-zero gradients
