"""Cross-entropy over the tied embedding head, chunked over the vocabulary.

With Gemma 3's 262,144-entry vocabulary the logits are the largest tensor of a training step
(8 x 512 tokens x 262144 x 4 B = 4.3 GB in f32, and autodiff keeps their softmax as well).
`cross_entropy_sum` never holds [tokens, V] logits: a custom_vjp whose forward loops over vocabulary
chunks keeping a running max / sum of exponentials (an online logsumexp) and the target logit. Peak
memory is O(tokens x chunk_size), not O(tokens x V).

Gradients flow to the hidden states and to the table: full fine-tuning trains the table, LoRA trains
neither but needs d_hidden to reach its adapters. Under differentiation the forward computes the
gradients itself, so that no chunk's logits are computed twice:
- table held constant (LoRA, or any caller that holds it fixed): d_hidden = softmax(logits) @ table -
  table[target] is a softmax-weighted sum that the online logsumexp rescales chunk by chunk, as flash
  attention computes its output; two head-sized products in all (logits, d_hidden).
- table differentiated: tokens in chunks of `TOKEN_BUDGET // V` rows, each chunk's [rows, V] logits held
  once for its exact logsumexp, then d_hidden and d_table accumulated from them vocabulary chunk by chunk;
  three head-sized products (logits, d_hidden, d_table), where a backward that recomputes would run four.
The backward only scales what the forward saved by the loss's cotangent.

    total, count = cross_entropy_sum(hidden, model.embedder.embedding[...], targets, weights)
    loss = cross_entropy(hidden, embedding, targets, weights)        # total / max(count, 1)

Precision: logits are computed with f32 accumulation (preferred_element_type=f32) from inputs of any float
dtype, the logsumexp and the loss are f32. In the backward, dlogits = w * (softmax - onehot) is computed
in f32 and cast to the operands' dtype (bf16 for a bf16 model, as autodiff of a bf16 einsum does) for the
two products, which accumulate in f32; d_hidden is returned in hidden's dtype, d_embedding in the table's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_CHUNK = 16384
TOKEN_BUDGET = 1 << 26  # logits entries of one token chunk when the table is differentiated (256 MiB f32)


def cross_entropy_sum(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, weights: jax.Array, *,
                      chunk_size: int = DEFAULT_CHUNK, softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Weighted cross-entropy of the tied head, summed; never materialises [tokens, V] logits.

    Args:
      hidden: [..., D] final-normed hidden states, any float dtype.
      embedding: [V, D] the tied embedding table (logits = hidden @ embedding.T, f32 accumulation).
      targets: int [...] target ids in [0, V) (positions with weight 0 may hold anything, e.g. -100).
      weights: float [...] per-position weights; 0 excludes a position.
      chunk_size: vocabulary rows per chunk (V need not be a multiple; capped at V).
      softcap: optional final-logit soft-cap: logits -> cap * tanh(logits / cap).

    Returns:
      (sum_t w_t * CE_t, sum_t w_t), both float32 scalars.
    """
    h, e, t, w = _check(hidden, embedding, targets, weights, chunk_size, softcap)
    chunk = min(int(chunk_size), e.shape[0])
    total = _chunked_ce(h, e, t, w, chunk, None if softcap is None else float(softcap))
    return total, jnp.sum(w)


def cross_entropy(hidden, embedding, targets, weights, **kw) -> jax.Array:
    """Weighted mean cross-entropy: cross_entropy_sum(...) total / max(count, 1), f32 scalar."""
    total, count = cross_entropy_sum(hidden, embedding, targets, weights, **kw)
    return total / jnp.maximum(count, 1.0)


