"""kernels.attention's dispatch, and the model run through every implementation.

On CPU the Pallas implementations run in interpret mode; each must give the
model the same logits as "xla", on plain and left-padded prompts, with image
blocks where the implementation serves them, and through the cached sampler.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels
from gemma import Sampler
from gemma import config as C
from gemma.cache import init_cache
from gemma.transformer import Transformer

from conftest import spy

PALLAS = ["pallas_tpu", "pallas_gpu"]
BAND_ONLY = ["splash", "cudnn"]


def _config(**changes):
    # head_dim 64: the smallest head the TPU/GPU kernels tile; window 8 < prompt length
    return C.tiny(head_dim=64, query_pre_attn_scalar=64, **changes)


@pytest.fixture(scope="module")
def base():
    model = Transformer(_config(attention_impl="xla"), rngs=nnx.Rngs(0))
    for i, (_, var) in enumerate(nnx.iter_graph(model)):  # randomized norms: no near-ties in greedy picks
        if isinstance(var, nnx.Param) and var[...].ndim == 1:
            var[...] = 0.3 * jax.random.normal(jax.random.key(i), var[...].shape)
    return model


def _with_impl(model: Transformer, impl: str) -> Transformer:
    other = model.with_attention_impl(impl)
    assert other.config.attention_impl == impl and model.config.attention_impl == "xla"
    assert other.embedder.embedding[...] is model.embedder.embedding[...]  # shared, not copied
    return other


def _tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 500, (b, t)), jnp.int32)


def test_resolve_auto_by_platform():
    assert kernels.resolve("auto", "tpu") == "pallas_tpu"
    assert kernels.resolve("auto", "gpu") == "pallas_gpu"
    assert kernels.resolve("auto", "cpu") == "xla"
    assert kernels.resolve("splash") == "splash"
    with pytest.raises(ValueError, match="unknown attention impl"):
        kernels.resolve("flash")
    with pytest.raises(ValueError, match="attention_impl"):
        C.tiny(attention_impl="flash")


@pytest.mark.parametrize("impl", PALLAS + BAND_ONLY)
def test_model_forward_equals_xla(base, impl):
    tokens = _tokens(2, 21)
    want = base(tokens)
    got = _with_impl(base, impl)(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=0)


@pytest.mark.parametrize("impl", PALLAS + ["splash"])
def test_left_padded_forward_equals_xla(base, impl):
    tokens = _tokens(2, 19, seed=1)
    mask = jnp.asarray(np.arange(19)[None] >= np.array([[0], [6]]))
    want = np.asarray(base(tokens, input_mask=mask))
    got = np.asarray(_with_impl(base, impl)(tokens, input_mask=mask))
    np.testing.assert_allclose(got[np.asarray(mask)], want[np.asarray(mask)], atol=2e-4, rtol=0)


def test_cudnn_with_padding_takes_the_exact_path(base):
    tokens = _tokens(2, 19, seed=2)
    mask = jnp.asarray(np.arange(19)[None] >= np.array([[0], [4]]))
    want = np.asarray(base(tokens, input_mask=mask))
    got = np.asarray(_with_impl(base, "cudnn")(tokens, input_mask=mask))
    np.testing.assert_allclose(got[np.asarray(mask)], want[np.asarray(mask)], atol=2e-4, rtol=0)


@pytest.mark.parametrize("impl", PALLAS + ["cudnn"])  # splash would repeat pallas_tpu's run (70 s)
def test_cached_prefill_and_decode_equal_xla(base, impl, tokenizer_270m):
    """Chunked prefill (k_pos over cache + chunk) and ring decode past wrap-around, through the sampler
    (cudnn, like splash, hands every cache call to its platform's flash kernel)."""
    prompts = [list(range(5, 27)), list(range(40, 49))]
    outs = {}
    for name, model in (("xla", base), (impl, _with_impl(base, impl))):
        sampler = Sampler(model, tokenizer_270m, max_len=64, prefill_chunk=8)
        outs[name] = sampler.generate(prompts, max_new_tokens=12).tokens
    assert outs[impl] == outs["xla"]


@pytest.mark.parametrize("impl", ["pallas_gpu"])  # T == 1 goes to the split-K decode kernel; TPU: sampler test
def test_decode_step_logits_equal_xla(base, impl):
    model = _with_impl(base, impl)
    tokens = _tokens(2, 13, seed=3)
    positions = jnp.broadcast_to(jnp.arange(13, dtype=jnp.int32), (2, 13))
    logits = {}
    for name, m in (("xla", base), (impl, model)):
        cache = init_cache(m.config, 2, 32, jnp.float32)
        _, cache = m.extend(tokens, positions, cache)
        out, _ = m.extend(_tokens(2, 1, seed=4), jnp.full((2, 1), 13, jnp.int32), cache)
        logits[name] = np.asarray(out)
    np.testing.assert_allclose(logits[impl], logits["xla"], atol=2e-4, rtol=0)


def test_band_only_impls_hand_what_they_cannot_serve_to_the_flash_kernel(monkeypatch):
    """splash and cudnn serve the causal/window band only. A cache (k_pos, S != T, NaN in its empty
    slots), a decode step, lookahead (image blocks) and, for cudnn, a soft-cap or operands cuDNN refuses
    run on their platform's flash kernel (pallas_tpu / pallas_gpu; pallas_gpu's decode kernel for one
    query) with the intervals' values, and the fused kernel is never called. A window hint on a cache
    is an error."""
    from kernels import blocks, decode, flash_gpu, flash_tpu, jax_ops

    calls = []
    for module, name in ((jax_ops, "splash"), (jax_ops, "cudnn"), (flash_tpu, "attention"),
                         (flash_gpu, "attention"), (decode, "attention")):
        spy(monkeypatch, module, name, calls, lambda kw, m=module.__name__.split(".")[-1], name=name: f"{m}.{name}")
    rng = np.random.default_rng(11)
    b, n, kv, h, s = 2, 4, 2, 64, 24
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    k_pos = np.stack([rng.permutation(s) for _ in range(b)]) - 4  # shuffled ring slots; 4 empty ones
    empty = k_pos < 0
    k_pos = jnp.asarray(np.where(empty, blocks.EMPTY, k_pos), jnp.int32)
    k, v = normal(b, s, kv, h), normal(b, s, kv, h)
    poisoned = [jnp.where(empty[..., None, None], jnp.nan, x) for x in (k, v)]  # what the kernels get
    cases = []
    for t in (6, 1):  # a chunk, a decode step: queries at the cache's last t positions, window 7
        pos = jnp.broadcast_to(jnp.arange(s - 4 - t, s - 4, dtype=jnp.int32), (b, t))
        cases.append((f"cache t={t}", normal(b, t, n, h), k, v, pos - 6, pos, dict(k_pos=k_pos), None))
    t = 16
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    block_end = jnp.where((pos >= 5) & (pos < 9), 8, pos)  # an image block at 5..8 sees itself whole
    self_kv = normal(b, t, kv, h), normal(b, t, kv, h)
    cases.append(("lookahead", normal(b, t, n, h), *self_kv, 0 * pos, block_end, dict(lookahead=3), None))
    cases.append(("softcap", normal(b, t, n, h), *self_kv, 0 * pos, pos, dict(lookahead=0, softcap=5.0), "cudnn"))
    for name, q, k_, v_, ks, ke, hints, only in cases:
        softcap = hints.get("softcap")
        want = kernels.reference.attention(q, k_, v_, ks, ke, scale=0.125, softcap=softcap, k_pos=hints.get("k_pos"))
        for impl, kernel in (("splash", "flash_tpu.attention"), ("cudnn", "flash_gpu.attention")):
            if only not in (None, impl):
                continue
            if impl == "cudnn" and q.shape[1] == 1:
                kernel = "decode.attention"
            calls.clear()
            if "k_pos" in hints:
                k_, v_ = poisoned
            got = kernels.attention(q, k_, v_, ks, ke, scale=0.125, impl=impl, **hints)
            assert calls == [kernel], (name, impl, calls)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0, err_msg=f"{name} {impl}")
    calls.clear()  # splash takes a soft-cap itself
    kernels.attention(*cases[-1][1:6], scale=0.125, impl="splash", lookahead=0, softcap=5.0)
    assert calls[:1] == ["jax_ops.splash"], calls
    q, k_, v_, ks, ke = cases[-1][1:6]  # operands cuDNN refuses: here q's dtype not k's and v's
    calls.clear()
    got = kernels.attention(q.astype(jnp.bfloat16), k_, v_, ks, ke, scale=0.125, impl="cudnn", lookahead=0)
    assert calls == ["flash_gpu.attention"], calls
    want = kernels.reference.attention(q.astype(jnp.bfloat16).astype(jnp.float32), k_, v_, ks, ke, scale=0.125)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2, rtol=0)
    monkeypatch.setattr(jax_ops, "cudnn_serves", lambda *a: False)  # what cuDNN refuses on a GPU only (f32)
    calls.clear()
    got = kernels.attention(q, k_, v_, ks, ke, scale=0.125, impl="cudnn", lookahead=0)
    assert calls == ["flash_gpu.attention"], calls
    want = kernels.reference.attention(q, k_, v_, ks, ke, scale=0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="self-attention"):
        kernels.attention(*cases[0][1:6], k_pos=k_pos, window=7)


