"""Gemma 3 from a llama.cpp GGUF file (any quantization the `gguf` package reads).

llama.cpp stores matrices in HF's [out, in] row order and every RMSNorm weight
as (1 + w); we rename to HF keys, subtract the 1, and hand over to
`params.build_model`.
"""

from __future__ import annotations

import functools
import os
import re

import numpy as np

from checkpoints.gguf_file import GGUFFile
from checkpoints.params import build_model
from gemma.config import PRESETS, GemmaConfig

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


def load_gguf(path: str | os.PathLike, dtype) -> "Transformer":  # noqa: F821
    f = open_gguf(os.fspath(path))
    config = config_from_gguf(f)
    names = {hf_name(n): n for n in f.tensors}
    shapes = {key: f.tensors[name].shape for key, name in names.items()}

    def read(key: str) -> np.ndarray:
        w = f.read(names[key])
        return w - 1.0 if _is_norm(key) else w

    return build_model(config, dtype, shapes, read, os.path.basename(f.path))


def tokenizer_vocab(path: str | os.PathLike) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token_types) of the GGUF's embedded SentencePiece vocabulary."""
    f = open_gguf(os.fspath(path))
    try:
        return (f.fields["tokenizer.ggml.tokens"], f.fields["tokenizer.ggml.scores"],
                f.fields["tokenizer.ggml.token_type"])
    except KeyError as e:
        raise ValueError(f"{f.path} carries no tokenizer vocabulary (missing {e})") from None
