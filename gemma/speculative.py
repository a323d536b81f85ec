"""Speculative decoding, the whole draft-verify loop one jitted `lax.while_loop` on device. draft="lookup"
(the default): n-grams copied from the context, checked by the target in one extend over the compact cache.

Each pass feeds [last, d1 .. dm] (last: the newest token, not yet in the cache; d: the draft, m <= k,
the chunk right-padded to k + 1 with position -1, which writes nothing) in one chunk, so the target's
weights are read once for up to k + 1 tokens. k depends on the length of the recurring n-gram (a longer
match drafts more), since a pass's products cost more with each row they carry. Greedy: the longest draft prefix equal to the target's
argmaxes is kept, plus the target's own next token, so the ids are the target's alone. Sampled: each
draft token d_i is kept with probability p_i(d_i) (the draft is a point mass), and the first rejected
one is replaced by a draw from p_i without d_i, renormalized; a fully kept draft adds a draw from p_m.
That is rejection sampling (Leviathan et al. 2023; Chen et al. 2023): every emitted token is
distributed as the target's. Ring slots the rejected tokens overwrote are restored
(gemma.cache.ring_snapshot / rollback); the cache length is cut back to the kept tokens. Drafts are
looked up on device over the token history (prompt + generated), so a pass costs no host round trip.

draft="vocab" is self-speculative (a draft head over a sub-vocabulary on the same body): a round runs the
body k times one token at a time, exactly as plain decode does, each step's final hidden state drafting the
next input as the likeliest token among a fixed sub-vocabulary and the context's tokens (a small product);
the full head then reads its table once for all k hidden states. The hidden states are plain decode's
(the same one-token steps, and the quantized and dense kernels give each row the same bits whatever rows
share a pass), so the kept tokens are the target's own choices by construction, not within a tolerance;
what the body computed after the first rejected draft is rolled back as above.

draft="hybrid" runs vocab rounds except after a recurring 3-gram, where the tokens that followed it are
checked in one lookup pass: a copied span costs one pass of the body instead of one step per token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma.cache import ring_snapshot, rollback
from gemma.config import VOCAB_SIZE
from gemma.sampler import SamplingParams, _bucket, _nucleus, greedy_rows
from kernels.dense import dense


# The defaults (Sampler.generate_speculative's too): draft 3 tokens after a recurring 3-gram, 1 after a 2- or
# 1-gram; a longer match predicts more of what follows, and a pass's cost grows with its rows.
DRAFT_LEN, MAX_NGRAM, MIN_NGRAM = (3, 1, 1), 3, 1
# draft="vocab": body steps a round, the sub-vocabulary (the first that many ids), context tokens also drafted from
VOCAB_DRAFT_LEN, VOCAB, CONTEXT = 3, 8192, 2048
# draft="hybrid": tokens looked up after a recurring max_ngram-gram, checked in one pass instead of a vocab round
HYBRID_LOOKUP = 3
DRAFTS = ("lookup", "vocab", "hybrid")


def lookup(history: jax.Array, count: jax.Array, draft_len: int, max_ngram: int = 3,
           min_ngram: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Traceable prompt lookup over `history` int [L] of which the first `count` tokens are the context:
    (draft [draft_len], m, n) where draft[:m] are the tokens that followed the latest earlier occurrence of
    the context's last n-gram, longest n first (max_ngram down to min_ngram); m = n = 0 when none recurs.
    L must be >= count + draft_len (the draft is sliced from the buffer)."""
    j = jnp.arange(history.shape[0])
    start, matched = jnp.int32(-1), jnp.int32(0)
    for n in range(max_ngram, min_ngram - 1, -1):  # a window starting at j ends before the last token
        tail = jax.lax.dynamic_slice(history, (jnp.maximum(count - n, 0),), (n,))
        hit = (j + n <= count - 1) & (count - 1 >= n)
        for i in range(n):
            hit &= jnp.roll(history, -i) == tail[i]
        latest = jnp.max(jnp.where(hit, j, -1))
        first = (start < 0) & (latest >= 0)
        start = jnp.where(first, latest + n, start).astype(jnp.int32)
        matched = jnp.where(first, n, matched).astype(jnp.int32)
    draft = jax.lax.dynamic_slice(history, (jnp.maximum(start, 0),), (draft_len,))
    return draft, jnp.where(start >= 0, jnp.minimum(draft_len, count - start), 0).astype(jnp.int32), matched