def test_cudnn_serves_what_cudnn_takes(monkeypatch):
    """On a GPU cuDNN takes bf16/f16 with a head_dim that is a multiple of 8, up to 256 from Hopper on
    and 128 before, q, k and v of one dtype and no soft-cap (jax.nn.dot_product_attention's own checks);
    decode steps are left to the decode kernel. Its XLA stand-in on CPU takes any dtype and head_dim."""
    from kernels import flash_hopper, jax_ops

    capability = [9.0]
    monkeypatch.setattr(flash_hopper, "compute_capability", lambda: capability[0])
    serves = lambda q, softcap=None, interpret=False, kv=None: jax_ops.cudnn_serves(  # noqa: E731
        q, q if kv is None else kv, q if kv is None else kv, softcap, interpret)
    q = lambda h, dtype=jnp.bfloat16, t=8: jnp.zeros((1, t, 2, h), dtype)  # noqa: E731
    for capability[0] in (8.0, 8.9, 9.0, 10.0):
        for h in (8, 64, 128, 136, 256, 264, 36):
            want = h % 8 == 0 and h <= (256 if capability[0] >= 9 else 128)
            assert serves(q(h)) == serves(q(h, jnp.float16)) == want, (capability, h)
            assert not serves(q(h, jnp.float32)) and serves(q(h, jnp.float32), interpret=True)
            assert not serves(q(h), 50.0) and not serves(q(h), 50.0, interpret=True)
            assert not serves(q(h), kv=q(h, jnp.float16)) and not serves(q(h), kv=q(h, jnp.float32), interpret=True)
            assert not serves(q(h, t=1)) and not serves(q(h, t=1), interpret=True)


