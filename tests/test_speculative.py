"""Speculative decoding (gemma/speculative.py): prompt-lookup drafts, ring rollback, greedy identity with the
target alone, rejection sampling distributed as the target (chi-square)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from conftest import FIXTURES
from gemma import config as C
from gemma import speculative
from gemma.cache import init_cache, ring_snapshot, rollback
from gemma.sampler import Sampler, SamplingParams
from gemma.transformer import Transformer


def test_prompt_lookup_copies_what_followed_the_latest_ngram():
    assert speculative.prompt_lookup([5, 6, 7, 8, 9, 5, 6, 7], 3) == [8, 9, 5]
    assert speculative.prompt_lookup([1, 2, 3, 1, 2, 4, 1, 2], 2) == [4, 1]  # the latest occurrence
    assert speculative.prompt_lookup([1, 2, 3, 9, 3], 4) == [9, 3]  # a 1-gram when no longer one recurs
    assert speculative.prompt_lookup([1, 2, 3, 4], 4) == []
    assert speculative.prompt_lookup([7], 4) == []


def test_lookup_reports_the_matched_ngram_length():
    for context, n in [([5, 6, 7, 8, 9, 5, 6, 7], 3), ([1, 2, 4, 1, 2], 2), ([1, 2, 3, 9, 3], 1), ([1, 2, 3, 4], 0)]:
        history = jnp.asarray(context + [0] * 4, jnp.int32)
        assert int(speculative.lookup(history, jnp.int32(len(context)), 4, 3, 1)[2]) == n, context


@pytest.mark.parametrize("draft_len, match", [
    ((4, 2), r"draft_len must be an int in \[1, 8\) or 3 such ints \(one per n-gram length 3..1\), got \(4, 2\)"),
    ((4, 2, 0), "got \\(4, 2, 0\\)"), (8, "got 8"), ("4", "got '4'"), ((4, 2.0, 1), "got")])
def test_bad_draft_lengths_are_named(tiny, tokenizer_270m, draft_len, match):
    s = Sampler(tiny, tokenizer_270m, max_len=128, prefill_chunk=16)
    with pytest.raises(ValueError, match=match):
        speculative.generate(s, [2, 5, 6, 5, 6], max_new_tokens=4, draft_len=draft_len)
    with pytest.raises(ValueError, match="n-gram sizes"):
        speculative.generate(s, [2, 5, 6, 5, 6], max_new_tokens=4, min_ngram=2, max_ngram=1)


@pytest.fixture(scope="module")
def tiny():
    """Random 7-layer model (W = 8) with the real vocabulary and randomized norms (as test_sampler)."""
    model = Transformer(C.tiny(vocab_size=C.VOCAB_SIZE), rngs=nnx.Rngs(0))
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.Param) and var[...].ndim == 1:
            var[...] = 0.3 * jax.random.normal(jax.random.key(i), var[...].shape)
    return model


def test_rollback_restores_the_ring(tiny):
    """Writing 4 tokens then cutting back to 1 leaves the cache as writing that 1 token alone did."""
    cache = init_cache(tiny.config, 1, 64, jnp.float32)
    _, cache = tiny.extend(jnp.arange(3, 14)[None], jnp.arange(11)[None], cache)
    _, one = tiny.extend(jnp.asarray([[20]]), jnp.asarray([[11]]), jax.tree.map(jnp.copy, cache))
    positions = jnp.arange(11, 15)[None]
    snapshot = ring_snapshot(cache, positions)
    _, four = tiny.extend(jnp.asarray([[20, 21, 22, 23]]), positions, cache)
    back = rollback(four, snapshot, positions, jnp.asarray([12]))
    assert any(c.ring for c in back.layers) and int(back.length[0]) == 12
    for a, b in zip(back.layers, one.layers):  # linear layers: the slots below the length (the rest is unread)
        keep = slice(None) if a.ring else slice(0, 12)
        np.testing.assert_allclose(np.asarray(a.k[:, keep]), np.asarray(b.k[:, keep]), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(a.v[:, keep]), np.asarray(b.v[:, keep]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.int8])
def test_greedy_equals_the_target_alone_tiny(tiny, tokenizer_270m, cache_dtype):
    """48 tokens through a ring of 8 with drafts kept and rejected: the target's greedy ids exactly."""
    s = Sampler(tiny, tokenizer_270m, max_len=128, prefill_chunk=16, cache_dtype=cache_dtype)
    prompt = np.random.default_rng(3).integers(3, 64, size=12).tolist() * 2
    want = s.generate(prompt, max_new_tokens=48).tokens
    for draft_len in (4, (5, 2, 1), (1, 3, 2)):  # one pass shape, or one per matched n-gram length
        got, st = speculative.generate(s, prompt, max_new_tokens=48, draft_len=draft_len)
        assert got == want, draft_len
        assert st.drafted > st.accepted > 0 and st.steps < len(got)  # some drafts kept, some rolled back
    assert s.generate_speculative(prompt, max_new_tokens=48).tokens == want


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.int8])
def test_vocab_drafts_greedy_equal_the_target_alone_tiny(tiny, tokenizer_270m, cache_dtype):
    """Self-speculative rounds (the body drafting from a sub-vocabulary head) through a ring of 8: the target's
    greedy ids exactly, with drafts kept and rolled back, for a sub-vocabulary given as a size or as ids."""
    s = Sampler(tiny, tokenizer_270m, max_len=128, prefill_chunk=16, cache_dtype=cache_dtype)
    prompt = np.random.default_rng(3).integers(3, 64, size=12).tolist() * 2
    want = s.generate(prompt, max_new_tokens=48).tokens
    for draft_len, vocab in ((3, 64), (5, 4096), (2, list(range(100, 300)))):
        got, st = speculative.generate(s, prompt, max_new_tokens=48, draft="vocab", draft_len=draft_len, vocab=vocab)
        assert got == want, (draft_len, vocab)
        assert st.drafted > st.accepted > 0 and st.steps < len(got), (draft_len, vocab)
        assert st.drafted == (draft_len - 1) * st.steps
    got, st = speculative.generate(s, prompt, max_new_tokens=48, draft="vocab", draft_len=1, vocab=8)
    assert got == want and (st.steps, st.drafted) == (len(want) - 1, 0)  # one body step a round: plain decode
    got, st = speculative.generate(s, prompt, max_new_tokens=48, draft="hybrid", vocab=64)
    assert got == want and st.drafted > st.accepted > 0
    assert st.drafted != 2 * st.steps  # some rounds were lookup passes (up to 3 drafted; a vocab round drafts 2)
    assert s.generate_speculative(prompt, max_new_tokens=48, draft="hybrid").tokens == want
    assert s.generate_speculative(prompt, max_new_tokens=48, draft="vocab").tokens == want
    stop = s.generate(prompt, max_new_tokens=48, stop=[tokenizer_270m.decode(want[5:7])])
    assert s.generate_speculative(prompt, max_new_tokens=48, draft="vocab", stop=[tokenizer_270m.decode(want[5:7])]) == stop


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_head_gives_each_row_the_bits_of_a_one_row_pass(tiny, dtype):
    """What makes draft="vocab" exact: a plain step's logits are the head of its returned hidden state, and the
    head over k hidden states gives each the bits a one-row pass gives it (the CPU kernels read one weight row
    per tile whatever rows share the pass)."""
    model = tiny if dtype == jnp.float32 else nnx.merge(*jax.tree.map(
        lambda a: a.astype(dtype) if a.dtype == jnp.float32 else a, nnx.split(tiny)))
    cache = init_cache(model.config, 1, 32, jnp.float32)
    _, cache = model.extend(jnp.arange(3, 13)[None], jnp.arange(10)[None], cache)
    step = jax.jit(lambda c, hidden: model.extend(jnp.asarray([[40]]), jnp.asarray([[10]]), c, return_hidden=hidden)[0],
                   static_argnums=1)
    h = step(cache, True)
    np.testing.assert_array_equal(np.asarray(jax.jit(model.logits)(h)), np.asarray(step(cache, False)))
    hidden = jnp.concatenate([h, 0.5 * h, h[..., ::-1], -h], axis=1)  # [1, 4, D]
    rows = jax.jit(model.logits)(hidden)
    for j in range(4):
        np.testing.assert_array_equal(np.asarray(rows[:, j]), np.asarray(jax.jit(model.logits)(hidden[:, j:j + 1])[:, 0]))


