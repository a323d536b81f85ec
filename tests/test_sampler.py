"""Compact KV cache, sampler and chat: cached decode equals the full forward, sizes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from gemma import config as C
from gemma.cache import cache_nbytes, init_cache
from gemma.chat import ChatSampler, format_turn
from gemma.sampler import Sampler, SamplingParams, sample_logits
from gemma.transformer import Transformer

GiB = 2**30


@pytest.fixture(scope="module")
def tiny():
    """Random 7-layer model (6 local with W = 8, 1 global; 4 q / 2 kv heads) with the real vocabulary,
    so real text prompts work; norms randomized. Its plain forward is checked against HF in test_model."""
    model = Transformer(C.tiny(vocab_size=C.VOCAB_SIZE), rngs=nnx.Rngs(0))
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.Param) and var[...].ndim == 1:
            var[...] = 0.3 * jax.random.normal(jax.random.key(i), var[...].shape)
    return model


@pytest.fixture(scope="module")
def sampler(tiny, tokenizer_270m):
    return Sampler(tiny, tokenizer_270m, max_len=128, prefill_chunk=8)


def full_logits(model, ids):
    return np.asarray(model(jnp.asarray([ids]))[0])


# ------------------------------------------------------------------ cache sizes
@pytest.mark.parametrize("name", list(C.PRESETS))
@pytest.mark.parametrize("max_len", [100, 4096, 32768])
def test_nbytes_equals_formula(name, max_len):
    cfg = C.preset(name)
    cache = jax.eval_shape(lambda: init_cache(cfg, 2, max_len, jnp.bfloat16))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache) if x.ndim == 4)
    expected = 2 * 2 * cfg.num_kv_heads * cfg.head_dim * 2 * (
        cfg.num_global_layers * max_len + cfg.num_local_layers * min(cfg.sliding_window, max_len))
    assert nbytes == expected == cache_nbytes(cfg, 2, max_len, jnp.bfloat16)


def test_design_figures():
    assert round(cache_nbytes(C.gemma3_4b(), 1, 32 * 1024) / GiB, 2) == 0.74
    assert round(cache_nbytes(C.gemma3_27b(), 1, 128 * 1024) / GiB, 1) == 10.4
    real = init_cache(C.tiny(), 3, 64, jnp.float32)
    assert real.nbytes == cache_nbytes(C.tiny(), 3, 64, jnp.float32)


# ------------------------------------------------------------------ cached == full
def test_decode_across_ring_wraparound(tiny, sampler):
    """Prefill 5, then decode 27 single tokens: the ring (W = 8) wraps three times."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 256, size=32).tolist()
    full = full_logits(tiny, ids)
    cache = sampler.new_cache(1, 64)
    logits, cache = sampler.prefill([ids[:5]], cache)
    got = [np.asarray(logits[0])]
    for t in range(5, 32):
        logits, cache = sampler.prefill([[ids[t]]], cache)
        got.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.stack(got), full[4:], atol=2e-4, rtol=0)
    assert int(cache.length[0]) == 32


@pytest.mark.parametrize("chunk", [3, 8, 13, 64])
def test_chunked_prefill_equals_one_shot(tiny, tokenizer_270m, chunk):
    """Chunks shorter than, equal to and longer than the window W = 8."""
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 256, size=40).tolist()
    s = Sampler(tiny, tokenizer_270m, max_len=128, prefill_chunk=chunk)
    logits, cache = s.prefill([ids], s.new_cache(1, 128))
    np.testing.assert_allclose(logits[0], full_logits(tiny, ids)[-1], atol=2e-4, rtol=0)
    # and the cache it left decodes the next token exactly
    logits, _ = s.prefill([[7]], cache)
    np.testing.assert_allclose(logits[0], full_logits(tiny, ids + [7])[-1], atol=2e-4, rtol=0)