def _band_by_definition(k_start, k_end, window, padding):
    """is_band from its definition: the [T, S] visibility of the intervals equals the band's."""
    t = k_start.shape[1]
    pos = np.arange(t)
    valid = k_start <= k_end
    lower = np.zeros(t, int) if window is None else np.maximum(pos - window + 1, 0)
    seen = (pos[None, None] >= k_start[..., None]) & (pos[None, None] <= k_end[..., None])
    band = valid[:, :, None] & valid[:, None, :] & (pos[None, None] >= lower[None, :, None]) & (
        pos[None, None] <= pos[None, :, None])
    return bool(np.all(seen == band)) and (padding or bool(valid.all()))


def test_is_band_matches_its_definition():
    """jax_ops.is_band decides whether splash / cuDNN compute the intervals: band cases (left, middle
    and right padding, windows, causal) and non-band ones (packed segments, a window other than the
    hint, a row seeing a padding key) against the [T, S] definition; then random intervals."""
    from kernels import jax_ops
    t, w = 24, 5
    pos = np.arange(t)[None]
    band = np.maximum(pos - w + 1, 0), pos.copy()
    pad = np.array([[1] * 3 + [0] * 18 + [1] * 3]).astype(bool)  # padding rows at both ends
    padded = (np.where(pad, 1, np.maximum(pos - w + 1, 3)), np.where(pad, 0, pos))
    packed = (np.where(pos < 10, np.maximum(pos - w + 1, 0), np.maximum(pos - w + 1, 10)), pos.copy())
    narrow = np.maximum(pos - 3 + 1, 0), pos.copy()
    middle = np.where(pos == 12, 1, np.maximum(pos - w + 1, 0)), np.where(pos == 12, 0, pos)  # sees key 12
    cases = {"band": (band, True), "causal": ((0 * pos, pos.copy()), True), "padded": (padded, True),
             "packed": (packed, False), "narrow": (narrow, False), "padding_key_seen": (middle, False)}
    for name, ((ks, ke), want_with_padding) in cases.items():
        hint = None if name == "causal" else w
        for padding in (True, False):
            want = _band_by_definition(ks, ke, hint, padding)
            if padding:
                assert want == want_with_padding, name
            got = bool(jax_ops.is_band(jnp.asarray(ks), jnp.asarray(ke), hint, padding))
            assert got == want, (name, padding)
    rng = np.random.default_rng(0)
    for _ in range(300):
        ks = np.maximum(pos - w + 1 + rng.integers(-1, 2, (2, t)) * (rng.random((2, t)) < 0.1), 0)
        ke = pos + (rng.random((2, t)) < 0.05)
        empty = rng.random((2, t)) < 0.1
        ks, ke = np.where(empty, 1, ks), np.where(empty, 0, ke)
        for padding in (True, False):
            assert bool(jax_ops.is_band(jnp.asarray(ks), jnp.asarray(ke), w, padding)) == _band_by_definition(
                ks, ke, w, padding)


