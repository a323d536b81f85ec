"""Sampled teacher targets (Gemma 3's sparse-logit KD): unbiasedness, the renormalised form's bias, the on-disk
store, and a tiny student distilled on K = 256 of a V = 4096 teacher against full-distribution distillation."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gemma import config
from gemma.train import data, distill as D, distill_targets as DS
from gemma.transformer import Transformer


def _sparse_grads(h, e, keys, teacher_logits, k, mode):
    """d/d hidden of the sparse cross-entropy sum for each draw: [draws, ...]."""
    def one(key):
        ids, probs = D.sample_targets(teacher_logits, key, k, mode=mode)
        w = jnp.ones(h.shape[:-1])
        return jax.grad(lambda h: D.sparse_cross_entropy_sum(h, e, ids, probs, w, chunk_size=48)[0])(h)
    return jax.lax.map(one, keys, batch_size=500)


@pytest.mark.parametrize("k", [8])
def test_frequency_form_is_unbiased_and_renormalized_is_biased(k):
    rng = np.random.default_rng(0)
    n, v, d = 6, 100, 8
    h = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    e = jnp.asarray(rng.standard_normal((v, d)), jnp.float32)
    teacher = jnp.asarray(rng.standard_normal((n, v)) * 2.5, jnp.float32)
    # the full forward-KL gradient: d/dh sum_t KL(q_t || p_t)
    exact = jax.grad(lambda h: D.generalized_jsd(h @ e.T, teacher, beta=0.0) * n)(h)
    keys = jax.random.split(jax.random.key(1), 4000)
    scale = float(jnp.linalg.norm(exact))
    for mode in ("sampled", "renormalized"):
        g = _sparse_grads(h, e, keys, teacher, k, mode)
        mean = jnp.mean(g, axis=0)
        noise = float(jnp.sqrt(jnp.sum(jnp.var(g, axis=0)) / len(keys)))  # the mean's expected error norm
        err = float(jnp.linalg.norm(mean - exact))
        print(f"{mode} K={k}: |E[g] - g_full| / |g_full| = {err / scale:.4f} (Monte Carlo noise "
              f"{noise / scale:.4f})")
        if mode == "sampled":
            assert err < 3 * noise
            assert err / scale < 0.02
        else:
            assert err > 10 * noise  # a bias, not noise
            assert err / scale > 0.05


def test_target_modes():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((3, 50)) * 3, jnp.float32)
    ids, probs = D.sample_targets(logits, jax.random.key(0), 7, mode="top_k")
    np.testing.assert_array_equal(np.asarray(ids), np.argsort(-np.asarray(logits), axis=1)[:, :7])
    q = jax.nn.softmax(logits)
    want = np.take_along_axis(np.asarray(q), np.asarray(ids), 1)
    np.testing.assert_allclose(np.asarray(probs), want / want.sum(1, keepdims=True), rtol=1e-5)
    ids, probs = D.sample_targets(logits, jax.random.key(0), 64, mode="renormalized", temperature=2.0)
    np.testing.assert_allclose(np.asarray(probs).sum(1), 1, rtol=1e-5)
    q2 = np.asarray(jax.nn.softmax(logits / 2.0))
    for row in range(3):
        distinct = np.unique(np.asarray(ids[row]))
        np.testing.assert_allclose(np.asarray(probs[row])[np.asarray(probs[row]) > 0],
                                   q2[row, distinct] / q2[row, distinct].sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="K .* must be an int >= 1, got 0"):
        D.sample_targets(logits, jax.random.key(0), 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        D.sample_targets(logits, jax.random.key(0), 4, mode="nucleus")
    with pytest.raises(ValueError, match="top-k K = 51 exceeds the vocabulary"):
        D.sample_targets(logits, jax.random.key(0), 51, mode="top_k")


def _examples(rng, count, length, vocab):
    out = []
    for _ in range(count):
        ids = rng.integers(3, vocab, length).astype(np.int32)
        ids[0] = 2
        out.append(data.Example(ids, np.arange(length) > rng.integers(0, length // 2)))
    return out


def test_store_round_trip_and_batches(tmp_path):
    v = 300
    teacher = Transformer(config.tiny(vocab_size=v), rngs=nnx.Rngs(0))
    teacher.embedder.embedding[...] = teacher.embedder.embedding[...] * 16
    examples = _examples(np.random.default_rng(0), 5, 12, v)
    meta = DS.write_targets(teacher, examples, str(tmp_path / "t"), k=16, mode="top_k", progress=False, block=8)
    store = DS.TargetStore(str(tmp_path / "t"))
    store.check(examples)
    assert meta["positions"] == sum(len(DS.loss_positions(e)) for e in examples) and store.meta == meta
    for i, ex in enumerate(examples):
        logits = np.asarray(teacher(jnp.asarray(ex.ids[None]))[0])
        for t, (ids, probs) in zip(DS.loss_positions(ex), store.example(i)):
            top = np.argsort(-logits[t])[:16]
            assert sorted(ids.tolist()) == sorted(top.tolist())
            np.testing.assert_allclose(float(np.asarray(probs, np.float32).sum()), 1, atol=5e-3)
    # packed rows: each loss position's target lands where its weight is
    it = data.make_iterator(examples, batch_size=2, seq_len=30, seed=0, packing=True, batch_fn=store.batch_fn(),
                            prefetch=0)
    batch = next(it)
    assert isinstance(batch, DS.TargetBatch) and batch.target_ids.shape == (2, 30, 16)
    np.testing.assert_array_equal(batch.target_probs.sum(-1) > 0, batch.weights > 0)
    with pytest.raises(ValueError, match="already holds teacher targets"):
        DS.write_targets(teacher, examples, str(tmp_path / "t"), k=16, progress=False)
    with pytest.raises(ValueError, match="holds targets of 5 examples, the data has 4"):
        store.check(examples[:4])
    # sampled: frequencies count / K, exactly
    DS.write_targets(teacher, examples, str(tmp_path / "s"), k=64, mode="sampled", progress=False, block=8)
    for ids, probs in DS.TargetStore(str(tmp_path / "s")).example(0):
        counts = np.asarray(probs, np.float64) * 64
        np.testing.assert_array_equal(counts, np.round(counts))
        assert counts.sum() == 64 and np.all(np.diff(ids.astype(int)) > 0)


def test_sampled_256_of_4096_distills_as_well_as_the_full_distribution(tmp_path):
    """A tiny student, the same steps on the same data: full forward KL vs K = 256 frequency-weighted draws
    (precomputed to disk); held-out KL(teacher || student) within 10%, with <= 1/10 of the target bytes."""
    from gemma.train import distill_trainer as DT, trainer as T

    v = 4096
    tc = config.tiny(vocab_size=v, d_model=64, hidden_dim=128)
    sc = config.tiny(vocab_size=v, d_model=32, hidden_dim=64, head_dim=8, num_heads=2, num_kv_heads=1)

    def teacher():  # a random teacher with structured distributions (entropy ~2.9 nats of 8.3)
        t = Transformer(tc, rngs=nnx.Rngs(1))
        t.embedder.embedding[...] = t.embedder.embedding[...] * 16
        return t

    rng = np.random.default_rng(0)
    train = [data.Example(e.ids, np.arange(33) > 0) for e in _examples(rng, 64, 33, v)]
    held = np.stack([e.ids for e in _examples(rng, 16, 33, v)])
    held_teacher = teacher()(jnp.asarray(held))[:, :-1]

    def held_kl(model):
        return float(D.generalized_jsd(model(jnp.asarray(held))[:, :-1], held_teacher, beta=0.0))

    cfg = T.TrainConfig(steps=100, batch_size=8, seq_len=33, learning_rate=3e-3, warmup_steps=10)
    kl, start = {}, held_kl(Transformer(sc, rngs=nnx.Rngs(0)))
    for mode in ("full", "sampled"):
        tr = DT.DistillTrainer(Transformer(sc, rngs=nnx.Rngs(0)), teacher(), None, cfg,
                               DT.DistillConfig(lmbda=0.0, beta=0.0))
        batch_fn = None
        if mode == "sampled":
            DS.write_targets(tr.teacher(), train, str(tmp_path / "t"), k=256, mode="sampled", progress=False)
            store = DS.TargetStore(str(tmp_path / "t"))
            batch_fn = store.batch_fn()
        it = data.make_iterator(train, batch_size=8, seq_len=33, seed=0, packing=False, batch_fn=batch_fn)
        for _ in range(cfg.steps):
            tr.step([next(it)])
        kl[mode] = held_kl(tr.model())
    full_bytes = store.meta["positions"] * v * 4  # the teacher's f32 distributions at the same positions
    print(f"held-out KL: start {start:.4f}, full {kl['full']:.4f}, sampled K=256 {kl['sampled']:.4f}; target "
          f"bytes {store.nbytes} vs {full_bytes} f32 ({store.nbytes / full_bytes:.4f})")
    assert kl["full"] < 0.95 * start  # it learned
    assert abs(kl["sampled"] - kl["full"]) <= 0.1 * kl["full"]
    assert start - kl["sampled"] >= 0.8 * (start - kl["full"])
    assert store.nbytes <= full_bytes / 10
