"""kernels.cpu_dense: decode-sized f32 / bf16-weight kernels for CPU, against f32 einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma import config as C
from kernels.dense import dense
from gemma.transformer import Transformer
from kernels import cpu_dense

pytestmark = pytest.mark.skipif(not cpu_dense.available(), reason="needs x86 AVX-512 and a C++ compiler")


@pytest.mark.parametrize("wdtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layout", ["minor", "major"])
@pytest.mark.parametrize("m,d,v", [(1, 640, 2048), (3, 37, 1030), (16, 64, 17), (8, 96, 3000), (2, 5, 1),
                                   (5, 203, 77), (11, 1000, 40), (7, 16, 4099), (3, 0, 20),
                                   (32, 640, 2048), (32, 203, 1030), (29, 96, 3000), (64, 37, 77)])
def test_kernel_equals_f32_einsum(layout, wdtype, m, d, v):
    """Row counts 1-64 (above 8: several 8-row groups, 29 and 11 with a ragged last group), ragged D and V
    (masked tails, odd row tiles), and shapes that split into many chunks across threads."""
    rng = np.random.default_rng(m * 1000 + d)
    x = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((v, d) if layout == "minor" else (d, v)), wdtype)
    spec = "MD,VD->MV" if layout == "minor" else "MD,DV->MV"
    want = jnp.einsum(spec, x, w.astype(jnp.float32), precision="highest")
    got = jax.jit(cpu_dense.dense, static_argnums=2)(x, w, layout)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    # the same products (bf16 weights widened exactly), summed in another order
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * np.sqrt(d), rtol=1e-5)


@pytest.mark.parametrize("rows", [8, 32])
@pytest.mark.parametrize("layout", ["minor", "major"])
def test_kernel_is_bitwise_reproducible(layout, rows):
    """Work is split over threads dynamically; every output must still be summed in one fixed order,
    and a row's result must not depend on how many rows share the call (its first 8 rows alone, or one
    under jax.vmap)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((rows, 640)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2048, 640) if layout == "minor" else (640, 2048)), jnp.float32)
    f = jax.jit(cpu_dense.dense, static_argnums=2)
    first = np.asarray(f(x, w, layout))
    for _ in range(30):
        np.testing.assert_array_equal(np.asarray(f(x, w, layout)), first)
    np.testing.assert_array_equal(np.asarray(f(x[:8], w, layout)), first[:8])
    batched = jax.jit(jax.vmap(lambda x: cpu_dense.dense(x, w, layout)))  # jax.vmap: one call per row
    np.testing.assert_array_equal(np.asarray(batched(x[:, None]))[:, 0], first)


@pytest.mark.skipif(not cpu_dense.bf16_dot(), reason="needs AVX512_BF16 (vdpbf16ps)")
@pytest.mark.parametrize("layout", ["minor", "major"])
@pytest.mark.parametrize("m,d,v", [(1, 640, 2048), (3, 37, 1030), (16, 64, 17), (8, 96, 3000), (2, 5, 1),
                                   (5, 203, 77), (11, 1000, 40), (7, 16, 4099), (3, 0, 20), (16, 640, 16384),
                                   (32, 640, 2048), (29, 96, 3000), (13, 2048, 640)])
def test_bf16_activations_on_the_bf16_dot(layout, m, d, v):
    """bf16 x against bf16 w (vdpbf16ps, no widening): ragged D (odd: the last weight row paired with zeros),
    ragged V (tail tiles), every row-group size; each row's result equals the same row computed alone."""
    rng = np.random.default_rng(m * 1000 + d)
    x = jnp.asarray(rng.standard_normal((m, d)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((v, d) if layout == "minor" else (d, v)), jnp.bfloat16)
    spec = "MD,VD->MV" if layout == "minor" else "MD,DV->MV"
    want = jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    f = jax.jit(cpu_dense.dense, static_argnums=2)
    got = np.asarray(f(x, w, layout))
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-5 * np.sqrt(d), rtol=1e-5)
    for row in {0, m - 1}:
        np.testing.assert_array_equal(np.asarray(f(x[row:row + 1], w, layout)), got[row:row + 1])