def test_vocab_drafts_sample_as_the_target(tiny, tokenizer_270m):
    """Sampled self-speculative rounds (temperature 1, top-k 3, the sub-vocabulary the tokens the target can
    pick, so drafts are often kept): the second token, the first drafted one, over 2000 keys is distributed
    as the target's sum over first tokens p(t1) p(t2 | t1), by chi-square."""
    s = Sampler(tiny, tokenizer_270m, max_len=64, prefill_chunk=16)
    prompt = [2, 7, 9, 11, 7, 9]
    params = SamplingParams(1.0, 3, None)
    logits, cache = s.prefill([prompt], s.new_cache(1, 16))
    p1 = np.asarray(speculative.target_probs(logits, params)[0], np.float64)
    p2, picks = np.zeros_like(p1), set(np.flatnonzero(p1 > 0))
    for t1 in np.flatnonzero(p1 > 0):
        nxt, _ = tiny.extend(jnp.asarray([[t1]]), jnp.asarray([[len(prompt)]]), jax.tree.map(jnp.copy, cache))
        q = np.asarray(speculative.target_probs(nxt[:, 0], params)[0], np.float64)
        p2 += p1[t1] * q
        picks |= set(np.flatnonzero(q > 0))
    vocab = speculative.vocab_ids_of(sorted(picks), C.VOCAB_SIZE)
    table = speculative._vocab_table(s._model_key, s._leaves, vocab)
    history = jnp.zeros(16, jnp.int32).at[:len(prompt)].set(jnp.asarray(prompt))

    def run(leaves, table, cache, logits, key):  # the loop generate runs after its prefill, two tokens
        return speculative._vocab_loop(s._model_key, leaves, table, vocab, cache, logits, history, key, params, 3,
                                       16, 0, 3, jnp.int32(len(prompt)), jnp.asarray(s.stop_ids, jnp.int32),
                                       jnp.int32(2))

    batched = jax.jit(jax.vmap(run, (None, None, None, None, 0)))  # 100 keys a call: [100, 3, 262144] logits
    keys = jax.random.split(jax.random.key(0), 2000).reshape(20, 100)
    out, n, st = (np.concatenate(x) for x in zip(*(batched(s._leaves, table, cache, logits, k) for k in keys)))
    second = out[:, len(prompt) + 1]
    assert (n == 2).all() and 0.2 < st[:, 2].mean() < 0.95  # drafts kept, not always
    support = np.flatnonzero(p2 > 0)
    assert set(np.unique(second)) <= set(support)
    counts = np.asarray([(second == t).sum() for t in support])
    assert stats.chisquare(counts, p2[support] / p2.sum() * len(second)).pvalue > 1e-3