def prompt_lookup(context: Sequence[int], draft_len: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """`lookup` on a host list: the draft tokens (up to `draft_len`; [] when no n-gram recurs)."""
    history = jnp.asarray(list(context) + [0] * draft_len, jnp.int32)
    draft, m, _ = _lookup(history, jnp.int32(len(context)), draft_len, max_ngram, min_ngram)
    return np.asarray(draft)[:int(m)].tolist()


_lookup = jax.jit(lookup, static_argnums=(2, 3, 4))


def target_probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """float32 probabilities [T, V] the Sampler draws from (temperature, top-k, top-p; ids >= 262144 never)."""
    logits = logits[:, :VOCAB_SIZE] / params.temperature
    if params.top_k is not None or params.top_p is not None:  # the candidates sample_logits draws from
        if params.top_k is not None:
            values, order = jax.lax.top_k(logits, min(params.top_k, logits.shape[-1]))
        else:
            order = jnp.argsort(-logits, axis=-1)
            values = jnp.take_along_axis(logits, order, axis=-1)
        if params.top_p is not None:
            values = _nucleus(values, params.top_p)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(values)
    return jax.nn.softmax(logits, axis=-1)


def accept(probs: jax.Array, draft: jax.Array, key: jax.Array, m: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Rejection sampling of a point-mass draft [k] (its first `m` tokens real, default all) against target
    probs [k + 1, V]: returns (the number of draft tokens kept, the next token: the replacement of the
    first rejected one or a draw from p_m)."""
    k = draft.shape[0]
    m = k if m is None else m
    u_key, draw_key = jax.random.split(key)
    p_draft = jnp.take_along_axis(probs[:k], draft[:, None], axis=1)[:, 0]
    kept = (jax.random.uniform(u_key, (k,)) < p_draft) & (jnp.arange(k) < m)
    n = jnp.argmin(jnp.concatenate([kept, jnp.zeros((1,), bool)])).astype(jnp.int32)  # first rejection (or m)
    p = probs[n]
    rejected = jnp.where(n < m, jnp.concatenate([draft, jnp.zeros((1,), draft.dtype)])[n], -1)
    residual = jnp.where(jnp.arange(p.shape[0]) == rejected, 0.0, p)
    return n, jax.random.categorical(draw_key, jnp.log(residual)).astype(jnp.int32)


def choose(logits: jax.Array, draft: jax.Array, m: jax.Array, key: jax.Array,
           params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """(draft tokens kept, next token) from verify logits [k + 1, V] of a draft [k] whose first m are real."""
    if params.greedy:
        target = greedy_rows(logits)
        same = (target[:-1] == draft) & (jnp.arange(draft.shape[0]) < m)
        n = jnp.argmin(jnp.concatenate([same, jnp.zeros((1,), bool)])).astype(jnp.int32)
        return n, target[n]
    return accept(target_probs(logits, params), draft, key, m)


@dataclasses.dataclass
class SpeculativeStats:
    steps: int = 0  # target passes after the prefill (verify passes and plain steps)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _rounds(logits, cache, history, count, key, params, stop_ids, max_new, round_fn):
    """Draft-verify rounds until a stop id or `max_new` tokens: returns (history with the generated tokens
    after the prompt's `count`, the number generated (a final stop id included), [rounds, drafted, accepted]).
    round_fn(cache, history, count, key) -> (cache, history, draft [w], n kept, next token, m drafted) checks a
    draft after history[count - 1], the newest token (not yet in the cache)."""
    prompt_len = count
    key, sub = jax.random.split(key)
    first = choose(logits, jnp.zeros((0,), jnp.int32), jnp.int32(0), sub, params)[1]
    history = history.at[count].set(first)
    init = (cache, history, count + 1, key, jnp.isin(first, stop_ids), jnp.zeros((3,), jnp.int32))

    def cond(carry):
        _, _, count, _, stopped, _ = carry
        return ~stopped & (count - prompt_len < max_new)

    def body(carry):
        cache, history, count, key, _, stats = carry
        key, sub = jax.random.split(key)
        cache, history, draft, n, nxt, m = round_fn(cache, history, count, sub)
        offsets = jnp.arange(draft.shape[0] + 1, dtype=jnp.int32)
        new = jnp.where(offsets < n, jnp.concatenate([draft, nxt[None]]), nxt)  # draft[:n] + [nxt], padded
        stop = (offsets <= n) & jnp.isin(new, stop_ids)
        emitted = jnp.minimum(jnp.where(stop.any(), jnp.argmax(stop) + 1, n + 1), max_new - (count - prompt_len))
        history = jax.lax.dynamic_update_slice(history, new, (count,))
        stopped = jnp.any(stop & (offsets < emitted))
        return cache, history, count + emitted, key, stopped, stats + jnp.stack([1, m, n])

    _, history, count, _, _, stats = jax.lax.while_loop(cond, body, init)
    return history, count - prompt_len, stats


def _lookup_pass(model, cache, history, start, draft, m, key, params):
    """The target over [history[start], draft[:m]] in one pass of len(draft) + 1 rows (the rest padding):
    (cache rolled back to the kept tokens, n kept, the next token)."""
    length = draft.shape[0]
    offsets = jnp.arange(length + 1, dtype=jnp.int32)
    positions = jnp.where(offsets <= m, start + offsets, -1)[None]
    tokens = jnp.concatenate([history[start][None], draft])[None]
    snapshot = ring_snapshot(cache, positions)
    logits, cache = model.extend(jnp.where(positions >= 0, tokens, 0), positions, cache, last_only=False)
    n, nxt = choose(logits[0], draft, m, key, params)
    return rollback(cache, snapshot, positions, (start + 1 + n)[None]), n, nxt


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10))
def _loop(model_key, leaves, cache, logits, history, count, key, params, draft_lens, max_ngram, min_ngram, stop_ids,
          max_new):
    """`_rounds` of prompt lookup: draft_lens[i] tokens drafted after a recurring n-gram of n = max_ngram - i;
    each distinct length is a pass of its own row count (one branch each), no recurring n-gram a plain step."""
    model = model_key.merge(leaves)
    k = max(draft_lens)
    lengths = sorted(set(draft_lens))
    branch_of_n = jnp.asarray([0] * min_ngram + [1 + lengths.index(draft_lens[max_ngram - n])
                                                 for n in range(min_ngram, max_ngram + 1)], jnp.int32)

    def round_fn(cache, history, count, key):
        draft, m, matched = lookup(history, count, k, max_ngram, min_ngram)
        start = count - 1

        def verify(length, cache):  # a pass of length + 1 rows over [newest, draft[:length]]
            m_ = jnp.minimum(m, length)
            return *_lookup_pass(model, cache, history, start, draft[:length], m_, key, params), m_

        def step(cache):  # no draft: a plain one-token decode step
            logits, cache = model.extend(history[start][None, None], start[None, None], cache)
            return cache, jnp.int32(0), choose(logits[0], draft[:0], jnp.int32(0), key, params)[1], jnp.int32(0)

        branches = [step] + [functools.partial(verify, length) for length in lengths]
        cache, n, nxt, m = jax.lax.switch(branch_of_n[matched], branches, cache)  # matched 0: no draft
        return cache, history, draft, n, nxt, m

    return _rounds(logits, cache, history, count, key, params, stop_ids, max_new, round_fn)


def _vocab_draft(model, table, vocab_ids, h, history, upto, context: int):
    """The draft after final-normed hidden h [1, 1, D]: the likeliest token of the sub-vocabulary head
    (`table`: the head's rows `vocab_ids` [N]) and of the last `context` tokens of history[:upto]."""
    static = dense("BTD,VD->BTV", h, table, preferred_element_type=jnp.float32)[0, 0]
    lo = jnp.maximum(upto - context, 0)
    ids = jax.lax.dynamic_slice(history, (lo,), (context,))
    seen = dense("BTD,VD->BTV", h, model.embedder.rows(ids), preferred_element_type=jnp.float32)[0, 0]
    seen = jnp.where(lo + jnp.arange(context) < upto, seen, -jnp.inf)
    i, j = jnp.argmax(static), jnp.argmax(seen)
    return jnp.where(static[i] >= seen[j], vocab_ids[i], ids[j]).astype(jnp.int32)


def _vocab_round(model, table, vocab_ids, context: int, k: int, cache, history, count, key, params):
    """k one-token steps of the body from history[count - 1], each drafting the next input from the
    sub-vocabulary head, then the full head over the k hidden states in one pass; the draft prefix the
    target's choice confirms is kept (the body's later steps rolled back). Returns what a round_fn does."""
    start = count - 1
    positions = (start + jnp.arange(k, dtype=jnp.int32))[None]
    snapshot = ring_snapshot(cache, positions)

    def row(j, carry):  # the body on history[start + j]; its draft becomes history[start + j + 1]
        cache, history, hidden = carry
        h, cache = model.extend(history[start + j][None, None], (start + j)[None, None], cache, return_hidden=True)
        draft = jax.lax.cond(j < k - 1, lambda: _vocab_draft(model, table, vocab_ids, h, history, start + j + 1,
                                                              context), lambda: jnp.int32(0))
        return cache, history.at[start + j + 1].set(draft), hidden.at[j].set(h[0, 0])

    hidden = jnp.zeros((k, model.config.d_model), model.dtype)
    cache, history, hidden = jax.lax.fori_loop(0, k, row, (cache, history, hidden))
    draft = jax.lax.dynamic_slice(history, (count,), (k - 1,))
    n, nxt = choose(model.logits(hidden[None])[0], draft, jnp.int32(k - 1), key, params)
    return rollback(cache, snapshot, positions, (start + 1 + n)[None]), history, draft, n, nxt, jnp.int32(k - 1)


@functools.partial(jax.jit, static_argnums=(0, 8, 9, 10, 11, 12))
def _vocab_loop(model_key, leaves, table, vocab_ids, cache, logits, history, key, params, k, context, shortcut,
                max_ngram, count, stop_ids, max_new):
    """`_rounds` of self-speculation (_vocab_round); with `shortcut` L > 0, a round after a recurring
    max_ngram-gram is a lookup pass of the L tokens that followed it instead ("hybrid")."""
    model = model_key.merge(leaves)
    width = max(k - 1, shortcut)

    def pad(draft):
        return jnp.zeros((width,), jnp.int32).at[:draft.shape[0]].set(draft)

    def vocab_round(cache, history, count, key):
        cache, history, draft, n, nxt, m = _vocab_round(model, table, vocab_ids, context, k, cache, history, count,
                                                        key, params)
        return cache, history, pad(draft), n, nxt, m

    if not shortcut:
        return _rounds(logits, cache, history, count, key, params, stop_ids, max_new, vocab_round)

    def round_fn(cache, history, count, key):
        draft, m, matched = lookup(history, count, shortcut, max_ngram, max_ngram)

        def look(cache):
            cache, n, nxt = _lookup_pass(model, cache, history, count - 1, draft, m, key, params)
            return cache, history, pad(draft), n, nxt, m

        return jax.lax.cond(matched > 0, look, lambda cache: vocab_round(cache, history, count, key), cache)

    return _rounds(logits, cache, history, count, key, params, stop_ids, max_new, round_fn)


def draft_lengths(draft_len, max_ngram: int, min_ngram: int, window: int) -> tuple[int, ...]:
    """draft_len (an int for every n-gram length, or one int per n from max_ngram down to min_ngram) as
    that tuple, checked."""
    if not (isinstance(max_ngram, int) and isinstance(min_ngram, int) and 1 <= min_ngram <= max_ngram):
        raise ValueError(f"n-gram sizes must be ints with 1 <= min_ngram <= max_ngram, got {min_ngram!r}, {max_ngram!r}")
    count = max_ngram - min_ngram + 1
    lens = (draft_len,) * count if isinstance(draft_len, int) else tuple(draft_len) if isinstance(
        draft_len, (tuple, list)) else None
    if lens is None or len(lens) != count or not all(isinstance(d, int) and 1 <= d < window for d in lens):
        raise ValueError(f"draft_len must be an int in [1, {window}) or {count} such ints (one per n-gram length "
                         f"{max_ngram}..{min_ngram}), got {draft_len!r}")
    return lens


def generate(sampler, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             draft_len: int | Sequence[int] | None = None, max_ngram: int = MAX_NGRAM,
             min_ngram: int = MIN_NGRAM, draft: str = "lookup",
             vocab: int | Sequence[int] = VOCAB) -> tuple[list[int], SpeculativeStats]:
    """Continues one prompt with speculative decoding on `sampler`'s model and cache layout; returns the
    generated ids (stop id excluded, as Sampler.generate) and the draft statistics.

    draft="lookup": drafts come from the longest recurring n-gram, max_ngram down to min_ngram: `draft_len`
    tokens of what followed it (an int, or one int per n-gram length, longest first; default DRAFT_LEN); a
    pass with none is a plain one-token step. draft="vocab": self-speculative, each round `draft_len`
    (default VOCAB_DRAFT_LEN) one-token steps of the body, each fed the likeliest token of a sub-vocabulary
    head (`vocab`: the first that many ids, or the ids themselves, plus the last CONTEXT tokens of the
    context), then the full head over those steps' hidden states in one pass. draft="hybrid": vocab rounds,
    but after a recurring max_ngram-gram a lookup pass of the HYBRID_LOOKUP tokens that followed it."""
    if draft not in DRAFTS:
        raise ValueError(f"draft must be one of {', '.join(map(repr, DRAFTS))}, got {draft!r}")
    params = SamplingParams(temperature, top_k, top_p)
    window = sampler.config.sliding_window
    shortcut = HYBRID_LOOKUP if draft == "hybrid" else 0
    if draft == "lookup":
        lens = draft_lengths(DRAFT_LEN if draft_len is None else draft_len, max_ngram, min_ngram, window)
    else:
        k = VOCAB_DRAFT_LEN if draft_len is None else draft_len
        if not (isinstance(k, int) and 1 <= k < window):
            raise ValueError(f"draft={draft!r} takes draft_len as one int in [1, {window}), got {draft_len!r}")
        if not (isinstance(max_ngram, int) and max_ngram >= 1):
            raise ValueError(f"max_ngram must be an int >= 1, got {max_ngram!r}")
        lens = (k, shortcut + 1)
        vocab_ids = vocab_ids_of(vocab, min(sampler.config.vocab_size, VOCAB_SIZE))
    k = max(lens)
    row = sampler.encode_prompt(prompt)
    sampler._check_room([len(row)], max_new_tokens)
    room = _bucket(len(row), sampler.prefill_chunk) + _bucket(max_new_tokens + k + 1, 1 << 30)
    cache = sampler.new_cache(1, min(sampler.max_len, room))  # bucketed as Sampler.generate: few shapes
    logits, cache = sampler.prefill([row], cache)
    history = np.zeros(room + k + 1, np.int32)  # the prompt, then what is generated
    history[:len(row)] = row
    stop_ids = jnp.asarray(sampler.stop_ids, jnp.int32)
    if draft == "lookup":
        history, n, stats = _loop(sampler._model_key, sampler._leaves, cache, logits, jnp.asarray(history),
                                  jnp.int32(len(row)), jax.random.key(seed), params, lens, max_ngram, min_ngram,
                                  stop_ids, jnp.int32(max_new_tokens))
    else:
        table = _vocab_table(sampler._model_key, sampler._leaves, vocab_ids)
        history, n, stats = _vocab_loop(sampler._model_key, sampler._leaves, table, vocab_ids, cache, logits,
                                        jnp.asarray(history), jax.random.key(seed), params, lens[0],
                                        min(CONTEXT, len(history)), shortcut, max_ngram, jnp.int32(len(row)),
                                        stop_ids, jnp.int32(max_new_tokens))
    out = np.asarray(history)[len(row):len(row) + int(n)].tolist()
    if out and out[-1] in sampler.stop_ids:
        out.pop()
    steps, drafted, accepted = (int(x) for x in np.asarray(stats))
    return out, SpeculativeStats(steps, drafted, accepted)


def vocab_ids_of(vocab: int | Sequence[int], vocab_size: int) -> jax.Array:
    """The sub-vocabulary of draft="vocab" as int32 ids: an int n is the first min(n, vocab_size) ids
    (SentencePiece BPE numbers pieces in merge order, so the early ids are the frequent pieces), or the ids
    given, each in [0, vocab_size)."""
    if isinstance(vocab, (int, np.integer)) and not isinstance(vocab, bool):
        if vocab < 1:
            raise ValueError(f"vocab must be a positive number of ids or a list of ids, got {vocab}")
        return jnp.arange(min(int(vocab), vocab_size), dtype=jnp.int32)
    ids = np.asarray(vocab)
    if (ids.ndim != 1 or not len(ids) or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0
            or ids.max() >= vocab_size):
        raise ValueError(f"vocab must be a positive int or a non-empty list of token ids in [0, {vocab_size}), "
                         f"got {str(vocab)[:80]}")
    return jnp.asarray(ids, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _vocab_table(model_key, leaves, ids):
    return model_key.merge(leaves).embedder.rows(ids)