def test_rows_routed_to_the_kernel_per_dtype():
    """bf16 weights up to 32 rows, f32 up to 16 (measured crossovers); other dtypes never."""
    x = jnp.zeros((1, 8), jnp.float32)
    for dtype, most in ((jnp.bfloat16, 32), (jnp.float32, 16)):
        w = jnp.zeros((8, 8), dtype)
        assert cpu_dense.usable(x, w, most) and not cpu_dense.usable(x, w, most + 1)
    assert not cpu_dense.usable(x, jnp.zeros((8, 8), jnp.float16), 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("spec,xs,ws", [
    ("BTD,DNH->BTNH", (2, 1, 32), (32, 4, 16)),
    ("BTNH,NHD->BTD", (1, 1, 4, 16), (4, 16, 32)),
    ("BTD,VD->BTV", (2, 1, 32), (300, 32)),
    ("BTD,DF->BTF", (8, 1, 48), (48, 96)),
])
def test_dense_reshapes_like_einsum_and_differentiates(spec, xs, ws, dtype):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(xs), dtype)
    w = jnp.asarray(rng.standard_normal(ws), dtype)
    want = jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    assert cpu_dense.usable(x, w, xs[0] * xs[1])  # the kernel path, not the einsum fallback
    got = dense(spec, x, w)
    assert got.shape == want.shape and got.dtype == dtype
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == jnp.float32 else dict(atol=0.05, rtol=1e-2)  # bf16: output rounding
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), **tol)
    g = jax.grad(lambda x, w: jnp.sum(dense(spec, x, w, preferred_element_type=jnp.float32)), argnums=(0, 1))(x, w)
    gw = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)),
                  argnums=(0, 1))(x, w)
    for a, b in zip(g, gw):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=0.1, rtol=2e-2)


def test_bf16_decode_step_matches_the_f32_model():
    """A bf16 model's decode logits (through the kernels) against the same weights run in f32 by XLA."""
    m32 = Transformer(C.tiny(), rngs=nnx.Rngs(0))
    m16 = Transformer(C.tiny(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(m16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(m32)))
    nnx.update(m32, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(m16)))  # same (bf16-exact) weights
    tokens = jnp.asarray([[5], [77]], jnp.int32)
    want = m32(jnp.tile(tokens, (cpu_dense.MAX_ROWS, 1)))[:2]  # > MAX_ROWS rows: XLA's f32 einsums
    got = m16(tokens)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-2, rtol=0)
    assert int(jnp.sum(jnp.argmax(got, -1) == jnp.argmax(want, -1))) == 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("spec,xs,ws", [
    ("BTD,DNH->BTNH", (2, 24, 32), (32, 4, 16)),
    ("BTNH,NHD->BTD", (2, 24, 4, 16), (4, 16, 32)),
    ("BTD,VD->BTV", (2, 24, 32), (300, 32)),
    ("BTD,DF->BTF", (2, 24, 48), (48, 96)),
])
def test_training_sized_products_equal_einsum_without_transposed_copies(spec, xs, ws, dtype):
    """Above the kernel's rows, dense is one 2-D product: its value and gradients equal the einsum's, in
    the einsum's dtypes, and the compiled gradient holds no transpose (the einsum's wrote the weight
    gradient's operand transposed)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(xs), dtype)
    w = jnp.asarray(rng.standard_normal(ws), dtype)
    dy = jnp.asarray(rng.standard_normal(jnp.einsum(spec, x, w).shape), dtype)
    assert not cpu_dense.usable(x, w, xs[0] * xs[1])
    ours = jax.jit(lambda x, w, dy: jax.vjp(lambda x, w: dense(spec, x, w), x, w)[1](dy) + (dense(spec, x, w),))
    ref = jax.jit(lambda x, w, dy: jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)[1](dy)
                  + (jnp.einsum(spec, x, w),))
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == jnp.float32 else dict(atol=0.25, rtol=2e-2)  # bf16: output rounding
    for a, b in zip(ours(x, w, dy), ref(x, w, dy)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    hlo = ours.lower(x, w, dy).compile().as_text()
    # f32 only: XLA CPU widens bf16 dots to f32 and lays out the widened weight as it likes; a weight stored
    # [out, contract] is read transposed by its own product
    if dtype == jnp.float32 and spec != "BTD,VD->BTV":
        assert " transpose(" not in hlo and " copy(" not in hlo, hlo