def test_hybrid_lookup_passes_sample_as_the_target(tiny, tokenizer_270m):
    """draft="hybrid" after a recurring 3-gram: the first token pinned to T (prefill logits of one token), so
    (9, 11, T) recurs and the round is a lookup pass of the 3 tokens that followed it; over 1000 keys the second
    token is distributed as the target's p(t2 | T), by chi-square (top-k 3, temperature 1)."""
    s = Sampler(tiny, tokenizer_270m, max_len=64, prefill_chunk=16)
    T, prompt = 7, [2, 9, 11, 7, 40, 41, 42, 9, 11]
    params = SamplingParams(1.0, 3, None)
    real, cache = s.prefill([prompt], s.new_cache(1, 16))
    logits = jnp.full_like(real, -1e9).at[:, T].set(0.0)
    nxt, _ = tiny.extend(jnp.asarray([[T]]), jnp.asarray([[len(prompt)]]), jax.tree.map(jnp.copy, cache))
    p2 = np.asarray(speculative.target_probs(nxt[:, 0], params)[0], np.float64)
    vocab = speculative.vocab_ids_of(64, C.VOCAB_SIZE)
    table = speculative._vocab_table(s._model_key, s._leaves, vocab)
    history = jnp.zeros(20, jnp.int32).at[:len(prompt)].set(jnp.asarray(prompt))

    def run(leaves, table, cache, logits, key):
        return speculative._vocab_loop(s._model_key, leaves, table, vocab, cache, logits, history, key, params, 3,
                                       16, speculative.HYBRID_LOOKUP, 3, jnp.int32(len(prompt)),
                                       jnp.asarray(s.stop_ids, jnp.int32), jnp.int32(2))

    batched = jax.jit(jax.vmap(run, (None, None, None, None, 0)))  # 10 keys a call: vmap runs both rounds' heads
    keys = jax.random.split(jax.random.key(1), 1000).reshape(100, 10)
    out, n, st = (np.concatenate(x) for x in zip(*(batched(s._leaves, table, cache, logits, k) for k in keys)))
    assert (n == 2).all() and (out[:, len(prompt)] == T).all()
    assert (st[:, 1] == 3).all()  # every round drafted the looked-up [40, 41, 42]
    second = out[:, len(prompt) + 1]
    support = np.flatnonzero(p2 > 0)
    assert set(np.unique(second)) <= set(support)
    counts = np.asarray([(second == t).sum() for t in support])
    assert stats.chisquare(counts, p2[support] / p2.sum() * len(second)).pvalue > 1e-3


@pytest.mark.parametrize("kwargs, match", [
    (dict(draft="ngram"), "draft must be one of 'lookup', 'vocab', 'hybrid', got 'ngram'"),
    (dict(draft="hybrid", draft_len=(3, 1)), r"draft='hybrid' takes draft_len as one int in \[1, 8\), got \(3, 1\)"),
    (dict(draft="vocab", draft_len=(3, 1, 1)), r"draft='vocab' takes draft_len as one int in \[1, 8\), got \(3, 1, 1\)"),
    (dict(draft="vocab", draft_len=8), r"one int in \[1, 8\), got 8"),
    (dict(draft="vocab", vocab=0), "vocab must be a positive number of ids or a list of ids, got 0"),
    (dict(draft="vocab", vocab=[5, 262144]), r"token ids in \[0, 262144\), got \[5, 262144\]"),
    (dict(draft="vocab", vocab=[]), "non-empty list")])
