"""Weight merges of WARP and WARM on parameter trees (nnx.State or any pytree of arrays).

    anchor = ema(anchor, policy, rate=0.01)              # WARP stage 1: the EMA anchor, the KL reference
    merged = slerp(init, [policy_1, policy_2], t=0.5)    # WARP stage 2: SLERP of the task vectors
    final = interpolate_toward_init(init, merged, eta=0.3)  # WARP stage 3: LITI
    reward = average([rm_1, rm_2, rm_3])                 # WARM: the (weighted) average of reward models

WARP: Ramé et al. 2024, "WARP: On the Benefits of Weight Averaged Rewarded Policies"; WARM: Ramé et al.
2024, "WARM: On the Benefits of Weight Averaged Reward Models". All trees must share one structure (paths,
shapes); arithmetic is in float32 and each result leaf keeps its input dtype. Non-float leaves (counters)
must be equal across trees and are passed through.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PARALLEL_EPS = 1e-6  # |sin Omega| below this: the task vectors are (anti)parallel and SLERP falls back to LERP


def ema(anchor, params, rate: float):
    """theta_ema <- (1 - rate) theta_ema + rate theta (WARP's anchor update, mu = rate in [0, 1]), computed as
    theta_ema + rate (theta - theta_ema) so that the anchor is an exact fixed point."""
    _unit("rate", rate)
    return _map(lambda a, p: a + rate * (p - a), anchor, params)


def interpolate_toward_init(init, params, eta: float):
    """LITI: theta_init + eta (theta - theta_init), eta in [0, 1] (0: the init, 1: params)."""
    _unit("eta", eta)
    return _map(lambda i, p: i + eta * (p - i), init, params)


def average(trees: Sequence, weights: Sequence[float] | None = None):
    """WARM: sum_i w_i theta_i / sum_i w_i, uniform when weights is None; weights >= 0 with a positive sum."""
    trees = list(trees)
    if not trees:
        raise ValueError("average needs at least one tree")
    if weights is None:
        weights = [1.0] * len(trees)
    weights = [float(w) for w in weights]
    if len(weights) != len(trees):
        raise ValueError(f"got {len(weights)} weights for {len(trees)} trees")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights}")
    total = sum(weights)
    return _map(lambda *xs: sum(w / total * x for w, x in zip(weights, xs)), *trees)


def slerp(init, policies: Sequence, t: float):
    """WARP's SLERP of the task vectors delta_i = theta_i - theta_init of two policies, per tensor:

        theta_init + sin((1 - t) Omega) / sin Omega * delta_1 + sin(t Omega) / sin Omega * delta_2,
        Omega = angle(delta_1, delta_2).

    Where sin Omega ~ 0 (parallel, anti-parallel or a zero task vector) it is the LERP (1 - t) delta_1 + t delta_2.
    """
    policies = list(policies)
    if len(policies) != 2:
        raise ValueError(f"slerp merges two policies, got {len(policies)} (merge more by repeated slerps)")
    _unit("t", t)

    return _map(lambda i, p1, p2: _slerp_tensor(i, p1, p2, jnp.float32(t)), init, *policies)


# ---------------------------------------------------------------- helpers
@jax.jit
def _slerp_tensor(i, p1, p2, t):
    d1, d2 = (p1 - i).ravel(), (p2 - i).ravel()
    n1, n2 = jnp.linalg.norm(d1), jnp.linalg.norm(d2)
    omega = jnp.arccos(jnp.clip(jnp.dot(d1, d2) / jnp.maximum(n1 * n2, 1e-30), -1.0, 1.0))
    sin = jnp.sin(omega)
    parallel = (sin < PARALLEL_EPS) | (n1 == 0) | (n2 == 0)
    safe = jnp.where(parallel, 1.0, sin)
    c1 = jnp.where(parallel, 1 - t, jnp.sin((1 - t) * omega) / safe)
    c2 = jnp.where(parallel, t, jnp.sin(t * omega) / safe)
    return i + (c1 * d1 + c2 * d2).reshape(i.shape)



def _unit(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating)) or not 0 <= x <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")


def _map(f, *trees):
    """f over the float leaves of trees of one structure (in f32, cast back); other leaves must be equal."""
    leaves = [_flatten(tree) for tree in trees]
    first_paths, treedef = leaves[0][0], leaves[0][2]
    for k, (paths, values, _) in enumerate(leaves[1:], start=1):
        for n, (a, b) in enumerate(zip(first_paths, paths)):
            if a != b:
                raise ValueError(f"tree {k} differs from tree 0 at leaf {n}: path {jax.tree_util.keystr(b)} "
                                 f"where tree 0 has {jax.tree_util.keystr(a)}")
        if len(paths) != len(first_paths):
            shorter, longer = (paths, first_paths) if len(paths) < len(first_paths) else (first_paths, paths)
            raise ValueError(f"tree {k} has {len(paths)} leaves, tree 0 has {len(first_paths)}: first path only "
                             f"in one of them: {jax.tree_util.keystr(longer[len(shorter)])}")
        for path, a, b in zip(paths, leaves[0][1], values):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(f"tree {k} differs from tree 0 at {jax.tree_util.keystr(path)}: shape "
                                 f"{jnp.shape(b)} vs {jnp.shape(a)}")
    out = []
    for path, xs in zip(first_paths, zip(*(values for _, values, _ in leaves))):
        x0 = jnp.asarray(xs[0])
        if jnp.issubdtype(x0.dtype, jnp.floating):
            out.append(f(*(jnp.asarray(x, jnp.float32) for x in xs)).astype(x0.dtype))
        elif all(np.array_equal(np.asarray(x), np.asarray(x0)) for x in xs[1:]):
            out.append(xs[0])
        else:
            raise ValueError(f"non-float leaf {jax.tree_util.keystr(path)} ({x0.dtype}) differs between trees; "
                             f"only float leaves are merged")
    return jax.tree_util.tree_unflatten(treedef, out)


def _flatten(tree):
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [p for p, _ in pairs], [x for _, x in pairs], treedef
