"""gemma.train.loss: the vocabulary-chunked cross-entropy against the plain one (values, gradients wrt hidden,
table and weights; bf16; jit / remat), its compiled peak memory at the 270M's training shape, and the real
270M's loss on chat examples against HF transformers (fixture: tests/reference/make_finetune_fixtures.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from gemma.train import loss as L

# chunked vs plain, f32: value and gradients (relative L2 norm of the difference). Measured <= 6.1e-7 on
# d_hidden, mostly the plain one's own rounding: against float64 the chunked d_hidden is off <= 3.2e-7, the
# plain one <= 6.5e-7 (the f32 log-sum-exp, ~8, carries an absolute error of ~5e-7 into every softmax).
F32_RTOL = 1e-6
# bf16 inputs: both losses read the same bf16 numbers with f32 accumulation, so the value agrees as in f32;
# gradients round dlogits (and the result) to bf16 (eps 2^-8 = 3.9e-3): measured 2.0e-3 relative L2 vs the
# f32 gradients of the same inputs, plain bf16 autodiff 1.7e-3. Bound: 2 bf16 eps.
BF16_GRAD_RTOL = 8e-3


def rel(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm((x - y).ravel()) / max(np.linalg.norm(y.ravel()), 1e-30))


def problem(shape=(3, 13), v=1000, d=24, seed=0, dtype=jnp.float32, zero_frac=0.3):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (*shape, d)).astype(dtype)
    table = (0.4 * jax.random.normal(k[1], (v, d))).astype(dtype)
    targets = jax.random.randint(k[2], shape, 0, v)
    weights = (jax.random.uniform(k[3], shape) > zero_frac).astype(jnp.float32)
    flat_t, flat_w = targets.reshape(-1), weights.reshape(-1)
    # excluded positions may hold anything (HF's -100, padding ids)
    targets = flat_t.at[0].set(-100).at[1].set(v + 5).reshape(shape)
    weights = flat_w.at[0].set(0.0).at[1].set(0.0).at[2].set(0.5).reshape(shape)
    return hidden, table, targets, weights


def value_and_grads(fn, hidden, table, targets, weights, **kw):
    f = lambda h, e, w: fn(h, e, targets, w, **kw)[0]  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(hidden, table, weights)
    count = fn(hidden, table, targets, weights, **kw)[1]
    return value, count, grads


def float64_reference(hidden, table, targets, weights, softcap):
    """(total, d_hidden [T, D], d_table) in float64 numpy, written out: dlogits = w * (softmax - onehot)."""
    h = np.asarray(hidden, np.float64).reshape(-1, hidden.shape[-1])
    e = np.asarray(table, np.float64)
    t, w = np.asarray(targets).reshape(-1), np.asarray(weights, np.float64).reshape(-1)
    raw = h @ e.T
    logits = softcap * np.tanh(raw / softcap) if softcap else raw
    m = logits.max(1, keepdims=True)
    p = np.exp(logits - m)
    s = p.sum(1, keepdims=True)
    p /= s
    keep, rows, safe = w != 0, np.arange(len(t)), np.clip(t, 0, len(e) - 1)
    ce = np.where(keep, m[:, 0] + np.log(s[:, 0]) - logits[rows, safe], 0.0)
    onehot = np.zeros_like(logits)
    onehot[rows[keep], safe[keep]] = 1.0
    dlogits = w[:, None] * (p - onehot)
    if softcap:
        dlogits *= 1.0 - (logits / softcap) ** 2
    return (w * ce).sum(), dlogits @ e, dlogits.T @ h


@pytest.mark.parametrize("v,chunk,softcap", [
    (1024, 256, None),    # V a multiple of the chunk
    (1000, 256, None),    # last chunk partial (clamped, overlapping rows masked)
    (1000, 333, 4.0),     # soft-capped
    (1000, 4096, None),   # one chunk larger than V
    (70, 1, None),        # one row per chunk
    (1088, 256, 30.0),    # the multimodal table's remainder (262208 = 16 * 16384 + 64) in miniature
])
def test_matches_plain_f32(v, chunk, softcap):
    args = problem(v=v)
    got = value_and_grads(L.cross_entropy_sum, *args, chunk_size=chunk, softcap=softcap)
    want = value_and_grads(L.plain_cross_entropy_sum, *args, softcap=softcap)
    assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.float32
    assert rel(got[0], want[0]) <= F32_RTOL
    assert float(got[1]) == float(want[1]) == float(args[3].sum())
    for name, g, w in zip(("hidden", "embedding", "weights"), got[2], want[2]):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert rel(g, w) <= F32_RTOL, (name, rel(g, w))
    total, dh, de = float64_reference(*args, softcap)
    assert rel(got[0], total) <= F32_RTOL
    assert rel(np.asarray(got[2][0]).reshape(dh.shape), dh) <= F32_RTOL and rel(got[2][1], de) <= F32_RTOL
    # excluded positions contribute nothing: no gradient into their hidden states
    excluded = np.asarray(args[3]).reshape(-1) == 0
    assert np.all(np.asarray(got[2][0]).reshape(-1, args[0].shape[-1])[excluded] == 0)


@pytest.mark.parametrize("rows,softcap", [(5, None), (7, 4.0), (39, None)])
def test_trained_table_token_chunks_f32(monkeypatch, rows, softcap):
    """With the table differentiated the forward takes the tokens `TOKEN_BUDGET // V` at a time: several
    chunks, the last one padded (3 x 13 = 39 tokens in chunks of 5 or 7), equal the float64 formula."""
    hidden, table, targets, weights = problem(v=1000)
    monkeypatch.setattr(L, "TOKEN_BUDGET", rows * 1000)
    got = value_and_grads(L.cross_entropy_sum, hidden, table, targets, weights, chunk_size=333, softcap=softcap)
    total, dh, de = float64_reference(hidden, table, targets, weights, softcap)
    assert rel(got[0], total) <= F32_RTOL
    assert rel(np.asarray(got[2][0]).reshape(dh.shape), dh) <= F32_RTOL and rel(got[2][1], de) <= F32_RTOL
    want = value_and_grads(L.plain_cross_entropy_sum, hidden, table, targets, weights, softcap=softcap)
    assert rel(got[2][2], want[2][2]) <= F32_RTOL  # d / d weights: the per-token losses


@pytest.mark.parametrize("v,chunk,softcap", [(1000, 256, None), (1000, 333, 4.0), (70, 1, None), (1088, 256, 30.0)])
def test_table_held_constant_f32(v, chunk, softcap):
    """Not differentiating the table (LoRA) takes the forward that computes d_hidden itself: same value and
    gradients wrt hidden and weights as the plain loss and as the float64 formula."""
    hidden, table, targets, weights = problem(v=v)
    f = lambda fn: lambda h, w: fn(h, table, targets, w, chunk_size=chunk, softcap=softcap)[0]  # noqa: E731
    got = jax.jit(jax.value_and_grad(f(L.cross_entropy_sum), argnums=(0, 1)))(hidden, weights)
    want = jax.value_and_grad(f(L.plain_cross_entropy_sum), argnums=(0, 1))(hidden, weights)
    assert rel(got[0], want[0]) <= F32_RTOL
    for name, g, w in zip(("hidden", "weights"), got[1], want[1]):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert rel(g, w) <= F32_RTOL, (name, rel(g, w))
    _, dh, _ = float64_reference(hidden, table, targets, weights, softcap)
    assert rel(np.asarray(got[1][0]).reshape(dh.shape), dh) <= F32_RTOL
    excluded = np.asarray(weights).reshape(-1) == 0
    assert np.all(np.asarray(got[1][0]).reshape(-1, hidden.shape[-1])[excluded] == 0)
    # the two paths are one loss: d_hidden with the table differentiated equals d_hidden without
    both = jax.grad(lambda h, e: L.cross_entropy_sum(h, e, targets, weights, chunk_size=chunk,
                                                     softcap=softcap)[0], argnums=(0, 1))(hidden, table)
    assert rel(got[1][0], both[0]) <= F32_RTOL


def test_head_products_run_once():
    """No head-sized product runs twice: the held-table gradient runs two (logits, d_hidden), the
    differentiated-table one three (logits, d_hidden, d_table): counted in the HLO."""
    hidden, table, targets, weights = problem(shape=(2, 8), v=512, d=32)
    count = {}
    for name, argnums in (("held", 0), ("both", (0, 1))):
        g = jax.grad(lambda h, e: L.cross_entropy_sum(h, e, targets, weights, chunk_size=128)[0], argnums=argnums)
        text = jax.jit(g).lower(hidden, table).as_text()
        count[name] = text.count("dot_general")
    assert count == {"held": 2, "both": 3}, count


def test_mean_jit_remat_and_empty():
    hidden, table, targets, weights = problem(shape=(2, 9), v=500)
    mean = lambda h, e: L.cross_entropy(h, e, targets, weights, chunk_size=128)  # noqa: E731
    plain = lambda h, e: (lambda s, c: s / jnp.maximum(c, 1.0))(  # noqa: E731
        *L.plain_cross_entropy_sum(h, e, targets, weights))
    want = jax.value_and_grad(plain, argnums=(0, 1))(hidden, table)
    got = jax.jit(jax.value_and_grad(jax.checkpoint(mean), argnums=(0, 1)))(hidden, table)
    assert rel(got[0], want[0]) <= F32_RTOL
    for g, w in zip(got[1], want[1]):
        assert rel(g, w) <= F32_RTOL
    # no loss positions: mean 0, finite zero gradients
    zero = jnp.zeros_like(weights)
    value, grads = jax.value_and_grad(lambda h, e: L.cross_entropy(h, e, targets, zero, chunk_size=128),
                                      argnums=(0, 1))(hidden, table)
    assert float(value) == 0.0 and all(not np.any(np.asarray(g)) for g in grads)


def test_bf16():
    hidden, table, targets, weights = problem(shape=(4, 16), v=3000, d=64, seed=1)
    hb, eb = hidden.astype(jnp.bfloat16), table.astype(jnp.bfloat16)
    got = value_and_grads(L.cross_entropy_sum, hb, eb, targets, weights, chunk_size=512)
    want = value_and_grads(L.plain_cross_entropy_sum, hb.astype(jnp.float32), eb.astype(jnp.float32),
                           targets, weights)
    assert got[0].dtype == jnp.float32
    assert rel(got[0], want[0]) <= 1e-5
    assert got[2][0].dtype == jnp.bfloat16 and got[2][1].dtype == jnp.bfloat16
    for name, g, w in zip(("hidden", "embedding"), got[2][:2], want[2][:2]):
        assert rel(g, w) <= BF16_GRAD_RTOL, (name, rel(g, w))
    # the table held constant (the d_hidden-in-forward path): same bound
    held = jax.grad(lambda h: L.cross_entropy_sum(h, eb, targets, weights, chunk_size=512)[0])(hb)
    assert held.dtype == jnp.bfloat16
    assert rel(held, want[2][0]) <= BF16_GRAD_RTOL, rel(held, want[2][0])


def test_bad_inputs():
    hidden, table, targets, weights = problem(v=100)
    with pytest.raises(ValueError, match="D = 24"):
        L.cross_entropy_sum(hidden[..., :8], table, targets, weights)
    with pytest.raises(ValueError, match="leading shape"):
        L.cross_entropy_sum(hidden, table, targets[:, :-1], weights)
    with pytest.raises(TypeError, match="integer"):
        L.cross_entropy_sum(hidden, table, targets.astype(jnp.float32), weights)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        L.cross_entropy_sum(hidden, table, targets, jnp.ones_like(weights))
    with pytest.raises(ValueError, match="chunk_size"):
        L.cross_entropy_sum(hidden, table, targets, weights, chunk_size=0)


def test_peak_memory_270m_shape():
    """value + grad (wrt hidden and table) at 8 x 512 tokens, V = 262144, D = 640, f32: compiled, not run."""
    b, t, v, d = 8, 512, 262144, 640
    spec = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32))
    stats = {}
    for fn in (L.cross_entropy_sum, L.plain_cross_entropy_sum):
        f = lambda h, e, tg, w, fn=fn: fn(h, e, tg, w)[0]  # noqa: E731
        m = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*spec).compile().memory_analysis()
        stats[fn.__name__] = m
        print(f"{fn.__name__}: temp {m.temp_size_in_bytes / 2**20:.0f} MiB, arguments "
              f"{m.argument_size_in_bytes / 2**20:.0f} MiB, outputs {m.output_size_in_bytes / 2**20:.0f} MiB")
    chunked, plain = stats["cross_entropy_sum"], stats["plain_cross_entropy_sum"]
    logits_bytes = b * t * v * 4
    assert plain.temp_size_in_bytes >= logits_bytes  # the plain one does hold the [tokens, V] logits
    assert chunked.temp_size_in_bytes < plain.temp_size_in_bytes / 8
    assert chunked.temp_size_in_bytes < logits_bytes / 4  # a few [tokens, chunk] buffers (16 chunks)


# ---- the real 270M against HF transformers ----

HF_PATH = FIXTURES / "finetune" / "hf_loss.json"
HF_ATOL = 1e-4


def _hf():
    return json.loads(HF_PATH.read_text())


def _loss_inputs(ids, labels):
    """Shifted targets and weights of one (possibly padded) row: position i predicts token i + 1."""
    ids, labels = np.asarray(ids), np.asarray(labels)
    return ids[..., 1:], (labels[..., 1:] != -100).astype(np.float32)


@pytest.mark.real
def test_loss_matches_hf_270m(model_270m):
    hf = _hf()
    table = model_270m.embedder.embedding[...]
    diffs = []
    for ex in hf["examples"]:
        hidden = model_270m(jnp.asarray([ex["ids"]]), return_hidden=True)[:, :-1]
        targets, weights = _loss_inputs([ex["ids"]], [ex["labels"]])
        assert int(weights.sum()) == ex["n_label_tokens"]
        ours = float(L.cross_entropy(hidden, table, jnp.asarray(targets), jnp.asarray(weights)))
        diffs.append(abs(ours - ex["loss"]))
        print(f"{ex['name']}: ours {ours:.6f} HF {ex['loss']:.6f} |diff| {diffs[-1]:.2e}")
        assert diffs[-1] <= HF_ATOL, ex["name"]
    # the batch, right-padded: causal attention keeps padding after a row's tokens out of its hidden states
    length = hf["batch"]["length"]
    ids = np.array([ex["ids"] + [hf["pad_id"]] * (length - len(ex["ids"])) for ex in hf["examples"]])
    labels = np.array([ex["labels"] + [-100] * (length - len(ex["labels"])) for ex in hf["examples"]])
    hidden = model_270m(jnp.asarray(ids), return_hidden=True)[:, :-1]
    targets, weights = _loss_inputs(ids, labels)
    ours = float(L.cross_entropy(hidden, table, jnp.asarray(targets), jnp.asarray(weights)))
    print(f"batch: ours {ours:.6f} HF {hf['batch']['loss']:.6f} |diff| {abs(ours - hf['batch']['loss']):.2e}; "
          f"max per-example |diff| {max(diffs):.2e}")
    assert abs(ours - hf["batch"]["loss"]) <= HF_ATOL


@pytest.mark.real
def test_render_matches_hf_fixture(tokenizer_270m):
    """gemma.train.data.render gives the fixture's ids and loss tokens. One allowed difference: the fixture
    (like HF's chat template) closes the last model turn with <end_of_turn> "\\n", render stops at
    <end_of_turn> (what inference generates). That "\\n" is not a loss token and is not a target of any loss
    position, so both give the same loss; the rest must be identical."""
    data = pytest.importorskip("gemma.train.data")
    for ex in _hf()["examples"]:
        got = data.render({"messages": ex["messages"]}, tokenizer_270m)
        ids, mask = [int(i) for i in np.asarray(got.ids)], [bool(m) for m in np.asarray(got.loss_mask)]
        want_ids, want_mask = ex["ids"], [lab != -100 for lab in ex["labels"]]
        assert want_ids[-2:] == [106, 107] and not want_mask[-1]
        if len(ids) == len(want_ids) - 1:
            want_ids, want_mask = want_ids[:-1], want_mask[:-1]
        assert ids == want_ids, ex["name"]
        assert mask == want_mask, ex["name"]
