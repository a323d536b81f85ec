"""WARP's merges (EMA anchor, SLERP of task vectors, LITI) and WARM's average: exact algebraic properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma import config
from gemma.train import merges
from gemma.transformer import Transformer


def _tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(scale * rng.normal(size=(3, 4)), jnp.float32),
            "layers": [jnp.asarray(scale * rng.normal(size=(5,)), jnp.float32),
                       jnp.asarray(scale * rng.normal(size=(2, 2)), jnp.bfloat16)],
            "count": jnp.asarray(7, jnp.int32)}


def _close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **kw),
                 a, b)


@functools.cache
def _model_state():
    """The parameter State of a tiny model, abstract (shapes only: building it for real costs seconds)."""
    cfg = config.tiny(num_layers=1, layer_types=("local",), d_model=16, hidden_dim=32, head_dim=8, num_heads=2,
                      num_kv_heads=1, vocab_size=64)
    return nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _state(seed):
    """Random values of every tensor of the tiny model's parameter State, distinct per seed."""
    rng = np.random.default_rng(100 + seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), _model_state())


def test_ema_fixed_point_and_formula():
    a, p = _tree(0), _tree(1)
    _close(merges.ema(p, p, 0.3), p, rtol=0, atol=0)
    out = merges.ema(a, p, 0.25)
    np.testing.assert_allclose(out["w"], 0.75 * a["w"] + 0.25 * p["w"], rtol=1e-6)
    assert out["layers"][1].dtype == jnp.bfloat16 and out["count"] == 7
    _close(merges.ema(a, p, 0.0), a, rtol=0, atol=0)
    _close(merges.ema(a, p, 1.0), p, rtol=1e-6, atol=1e-6)


def test_slerp_end_points_return_each_policy():
    init, p1, p2 = _tree(0), _tree(1), _tree(2)
    _close(merges.slerp(init, [p1, p2], 0.0), p1, rtol=1e-5, atol=1e-5)
    _close(merges.slerp(init, [p1, p2], 1.0), p2, rtol=1e-5, atol=1e-5)


def test_slerp_keeps_the_norm_of_orthogonal_equal_norm_task_vectors():
    init = {"w": jnp.asarray([1.0, -2.0, 0.5, 3.0])}
    d1, d2 = np.array([2.0, 0, 0, 0]), np.array([0, 0, 2.0, 0])
    p1, p2 = {"w": init["w"] + d1}, {"w": init["w"] + d2}
    for t in (0.25, 0.5, 0.8):
        delta = np.asarray(merges.slerp(init, [p1, p2], t)["w"] - init["w"])
        np.testing.assert_allclose(np.linalg.norm(delta), 2.0, rtol=1e-6)  # LERP's would be 2 * sqrt(t^2 + (1-t)^2)
        np.testing.assert_allclose(delta, np.cos(t * np.pi / 2) * d1 + np.sin(t * np.pi / 2) * d2, atol=1e-6)
    lerp = 0.5 * d1 + 0.5 * d2
    assert np.linalg.norm(lerp) == pytest.approx(np.sqrt(2.0))


def test_slerp_of_parallel_or_zero_task_vectors_is_the_lerp():
    init = {"w": jnp.asarray([1.0, 1.0, 1.0])}
    d = np.array([1.0, 2.0, -1.0])
    for p1, p2 in (({"w": init["w"] + d}, {"w": init["w"] + 3 * d}),  # parallel
                   ({"w": init["w"]}, {"w": init["w"] + d})):  # a zero task vector
        out = np.asarray(merges.slerp(init, [p1, p2], 0.3)["w"])
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, 0.7 * np.asarray(p1["w"]) + 0.3 * np.asarray(p2["w"]), rtol=1e-6)


def test_slerp_is_per_tensor_on_a_model_state():
    init, p1, p2 = _state(0), _state(1), _state(2)
    out = merges.slerp(init, [p1, p2], 0.5)
    assert jax.tree.structure(out) == jax.tree.structure(init)
    for i, a, b, o in zip(*(jax.tree.leaves(x) for x in (init, p1, p2, out))):
        d1, d2 = (np.asarray(a - i).ravel(), np.asarray(b - i).ravel())
        omega = np.arccos(np.dot(d1, d2) / np.linalg.norm(d1) / np.linalg.norm(d2))
        want = np.asarray(i).ravel() + np.sin(omega / 2) / np.sin(omega) * (d1 + d2)
        np.testing.assert_allclose(np.asarray(o).ravel(), want, rtol=1e-4, atol=1e-5)


def test_liti_and_average():
    init, p = _tree(0), _tree(1)
    _close(merges.interpolate_toward_init(init, p, 0.0), init, rtol=0, atol=0)
    _close(merges.interpolate_toward_init(init, p, 1.0), p, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merges.interpolate_toward_init(init, p, 0.3)["w"],
                               init["w"] + 0.3 * (p["w"] - init["w"]), rtol=1e-6)
    _close(merges.average([p, p, p]), p, rtol=1e-6, atol=0)
    a, b, c = _tree(0), _tree(1), _tree(2)
    np.testing.assert_allclose(merges.average([a, b, c])["w"], (a["w"] + b["w"] + c["w"]) / 3, rtol=1e-6)
    np.testing.assert_allclose(merges.average([a, b], [1.0, 3.0])["w"], 0.25 * a["w"] + 0.75 * b["w"], rtol=1e-6)
    s = merges.average([_state(0), _state(1)])
    assert jax.tree.structure(s) == jax.tree.structure(_state(0))


def test_mismatched_trees_name_the_first_differing_path():
    a = _tree(0)
    renamed = dict(a)
    renamed["v"] = renamed.pop("w")
    with pytest.raises(ValueError, match=r"leaf 3: path \['v'\] where tree 0 has \['w'\]"):
        merges.average([a, renamed])
    shorter = dict(a, layers=a["layers"][:1])
    with pytest.raises(ValueError, match=r"leaf 2: path \['w'\] where tree 0 has \['layers'\]\[1\]"):
        merges.ema(a, shorter, 0.5)
    with pytest.raises(ValueError, match=r"tree 1 has 1 leaves, tree 0 has 2: .*\[1\]"):
        merges.ema(a["layers"], a["layers"][:1], 0.5)
    reshaped = dict(a, w=a["w"].reshape(4, 3))
    with pytest.raises(ValueError, match=r"\['w'\]: shape \(4, 3\) vs \(3, 4\)"):
        merges.slerp(a, [a, reshaped], 0.5)
    with pytest.raises(ValueError, match="count"):
        merges.average([a, dict(a, count=jnp.asarray(8, jnp.int32))])


@pytest.mark.parametrize("call, match", [
    (lambda a: merges.ema(a, a, -0.1), "rate"),
    (lambda a: merges.ema(a, a, 1.5), "rate"),
    (lambda a: merges.interpolate_toward_init(a, a, float("nan")), "eta"),
    (lambda a: merges.slerp(a, [a, a], 2.0), "t must"),
    (lambda a: merges.slerp(a, [a, a, a], 0.5), "two policies"),
    (lambda a: merges.average([]), "at least one"),
    (lambda a: merges.average([a, a], [1.0]), "1 weights for 2"),
    (lambda a: merges.average([a, a], [1.0, -1.0]), ">= 0"),
    (lambda a: merges.average([a, a], [0.0, 0.0]), "not all 0"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(_tree(0))
