"""Distillation losses: generalized JSD against TRL's GKD loss, the chunked form against the whole one."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.train import distill as D

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "distill" / "trl_jsd.npz"


def test_matches_trl_generalized_jsd_loss():
    f = np.load(FIXTURE)
    student, teacher, mask = jnp.asarray(f["student"]), jnp.asarray(f["teacher"]), jnp.asarray(f["mask"])
    for i, beta in enumerate(f["betas"].tolist()):
        for j, temp in enumerate(f["temperatures"].tolist()):
            value, grad = jax.value_and_grad(
                lambda s: D.generalized_jsd(s, teacher, mask, beta=beta, temperature=temp))(student)
            np.testing.assert_allclose(float(value), f["value"][i, j], rtol=1e-5, err_msg=f"beta {beta} T {temp}")
            want = f["grad"][i, j]
            np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                       err_msg=f"beta {beta} T {temp}")
    np.testing.assert_allclose(float(D.generalized_jsd(student, teacher, beta=0.5)), f["value_nomask"], rtol=1e-5)


def _problem(shape=(3, 5), v=1000, d=16, dt=24, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    weights = jnp.asarray(rng.random(shape) > 0.3, jnp.float32) * jnp.asarray(rng.uniform(0.5, 2, shape),
                                                                               jnp.float32)
    return f(*shape, d), f(v, d) * 0.5, f(*shape, dt), f(v, dt) * 0.5, weights


def _whole_sum(h, e, ht, et, w, *, beta, temperature, softcap=None, **_):
    """The plain form on full logits, summed with weights (the reference for the chunked one)."""
    s, t = jnp.einsum("...D,VD->...V", h, e), jnp.einsum("...D,VD->...V", ht, et)
    if softcap is not None:
        s, t = softcap * jnp.tanh(s / softcap), softcap * jnp.tanh(t / softcap)
    d = D.token_divergence(jax.nn.log_softmax(s / temperature), jax.nn.log_softmax(t / temperature), beta)
    return jnp.sum(w * d), jnp.sum(w)


def _value_and_grads(fn, h, e, ht, et, w, **kw):
    return jax.jit(jax.value_and_grad(lambda h, e, ht, et, w: fn(h, e, ht, et, w, **kw)[0], argnums=(0, 1, 4)))(
        h, e, ht, et, w)


@pytest.mark.parametrize("beta, temperature, chunk, softcap", [
    (0.0, 1.0, 256, None), (0.1, 0.7, 300, None), (0.5, 2.0, 1000, None), (0.9, 1.0, 128, 5.0),
    (1.0, 0.7, 333, None)])
def test_chunked_equals_whole(beta, temperature, chunk, softcap):
    args = _problem()
    got = _value_and_grads(D.generalized_jsd_sum, *args, beta=beta, temperature=temperature, chunk_size=chunk,
                           softcap=softcap, teacher_softcap=softcap)
    want = _value_and_grads(_whole_sum, *args, beta=beta, temperature=temperature, softcap=softcap)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * np.abs(w).max())
    # the mean matches generalized_jsd's mean over weight-1 positions
    h, e, ht, et, w = args
    mask = w > 0
    total, count = D.generalized_jsd_sum(h, e, ht, et, mask.astype(jnp.float32), beta=beta,
                                         temperature=temperature, chunk_size=chunk)
    mean = D.generalized_jsd(jnp.einsum("...D,VD->...V", h, e), jnp.einsum("...D,VD->...V", ht, et), mask,
                             beta=beta, temperature=temperature)
    np.testing.assert_allclose(float(total / count), float(mean), rtol=1e-5)


def test_chunked_equals_whole_at_full_vocabulary():
    """V = 262144 (Gemma 3's), 2 x 4 tokens: value and every gradient."""
    args = _problem(shape=(2, 4), v=262_144, d=32, dt=48, seed=1)
    for beta in (0.0, 0.5, 1.0):
        got = _value_and_grads(D.generalized_jsd_sum, *args, beta=beta, temperature=1.0)
        want = _value_and_grads(_whole_sum, *args, beta=beta, temperature=1.0)
        np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
        for g, w in zip(got[1], want[1]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * np.abs(w).max())


def test_peak_memory_270m_shape():
    """value + grad (student hidden and table) at 8 x 512 tokens, V = 262144, D = 640: compiled, not run."""
    b, t, v, d = 8, 512, 262144, 640
    spec = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((b, t, d), (v, d), (b, t, d), (v, d), (b, t))]
    stats = {}
    for name, fn in (("chunked", D.generalized_jsd_sum), ("whole", _whole_sum)):
        f = lambda h, e, ht, et, w: fn(h, e, ht, et, w, beta=0.5, temperature=1.0)[0]  # noqa: E731
        m = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*spec).compile().memory_analysis()
        stats[name] = m.temp_size_in_bytes
        print(f"{name}: temp {m.temp_size_in_bytes / 2**20:.0f} MiB")
    logits_bytes = b * t * v * 4
    assert stats["whole"] >= 2 * logits_bytes  # student and teacher [tokens, V] both held
    assert stats["chunked"] < stats["whole"] / 10
    assert stats["chunked"] < logits_bytes / 2


def test_sums_over_splits_equal_the_whole_batch():
    """Micro-batch invariance of the sum form: halves' sums add up to the batch's (value and gradients)."""
    h, e, ht, et, w = _problem(shape=(4, 6), v=700)
    f = lambda h, e, sl: D.generalized_jsd_sum(h[sl], e, ht[sl], et, w[sl], beta=0.3, chunk_size=256)[0]  # noqa: E731
    whole = jax.value_and_grad(f, argnums=(0, 1))(h, e, slice(None))
    halves = [jax.value_and_grad(f, argnums=(0, 1))(h, e, sl) for sl in (slice(0, 2), slice(2, 4))]
    np.testing.assert_allclose(float(whole[0]), float(halves[0][0] + halves[1][0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(whole[1][1]), np.asarray(halves[0][1][1] + halves[1][1][1]),
                               rtol=1e-5, atol=1e-7)


def test_bad_inputs():
    h, e, ht, et, w = _problem(v=100)
    for beta in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\]"):
            D.generalized_jsd_sum(h, e, ht, et, w, beta=beta)
    for temperature in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            D.generalized_jsd(h, h, temperature=temperature)
    with pytest.raises(ValueError, match="vocabularies differ: 100 vs 99"):
        D.generalized_jsd_sum(h, e, ht, et[:99], w)
    with pytest.raises(ValueError, match="D = 24"):
        D.generalized_jsd_sum(h, e, ht[..., :8], et, w)
    with pytest.raises(ValueError, match="one shape"):
        D.generalized_jsd(h, ht)