def test_bad_vocab_drafts_are_named(tiny, tokenizer_270m, kwargs, match):
    s = Sampler(tiny, tokenizer_270m, max_len=128, prefill_chunk=16)
    with pytest.raises(ValueError, match=match):
        speculative.generate(s, [2, 5, 6, 5, 6], max_new_tokens=4, **kwargs)


def test_rejection_sampling_is_distributed_as_the_target(tiny):
    """Verify logits of the tiny model (top-k 6 at temperature 1, so six cells carry all mass), a draft of
    the target's likeliest then an unlikely token: 40,000 draws of the first emitted token match p_0, the
    second (after a kept first) p_1, by chi-square; the draft's acceptance matches p_0(d_1)."""
    params = SamplingParams(1.0, 6, None)
    cache = init_cache(tiny.config, 1, 32, jnp.float32)
    _, cache = tiny.extend(jnp.arange(3, 13)[None], jnp.arange(10)[None], cache)
    p0 = speculative.target_probs(tiny.extend(jnp.asarray([[40]]), jnp.asarray([[10]]), cache)[0][:, 0], params)[0]
    d1 = int(jnp.argmax(p0))
    logits, _ = tiny.extend(jnp.asarray([[40, d1, 0]]), jnp.arange(10, 13)[None], cache, last_only=False)
    probs = speculative.target_probs(logits[0], params)
    np.testing.assert_allclose(probs[0], p0, atol=1e-5)
    d2 = int(jnp.argsort(probs[1])[-6])  # the least likely of the six
    # accept() draws over the vocabulary it is given: the union of the supports (40,000 rows of 262k is 42 GB)
    vocab = np.union1d(np.flatnonzero(np.asarray(probs[0]) > 0), np.flatnonzero(np.asarray(probs[1]) > 0))
    small = probs[:, vocab]
    draft = jnp.asarray([np.searchsorted(vocab, d1), np.searchsorted(vocab, d2)], jnp.int32)
    n, nxt = jax.vmap(lambda k: speculative.accept(small, draft, k))(jax.random.split(jax.random.key(0), 40_000))
    n, nxt = np.asarray(n), vocab[np.asarray(nxt)]
    first = np.where(n >= 1, d1, nxt)
    second = np.where(n >= 2, d2, nxt)[n >= 1]
    for draws, p in ((first, np.asarray(probs[0], np.float64)), (second, np.asarray(probs[1], np.float64))):
        support = np.flatnonzero(p > 0)
        assert len(support) == 6 and set(np.unique(draws)) <= set(support)
        counts = np.asarray([(draws == t).sum() for t in support])
        assert stats.chisquare(counts, p[support] / p[support].sum() * len(draws)).pvalue > 1e-3
    assert abs((n >= 1).mean() - float(probs[0, d1])) < 4 * np.sqrt(0.25 / len(n))


REF = json.loads((FIXTURES / "gemma3_270m" / "reference.json").read_text())
NPZ = dict(np.load(FIXTURES / "gemma3_270m" / "reference.npz"))


def test_greedy_equals_the_target_alone_270m(model_270m, tokenizer_270m):
    """The parity prompts (test_real_270m), 32 tokens each: speculative ids (every draft) equal Sampler.generate's."""
    s = Sampler(model_270m, tokenizer_270m, max_len=8192)
    drafted = accepted = vocab_drafted = vocab_accepted = 0
    for i, p in enumerate(REF["prompts"]):
        ids = NPZ[f"p{i}_ids"].tolist()
        want = s.generate(ids, max_new_tokens=32).tokens
        got, st = speculative.generate(s, ids, max_new_tokens=32)
        assert got == want, p["name"]
        drafted, accepted = drafted + st.drafted, accepted + st.accepted
        got, st = speculative.generate(s, ids, max_new_tokens=32, draft="vocab")
        assert got == want, (p["name"], "vocab")
        vocab_drafted, vocab_accepted = vocab_drafted + st.drafted, vocab_accepted + st.accepted
        assert speculative.generate(s, ids, max_new_tokens=32, draft="hybrid")[0] == want, (p["name"], "hybrid")
    assert accepted > 0 and vocab_accepted > 0
    print(f"acceptance: lookup {accepted}/{drafted}, vocab {vocab_accepted}/{vocab_drafted}")