@pytest.mark.parametrize("impl", BAND_ONLY)
def test_band_only_impls_follow_any_intervals(impl):
    """Intervals that are not the hinted band (packed segments, a narrower window) give the intervals'
    attention (the exact path), not the band's; the band itself (the fused path, as is_band's own test
    shows it is chosen) matches too."""
    rng = np.random.default_rng(6)
    b, t, n, kv, h, w = 2, 32, 4, 2, 64, 8
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h)))
    pos = np.broadcast_to(np.arange(t), (b, t))
    for ks in (np.maximum(pos - w + 1, 0),  # the band
               np.maximum(pos - w + 1, np.where(pos < 13, 0, 13)),  # two packed segments
               np.maximum(pos - 3 + 1, 0)):  # a narrower window than the hint
        ks, ke = jnp.asarray(ks, jnp.int32), jnp.asarray(pos, jnp.int32)
        want = kernels.reference.attention(q, k, v, ks, ke, scale=0.125)
        got = kernels.attention(q, k, v, ks, ke, scale=0.125, impl=impl, window=w)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


def test_banded_xla_path_equals_reference():
    rng = np.random.default_rng(5)
    b, t, n, kv, h, w = 2, 70, 4, 2, 16, 8
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h)))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    k_start = jnp.maximum(pos - w + 1, jnp.array([[0], [9]]))
    k_end = jnp.where(pos >= jnp.array([[0], [9]]), pos, -1)
    want = kernels.reference.attention(q, k, v, k_start, k_end, scale=0.25)
    got = kernels.attention(q, k, v, k_start, k_end, scale=0.25, impl="xla", window=w)
    assert t >= kernels.BANDED_MIN_LEN * w  # the banded path ran
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


