"""The decoder on tiny configs: HF parity, window and mask semantics, building blocks, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import checkpoints
import kernels
from conftest import FIXTURES
from gemma import config as C
from gemma.layers import RMSNorm, rope
from gemma.transformer import Transformer, causal_intervals

TINY = ["window", "mqa", "scaled"]


@pytest.fixture(scope="module", params=TINY)
def tiny_case(request):
    d = FIXTURES / "tiny" / request.param
    return checkpoints.load(d), dict(np.load(d / "io.npz"))


def test_fixture_norms_are_not_trivial(tiny_case):
    model, _ = tiny_case
    scales = [np.asarray(model.layers[0].pre_attention_norm.scale[...]),
              np.asarray(model.layers[0].attn.q_norm.scale[...]), np.asarray(model.final_norm.scale[...])]
    assert all(np.abs(s).max() > 0.01 for s in scales)


def test_logits_match_hf(tiny_case):
    model, io = tiny_case
    logits = model(jnp.asarray(io["input_ids"]))
    assert logits.dtype == jnp.float32 and logits.shape == io["logits"].shape
    np.testing.assert_allclose(logits, io["logits"], atol=2e-4, rtol=0)


def test_left_padding_matches_hf(tiny_case):
    model, io = tiny_case
    mask = io["padded_mask"].astype(bool)
    logits = np.asarray(model(jnp.asarray(io["padded_input_ids"]), input_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(logits[mask], io["padded_logits"][mask], atol=2e-4, rtol=0)
    explicit = model(jnp.asarray(io["padded_input_ids"]), input_mask=jnp.asarray(mask),
                     positions=jnp.asarray(io["padded_positions"]))
    np.testing.assert_allclose(np.asarray(explicit)[mask], logits[mask], atol=1e-6)


def test_last_only_equals_last_row(tiny_case):
    model, io = tiny_case
    tokens = jnp.asarray(io["input_ids"])
    np.testing.assert_allclose(model(tokens, last_only=True), model(tokens)[:, -1:], atol=1e-5)


def test_prompt_longer_than_window_uses_the_window():
    model = checkpoints.load(FIXTURES / "tiny" / "window")
    io = np.load(FIXTURES / "tiny" / "window" / "io.npz")
    assert io["input_ids"].shape[1] > model.config.sliding_window
    wide = Transformer(model.config.replace(sliding_window=10_000))
    nnx.update(wide, nnx.state(model))
    full = np.asarray(wide(jnp.asarray(io["input_ids"])))
    assert np.abs(full - io["logits"]).max() > 1e-2  # without the window the logits are wrong


def test_window_definition():
    """A query at i sees keys i - W < j <= i: W keys, itself included."""
    w, t = 3, 7
    k_start, k_end = causal_intervals(jnp.ones((1, t), bool), w)
    for i in range(t):
        visible = [j for j in range(t) if k_start[0, i] <= j <= k_end[0, i]]
        assert visible == [j for j in range(t) if i - w < j <= i]
    k_start, k_end = causal_intervals(jnp.asarray([[False, False, True, True]]), None)
    assert k_start.tolist() == [[2, 2, 2, 2]] and k_end.tolist() == [[-1, -1, 2, 3]]


def test_reference_attention_against_loops():
    rng = np.random.default_rng(0)
    b, t, s, n, k, h = 2, 5, 6, 4, 2, 8
    q, kk, v = (rng.normal(size=shape).astype(np.float32) for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h)))
    k_start = rng.integers(0, s, size=(b, t)).astype(np.int32)
    k_end = (k_start + rng.integers(-1, 3, size=(b, t))).astype(np.int32)  # some empty intervals
    out = np.asarray(kernels.attention(*map(jnp.asarray, (q, kk, v, k_start, k_end)), scale=0.3))
    for bi in range(b):
        for ti in range(t):
            keys = [j for j in range(s) if k_start[bi, ti] <= j <= k_end[bi, ti]]
            for ni in range(n):
                kv = ni // (n // k)
                if not keys:
                    np.testing.assert_array_equal(out[bi, ti, ni], 0)
                    continue
                logits = np.array([q[bi, ti, ni] @ kk[bi, j, kv] * 0.3 for j in keys])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                np.testing.assert_allclose(out[bi, ti, ni], p @ v[bi, keys, kv], atol=1e-5)


def test_rmsnorm_is_one_plus_w():
    norm = RMSNorm(4)
    x = jnp.asarray([[1.0, -2.0, 3.0, -4.0]])
    unit = x / jnp.sqrt(jnp.mean(x * x) + 1e-6)
    np.testing.assert_allclose(norm(x), unit, rtol=1e-6)
    norm.scale[...] = jnp.full((4,), 0.5)
    np.testing.assert_allclose(norm(x), 1.5 * unit, rtol=1e-6)
    assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_rope_rotates_split_halves():
    rng = np.random.default_rng(1)
    h, base, pos = 8, 10_000.0, 5
    x = rng.normal(size=(1, 1, 1, h)).astype(np.float32)
    out = np.asarray(rope(jnp.asarray(x), jnp.asarray([[pos]]), base=base, scale=2.0))[0, 0, 0]
    for i in range(h // 2):  # pairs (i, i + H/2) rotate by (pos / scale) * base^(-2i/H)
        angle = (pos / 2.0) * base ** (-2 * i / h)
        z = complex(x[0, 0, 0, i], x[0, 0, 0, i + h // 2]) * complex(np.cos(angle), np.sin(angle))
        np.testing.assert_allclose([out[i], out[i + h // 2]], [z.real, z.imag], atol=1e-5)


def test_bf16_forward_close_to_f32():
    model = checkpoints.load(FIXTURES / "tiny" / "mqa")
    model16 = checkpoints.load(FIXTURES / "tiny" / "mqa", dtype=jnp.bfloat16)
    assert model16.embedder.embedding[...].dtype == jnp.bfloat16
    tokens = jnp.asarray(np.load(FIXTURES / "tiny" / "mqa" / "io.npz")["input_ids"])
    out16 = model16(tokens)
    assert out16.dtype == jnp.float32
    # bf16 keeps ~3 significant digits per op; this bounds accumulated drift, it is not a parity check.
    assert float(jnp.abs(out16 - model(tokens)).max()) < 0.25


def test_bad_inputs():
    model = Transformer(C.tiny())
    with pytest.raises(ValueError, match="empty"):
        model(jnp.zeros((1, 0), jnp.int32))
    with pytest.raises(ValueError, match="empty"):
        model(jnp.zeros((0, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"token id 512 is outside the vocabulary \[0, 512\)"):
        model(jnp.asarray([[1, 2, 512]]))
    with pytest.raises(ValueError, match=r"token id -1"):
        model(jnp.asarray([[1, -1]]))
    with pytest.raises(ValueError, match="rank 2"):
        model(jnp.asarray([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        model(jnp.ones((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="input_mask must have the shape"):
        model(jnp.ones((1, 3), jnp.int32), input_mask=jnp.ones((1, 4), bool))
    assert model([[1, 2, 3]]).shape == (1, 3, 512)  # nested lists are fine


def test_jit_of_a_traced_forward():
    """Inside a user's jit the ids are abstract: no range check, but the forward works."""
    model = Transformer(C.tiny())

    @nnx.jit
    def f(m, tokens):
        return m(tokens)

    tokens = jnp.asarray([[5, 6, 7]])
    np.testing.assert_allclose(f(model, tokens), model(tokens), atol=1e-6)
