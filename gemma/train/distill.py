"""Distillation losses: the generalized Jensen-Shannon divergence of GKD, whole and chunked over the vocabulary.

    loss = generalized_jsd(student_logits, teacher_logits, mask, beta=0.5, temperature=1.0)
    total, count = generalized_jsd_sum(hidden, embedding, teacher_hidden, teacher_embedding, weights, beta=0.5)

Convention (TRL's `GKDTrainer.generalized_jsd_loss`): logits are divided by the temperature; with
p = softmax(student), q = softmax(teacher) and M = beta q + (1 - beta) p,

    beta = 0:      KL(q || p)                                  (forward KL)
    beta = 1:      KL(p || q)                                  (reverse KL)
    otherwise:     beta KL(q || M) + (1 - beta) KL(p || M)

per position, summed over the masked positions and divided by their number. (The mid formula tends to 0,
not to a KL, as beta -> 0 or 1: the end points are TRL's special cases and ours.)

`generalized_jsd_sum` never holds [tokens, V] of either distribution: a custom_vjp whose forward makes two
passes over vocabulary chunks (online logsumexp of both, then the divergence's sums) and whose backward
recomputes each chunk. With g = d D / d student_logit (before the temperature):

    beta = 0:   g = p - q
    beta = 1:   g = p (log p - log q - KL(p || q))
    otherwise:  g = (1 - beta) p (log p - log M - KL(p || M))

The teacher gets no gradient. Teacher and student share the vocabulary, not the width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gemma.train.loss import DEFAULT_CHUNK, _chunk_logits


def check_divergence(beta, temperature) -> None:
    """ValueError unless 0 <= beta <= 1 and temperature > 0 (finite numbers)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"beta must be a number in [0, 1] (0 forward KL, 1 reverse KL), got {beta!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _mixture(s_logp, t_logp, beta):
    """log M = log(beta q + (1 - beta) p)."""
    return jnp.logaddexp(s_logp + math.log1p(-beta), t_logp + math.log(beta))