@pytest.fixture
def faked_hopper(monkeypatch):
    """A Hopper GPU as "auto" sees it, on CPU: compute capability 9.0 and "auto" resolves to
    pallas_gpu (cuDNN is then jax.nn.dot_product_attention's XLA path, our kernels run interpreted)."""
    from kernels import flash_hopper

    monkeypatch.setattr(flash_hopper, "compute_capability", lambda: 9.0)
    resolve = kernels.resolve
    monkeypatch.setattr(kernels, "resolve", lambda impl: "pallas_gpu" if impl == "auto" else resolve(impl))


def test_auto_on_hopper_runs_causal_layers_through_cudnn(monkeypatch, faked_hopper):
    """On a Hopper GPU (faked: on CPU cuDNN is jax.nn.dot_product_attention's XLA path and our kernels run
    interpreted) "auto" sends a causal layer through `jax_ops.cudnn`, for inference and under
    differentiation: its fused branch on the band, its exact branch (our kernel) on left-padded rows.
    Values and gradients equal the reference's, also under jit and remat."""
    from kernels import flash_gpu, jax_ops, reference

    calls = []
    for module, name in ((jax_ops, "cudnn"), (flash_gpu, "attention")):
        spy(monkeypatch, module, name, calls, lambda kw, name=name: name)
    b, t, n, kv, h = 2, 64, 4, 2, 64
    scale = h**-0.5
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h)))
    dout = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    pos = np.arange(t)[None]
    auto = lambda *a: kernels.attention(*a, impl="auto", lookahead=0)  # noqa: E731
    for pad in ([0, 0], [0, 9]):  # the band; then 9 rows of left padding in the second sequence
        ks = jnp.asarray(np.broadcast_to(np.array(pad)[:, None], (b, t)), jnp.int32)
        ke = jnp.asarray(np.where(pos < np.array(pad)[:, None], -1, pos), jnp.int32)
        fused = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True)
        ours = flash_gpu.attention(q, k, v, ks, ke, scale=scale, interpret=True)
        assert not np.array_equal(np.asarray(fused), np.asarray(ours))  # so the branch taken shows below

        def loss(f):
            return lambda q, k, v: jnp.sum(f(q, k, v, ks, ke).astype(jnp.float32) * dout)

        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        want = reference.attention(*f32, ks, ke, scale=scale)
        with jax.default_matmul_precision("highest"):
            want_grads = jax.grad(loss(lambda *a: reference.attention(*a, scale=scale)), (0, 1, 2))(*f32)
        calls.clear()
        out = auto(q, k, v, ks, ke)
        assert calls[:1] == ["cudnn"], calls
        np.testing.assert_array_equal(np.asarray(out), np.asarray(fused if pad == [0, 0] else ours))
        np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=0)
        calls.clear()
        out, pullback = jax.vjp(lambda q, k, v: auto(q, k, v, ks, ke), q, k, v)
        assert calls[:1] == ["cudnn"], calls
        np.testing.assert_array_equal(np.asarray(out), np.asarray(fused if pad == [0, 0] else ours))
        grads = pullback(dout.astype(jnp.bfloat16))
        remat = jax.jit(jax.grad(jax.checkpoint(loss(auto)), (0, 1, 2)))(q, k, v)
        for name, g, g2, wg in zip("qkv", grads, remat, want_grads):
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(wg), atol=5e-2, rtol=0, err_msg=f"d{name}")
            np.testing.assert_allclose(np.asarray(g2, np.float32), np.asarray(wg), atol=5e-2, rtol=0, err_msg=f"d{name}")


