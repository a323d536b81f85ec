"""The one map between HF tensor names / layouts and our parameter tree.

Every importer (HF safetensors, GGUF) names tensors in HF's text-model scheme
(`embed_tokens.weight`, `layers.{i}.self_attn.q_proj.weight`, ...) with HF's
layouts ([out, in] matrices); `build_model` checks them all against the config
and fills an abstract model, so a mismatched file fails before any large
allocation, with every problem named at once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from gemma.config import GemmaConfig
from gemma.transformer import Transformer


def _identity(x):
    return x


def _transpose(x):
    return x.T


@dataclasses.dataclass(frozen=True)
class Spec:
    path: tuple  # attribute path inside Transformer, e.g. ("layers", 0, "attn", "q_proj", "w")
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray] = _identity  # HF layout -> ours (import)
    to_hf: Callable[[np.ndarray], np.ndarray] = _identity  # its inverse (export)


def hf_specs(config: GemmaConfig) -> dict[str, Spec]:
    """HF key (without the model prefix) -> where and how it goes in our tree, and back."""
    c = config
    d, n, k, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_dim
    specs = {"embed_tokens.weight": Spec(("embedder", "embedding"), (c.vocab_size, d)),
             "norm.weight": Spec(("final_norm", "scale"), (d,))}
    norms = {"input_layernorm": "pre_attention_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "pre_ffw_norm", "post_feedforward_layernorm": "post_ffw_norm"}
    for i in range(c.num_layers):
        p = f"layers.{i}."
        for hf_name, ours in norms.items():
            specs[p + hf_name + ".weight"] = Spec(("layers", i, ours, "scale"), (d,))
        for hf_name in ("q_norm", "k_norm"):
            specs[p + f"self_attn.{hf_name}.weight"] = Spec(("layers", i, "attn", hf_name, "scale"), (h,))
        specs[p + "self_attn.q_proj.weight"] = Spec(
            ("layers", i, "attn", "q_proj", "w"), (n * h, d), lambda w: w.T.reshape(d, n, h),
            lambda x: x.reshape(d, n * h).T)
        for name in ("k_proj", "v_proj"):
            specs[p + f"self_attn.{name}.weight"] = Spec(
                ("layers", i, "attn", name, "w"), (k * h, d), lambda w: w.T.reshape(d, k, h),
                lambda x: x.reshape(d, k * h).T)
        specs[p + "self_attn.o_proj.weight"] = Spec(
            ("layers", i, "attn", "o_proj", "w"), (d, n * h), lambda w: w.T.reshape(n, h, d),
            lambda x: x.reshape(n * h, d).T)
        for name in ("gate_proj", "up_proj"):
            specs[p + f"mlp.{name}.weight"] = Spec(("layers", i, "mlp", name, "w"), (f, d), _transpose, _transpose)
        specs[p + "mlp.down_proj.weight"] = Spec(("layers", i, "mlp", "down_proj", "w"), (d, f), _transpose, _transpose)
    if c.vision is not None:
        specs.update(vision_specs(c))
    return specs


def vision_specs(config: GemmaConfig) -> dict[str, Spec]:
    """HF SigLIP tower (`vision_tower.*`, without `vision_model.`) and projector keys."""
    v = config.vision
    w, heads, p, f = v.width, v.num_heads, v.patch_size, v.mlp_dim
    h = w // heads
    enc, t = ("vision", "encoder"), "vision_tower."
    specs = {
        t + "embeddings.patch_embedding.weight": Spec(enc + ("patch_embedding",), (w, 3, p, p),
                                                      lambda x: x.transpose(2, 3, 1, 0),
                                                      lambda x: x.transpose(3, 2, 0, 1)),
        t + "embeddings.patch_embedding.bias": Spec(enc + ("patch_bias",), (w,)),
        t + "embeddings.position_embedding.weight": Spec(enc + ("position_embedding",), (v.num_patches, w)),
        t + "post_layernorm.weight": Spec(enc + ("post_layernorm", "scale"), (w,)),
        t + "post_layernorm.bias": Spec(enc + ("post_layernorm", "bias"), (w,)),
        "multi_modal_projector.mm_input_projection_weight": Spec(("vision", "projector", "projection", "w"),
                                                                 (w, config.d_model)),
        "multi_modal_projector.mm_soft_emb_norm.weight": Spec(("vision", "projector", "norm_scale"), (w,)),
    }
    for i in range(v.depth):
        k, path = f"{t}encoder.layers.{i}.", enc + ("layers", i)
        for ln in ("layer_norm1", "layer_norm2"):
            specs[k + ln + ".weight"] = Spec(path + (ln, "scale"), (w,))
            specs[k + ln + ".bias"] = Spec(path + (ln, "bias"), (w,))
        for name in ("q", "k", "v"):
            specs[k + f"self_attn.{name}_proj.weight"] = Spec(path + (f"{name}_proj", "w"), (w, w),
                                                              lambda x: x.T.reshape(w, heads, h),
                                                              lambda x: x.reshape(w, w).T)
            specs[k + f"self_attn.{name}_proj.bias"] = Spec(path + (f"{name}_bias",), (w,),
                                                            lambda x: x.reshape(heads, h), lambda x: x.reshape(w))
        specs[k + "self_attn.out_proj.weight"] = Spec(path + ("o_proj", "w"), (w, w), lambda x: x.T.reshape(heads, h, w),
                                                      lambda x: x.reshape(w, w).T)
        specs[k + "self_attn.out_proj.bias"] = Spec(path + ("o_bias",), (w,))
        specs[k + "mlp.fc1.weight"] = Spec(path + ("fc1", "w"), (f, w), _transpose, _transpose)
        specs[k + "mlp.fc1.bias"] = Spec(path + ("fc1_bias",), (f,))
        specs[k + "mlp.fc2.weight"] = Spec(path + ("fc2", "w"), (w, f), _transpose, _transpose)
        specs[k + "mlp.fc2.bias"] = Spec(path + ("fc2_bias",), (w,))
    return specs


def _variable(model: nnx.Module, path: tuple) -> nnx.Variable:
    return functools.reduce(lambda obj, key: obj[key] if isinstance(key, int) else getattr(obj, key), path, model)


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], header: str,
                 ignore: Callable[[str], bool] = lambda key: False) -> None:
    """Raises one ValueError, `header` then every missing, unexpected (not `ignore`d) or mis-shaped tensor of
    `found` against `expected` (name -> shape), at most 20 of each kind by name."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected and not ignore(key)]
    misshaped = [f"{key}: expected {expected[key]}, found {tuple(found[key])}"
                 for key in expected if key in found and tuple(found[key]) != tuple(expected[key])]
    if missing or unexpected or misshaped:
        lines = [header]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {len(items)} {title} tensor(s): " + "; ".join(shown))
        raise ValueError("\n".join(lines))


def check_tensors(config: GemmaConfig, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Spec]:
    """Raises one ValueError naming every missing, unexpected or mis-shaped tensor."""
    specs = hf_specs(config)
    check_shapes({key: spec.hf_shape for key, spec in specs.items()}, shapes,
                 f"checkpoint {source} does not match the config "
                 f"({config.num_layers} layers, d_model {config.d_model}, vocab {config.vocab_size}):")
    return specs


def build_model(config: GemmaConfig, dtype, shapes: dict[str, tuple[int, ...]],
                read: Callable[[str], np.ndarray], source: str) -> Transformer:
    """Checks `shapes` (HF key -> HF shape), then fills a model from `read(key)` (HF layout)."""
    specs = check_tensors(config, shapes, source)
    model = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    for key in tqdm(list(specs), desc=f"loading {source}", unit="tensor", leave=False):
        spec = specs[key]
        _variable(model, spec.path).set_value(jnp.asarray(spec.to_ours(read(key)), dtype))
    return model