def plain_cross_entropy_sum(hidden, embedding, targets, weights, *, chunk_size: int | None = None,
                            softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """The unchunked reference (full [tokens, V] f32 logits + log_softmax, plain autodiff); same signature
    and results as cross_entropy_sum (chunk_size is accepted and ignored). For tests and small vocabularies."""
    h, e, t, w = _check(hidden, embedding, targets, weights, chunk_size or 1, softcap)
    logits = _logits(h, e, softcap)
    logp = jax.nn.log_softmax(logits, axis=-1)
    safe = jnp.clip(t, 0, e.shape[0] - 1)
    ce = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
    return jnp.sum(w * jnp.where(w != 0, ce, 0.0)), jnp.sum(w)


def _logits(h, e, softcap):
    """[T, D] x [C, D] -> f32 logits [T, C], optionally soft-capped."""
    logits = jnp.einsum("TD,VD->TV", h, e, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


def _chunk_rows(i, chunk, v):
    """Vocabulary chunk i: rows [start, start + chunk) with start clamped so the last chunk stays inside the
    table (it then overlaps its predecessor); `fresh` marks the rows this chunk owns."""
    start = jnp.minimum(i * chunk, v - chunk)
    rows = start + jnp.arange(chunk, dtype=jnp.int32)  # [C] vocabulary ids
    return start, rows, rows >= i * chunk  # overlap rows were counted by chunk i - 1


def _chunk_logits(h, e, i, chunk, softcap):
    """Logits of vocabulary chunk i (see _chunk_rows), its table rows, start, ids and `fresh` mask."""
    start, rows, fresh = _chunk_rows(i, chunk, e.shape[0])
    e_c = jax.lax.dynamic_slice_in_dim(e, start, chunk, axis=0)
    return _logits(h, e_c, softcap), e_c, start, rows, fresh


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_ce(h, e, t, w, chunk, softcap):
    return _forward(h, e, t, w, chunk, softcap)[0]


def _forward(h, e, t, w, chunk, softcap, with_dh: bool = False):
    """(total, residuals). with_dh: also the unscaled d_hidden, d CE_t / d h_t [T, D] f32, from
    acc = sum_v exp(l_v - m) (dl_v / d raw_v) e_v rescaled with the running max m, as the output of
    flash attention: d CE_t / d h_t = acc / s - (dl_target / d raw_target) e_target."""
    n_chunks = -(-e.shape[0] // chunk)
    tokens = h.shape[0]
    compute = jnp.result_type(h.dtype, e.dtype)
    ragged = e.shape[0] % chunk != 0  # the last chunk overlaps its predecessor: mask the rows it repeats

    def body(i, carry):
        m, s, acc = carry
        logits, e_c, _, _, fresh = _chunk_logits(h, e, i, chunk, softcap)
        if ragged:
            logits = jnp.where(fresh[None, :], logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        p = jnp.exp(logits - m_new[:, None])
        rescale = jnp.exp(m - m_new)
        s = s * rescale + jnp.sum(p, axis=1)
        if with_dh:
            if softcap is not None:  # d(cap * tanh(x / cap)) / dx = 1 - tanh^2; 0 * (-inf) rows have p = 0
                p = p * (1.0 - jnp.square((jnp.where(fresh[None, :], logits, 0.0) if ragged else logits) / softcap))
            acc = acc * rescale[:, None] + jnp.einsum(
                "TV,VD->TD", p.astype(compute), e_c.astype(compute), preferred_element_type=jnp.float32)
        return m_new, s, acc

    init = (jnp.full((tokens,), -jnp.inf, jnp.float32), jnp.zeros((tokens,), jnp.float32),
            jnp.zeros(h.shape if with_dh else (0,), jnp.float32))
    m, s, acc = jax.lax.fori_loop(0, n_chunks, body, init)
    lse = m + jnp.log(s)
    # the target's logit from its table row: one [T, D] gather, not a masked pass over every chunk
    target_row = jnp.take(e, jnp.clip(t, 0, e.shape[0] - 1), axis=0)
    tgt = jnp.einsum("TD,TD->T", h.astype(compute), target_row.astype(compute), preferred_element_type=jnp.float32)
    if softcap is not None:
        tgt = softcap * jnp.tanh(tgt / softcap)
    ce = jnp.where(w != 0, lse - tgt, 0.0)  # excluded positions (any target) contribute exactly 0
    dh = None
    if with_dh:
        target_row = target_row.astype(jnp.float32)
        cap_grad = 1.0 if softcap is None else (1.0 - jnp.square(tgt / softcap))[:, None]
        dh = acc / s[:, None] - cap_grad * target_row
    return jnp.sum(w * ce), (ce, dh)


def _forward_trained(h, e, t, w, chunk, softcap):
    """(total, residuals) with the table differentiated: the w-weighted d total / d h [T, D] and d total / d e
    [V, D] (f32), computed token chunk by token chunk from each chunk's [rows, V] logits, held once."""
    tokens, v = h.shape[0], e.shape[0]
    rows = max(1, min(tokens, TOKEN_BUDGET // v))
    n_tokens, n_vocab = -(-tokens // rows), -(-v // chunk)
    pad = n_tokens * rows - tokens  # padding rows have weight 0: no loss, no gradient
    hp, tp, wp = jnp.pad(h, ((0, pad), (0, 0))), jnp.pad(t, (0, pad)), jnp.pad(w, (0, pad))
    compute = jnp.result_type(h.dtype, e.dtype)

    def token_chunk(i, carry):
        ces, dh, de = carry
        h_c, t_c, w_c = (jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=0) for x in (hp, tp, wp))
        logits = _logits(h_c, e, softcap)  # [rows, V] f32
        m = jnp.max(logits, axis=1)
        lse = m + jnp.log(jnp.sum(jnp.exp(logits - m[:, None]), axis=1))
        tgt = jnp.take_along_axis(logits, jnp.clip(t_c, 0, v - 1)[:, None], axis=1)[:, 0]
        ce = jnp.where(w_c != 0, lse - tgt, 0.0)

        def vocab_chunk(j, carry):
            dh_c, de = carry
            start, ids, fresh = _chunk_rows(j, chunk, v)
            l_j = jax.lax.dynamic_slice_in_dim(logits, start, chunk, axis=1)
            dlogits = w_c[:, None] * (jnp.exp(l_j - lse[:, None]) - (ids[None, :] == t_c[:, None]))
            if softcap is not None:  # d(cap * tanh(x / cap)) / dx = 1 - tanh^2
                dlogits = dlogits * (1.0 - jnp.square(l_j / softcap))
            if v % chunk:  # the last chunk overlaps its predecessor
                dlogits = jnp.where(fresh[None, :], dlogits, 0.0)
            dlogits = dlogits.astype(compute)
            e_j = jax.lax.dynamic_slice_in_dim(e, start, chunk, axis=0)
            dh_c = dh_c + jnp.einsum("TV,VD->TD", dlogits, e_j.astype(compute), preferred_element_type=jnp.float32)
            # overlap rows of the last chunk get + 0 on what chunk j - 1 wrote
            old = jax.lax.dynamic_slice_in_dim(de, start, chunk, axis=0)
            de = jax.lax.dynamic_update_slice_in_dim(de, old + jnp.einsum(
                "TV,TD->VD", dlogits, h_c.astype(compute), preferred_element_type=jnp.float32), start, 0)
            return dh_c, de

        dh_c, de = jax.lax.fori_loop(0, n_vocab, vocab_chunk, (jnp.zeros(h_c.shape, jnp.float32), de))
        return (jax.lax.dynamic_update_slice_in_dim(ces, ce, i * rows, 0),
                jax.lax.dynamic_update_slice_in_dim(dh, dh_c, i * rows, 0), de)

    init = (jnp.zeros((n_tokens * rows,), jnp.float32), jnp.zeros(hp.shape, jnp.float32),
            jnp.zeros(e.shape, jnp.float32))
    ces, dh, de = jax.lax.fori_loop(0, n_tokens, token_chunk, init)
    ce = ces[:tokens]
    return jnp.sum(w * ce), (ce, dh[:tokens], de)


def _fwd(h, e, t, w, chunk, softcap):
    # symbolic zeros: `perturbed` says whether the table is differentiated
    trained, (h, e, t, w) = e.perturbed, (x.value for x in (h, e, t, w))
    if trained:
        total, (ce, dh, de) = _forward_trained(h, e, t, w, chunk, softcap)
    else:
        (total, (ce, dh)), de = _forward(h, e, t, w, chunk, softcap, with_dh=True), None
    return total, (h, e, w, ce, dh, de)


def _bwd(chunk, softcap, res, g):
    h, e, w, ce, dh, de = res
    dw = (g * ce).astype(w.dtype)
    if de is not None:  # the table differentiated: dh and de already carry the weights
        return (g * dh).astype(h.dtype), (g * de).astype(e.dtype), None, dw
    scale = (g * w).astype(jnp.float32)  # [T]: d total / d CE_t
    return (scale[:, None] * dh).astype(h.dtype), None, None, dw


_chunked_ce.defvjp(_fwd, _bwd, symbolic_zeros=True)


def _check(hidden, embedding, targets, weights, chunk_size, softcap):
    """Validates and flattens: -> hidden [T, D], embedding [V, D], targets int32 [T], weights f32 [T]."""
    for name, x in (("hidden", hidden), ("embedding", embedding), ("targets", targets), ("weights", weights)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if embedding.ndim != 2:
        raise ValueError(f"embedding must be the [V, D] table, got shape {tuple(embedding.shape)}")
    if hidden.ndim < 1 or hidden.shape[-1] != embedding.shape[1]:
        raise ValueError(f"hidden must be [..., D] with D = {embedding.shape[1]} (the table's width), "
                         f"got shape {tuple(hidden.shape)}")
    if not jnp.issubdtype(hidden.dtype, jnp.floating) or not jnp.issubdtype(embedding.dtype, jnp.floating):
        raise TypeError(f"hidden and embedding must be float, got {hidden.dtype} and {embedding.dtype}")
    lead = tuple(hidden.shape[:-1])
    if tuple(targets.shape) != lead or tuple(weights.shape) != lead:
        raise ValueError(f"targets and weights must have hidden's leading shape {lead}, got "
                         f"{tuple(targets.shape)} and {tuple(weights.shape)}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer ids, got dtype {targets.dtype}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of vocabulary rows, got {chunk_size}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap}")
    value = _concrete(targets), _concrete(weights)
    if value[0] is not None and value[1] is not None:
        used = value[0][value[1] != 0]
        if used.size and (used.min() < 0 or used.max() >= embedding.shape[0]):
            bad = used.min() if used.min() < 0 else used.max()
            raise ValueError(f"target id {int(bad)} at a position with nonzero weight is outside the "
                             f"vocabulary [0, {embedding.shape[0]}); give such positions weight 0")
    t = hidden.reshape(-1, hidden.shape[-1]) if hidden.ndim != 2 else hidden
    return (t, embedding, jnp.asarray(targets).reshape(-1).astype(jnp.int32),
            jnp.asarray(weights).reshape(-1).astype(jnp.float32))


def _concrete(x) -> np.ndarray | None:
    """The value of x as numpy, or None when x is abstract (inside a trace)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
