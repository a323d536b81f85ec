"""Policy-gradient pieces: RLOO advantages, KL to a reference (k3 estimate and exact), off-policy REINFORCE.

    adv = rloo_advantages(rewards)                           # [P, n]: r_i - mean_{j != i} r_j
    kl = k3(logp, ref_logp)                                  # per sampled token, >= 0, unbiased for KL(pi || ref)
    total, n = kl_sum(h, e, ref_h, ref_e, weights)           # exact KL(pi || ref) over the full vocabulary, chunked
    per_token = token_kl(h, e, ref_h, ref_e, weights)        # the same, one value per position
    r = penalized_reward(reward, kl_per_sequence, alpha)     # r - alpha KL (Roit et al. 2023; Gemma 3's RL)
    loss, stats = reinforce_loss(logp, behavior_logp, mask, adv, versions=v, current_version=c, max_staleness=2)

RLOO: Kool et al. 2019 / Ahmadian et al. 2024. k3: Schulman 2020, "Approximating KL divergence":
k3 = exp(ref - logp) - (ref - logp) - 1 for tokens sampled from pi. The exact KL is
gemma.train.distill.generalized_jsd_sum with the policy as student and the reference as teacher: beta = 1 gives
KL(pi || ref) (the RL penalty), beta = 0 KL(ref || pi). Off-policy: a rollout sampled under weights version v
(the server's) is reweighted by the sequence ratio pi / mu, optionally truncated at max_ratio, and dropped when
current_version - v > max_staleness.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gemma.train import distill
from gemma.train.loss import DEFAULT_CHUNK, _concrete


def rloo_advantages(rewards: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Leave-one-out advantages of n samples per prompt: rewards [..., n] -> r_i - (sum_j r_j - r_i) / (n - 1).

    mask [..., n] (optional): samples to use (a reward that failed: False). The baseline of sample i is then the
    mean of the other used samples of its group; unused samples, and the samples of a group with fewer than two
    used ones, get advantage 0."""
    rewards = jnp.asarray(rewards, jnp.float32)
    n = rewards.shape[-1] if rewards.ndim else 0
    if n < 2:
        raise ValueError(f"the leave-one-out baseline needs n >= 2 samples per prompt (rewards [..., n]), got "
                         f"shape {tuple(rewards.shape)}")
    if mask is None:
        return rewards - (jnp.sum(rewards, axis=-1, keepdims=True) - rewards) / (n - 1)
    if jnp.shape(mask) != rewards.shape:
        raise ValueError(f"mask must have the rewards' shape {tuple(rewards.shape)}, got {jnp.shape(mask)}")
    m = jnp.asarray(mask, bool)
    r = jnp.where(m, rewards, 0.0)
    others = jnp.sum(m, axis=-1, keepdims=True) - 1
    adv = r - (jnp.sum(r, axis=-1, keepdims=True) - r) / jnp.maximum(others, 1)
    return jnp.where(m & (others >= 1), adv, 0.0)


def k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || ref) from log-probabilities of tokens sampled from pi."""
    if jnp.shape(logp) != jnp.shape(ref_logp):
        raise ValueError(f"logp and ref_logp must have one shape, got {jnp.shape(logp)} and {jnp.shape(ref_logp)}")
    log_ratio = ref_logp - logp
    return jnp.exp(log_ratio) - log_ratio - 1


def kl_sum(hidden, embedding, ref_hidden, ref_embedding, weights, *, beta: float = 1.0,
           chunk_size: int = DEFAULT_CHUNK, softcap: float | None = None, ref_softcap: float | None = None):
    """(sum_t w_t KL_t, sum_t w_t) over the full vocabulary of the tied heads, never holding [tokens, V]:
    beta = 1: KL(pi || ref), beta = 0: KL(ref || pi). Gradients reach the policy's hidden and table only."""
    if beta not in (0, 1):
        raise ValueError(f"beta must be 1 (KL(pi || ref)) or 0 (KL(ref || pi)), got {beta!r}; "
                         f"distill.generalized_jsd_sum gives the mixtures")
    return distill.generalized_jsd_sum(hidden, embedding, ref_hidden, ref_embedding, weights, beta=float(beta),
                                       chunk_size=chunk_size, softcap=softcap, teacher_softcap=ref_softcap)