def test_hopper_route_takes_cudnn_only_where_it_was_timed_faster(monkeypatch):
    """On a Hopper GPU "auto" takes cuDNN for causal layers and keeps ours for windowed ones (any
    head_dim) and for every case cuDNN cannot take: not a Hopper GPU, f32, a soft-cap, lookahead (image
    blocks), no causal hint, a head_dim cuDNN does not take, a decode step, a cache."""
    from kernels import flash_hopper

    capability = [9.0]
    monkeypatch.setattr(flash_hopper, "compute_capability", lambda: capability[0])
    route = kernels.hopper_route
    q = {h: jnp.zeros((1, 64, 4, h), jnp.bfloat16) for h in (64, 128, 256)}
    for h in (64, 128, 256):
        assert route(q[h], True, None, None, 0) == route(q[h].astype(jnp.float16), True, None, None, 0) == "cudnn"
        assert route(q[h], True, None, 24, 0) == route(q[h], True, None, 24, None) == "pallas_gpu"  # windowed
    for args in ((q[64], False, None, None, 0),  # a cache (k_pos) or S != T
                 (q[64], True, None, None, None),  # no hint: maybe bidirectional
                 (q[64], True, None, None, 3),  # lookahead: image blocks
                 (q[64], True, 50.0, None, 0),
                 (q[64].astype(jnp.float32), True, None, None, 0),
                 (jnp.zeros((1, 64, 4, 36), jnp.bfloat16), True, None, None, 0),
                 (jnp.zeros((1, 64, 4, 512), jnp.bfloat16), True, None, None, 0),
                 (q[64][:, :1], True, None, None, 0)):
        assert route(*args) == "pallas_gpu", args
    for capability[0] in (8.0, 10.0):  # not a Hopper GPU: not timed
        assert route(q[64], True, None, None, 0) == "pallas_gpu"


def test_auto_on_hopper_routes_each_call_to_its_kernel(monkeypatch, faked_hopper):
    """The routes as "auto" runs them on a (faked) Hopper GPU, for inference and under differentiation:
    causal -> jax_ops.cudnn both ways; windowed -> our kernel both ways, no cuDNN."""
    from kernels import flash_gpu, jax_ops

    calls = []
    for module, name in ((jax_ops, "cudnn"), (flash_gpu, "attention")):
        spy(monkeypatch, module, name, calls, lambda kw, name=name: name)
    rng = np.random.default_rng(6)
    b, t, n, kv = 1, 64, 2, 1
    for h, window, lookahead, want in ((64, None, 0, ["cudnn"]), (256, 16, None, ["attention"]),
                                       (64, 16, 0, ["attention"])):
        q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h)))
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        ks, ke = (jnp.zeros_like(pos) if window is None else jnp.maximum(pos - window + 1, 0)), pos
        auto = lambda q, k, v: kernels.attention(q, k, v, ks, ke, impl="auto", window=window,  # noqa: E731
                                                 lookahead=lookahead)
        ref = kernels.reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), ks, ke, scale=h**-0.5)
        calls.clear()
        np.testing.assert_allclose(np.asarray(auto(q, k, v), np.float32), ref, atol=2e-2, rtol=0)
        assert calls[:1] == want, calls
        calls.clear()
        jax.grad(lambda q: auto(q, k, v).astype(jnp.float32).sum())(q)
        assert calls[:1] == want, calls
        assert ("cudnn" in calls) == (window is None), calls


