"""Quantized models: `checkpoints.load(source, quantize="int8" | "int4")`.

Every projection of the language model becomes a kernels.quantized.QuantizedEinsum and the
tied embedding a gemma.layers.QuantizedEmbedder. "int8": symmetric groups of 32; "int4":
asymmetric groups of 32 for the projections, with the embedding (the output head) kept at
8 bits. Norms and the vision tower stay in the model's dtype. A GGUF's quantized tensors keep
their own format, converted exactly (checkpoints/from_gguf.py, checkpoints/gguf_quant.py); other
sources are loaded, then quantized one weight at a time.
"""

from __future__ import annotations

import functools

from flax import nnx

from checkpoints.params import hf_specs
from gemma.layers import QuantizedEmbedder
from kernels.dense import Einsum
from kernels.quantized import MODES, QArray, QuantizedData, QuantizedEinsum, quantize

EMBEDDING = ("embedder", "embedding")


def bits_of(quantize: str | None) -> int | None:
    """8, 4 or None for quantize= "int8", "int4" or None; anything else raises naming the choices."""
    if quantize is None:
        return None
    if quantize not in MODES:
        raise ValueError(f"unknown quantize={quantize!r}; expected one of {', '.join(map(repr, MODES))} or None")
    return 8 if quantize == "int8" else 4


def weight_bits(path: tuple, bits: int) -> int:
    """The precision of the weight at `path` under a mode of `bits`: the head stays 8-bit."""
    return 8 if path == EMBEDDING else bits


def quantized_paths(config) -> dict[str, tuple]:
    """HF key -> spec path of every weight a quantized model holds quantized (text model matrices)."""
    return {key: spec.path for key, spec in hf_specs(config).items()
            if spec.path[0] != "vision" and (spec.path == EMBEDDING or spec.path[-1] == "w")}


def _at(model, path: tuple):
    return functools.reduce(lambda obj, key: obj[key] if isinstance(key, int) else getattr(obj, key), path, model)


def float_module(model, path: tuple) -> Einsum | None:
    """The Einsum whose weight is at `path` (None for the embedding)."""
    return None if path == EMBEDDING else _at(model, path[:-1])


def install(model, path: tuple, w: QArray) -> None:
    """Puts the quantized weight `w` (rows x contraction) where the float weight at `path` was."""
    if path == EMBEDDING:
        vocab, d = w.shape
        model.embedder = QuantizedEmbedder(QuantizedEinsum("BTD,VD->BTV", (vocab, d), w, ("vocab", "embed")))
        return
    einsum = float_module(model, path)
    axes = einsum.w.get_metadata().get("logical_axes", ())
    setattr(_at(model, path[:-2]), path[-2], QuantizedEinsum(einsum.spec, einsum.w.shape, w, axes))


def quantize_model(model, mode: str):
    """Quantizes a float model's projections and embedding in place (each float weight is dropped
    once its quantized form is installed); returns the model."""
    bits = bits_of(mode)
    for key, path in quantized_paths(model.config).items():
        if path == EMBEDDING:
            install(model, path, quantize(model.embedder.embedding[...], 8, name=key))
            continue
        einsum = float_module(model, path)
        axes = einsum.w.get_metadata().get("logical_axes", ())
        q = QuantizedEinsum.from_float(einsum.spec, einsum.w[...], bits, key, axes)
        setattr(_at(model, path[:-2]), path[-2], q)
    return model


def quantized_bytes(model) -> int:
    """Bytes of the quantized weights (data, scales, minima) of a model."""
    return sum(int(v[...].size) * v[...].dtype.itemsize for _, v in nnx.iter_graph(model) if isinstance(v, QuantizedData))
