"""Quantized weights: formats, exact GGUF conversions, the CPU kernels against NumPy, models, bad input."""

import os
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

import checkpoints
from checkpoints import gguf_quant
from checkpoints.params import hf_specs
from checkpoints.quantize import quantize_model
from gemma import config as C
from gemma.layers import QuantizedEmbedder
from gemma.transformer import Transformer
from kernels import cpu_quantized, quantized
from kernels.dense import Einsum, dense, einsum_axes
from kernels.quantized import QArray, QuantizedEinsum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# byte offsets of each type's float16 fields (kept finite in random blocks)
F16_AT = {T.Q8_0: (0,), T.Q5_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q4_K: (0, 2), T.Q6_K: (208,),
          T.Q5_K: (0, 2)}


def random_blocks(qtype, rows, k, rng):
    """Random raw bytes of a [rows, k] tensor of `qtype`, with finite float16 scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * k // block, size), dtype=np.uint8)
    for at in F16_AT[qtype]:
        raw[:, at:at + 2] = rng.uniform(-0.1, 0.1, (len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw


def converted(raw, qtype, rows, k):
    """Our QArray [rows, k] of a tensor's raw blocks (the loader's conversion, in one piece)."""
    bits, group, convert = gguf_quant.FORMATS[qtype]
    data, scale, minimum = (None if a is None else a.reshape(rows, -1) for a in convert(raw))
    return QArray(data, scale, minimum, bits, group)


# ------------------------------------------------------------------ formats
@pytest.mark.parametrize("qtype", list(gguf_quant.FORMATS))
def test_gguf_types_convert_exactly(qtype):
    """Each served type dequantizes, in our format, to gguf's dequantization bit for bit (zeros compared
    unsigned: Q4_0's d * (q - 8) gives -0.0 for d < 0 where our s * q - m gives +0.0, a zero either way)."""
    rng = np.random.default_rng(int(qtype))
    rows, k = 6, 512
    raw = random_blocks(qtype, rows, k, rng)
    want = gguf.quants.dequantize(raw.reshape(rows, -1), qtype)
    got = np.asarray(quantized.dequantize(jax.tree.map(jnp.asarray, converted(raw, qtype, rows, k))))
    assert want.shape == got.shape == (rows, k)
    np.testing.assert_array_equal((got + np.float32(0)).view(np.uint32), (want + np.float32(0)).view(np.uint32))


def test_int4_packing_round_trips():
    q = np.random.default_rng(0).integers(0, 16, (3, 5, 64), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(quantized.unpack_int4(jnp.asarray(quantized.pack_int4(q)))), q)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_error_is_half_a_step(bits):
    w = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    qa = quantized.quantize(w, bits)
    back = np.asarray(quantized.dequantize(jax.tree.map(jnp.asarray, qa)))
    step = np.repeat(qa.scale.astype(np.float32), 32, axis=-1)
    assert np.all(np.abs(back - w) <= 0.5 * step + 1e-6)
    assert qa.nbytes == w.size * bits // 8 + qa.scale.nbytes + (0 if qa.minimum is None else qa.minimum.nbytes)


# ------------------------------------------------------------------ kernels
def reference(x, w: QArray):
    """The same quantized arithmetic in NumPy: float32 s * q (- m), products summed in float64."""
    q = (quantized.unpack_int4(jnp.asarray(w.data)) if w.bits == 4 else w.data)
    q = np.asarray(q, np.float32).reshape(w.data.shape[0], -1, w.group)
    deq = np.asarray(w.scale, np.float32)[..., None] * q
    if w.minimum is not None:
        deq = deq - np.asarray(w.minimum, np.float32)[..., None]
    return np.asarray(x, np.float64) @ deq.reshape(w.data.shape[0], -1).astype(np.float64).T