def token_divergence(s_logp: jax.Array, t_logp: jax.Array, beta: float) -> jax.Array:
    """The generalized JSD of each position from log-probabilities [..., V] -> [...]."""
    p, q = jnp.exp(s_logp), jnp.exp(t_logp)
    if beta == 0:
        return jnp.sum(q * (t_logp - s_logp), axis=-1)
    if beta == 1:
        return jnp.sum(p * (s_logp - t_logp), axis=-1)
    log_m = _mixture(s_logp, t_logp, beta)
    return beta * jnp.sum(q * (t_logp - log_m), axis=-1) + (1 - beta) * jnp.sum(p * (s_logp - log_m), axis=-1)


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array | None = None, *,
                    beta: float = 0.5, temperature: float = 1.0) -> jax.Array:
    """Mean generalized JSD over the positions where `mask` is True (all when None); logits [..., V], f32."""
    check_divergence(beta, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must have one shape [..., V], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, axis=-1)
    d = token_divergence(s_logp, t_logp, beta)
    if mask is None:
        return jnp.mean(d)
    if tuple(mask.shape) != d.shape:
        raise ValueError(f"mask must have the logits' leading shape {d.shape}, got {tuple(mask.shape)}")
    mask = mask.astype(bool)
    return jnp.sum(jnp.where(mask, d, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


# ---------------------------------------------------------------- chunked over the vocabulary


def generalized_jsd_sum(hidden: jax.Array, embedding: jax.Array, teacher_hidden: jax.Array,
                        teacher_embedding: jax.Array, weights: jax.Array, *, beta: float = 0.5,
                        temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK,
                        softcap: float | None = None, teacher_softcap: float | None = None
                        ) -> tuple[jax.Array, jax.Array]:
    """(sum_t w_t D_t, sum_t w_t) of the tied heads' logits, student (hidden [..., D], embedding [V, D]) against
    teacher (teacher_hidden [..., Dt], teacher_embedding [V, Dt]); never holds [tokens, V]. Gradients reach
    hidden, embedding and weights; the teacher's inputs get zeros."""
    check_divergence(beta, temperature)
    h, e, ht, et, w = _check(hidden, embedding, teacher_hidden, teacher_embedding, weights, chunk_size)
    chunk = min(int(chunk_size), e.shape[0])
    caps = tuple(None if c is None else float(c) for c in (softcap, teacher_softcap))
    total = _chunked_jsd(h, e, jax.lax.stop_gradient(ht), jax.lax.stop_gradient(et), w, float(beta),
                         float(temperature), chunk, caps)
    return total, jnp.sum(w)


def _pair(h, e, ht, et, i, chunk, temperature, caps):
    """Chunk i of the student's and teacher's logits / temperature, the chunk's table slice, start, fresh."""
    s, e_c, start, _, fresh = _chunk_logits(h, e, i, chunk, caps[0])
    t, _, _, _, _ = _chunk_logits(ht, et, i, chunk, caps[1])
    return s / temperature, t / temperature, s, e_c, start, fresh


def _lse_pass(h, e, ht, et, chunk, temperature, caps):
    """Online logsumexp of both distributions over the chunks: (lse_student, lse_teacher) [T]."""
    def body(i, carry):
        (ms, ss), (mt, st) = carry
        s, t, _, _, _, fresh = _pair(h, e, ht, et, i, chunk, temperature, caps)
        out = []
        for x, m, acc in ((s, ms, ss), (t, mt, st)):
            x = jnp.where(fresh[None, :], x, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(x, axis=1))
            out.append((m_new, acc * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)))
        return tuple(out)

    n = h.shape[0]
    init = ((jnp.full((n,), -jnp.inf), jnp.zeros((n,))), (jnp.full((n,), -jnp.inf), jnp.zeros((n,))))
    (ms, ss), (mt, st) = jax.lax.fori_loop(0, -(-e.shape[0] // chunk), body, init)
    return ms + jnp.log(ss), mt + jnp.log(st)


def _log_probs(h, e, ht, et, i, chunk, temperature, caps, lse_s, lse_t):
    s, t, raw, e_c, start, fresh = _pair(h, e, ht, et, i, chunk, temperature, caps)
    return s - lse_s[:, None], t - lse_t[:, None], raw, e_c, start, fresh


def _kl_terms(s_logp, t_logp, beta):
    """Per-position partial sums over a chunk: (KL of the teacher's side, KL of the student's side)."""
    p, q = jnp.exp(s_logp), jnp.exp(t_logp)
    if beta == 0:
        return q * (t_logp - s_logp), jnp.zeros_like(p)
    if beta == 1:
        return jnp.zeros_like(p), p * (s_logp - t_logp)
    log_m = _mixture(s_logp, t_logp, beta)
    return q * (t_logp - log_m), p * (s_logp - log_m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _chunked_jsd(h, e, ht, et, w, beta, temperature, chunk, caps):
    return _forward(h, e, ht, et, w, beta, temperature, chunk, caps)[0]


def _forward(h, e, ht, et, w, beta, temperature, chunk, caps):
    lse_s, lse_t = _lse_pass(h, e, ht, et, chunk, temperature, caps)

    def body(i, carry):
        kl_q, kl_p = carry
        s_logp, t_logp, _, _, _, fresh = _log_probs(h, e, ht, et, i, chunk, temperature, caps, lse_s, lse_t)
        a, b = _kl_terms(s_logp, t_logp, beta)
        return (kl_q + jnp.sum(jnp.where(fresh[None, :], a, 0.0), axis=1),
                kl_p + jnp.sum(jnp.where(fresh[None, :], b, 0.0), axis=1))

    zeros = jnp.zeros((h.shape[0],), jnp.float32)
    kl_q, kl_p = jax.lax.fori_loop(0, -(-e.shape[0] // chunk), body, (zeros, zeros))
    d = kl_q if beta == 0 else kl_p if beta == 1 else beta * kl_q + (1 - beta) * kl_p
    return jnp.sum(w * d), (h, e, ht, et, w, lse_s, lse_t, kl_p, d)


def _fwd(h, e, ht, et, w, beta, temperature, chunk, caps):
    return _forward(h, e, ht, et, w, beta, temperature, chunk, caps)


def _bwd(beta, temperature, chunk, caps, res, g):
    h, e, ht, et, w, lse_s, lse_t, kl_p, d = res
    compute = jnp.result_type(h.dtype, e.dtype)
    scale = (g * w).astype(jnp.float32) / temperature  # [T]; the 1/T of logits / T

    def body(i, carry):
        dh, de = carry
        s_logp, t_logp, raw, e_c, start, fresh = _log_probs(h, e, ht, et, i, chunk, temperature, caps,
                                                            lse_s, lse_t)
        p = jnp.exp(s_logp)
        if beta == 0:
            dz = p - jnp.exp(t_logp)
        elif beta == 1:
            dz = p * (s_logp - t_logp - kl_p[:, None])
        else:
            dz = (1 - beta) * p * (s_logp - _mixture(s_logp, t_logp, beta) - kl_p[:, None])
        dlogits = scale[:, None] * dz
        if caps[0] is not None:
            dlogits = dlogits * (1.0 - jnp.square(raw / caps[0]))
        dlogits = jnp.where(fresh[None, :], dlogits, 0.0).astype(compute)
        dh = dh + jnp.einsum("TV,VD->TD", dlogits, e_c.astype(compute), preferred_element_type=jnp.float32)
        de_c = jnp.einsum("TV,TD->VD", dlogits, h.astype(compute), preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(de, start, chunk, axis=0)
        de = jax.lax.dynamic_update_slice_in_dim(de, (old.astype(jnp.float32) + de_c).astype(de.dtype), start, 0)
        return dh, de

    dh, de = jax.lax.fori_loop(0, -(-e.shape[0] // chunk), body, (jnp.zeros(h.shape, jnp.float32), jnp.zeros_like(e)))
    return dh.astype(h.dtype), de, jnp.zeros_like(ht), jnp.zeros_like(et), (g * d).astype(w.dtype)


_chunked_jsd.defvjp(_fwd, _bwd)


def _check(hidden, embedding, teacher_hidden, teacher_embedding, weights, chunk_size):
    """Validates and flattens: -> hidden [T, D], embedding [V, D], teacher hidden [T, Dt], table [V, Dt], w [T]."""
    for name, x in (("hidden", hidden), ("embedding", embedding), ("teacher_hidden", teacher_hidden),
                    ("teacher_embedding", teacher_embedding), ("weights", weights)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    for who, hh, ee in (("student", hidden, embedding), ("teacher", teacher_hidden, teacher_embedding)):
        if ee.ndim != 2:
            raise ValueError(f"the {who}'s embedding must be the [V, D] table, got shape {tuple(ee.shape)}")
        if hh.ndim < 1 or hh.shape[-1] != ee.shape[1]:
            raise ValueError(f"the {who}'s hidden must be [..., D] with D = {ee.shape[1]} (its table's width), "
                             f"got shape {tuple(hh.shape)}")
    if embedding.shape[0] != teacher_embedding.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {embedding.shape[0]} vs "
                         f"{teacher_embedding.shape[0]} rows; distillation needs one vocabulary")
    lead = tuple(hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != lead or tuple(weights.shape) != lead:
        raise ValueError(f"teacher_hidden and weights must have hidden's leading shape {lead}, got "
                         f"{tuple(teacher_hidden.shape[:-1])} and {tuple(weights.shape)}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of vocabulary rows, got {chunk_size}")
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    return (flat(hidden), embedding, flat(teacher_hidden), teacher_embedding,
            jnp.asarray(weights).reshape(-1).astype(jnp.float32))


# ---------------------------------------------------------------- sampled teacher targets (Gemma 3's pre-training)

TARGET_MODES = ("sampled", "renormalized", "top_k")


def sample_targets(teacher_logits: jax.Array, key: jax.Array, k: int, *, mode: str = "sampled",
                   temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """K-entry sparse targets of teacher logits [..., V] -> (ids int32 [..., K], probs f32 [..., K]).

    "sampled": K ids drawn with replacement from softmax(logits / T), each with weight 1/K (a repeated id
      repeats): the draws' empirical frequencies, an unbiased estimate of the teacher's distribution.
    "renormalized": the same draws' distinct ids with the teacher's probabilities renormalised over them
      (Gemma 3's report; biased). Slots of repeated ids get 0.
    "top_k": the K most probable ids, probabilities renormalised over them.
    Each row's probs sum to 1.
    """
    check_divergence(0.0, temperature)
    if mode not in TARGET_MODES:
        raise ValueError(f"mode must be one of {', '.join(TARGET_MODES)}, got {mode!r}")
    v = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k:
        raise ValueError(f"K (teacher ids per position) must be an int >= 1, got {k!r}")
    logits = teacher_logits.astype(jnp.float32) / temperature
    if mode == "top_k":
        if k > v:
            raise ValueError(f"top-k K = {k} exceeds the vocabulary ({v})")
        top, ids = jax.lax.top_k(logits, k)
        return ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1)
    ids = _draw(key, logits, k)
    if mode == "sampled":
        return ids, jnp.full(ids.shape, 1.0 / k, jnp.float32)
    first = jnp.concatenate([jnp.ones_like(ids[..., :1], bool), ids[..., 1:] != ids[..., :-1]], axis=-1)
    q = jnp.where(first, jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), ids, axis=-1), 0.0)
    return ids, q / jnp.sum(q, axis=-1, keepdims=True)


def _draw(key, logits, k):
    """K ids per row of softmax(logits), ascending, by the inverse CDF: O(rows x V) memory, where
    jax.random.categorical's Gumbel draws would take O(K x rows x V)."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    flat = cdf.reshape(-1, cdf.shape[-1])
    u = jnp.sort(jax.random.uniform(key, (flat.shape[0], k)), axis=-1) * flat[:, -1:]
    ids = jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(flat, u)
    return jnp.minimum(ids, cdf.shape[-1] - 1).astype(jnp.int32).reshape(*logits.shape[:-1], k)


def sparse_cross_entropy_sum(hidden: jax.Array, embedding: jax.Array, ids: jax.Array, probs: jax.Array,
                             weights: jax.Array, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK,
                             softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum_t w_t CE_t, sum_t w_t) with CE_t = -sum_k probs[t, k] log softmax(logits_t / T)[ids[t, k]], logits of
    the tied head (hidden [..., D], embedding [V, D]); never holds [tokens, V]. ids, probs [..., K]."""
    check_divergence(0.0, temperature)
    h, e, _, _, w = _check(hidden, embedding, hidden, embedding, weights, chunk_size)
    lead = tuple(hidden.shape[:-1])
    if ids.ndim != len(lead) + 1 or tuple(ids.shape[:-1]) != lead or probs.shape != ids.shape:
        raise ValueError(f"ids and probs must be [..., K] with hidden's leading shape {lead}, got "
                         f"{tuple(ids.shape)} and {tuple(probs.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"ids must be integer, got dtype {ids.dtype}")
    ids = ids.reshape(-1, ids.shape[-1]).astype(jnp.int32)
    probs = probs.reshape(ids.shape).astype(jnp.float32)
    chunk = min(int(chunk_size), e.shape[0])
    total = _chunked_sparse_ce(h, e, ids, jax.lax.stop_gradient(probs), w, float(temperature), chunk,
                               None if softcap is None else float(softcap))
    return total, jnp.sum(w)


def _owned(ids, i, chunk, start):
    """Which target ids chunk i owns (ids in [i * chunk, start + chunk)) and their column in it."""
    return (ids >= i * chunk) & (ids < start + chunk), jnp.clip(ids - start, 0, chunk - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _chunked_sparse_ce(h, e, ids, probs, w, temperature, chunk, softcap):
    return _sparse_forward(h, e, ids, probs, w, temperature, chunk, softcap)[0]


def _sparse_forward(h, e, ids, probs, w, temperature, chunk, softcap):
    n = h.shape[0]

    def body(i, carry):
        m, s, tgt = carry
        logits, _, start, _, fresh = _chunk_logits(h, e, i, chunk, softcap)
        logits = jnp.where(fresh[None, :], logits / temperature, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        owned, col = _owned(ids, i, chunk, start)
        picked = jnp.take_along_axis(logits, col, axis=1)
        return m_new, s, tgt + jnp.sum(jnp.where(owned, probs * picked, 0.0), axis=1)

    init = (jnp.full((n,), -jnp.inf), jnp.zeros((n,)), jnp.zeros((n,)))
    m, s, tgt = jax.lax.fori_loop(0, -(-e.shape[0] // chunk), body, init)
    lse = m + jnp.log(s)
    ce = lse * jnp.sum(probs, axis=1) - tgt
    return jnp.sum(w * ce), (h, e, ids, probs, w, lse, ce)


def _sparse_fwd(h, e, ids, probs, w, temperature, chunk, softcap):
    return _sparse_forward(h, e, ids, probs, w, temperature, chunk, softcap)


def _sparse_bwd(temperature, chunk, softcap, res, g):
    h, e, ids, probs, w, lse, ce = res
    compute = jnp.result_type(h.dtype, e.dtype)
    scale = (g * w).astype(jnp.float32) / temperature
    mass = jnp.sum(probs, axis=1)
    rows = jnp.arange(h.shape[0])[:, None]

    def body(i, carry):
        dh, de = carry
        raw, e_c, start, _, fresh = _chunk_logits(h, e, i, chunk, softcap)
        p = jnp.exp(raw / temperature - lse[:, None])
        owned, col = _owned(ids, i, chunk, start)
        target = jnp.zeros(p.shape, jnp.float32).at[rows, col].add(jnp.where(owned, probs, 0.0))
        dlogits = scale[:, None] * (p * mass[:, None] - target)
        if softcap is not None:
            dlogits = dlogits * (1.0 - jnp.square(raw / softcap))
        dlogits = jnp.where(fresh[None, :], dlogits, 0.0).astype(compute)
        dh = dh + jnp.einsum("TV,VD->TD", dlogits, e_c.astype(compute), preferred_element_type=jnp.float32)
        de_c = jnp.einsum("TV,TD->VD", dlogits, h.astype(compute), preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(de, start, chunk, axis=0)
        de = jax.lax.dynamic_update_slice_in_dim(de, (old.astype(jnp.float32) + de_c).astype(de.dtype), start, 0)
        return dh, de

    dh, de = jax.lax.fori_loop(0, -(-e.shape[0] // chunk), body, (jnp.zeros(h.shape, jnp.float32), jnp.zeros_like(e)))
    return dh.astype(h.dtype), de, None, jnp.zeros_like(probs), (g * ce).astype(w.dtype)


_chunked_sparse_ce.defvjp(_sparse_fwd, _sparse_bwd)