def test_fresh_prefill_equals_prefill_over_the_empty_cache(tiny):
    """`fresh=True` (a first chunk skips the empty cache) gives the same logits and cache as the general
    path that scores the empty slots too: left-padded rows, a chunk (20) longer than the window (8)."""
    rng = np.random.default_rng(5)
    lengths = (20, 13)
    tokens = np.zeros((2, 20), np.int32)
    positions = np.full((2, 20), -1, np.int32)
    for b, n in enumerate(lengths):
        tokens[b, 20 - n:] = rng.integers(3, 256, size=n)
        positions[b, 20 - n:] = np.arange(n)
    runs = [tiny.extend(jnp.asarray(tokens), jnp.asarray(positions), init_cache(tiny.config, 2, 32, jnp.float32),
                        last_only=False, fresh=fresh) for fresh in (False, True)]
    (want, want_cache), (got, got_cache) = runs
    real = positions >= 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):  # later layers: sums in another order
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_mixed_length_batch_equals_each_alone(tiny, sampler):
    rng = np.random.default_rng(2)
    rows = [rng.integers(3, 256, size=n).tolist() for n in (3, 17, 11)]
    batch = sampler_generate_ids(sampler, rows, 12)
    for row, got in zip(rows, batch):
        assert got == sampler_generate_ids(sampler, [row], 12)[0]
        # and greedy ids equal argmax of the full forward, step by step
        seq = list(row)
        for token in got:
            assert token == int(full_logits(tiny, seq)[-1].argmax())
            seq.append(token)


def sampler_generate_ids(sampler, rows, n):
    from gemma.sampler import _bucket, _decode_loop

    cache = sampler.new_cache(len(rows), 64)
    logits, cache = sampler.prefill(rows, cache)
    out, _ = _decode_loop(sampler._model_key, sampler._leaves, cache, logits, jax.random.key(0),
                          jnp.asarray([-5], jnp.int32), SamplingParams(), _bucket(n, 1 << 30), jnp.int32(n),
                          jnp.zeros((len(rows),), bool))
    return [r[:n] for r in np.asarray(out).tolist()]