def random_qarray(bits, scale_dtype, group, r, k, rng):
    data = (rng.integers(0, 256, (r, k // 2), dtype=np.uint8) if bits == 4
            else rng.integers(-128, 128, (r, k), dtype=np.int8))
    scale = rng.uniform(0.001, 0.02, (r, k // group)).astype(scale_dtype)
    minimum = rng.uniform(0, 0.1, (r, k // group)).astype(scale_dtype) if bits == 4 else None
    return QArray(data, scale, minimum, bits, group)


CASES = [(8, 16, 32), (8, 32, 16), (4, 32, 32), (4, 16, 32), (8, 16, "K")]  # (bits, scale bits, group; K: per channel)


def as_the_kernel_reads(x, w: QArray, isa: str):
    """x as `isa`'s build multiplies it: quantized per block of 32 to int8 and back (exactly d * q) by the
    builds that quantize activations, where they serve the shape; x itself otherwise."""
    if isa in cpu_quantized.QUANTIZES_X and cpu_quantized.vnni_serves(w.shape[1], w.group):
        q, d = cpu_quantized.quantize_x(x)
        return (q.reshape(len(x), -1, 32).astype(np.float64) * d[..., None]).reshape(x.shape)
    return x


def test_quantize_x_rounds_each_block_to_its_own_scale():
    x = np.concatenate([np.linspace(-2, 2, 32), np.zeros(32), 1e-3 * np.arange(32)]).astype(np.float32)[None]
    q, d = cpu_quantized.quantize_x(x)
    np.testing.assert_allclose(d[0], [2 / 127, 0, 31e-3 / 127], rtol=1e-6)
    assert q[0, 0] == -127 and q[0, 31] == 127 and not q[0, 32:64].any() and q[0, 95] == 127
    assert np.abs(q[0, :32].astype(np.float32) * d[0, 0] - x[0, :32]).max() <= d[0, 0] / 2 + 1e-7


@pytest.mark.skipif(not cpu_quantized.supported(), reason="needs an x86 CPU with AVX2")
@pytest.mark.parametrize("isa", list(cpu_quantized.ISAS))
@pytest.mark.parametrize("bits,sbits,group", CASES)
@pytest.mark.parametrize("m,k,r", [(1, 640, 2048), (3, 64, 37), (8, 1280, 96), (11, 128, 5), (5, 640, 1),
                                   (2, 96, 7)])
def test_kernel_equals_numpy(isa, bits, sbits, group, m, k, r):
    """Row counts 1-11 (11 takes two 8-row passes), weight rows not a multiple of the tile, groups of 16,
    32 and one per output channel, float16 and float32 scales, each instruction set this CPU runs; the VNNI
    build against the same arithmetic on x quantized per block (k = 96: not whole chunks of 64, so the
    weights are widened instead)."""
    if isa not in cpu_quantized.supported():
        pytest.skip(f"this CPU has no {isa}")
    group = k if group == "K" else group
    rng = np.random.default_rng(m * 100 + k + r)
    w = random_qarray(bits, np.float16 if sbits == 16 else np.float32, group, r, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, w: cpu_quantized.matmul(x, w, isa))(x, jax.tree.map(jnp.asarray, w)))
    want = reference(as_the_kernel_reads(x, w, isa), w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.skipif("avx512vnni" not in cpu_quantized.supported(), reason="needs a CPU with AVX-512 VNNI")
def test_vnni_build_alone_serves_shapes_it_hands_to_the_widening_build():
    """In a fresh process whose first quantized product is the VNNI build's on a shape it hands on (k = 96, not
    whole chunks of 64): the widening build it hands to is registered too, whatever ran before."""
    script = ("import jax, numpy as np\n"
              "from kernels import cpu_quantized\n"
              "from kernels.quantized import QArray\n"
              "rng = np.random.default_rng(0)\n"
              "w = QArray(jax.numpy.asarray(rng.integers(-128, 128, (7, 96), dtype=np.int8)),\n"
              "           jax.numpy.asarray(rng.uniform(0.001, 0.02, (7, 6)).astype(np.float32)), None, 8, 16)\n"
              "x = rng.standard_normal((2, 96)).astype(np.float32)\n"
              "got = np.asarray(jax.jit(lambda x, w: cpu_quantized.matmul(x, w, 'avx512vnni'))(x, w))\n"
              "want = x @ (np.asarray(w.data, np.float32) * np.repeat(np.asarray(w.scale), 16, 1)).T\n"
              "np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("GEMMA_CPU_ISA", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not cpu_quantized.supported(), reason="needs an x86 CPU with AVX2")
@pytest.mark.parametrize("isa", list(cpu_quantized.ISAS))
@pytest.mark.parametrize("bits,group", [(8, 32), (8, 16), (4, 32)])
def test_kernel_row_alone_gives_the_same_bits(isa, bits, group):
    """Each row's products are the same bits whatever rows share its pass: a speculative verify pass of 5 rows
    and a 1-row decode step give the target the same logits; so does jax.vmap over single rows."""
    if isa not in cpu_quantized.supported():
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.default_rng(11)
    w = jax.tree.map(jnp.asarray, random_qarray(bits, np.float16, group, 301, 640, rng))
    x = jnp.asarray(rng.standard_normal((7, 640)), jnp.float32)
    f = jax.jit(lambda x, w: cpu_quantized.matmul(x, w, isa))
    together = np.asarray(f(x, w))
    for i in range(7):
        np.testing.assert_array_equal(np.asarray(f(x[i:i + 1], w))[0], together[i])
    np.testing.assert_array_equal(np.asarray(f(x[2:5], w)), together[2:5])
    batched = jax.jit(jax.vmap(lambda x, w: cpu_quantized.matmul(x, w, isa), (0, None)))  # one call per row
    np.testing.assert_array_equal(np.asarray(batched(x[:, None], w))[:, 0], together)


@pytest.mark.skipif(not cpu_quantized.supported(), reason="needs an x86 CPU with AVX2")
@pytest.mark.parametrize("isa", list(cpu_quantized.ISAS))
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_is_bitwise_reproducible(isa, bits):
    if isa not in cpu_quantized.supported():
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.default_rng(5)
    w = jax.tree.map(jnp.asarray, random_qarray(bits, np.float32, 32, 4096, 640, rng))
    x = jnp.asarray(rng.standard_normal((8, 640)), jnp.float32)
    f = jax.jit(lambda x, w: cpu_quantized.matmul(x, w, isa))
    first = np.asarray(f(x, w))
    for _ in range(30):
        np.testing.assert_array_equal(np.asarray(f(x, w)), first)


# ------------------------------------------------------------------ modules and models
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("spec,xs,ws", [("BTD,DNH->BTNH", (2, 1, 64), (64, 4, 16)),
                                        ("BTNH,NHD->BTD", (1, 3, 4, 16), (4, 16, 32)),
                                        ("BTF,FD->BTD", (4, 5, 96), (96, 48))])
def test_quantized_einsum_is_the_einsum_of_its_dequantized_weight(spec, xs, ws, bits):
    """Decode-sized (kernel) and longer (XLA) products, and the activation gradient (for QLoRA)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    layer = QuantizedEinsum.from_float(spec, rng.standard_normal(ws).astype(np.float32), bits, "w")
    lhs, rhs, out, batch, contract, rest = einsum_axes(spec)
    rows = quantized.dequantize(layer.weight()).reshape(*(ws[rhs.index(a)] for a in rest + contract))
    w = jnp.transpose(rows, [(rest + contract).index(a) for a in rhs])  # back to the einsum's layout
    want = jnp.einsum(spec, x, w, precision="highest")
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    gx = jax.grad(lambda x: jnp.sum(layer(x) ** 2))(x)
    gw = jax.grad(lambda x: jnp.sum(jnp.einsum(spec, x, w, precision="highest") ** 2))(x)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gw), rtol=1e-4, atol=1e-4)


def dequantized_twin(model):
    """A float model holding exactly the quantized model's dequantized weights."""
    twin = Transformer(model.config, rngs=nnx.Rngs(0))
    for key, spec in hf_specs(model.config).items():
        path = spec.path
        if path == ("embedder", "embedding"):
            twin.embedder.embedding.set_value(quantized.dequantize(model.embedder.table.weight()))
            continue
        owner = model
        for p in path[:-1]:
            owner = owner[p] if isinstance(p, int) else getattr(owner, p)
        target = twin
        for p in path[:-1]:
            target = target[p] if isinstance(p, int) else getattr(target, p)
        if isinstance(owner, QuantizedEinsum):
            lhs, rhs, out, batch, contract, rest = einsum_axes(owner.spec)
            sizes = dict(zip(rhs, owner.shape))
            rows = quantized.dequantize(owner.weight()).reshape(*(sizes[a] for a in rest + contract))
            target.w.set_value(jnp.transpose(rows, [(rest + contract).index(a) for a in rhs]))
        else:
            getattr(target, path[-1]).set_value(getattr(owner, path[-1])[...])
    return twin


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_runs_its_dequantized_weights(mode):
    model = quantize_model(Transformer(C.tiny(), rngs=nnx.Rngs(0)), mode)
    assert isinstance(model.embedder, QuantizedEmbedder) and model.embedder.table.bits == 8  # the head stays 8-bit
    assert all(block.mlp.up_proj.bits == (8 if mode == "int8" else 4) for block in model.layers)
    twin = dequantized_twin(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 9)), jnp.int32)
    for t in (1, 9):  # one token per row: the kernels; nine: XLA's dots on dequantized weights
        np.testing.assert_allclose(np.asarray(model(tokens[:, :t])), np.asarray(twin(tokens[:, :t])),
                                   rtol=1e-5, atol=2e-5)
    first = np.asarray(model(tokens[:, :1]))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(model(tokens[:, :1])), first)


TINY_GGUF = C.tiny(d_model=256, num_heads=4, head_dim=64, num_kv_heads=1, hidden_dim=512, num_layers=2,
                     layer_types=None)
# types per GGUF tensor kind, as llama.cpp's Q4_K_M mixes them (plus Q4_0 / Q4_1)
KINDS = {"token_embd": T.Q8_0, "attn_q": T.Q5_0, "attn_k": T.Q4_0, "attn_v": T.Q8_0, "attn_output": T.Q4_K,
         "ffn_gate": T.Q5_0, "ffn_up": T.Q4_1, "ffn_down": T.Q6_K}


def write_random_gguf(path, config, kinds=KINDS, seed=0):
    """A gemma3 GGUF of `config` whose matrices are random blocks of the types in `kinds`."""
    from checkpoints.from_gguf import hf_name

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in [("context_length", 512), ("embedding_length", config.d_model),
                       ("block_count", config.num_layers), ("feed_forward_length", config.hidden_dim),
                       ("attention.head_count", config.num_heads), ("attention.head_count_kv", config.num_kv_heads),
                       ("attention.key_length", config.head_dim), ("attention.sliding_window", config.sliding_window)]:
        w.add_uint32(f"gemma3.{key}", value)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    names = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{n}.weight" for i in range(config.num_layers) for n in (
            "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "attn_norm",
            "post_attention_norm", "ffn_norm", "post_ffw_norm", "ffn_gate", "ffn_up", "ffn_down")]
    specs = hf_specs(config)
    raws = {}
    for name in names:
        shape = specs[hf_name(name)].hf_shape
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        if len(shape) == 1:
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        raw = random_blocks(kinds[kind], shape[0], shape[1], rng)
        raws[name] = raw
        w.add_tensor(name, raw.reshape(shape[0], -1), raw_dtype=kinds[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def random_gguf(tmp_path_factory):
    return write_random_gguf(tmp_path_factory.mktemp("gguf") / "mixed.gguf", TINY_GGUF)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gguf_load_keeps_each_tensor_exactly(random_gguf, mode):
    """Every matrix of a mixed-type GGUF is held in its exact format (int4 for Q4_*, int8 otherwise,
    whatever the mode): its dequantized weight equals the float load's, which is gguf's, bitwise."""
    model = checkpoints.load(random_gguf, quantize=mode)
    floats = checkpoints.load(random_gguf)
    twin = dequantized_twin(model)
    a, b = nnx.state(twin, nnx.Param), nnx.state(floats, nnx.Param)
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert model.layers[0].attn.o_proj.bits == 4 and model.layers[0].attn.k_proj.bits == 4  # Q4_K, Q4_0
    assert model.layers[0].mlp.down_proj.group == 16 and model.layers[0].attn.q_proj.bits == 8  # Q6_K, Q5_0
    tokens = jnp.asarray([[2, 17, 300, 45]], jnp.int32)
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(floats(tokens)), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ bad input
def test_unknown_quantize_is_named(random_gguf):
    with pytest.raises(ValueError, match=r"unknown quantize='int3'; expected one of 'int8', 'int4'"):
        checkpoints.load(random_gguf, quantize="int3")


def test_contraction_not_whole_groups_names_the_tensor():
    model = Transformer(C.tiny(hidden_dim=80), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj\.weight: contraction of 80 values is not a "
                                         r"multiple of the quantization group size 32"):
        quantize_model(model, "int8")


def test_gguf_type_no_format_holds_is_named(tmp_path):
    path = write_random_gguf(tmp_path / "q5k.gguf", TINY_GGUF, {**KINDS, "ffn_up": T.Q5_K})
    with pytest.raises(ValueError, match=r"GGUF tensor 'blk\.0\.ffn_up\.weight' is Q5_K, which no quantized format "
                                         r"holds exactly"):
        checkpoints.load(path, quantize="int4")
    assert checkpoints.load(path).config.num_layers == 2  # without quantize= it dequantizes


def test_dense_rejects_a_mismatched_quantized_weight():
    layer = QuantizedEinsum.from_float("BTD,DF->BTF", np.ones((64, 32), np.float32), 8, "w")
    with pytest.raises(ValueError, match="contracts 48 values, the quantized weight"):
        dense("BTD,DF->BTF", jnp.ones((1, 1, 48)), layer.weight())
