"""Policy-gradient pieces against plain numpy formulas: RLOO, k3, the exact chunked KL, off-policy REINFORCE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.train import rl


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_rloo_is_the_leave_one_out_mean():
    r = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    want = np.array([[r[p, i] - np.mean(np.delete(r[p], i)) for i in range(4)] for p in range(3)])
    adv = np.asarray(rl.rloo_advantages(r))
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv.sum(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(rl.rloo_advantages(np.array([1.0, 3.0])), [-2.0, 2.0])


def test_rloo_with_a_mask_leaves_dropped_samples_out():
    r = np.array([[1.0, 2.0, 3.0, 99.0], [5.0, 7.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0]], np.float32)
    m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    adv = np.asarray(rl.rloo_advantages(r, m))
    np.testing.assert_allclose(adv[0], [1 - 2.5, 2 - 2.0, 3 - 1.5, 0.0], rtol=1e-6)  # 99 ignored
    np.testing.assert_allclose(adv[1], 0.0)  # one used sample: no baseline, no advantage
    np.testing.assert_allclose(adv[2], 0.0)
    np.testing.assert_allclose(rl.rloo_advantages(r[2:], np.ones((1, 4), bool)), rl.rloo_advantages(r[2:]))
    with pytest.raises(ValueError, match="mask must have the rewards' shape"):
        rl.rloo_advantages(r, m[:2])


@pytest.mark.parametrize("shape", [(5, 1), (1,), ()])
def test_rloo_needs_two_samples(shape):
    with pytest.raises(ValueError, match="n >= 2 samples per prompt"):
        rl.rloo_advantages(np.zeros(shape))


def test_k3_formula_and_its_mean_is_the_kl():
    rng = np.random.default_rng(1)
    logp, ref = np.log(rng.uniform(0.05, 1, 6)), np.log(rng.uniform(0.05, 1, 6))
    np.testing.assert_allclose(rl.k3(logp, ref), np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-6)
    assert np.all(np.asarray(rl.k3(logp, ref)) >= 0)
    p, q = np.exp(_log_softmax(rng.normal(size=7))), np.exp(_log_softmax(rng.normal(size=7)))
    draws = rng.choice(7, size=200_000, p=p)  # tokens sampled from pi
    estimate = float(np.mean(rl.k3(np.log(p[draws]), np.log(q[draws]))))
    kl = float(np.sum(p * np.log(p / q)))
    assert abs(estimate - kl) < 0.02 * kl + 1e-3, (estimate, kl)
    with pytest.raises(ValueError, match="one shape"):
        rl.k3(np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_exact_kl_over_the_vocabulary_matches_numpy(beta):
    rng = np.random.default_rng(2)
    v, d, dr = 50, 8, 6  # chunks of 16 over 50 rows: the last chunk overlaps
    h, e = rng.normal(size=(2, 3, d)), rng.normal(size=(v, d))
    hr, er = rng.normal(size=(2, 3, dr)), rng.normal(size=(v, dr))
    w = np.array([[1.0, 0.0, 2.0], [1.0, 1.0, 0.5]])
    lp, lq = _log_softmax(h @ e.T), _log_softmax(hr @ er.T)  # policy, reference
    want = np.sum(np.exp(lp) * (lp - lq), -1) if beta == 1 else np.sum(np.exp(lq) * (lq - lp), -1)
    args = [jnp.asarray(x, jnp.float32) for x in (h, e, hr, er)]
    per_token = rl.token_kl(*args, jnp.asarray(w, jnp.float32), beta=beta, chunk_size=16)
    np.testing.assert_allclose(per_token, want, rtol=1e-4, atol=1e-6)  # weight-0 positions included
    total, count = rl.kl_sum(*args, jnp.asarray(w, jnp.float32), beta=beta, chunk_size=16)
    np.testing.assert_allclose(total, np.sum(w * want), rtol=1e-4)
    assert float(count) == w.sum()
    with pytest.raises(ValueError, match="beta must be 1"):
        rl.kl_sum(*args, jnp.asarray(w, jnp.float32), beta=0.5)


def test_penalized_reward_and_bad_alpha():
    np.testing.assert_allclose(rl.penalized_reward(np.array([1.0, 2.0]), np.array([0.5, 4.0]), 0.1), [0.95, 1.6])
    for alpha in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="alpha"):
            rl.penalized_reward(1.0, 1.0, alpha)


def _rollouts(seed=3, b=4, t=5):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t), np.float32)
    mask[0, 3:] = 0
    logp = np.log(rng.uniform(0.1, 1, (b, t))).astype(np.float32)
    behavior = (logp + rng.normal(scale=0.2, size=(b, t))).astype(np.float32)
    return logp, behavior, mask, rng.normal(size=b).astype(np.float32)


@pytest.mark.parametrize("max_ratio", [None, 1.1])
def test_reinforce_loss_and_gradient_match_numpy(max_ratio):
    logp, behavior, mask, adv = _rollouts()
    versions, current = np.array([5, 4, 2, 5]), 5  # row 2 is 3 versions old: dropped with max_staleness 2
    keep = np.array([1, 1, 0, 1], np.float32)
    rho = np.exp(np.sum(mask * (logp - behavior), 1))
    used = rho if max_ratio is None else np.minimum(rho, max_ratio)
    want_loss = -np.sum(keep * used * adv) / keep.sum()
    want_grad = -(keep * used * adv)[:, None] * mask / keep.sum()  # d rho = rho d log pi; truncation: a constant
    f = lambda lp: rl.reinforce_loss(lp, behavior, mask, adv, versions=versions, current_version=current,  # noqa: E731
                                     max_staleness=2, max_ratio=max_ratio)
    (loss, stats), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    assert int(stats["kept"]) == 3 and int(stats["dropped"]) == 1
    if max_ratio is not None:
        assert (rho * keep).max() > max_ratio  # the truncation is exercised


def test_on_policy_reinforce_is_the_plain_policy_gradient():
    logp, _, mask, adv = _rollouts(seed=4)
    grad = jax.grad(lambda lp: rl.reinforce_loss(lp, logp, mask, adv)[0])(jnp.asarray(logp))
    np.testing.assert_allclose(grad, -adv[:, None] * mask / len(adv), rtol=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(versions=np.array([1, 1, 1, 1])), "together"),
    (dict(versions=np.array([1, 1, 1, 1]), current_version=2, max_staleness=-1), "max_staleness must be"),
    (dict(versions=np.array([3, 1, 1, 1]), current_version=2, max_staleness=1), "newer than the current"),
    (dict(versions=np.array([1, 1]), current_version=2, max_staleness=1), r"versions must be \[B\]"),
    (dict(max_ratio=0.0), "max_ratio"),
])
def test_reinforce_bad_inputs(kw, match):
    logp, behavior, mask, adv = _rollouts()
    with pytest.raises(ValueError, match=match):
        rl.reinforce_loss(logp, behavior, mask, adv, **kw)
    with pytest.raises(ValueError, match="advantages"):
        rl.reinforce_loss(logp, behavior, mask, adv[:2])