def token_kl(hidden, embedding, ref_hidden, ref_embedding, weights=None, **kw) -> jax.Array:
    """kl_sum's per-position KL_t [...] (hidden's leading shape): the gradient of sum_t w_t KL_t in w_t, which
    distill's custom VJP returns as KL_t, so the chunked loop is not written twice. Positions with weight 0 too."""
    w = jnp.ones(hidden.shape[:-1], jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    return jax.grad(lambda w: kl_sum(hidden, embedding, ref_hidden, ref_embedding, w, **kw)[0])(w)


def penalized_reward(reward: jax.Array, kl: jax.Array, alpha: float) -> jax.Array:
    """The KL-regularised sequence reward r - alpha * KL, alpha >= 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha (the KL weight) must be a finite number >= 0, got {alpha!r}")
    return jnp.asarray(reward, jnp.float32) - alpha * jnp.asarray(kl, jnp.float32)


def reinforce_loss(logp: jax.Array, behavior_logp: jax.Array, mask: jax.Array, advantages: jax.Array, *,
                   versions=None, current_version: int | None = None, max_staleness: int | None = None,
                   max_ratio: float | None = None) -> tuple[jax.Array, dict]:
    """Off-policy REINFORCE with a sequence reward: -mean_kept(rho_b A_b), rho_b = pi(y_b) / mu(y_b), whose
    gradient is -mean_kept(rho_b A_b grad log pi(y_b)).

    logp, behavior_logp, mask [B, T]: log-probabilities of the sampled tokens under the current policy (the
    differentiable input) and under the weights that sampled them (mu); mask marks the response tokens.
    advantages [B]. versions int [B] with current_version and max_staleness: rollouts older than max_staleness
    versions are dropped. max_ratio: rho is truncated at it (the truncated part carries no gradient).
    Returns (loss, {"kept": rows used, "dropped": rows dropped as stale, "mean_ratio": mean rho of kept rows}).
    """
    logp, behavior_logp = jnp.asarray(logp), jnp.asarray(behavior_logp)
    if logp.ndim != 2 or behavior_logp.shape != logp.shape or jnp.shape(mask) != logp.shape:
        raise ValueError(f"logp, behavior_logp and mask must be [B, T] of one shape, got {logp.shape}, "
                         f"{behavior_logp.shape} and {jnp.shape(mask)}")
    if jnp.shape(advantages) != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {jnp.shape(advantages)}")
    if max_ratio is not None and not max_ratio > 0:
        raise ValueError(f"max_ratio must be > 0 or None, got {max_ratio!r}")
    keep = jnp.ones(logp.shape[:1], bool)
    if versions is not None or max_staleness is not None:
        if versions is None or current_version is None or max_staleness is None:
            raise ValueError("the staleness bound needs versions, current_version and max_staleness together")
        if isinstance(max_staleness, bool) or not isinstance(max_staleness, (int, np.integer)) or max_staleness < 0:
            raise ValueError(f"max_staleness must be an int >= 0, got {max_staleness!r}")
        lag = current_version - jnp.asarray(versions)  # traced under jit: then the check below is skipped
        if lag.shape != logp.shape[:1]:
            raise ValueError(f"versions must be [B] = [{logp.shape[0]}], got {lag.shape}")
        concrete = _concrete(lag)
        if concrete is not None and (concrete < 0).any():
            raise ValueError(f"a rollout has version {int(np.asarray(versions).max())}, newer than the current "
                             f"version {current_version}")
        keep = lag <= max_staleness
    mask = jnp.asarray(mask, jnp.float32)
    log_rho = jnp.sum(mask * (logp - jax.lax.stop_gradient(behavior_logp)), axis=1)
    rho = jnp.exp(jnp.where(keep, log_rho, 0.0))  # dropped rows: no overflow from ancient weights
    if max_ratio is not None:
        rho = rho * jax.lax.stop_gradient(jnp.minimum(1.0, max_ratio / rho))
    kept = jnp.sum(keep)
    loss = -jnp.sum(jnp.where(keep, rho * advantages, 0.0)) / jnp.maximum(kept, 1)
    stats = {"kept": kept, "dropped": keep.size - kept,
             "mean_ratio": jnp.sum(jnp.where(keep, jax.lax.stop_gradient(rho), 0.0)) / jnp.maximum(kept, 1)}
    return loss, stats