# ------------------------------------------------------------------ sampling
def test_sampling_rules():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05] + [0.0] * 4]) + 1e-30)
    draws = lambda p, n=400: np.asarray(jax.vmap(lambda k: sample_logits(logits, k, p)[0])(
        jax.random.split(jax.random.key(0), n)))
    assert set(draws(SamplingParams(1.0, top_k=2))) == {0, 1}
    assert set(draws(SamplingParams(1.0, top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draws(SamplingParams(1.0, top_p=0.5))) == {0}
    assert set(draws(SamplingParams(1.0))) == {0, 1, 2, 3}
    assert int(sample_logits(logits, jax.random.key(0), SamplingParams())[0]) == 0


def test_image_ids_are_never_sampled():
    logits = jnp.zeros((1, C.MULTIMODAL_VOCAB_SIZE)).at[0, 262150].set(100.0)
    assert int(sample_logits(logits, jax.random.key(0), SamplingParams())[0]) < C.VOCAB_SIZE
    assert int(sample_logits(logits, jax.random.key(0), SamplingParams(1.0))[0]) < C.VOCAB_SIZE


def test_seed_reproducible(sampler):
    a = sampler.generate("Hello there", max_new_tokens=8, temperature=1.0, seed=3)
    b = sampler.generate("Hello there", max_new_tokens=8, temperature=1.0, seed=3)
    c = sampler.generate("Hello there", max_new_tokens=8, temperature=1.0, seed=4)
    assert a == b and len(a.tokens) == 8 and a.tokens != c.tokens


def test_stream_equals_generate(sampler):
    out = sampler.generate("Hello there", max_new_tokens=10)
    assert "".join(sampler.stream("Hello there", max_new_tokens=10)) == out.text
    sampled = sampler.generate("Hello there", max_new_tokens=10, temperature=1.0, seed=5)
    assert "".join(sampler.stream("Hello there", max_new_tokens=10, temperature=1.0, seed=5)) == sampled.text


def test_stop_strings(sampler):
    full = sampler.generate("Hello there", max_new_tokens=12)
    stop = full.text[3:5]
    cut = sampler.generate("Hello there", max_new_tokens=12, stop=[stop])
    assert cut.text == full.text[: full.text.find(stop)]
    assert sampler.tokenizer.decode(cut.tokens).startswith(cut.text)
    assert "".join(sampler.stream("Hello there", max_new_tokens=12, stop=[stop])) == cut.text


def test_bad_input(sampler):
    with pytest.raises(ValueError, match="exceeds max_len 128"):
        sampler.generate("Hello", max_new_tokens=200)
    with pytest.raises(ValueError, match="prompt is empty"):
        sampler.generate("", max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        sampler.generate("Hi", temperature=-1)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            sampler.generate("Hi", top_p=top_p)
    with pytest.raises(ValueError, match="top_k"):
        sampler.generate("Hi", top_k=0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        sampler.generate([2, C.VOCAB_SIZE], max_new_tokens=2)
    assert sampler.generate("Hi", max_new_tokens=2).text is not None  # nothing left half-done


# ------------------------------------------------------------------ chat
def test_chat_template():
    assert format_turn("Hi", first=True, system="Be brief.") == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert format_turn("Again", first=False) == (
        "<end_of_turn>\n<start_of_turn>user\nAgain<end_of_turn>\n<start_of_turn>model\n")


def test_chat_keeps_cache_between_turns(tiny, tokenizer_270m):
    chat = ChatSampler(tiny, tokenizer_270m, system="Be brief.", max_len=128)
    chat.send("Hello", max_new_tokens=5)
    after_first = list(chat.tokens)
    assert int(chat.cache.length[0]) == len(after_first)
    chat.send("And now?", max_new_tokens=5)
    assert chat.tokens[: len(after_first)] == after_first  # turn 2 only appended
    assert int(chat.cache.length[0]) == len(chat.tokens)
    assert [h["role"] for h in chat.history] == ["user", "model", "user", "model"]
    # The kept cache equals a fresh prefill of the whole dialog: its next-token logits match.
    s = chat.sampler
    kept, _ = s.prefill([[9]], chat.cache)
    fresh, _ = s.prefill([chat.tokens + [9]], s.new_cache(1, 128))
    np.testing.assert_allclose(kept, fresh, atol=2e-4, rtol=0)
    np.testing.assert_allclose(kept[0], full_logits(tiny, chat.tokens + [9])[-1], atol=2e-4, rtol=0)
    chat.reset()
    assert chat.history == [] and chat.cache is None


def test_chat_full_cache_is_a_clear_error(tiny, tokenizer_270m):
    chat = ChatSampler(tiny, tokenizer_270m, max_len=40)
    chat.send("Hello", max_new_tokens=8)
    with pytest.raises(ValueError, match="exceeds max_len 40"):
        chat.send("Tell me more please " * 3, max_new_tokens=8)


def kept_equals_fresh(chat):
    """The chat's cache holds exactly its tokens: the next-token logits equal a fresh prefill's."""
    s = chat.sampler
    assert int(chat.cache.length[0]) == len(chat.tokens)
    kept, _ = s.prefill([[9]], jax.tree.map(jnp.copy, chat.cache))  # a copy: prefill donates its cache
    fresh, _ = s.prefill([chat.tokens + [9]], s.new_cache(1, chat.cache.max_len))
    np.testing.assert_allclose(kept, fresh, atol=2e-4, rtol=0)


def test_chat_reply_stopped_early_keeps_the_dialog(tiny, tokenizer_270m):
    chat = ChatSampler(tiny, tokenizer_270m, max_len=128)
    replies = chat.stream("Hello", max_new_tokens=8)
    shown = next(replies)
    replies.close()  # as the CLI does on Ctrl-C: the token shown is fed, nothing more
    assert chat.history[-1] == {"role": "model", "text": shown}
    assert chat.tokenizer.decode(chat.tokens[-len(chat._turns[0].reply):]) == shown
    kept_equals_fresh(chat)
    first = list(chat.tokens)
    chat.send("And now?", max_new_tokens=4)  # the next turn sees the earlier one
    assert chat.tokens[:len(first)] == first
    kept_equals_fresh(chat)


def test_chat_reply_closed_mid_stream_feeds_what_was_shown(tiny, tokenizer_270m):
    """Closed after some pieces (each later id is fed by a step dispatched before its piece is shown): the
    dialog and the cache hold the shown ids, nothing sampled after them."""
    chat = ChatSampler(tiny, tokenizer_270m, max_len=128)
    replies = chat.stream("Hello", max_new_tokens=16, temperature=1.0, seed=2)
    shown = "".join(next(replies) for _ in range(4))
    replies.close()
    assert chat.history[-1] == {"role": "model", "text": shown}
    assert chat.tokenizer.decode(chat._turns[0].reply) == shown and len(chat._turns[0].reply) < 16
    assert chat.cache is not None and int(chat.cache.length[0]) == len(chat.tokens)
    kept_equals_fresh(chat)


def test_chat_recovers_a_cache_lost_mid_reply(tiny, tokenizer_270m, monkeypatch):
    """An interrupt inside a decode step (the input cache donated, the output never assigned) loses the
    cache; the dialog keeps the ids fed so far and the next turn prefills all of it again."""
    import gemma.sampler as sampler_module

    chat = ChatSampler(tiny, tokenizer_270m, max_len=128)
    real, calls = sampler_module._feed_and_sample, []

    def interrupted(*args):
        out = real(*args)
        calls.append(1)
        if len(calls) == 2:  # one decode step, then the interrupt during the second
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(sampler_module, "_feed_and_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        chat.send("Hello", max_new_tokens=8)
    monkeypatch.setattr(sampler_module, "_feed_and_sample", real)
    assert chat.cache is None and len(chat._turns[0].reply) == 1
    assert chat.tokens == chat._turns[0].ids + chat._turns[0].reply
    chat.send("Again", max_new_tokens=3)
    kept_equals_fresh(chat)


def test_chat_when_full_drops_the_oldest_exchanges(tiny, tokenizer_270m):
    chat = ChatSampler(tiny, tokenizer_270m, system="Be brief.", max_len=64, when_full="drop")
    for message in ("Hello there", "Tell me more", "And then what happened"):
        chat.send(message, max_new_tokens=8)
    assert chat.dropped >= 1 and len(chat.history) == 2 * len(chat._turns)
    first = chat._turns[0]  # the oldest kept exchange became the first turn: <bos>, system prompt
    assert first.ids == chat.sampler.prepare(
        format_turn(first.message, first=True, system="Be brief."), add_bos=True)[0]
    assert chat.tokens == [i for t in chat._turns for i in t.ids + t.reply] and len(chat.tokens) + 8 <= 64
    kept_equals_fresh(chat)
    with pytest.raises(ValueError, match="exceeds max_len 64"):  # a message that alone does not fit
        chat.send("word " * 80, max_new_tokens=8)


def test_chat_cache_grows_with_the_dialog(tiny, tokenizer_270m, monkeypatch):
    import gemma.chat as chat_module
    from gemma.cache import init_cache

    monkeypatch.setattr(chat_module, "_MIN_SLOTS", 16)
    chat = ChatSampler(tiny, tokenizer_270m, max_len=128)
    chat.send("Hello", max_new_tokens=4)
    small = chat.cache.max_len
    chat.send("Tell me a much longer story about it now", max_new_tokens=16)
    assert chat.cache.max_len > small
    kept_equals_fresh(chat)
    # a cache of at most W slots (its local layers linear, not rings) moves into a larger one (rings)
    s, ids = chat.sampler, list(range(10, 16))
    _, cache = s.prefill([ids], init_cache(tiny.config, 1, 8, jnp.float32))
    moved = chat_module._moved(cache, init_cache(tiny.config, 1, 32, jnp.float32))
    assert not cache.layers[0].ring and moved.layers[0].ring
    kept, _ = s.prefill([[9]], moved)
    np.testing.assert_allclose(kept[0], full_logits(tiny, ids + [9])[-1], atol=2e-4, rtol=0)


def test_max_len_defaults_to_and_stops_at_the_models_context(tiny, tokenizer_270m):
    assert Sampler(tiny, tokenizer_270m).max_len == tiny.config.max_context == 4096
    with pytest.raises(ValueError, match="max_len 5000 exceeds the model's context of 4096 tokens"):
        Sampler(tiny, tokenizer_270m, max_len=5000)
    with pytest.raises(ValueError, match="max_len must be an int >= 1"):
        ChatSampler(tiny, tokenizer_270m, max_len=0)
    with pytest.raises(ValueError, match="when_full must be one of"):
        ChatSampler(tiny, tokenizer_270m, when_full="wrap")


def test_streaming_holds_back_partial_utf8(tokenizer_270m):
    from gemma.sampler import IncrementalText

    sp = tokenizer_270m._sp
    euro = [sp.piece_to_id(f"<0x{b:02X}>") for b in "€".encode()]  # byte-fallback pieces
    assert len(set(euro)) == 3 and all(tokenizer_270m.decode([i]) == "\ufffd" for i in euro)
    text = IncrementalText(tokenizer_270m)
    pieces = [text.push(i) for i in tokenizer_270m.encode("Price:", add_bos=False) + euro]
    assert pieces[-3:] == ["", "", "€"] and "".join(pieces) + text.flush() == "Price:€"


def test_new_prompt_lengths_do_not_recompile(sampler):
    from gemma.sampler import _extend

    sampler.generate("one two three", max_new_tokens=3)
    compiled = _extend._cache_size()
    for prompt in ("one two three four five", "a", "one two three four five six seven"):
        sampler.generate(prompt, max_new_tokens=3)
    assert _extend._cache_size() == compiled
