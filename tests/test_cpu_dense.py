"""kernels.cpu_dense: bf16-weight matrix-vector kernels for CPU decode, against f32 einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma import config as C
from gemma.layers import dense
from gemma.transformer import Transformer
from kernels import cpu_dense

pytestmark = pytest.mark.skipif(not cpu_dense.available(), reason="needs x86 AVX-512 and a C++ compiler")


@pytest.mark.parametrize("layout", ["minor", "major"])
@pytest.mark.parametrize("m,d,v", [(1, 640, 2048), (3, 37, 1030), (16, 64, 17), (8, 96, 3000), (2, 5, 1)])
def test_kernel_equals_f32_einsum(layout, m, d, v):
    rng = np.random.default_rng(m * 1000 + d)
    x = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((v, d) if layout == "minor" else (d, v)), jnp.bfloat16)
    spec = "MD,VD->MV" if layout == "minor" else "MD,DV->MV"
    want = jnp.einsum(spec, x, w.astype(jnp.float32), precision="highest")
    got = jax.jit(cpu_dense.dense, static_argnums=2)(x, w, layout)
    # the same products of exactly widened bf16 weights, summed in another order
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * np.sqrt(d), rtol=1e-5)


@pytest.mark.parametrize("spec,xs,ws", [
    ("BTD,DNH->BTNH", (2, 1, 32), (32, 4, 16)),
    ("BTNH,NHD->BTD", (1, 1, 4, 16), (4, 16, 32)),
    ("BTD,VD->BTV", (2, 1, 32), (300, 32)),
])
def test_dense_reshapes_like_einsum_and_differentiates(spec, xs, ws):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(xs), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(ws), jnp.bfloat16)
    want = jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32))
    assert cpu_dense.usable(x, w, xs[0] * xs[1])  # the kernel path, not the einsum fallback
    got = dense(spec, x, w)
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=0.05, rtol=1e-2)
    g = jax.grad(lambda x, w: jnp.sum(dense(spec, x, w, preferred_element_type=jnp.float32)), argnums=(0, 1))(x, w)
    gw = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)),
                  argnums=(0, 1))(x, w)
    for a, b in zip(g, gw):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=0.1, rtol=2e-2)


def test_bf16_decode_step_matches_the_f32_model():
    """A bf16 model's decode logits (through the kernel) against the same weights run in f32."""
    m32 = Transformer(C.tiny(), rngs=nnx.Rngs(0))
    m16 = Transformer(C.tiny(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(m16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(m32)))
    nnx.update(m32, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(m16)))  # same (bf16-exact) weights
    tokens = jnp.asarray([[5], [77]], jnp.int32)
    want = m32(tokens)
    got = m16(tokens)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-2, rtol=0)
    assert int(jnp.sum(jnp.argmax(got, -1) == jnp.argmax(want, -1))) == 2