def test_model_trained_with_auto_on_hopper_routes_its_layers(monkeypatch, faked_hopper):
    """The model's own calls carry the hints `auto` needs: under differentiation on a (faked) Hopper GPU
    the global layer of a bf16 model (lookahead 0) trains through cuDNN and the six windowed ones through
    our kernel. Its gradients are as close to the f32 model's as the bf16 xla model's are: bf16 alone
    puts 2-4% on each parameter's gradient (measured; the two bf16 models differ from each other by as
    much), so the bound is relative to that rounding, not to the other bf16 model."""
    from kernels import flash_gpu, jax_ops

    calls = []
    spy(monkeypatch, jax_ops, "cudnn", calls, lambda kw: ("cudnn", kw["window"]))
    spy(monkeypatch, flash_gpu, "attention", calls, lambda kw: "ours")
    tokens = _tokens(2, 21, seed=4)

    def grads(dtype, impl):
        model = Transformer(_config(attention_impl="xla"), dtype=dtype, rngs=nnx.Rngs(1))
        got = nnx.grad(lambda m: m(tokens).astype(jnp.float32).std())(model.with_attention_impl(impl))
        return [np.asarray(g[...], np.float32) for _, g in nnx.to_flat_state(got)]

    exact, rounded = grads(jnp.float32, "xla"), grads(jnp.bfloat16, "xla")
    calls.clear()
    routed = grads(jnp.bfloat16, "auto")
    # 6 local layers to ours; the global one to cudnn, whose exact branch (ours) is traced too
    assert sorted(calls, key=str) == sorted(["ours"] * 7 + [("cudnn", None)], key=str), calls
    err = lambda gs: np.array([np.linalg.norm(g - e) for g, e in zip(gs, exact)])  # noqa: E731
    ours, xla = err(routed), err(rounded)
    assert np.sqrt(np.sum(ours**2) / np.sum(xla**2)) <= 1.25  # measured 0.99
    assert np.all(ours <= 2 * xla), ours / xla  # per parameter, measured at most 1.42


@pytest.mark.parametrize("t, window, lookahead, softcap", [
    (200, None, 0, None),   # causal global layer: 4 chunks of 64, the last one short
    (257, 100, 0, 30.0),    # sliding window shorter than the row (T < BANDED_MIN_LEN * window)
    (300, 50, 63, None),    # a bidirectional 64-token image block: keys up to 63 ahead
])
def test_blocked_xla_path_equals_reference(t, window, lookahead, softcap):
    """A promised band too short for the banded path runs in query chunks over the keys each can reach:
    values and gradients equal the reference's, with left padding, two packed segments and an image block."""
    rng = np.random.default_rng(t)
    b, n, kv, h = 2, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h)))
    pos = np.broadcast_to(np.arange(t), (b, t))
    starts = np.array([[0], [9]])  # row 1: 9 padding rows (empty intervals)
    k_start = np.maximum(pos - (window or t) + 1, starts)
    k_start[1, 150:] = np.maximum(k_start[1, 150:], 150)  # row 1: a second packed segment from 150
    k_end = np.where(pos >= starts, pos, -1)
    if lookahead:
        image = (120, 120 + lookahead + 1)
        inside = (pos >= image[0]) & (pos < image[1])
        k_start, k_end = np.where(inside, np.minimum(k_start, image[0]), k_start), np.where(inside, image[1] - 1, k_end)
    k_start, k_end = jnp.asarray(k_start, jnp.int32), jnp.asarray(k_end, jnp.int32)
    do = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    kw = dict(scale=0.25, softcap=softcap)

    def grads(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * do), argnums=(0, 1, 2)))(q, k, v)

    want = grads(lambda q, k, v: kernels.reference.attention(q, k, v, k_start, k_end, **kw))
    got = grads(lambda q, k, v: kernels.attention(q, k, v, k_start, k_end, impl="xla", window=window,
                                                  lookahead=lookahead, **kw))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5 * max(1.0, float(jnp.abs(w).max())), rtol=0)
    # the blocked path ran: no [T, T] score matrix in the traced computation
    f = lambda q, k, v: kernels.attention(q, k, v, k_start, k_end, impl="xla", window=window,  # noqa: E731
                                          lookahead=lookahead, **kw)
    shapes = [tuple(e.outvars[0].aval.shape) for e in jax.make_jaxpr(f)(q, k, v).jaxpr.eqns if e.outvars]
    assert not any(s[-2:] == (t, t) for s in shapes)
