"""Export to HF transformers: config.json + model.safetensors (+ the tokenizer), what
`save_pretrained` writes, so `AutoModelForCausalLM.from_pretrained(path)` loads it.

    checkpoints.save_hf(model, "out/hf", tokenizer)

A text model is written as Gemma3ForCausalLM (`model.*` keys); a model with a vision tower as
Gemma3ForConditionalGeneration in the Hub's spelling (`language_model.model.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`), which transformers 4.x and 5.x both load.
Tensors are named and laid out by the same table that imports them (checkpoints.params.hf_specs),
so import(export(model)) is the model bit for bit. A projection wrapped by an adapter (a module with
`base`, the Einsum, and `delta()`, its update in the weight's layout: LoRA) is written merged,
w + delta in f32 cast to the weight's dtype; the model itself is not changed.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors.flax import save_file

from checkpoints.params import hf_specs
from gemma.config import GemmaConfig

WEIGHTS_FILE = "model.safetensors"


def _rope(theta: float, factor: float) -> dict:
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "linear", "factor": factor, "rope_theta": theta}


def text_config(config: GemmaConfig, dtype) -> dict:
    """The Gemma3TextConfig fields of `config` (transformers 5 names, plus the 4.x RoPE keys)."""
    c = config
    return {
        "model_type": "gemma3_text", "vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "intermediate_size": c.hidden_dim, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "sliding_window": c.sliding_window,
        "layer_types": ["full_attention" if t == "global" else "sliding_attention" for t in c.layer_types],
        "rope_parameters": {"full_attention": _rope(c.rope_global_base, c.rope_global_scale),
                            "sliding_attention": _rope(c.rope_local_base, 1.0)},
        "rope_theta": c.rope_global_base, "rope_local_base_freq": c.rope_local_base,
        "rope_scaling": (None if c.rope_global_scale == 1.0
                         else {"rope_type": "linear", "factor": c.rope_global_scale}),
        "rms_norm_eps": c.rms_eps, "max_position_embeddings": c.max_context,
        "final_logit_softcapping": c.final_logit_softcap, "attn_logit_softcapping": c.attn_logit_softcap,
        "attention_bias": False, "attention_dropout": 0.0, "use_bidirectional_attention": False,
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "dtype": jnp.dtype(dtype).name,
    }


def hf_config(config: GemmaConfig, dtype=jnp.float32) -> dict:
    """config.json for `config`: Gemma3ForCausalLM, or Gemma3ForConditionalGeneration with a tower."""
    text = text_config(config, dtype)
    if config.vision is None:
        return {"architectures": ["Gemma3ForCausalLM"], **text}
    v = config.vision
    vision = {"model_type": "siglip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
              "num_hidden_layers": v.depth, "num_attention_heads": v.num_heads, "num_channels": 3,
              "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": "gelu_pytorch_tanh",
              "layer_norm_eps": v.eps, "attention_dropout": 0.0, "vision_use_head": False}
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": text, "vision_config": vision, "mm_tokens_per_image": v.tokens_per_image,
            "image_token_index": config.image_token_id, "boi_token_index": config.boi_token_id,
            "eoi_token_index": config.eoi_token_id, "tie_word_embeddings": True, "dtype": text["dtype"]}


def _file_key(key: str, multimodal: bool) -> str:
    """hf_specs key -> the key in the file."""
    if not multimodal:
        return "model." + key
    if key.startswith("vision_tower."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    if key.startswith("multi_modal_projector."):
        return key
    return "language_model.model." + key


def _weight(model, path: tuple, merge: bool = True):
    """The value at `path` (e.g. ("layers", 0, "attn", "q_proj", "w")); an adapter's update added when
    `merge` (else the bare weight, for its shape and dtype)."""
    owner = model
    for key in path[:-1]:
        owner = owner[key] if isinstance(key, int) else getattr(owner, key)
    if hasattr(owner, "base") and hasattr(owner, "delta"):  # an adapter around the Einsum
        w = getattr(owner.base, path[-1])
        return (w[...].astype(jnp.float32) + owner.delta()).astype(w.dtype) if merge else w
    return getattr(owner, path[-1])[...] if merge else getattr(owner, path[-1])


def _shards(model, dtype, max_shard_bytes: int) -> list[list[str]]:
    """hf_specs keys grouped into files of at most `max_shard_bytes` (a larger tensor is a file alone)."""
    shards, size = [[]], 0
    for key, spec in hf_specs(model.config).items():
        nbytes = int(np.prod(spec.hf_shape)) * jnp.dtype(dtype or _weight(model, spec.path, merge=False).dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_hf(model, path: str | os.PathLike, tokenizer=None, *, dtype=None, max_shard_bytes: int = 5 << 30) -> str:
    """Writes `model` (adapters merged) as an HF transformers directory; returns the path.

    `dtype` (e.g. jnp.bfloat16) casts every tensor (default: each weight's own). Weights over
    `max_shard_bytes` are split into model-0000i-of-0000n.safetensors files with an index, as
    `save_pretrained` does; one shard is in host memory at a time.
    """
    path = os.path.abspath(os.fspath(path))
    specs, multimodal = hf_specs(model.config), model.config.vision is not None
    shards = _shards(model, dtype, max_shard_bytes)
    os.makedirs(path, exist_ok=True)
    names = ([WEIGHTS_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    index = {}
    for name, keys in zip(names, shards):
        tensors = {}
        for key in keys:
            w = _weight(model, specs[key].path)
            tensors[_file_key(key, multimodal)] = jnp.asarray(specs[key].to_hf(w), dtype or w.dtype)
            index[_file_key(key, multimodal)] = name
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(int(np.prod(s.hf_shape)) * jnp.dtype(dtype or _weight(model, s.path, merge=False).dtype).itemsize
                    for s in specs.values())
        with open(os.path.join(path, WEIGHTS_FILE + ".index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": index}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(model.config, dtype or model.dtype), f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer.model"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                       "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True,
                       "add_eos_token": False, "model_max_length": model.config.max_context}, f, indent=2)
    return path
