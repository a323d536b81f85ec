"""Gemma 3 from an orbax checkpoint of the official `gemma` package (google-deepmind/gemma, `gm`).

    model = checkpoints.load("path/to/gemma3-4b-it")           # a released checkpoint directory
    model = checkpoints.load(path, text_only=True)             # language model only; vision never read

Layouts, told apart by the checkpoint's tree (its metadata; no tensor is read for that):
  released  {'transformer/layer_0/attn/q_einsum': {'w': ...}, 'transformer/embedder': {'input_embedding',
            'mm_...'}, 'SigLiPFromPatches_0/siglip_encoder/Transformer/encoderblock_0/...': {...}}
  nested    what `gm.ckpts.save_params(model.init(...)['params'])` writes: {'layer_0': {'attn': ...},
            'embedder': ..., 'final_norm': ..., 'vision_encoder': {'siglip_encoder': ...}}
Both are named in the nested scheme ('/'-joined, e.g. `layer_0/mlp/gating_einsum`) before anything else.

Official parameter layouts (N / K query / kv heads, D d_model, H head_dim, F MLP width, W SigLIP width):
  q_einsum [N, D, H], kv_einsum [2, K, D, H] (qkv_einsum [3, N, D, H] when K == N), attn_vec_einsum
  [N, H, D], gating_einsum [2, F, D] (gate, up; [2, D, F] untransposed), linear [F, D]; RMSNorm scales
  are applied as (1 + w), like ours. SigLIP (flax): Conv kernel [p, p, 3, W], DenseGeneral q/k/v
  [W, heads, h] and out [heads, h, W], Dense [in, out], LayerNorm scale / bias, pos_embedding [1, P, W];
  the embedder's mm_input_projection [W, D] and mm_soft_embedding_norm [W] are the projector.

The tree tells the layers, widths, heads, vocabulary rows and the SigLIP tower. It cannot tell the
sliding window, RoPE bases and scaling, query scale, context or soft tokens per image: those come from
`preset` when given, else from the preset of gemma/config.py with the tree's shapes, else from the
Gemma 3 family rules (text-only: window 512, no RoPE scaling, 32K context; multimodal: window 1024,
global positions / 8, 128K context; always query scale head_dim^-1/2, RoPE 10k local / 1M global,
256 soft tokens per image).

Official tables hold 262144 rows and no row for the image soft token (the official code marks soft
tokens with -2). Our model marks them with `image_token_id` (262144), so a load with the vision tower
pads the table with zero rows to 262208 (the HF height): those ids are never sampled and soft-token
embeddings are replaced by the projector's output.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import re
from typing import Callable

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from checkpoints.params import check_shapes
from gemma.config import MULTIMODAL_VOCAB_SIZE, PRESETS, GemmaConfig, preset as named_preset
from gemma.transformer import Transformer
from vision.config import SigLIPConfig

ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
SIGLIP = "vision_encoder/siglip_encoder/"
BLOCK = SIGLIP + "Transformer/encoderblock_"
# In released trees, unused by Gemma 3 inference (HF's converter skips them too).
UNUSED = ("embedder/mm_output_embedding", "embedder/mm_input_embedding_extra")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One official tensor: its shape and where it goes (one or more params of ours, each with a map)."""

    shape: tuple[int, ...]
    targets: tuple[tuple[tuple, Callable[[np.ndarray], np.ndarray]], ...]


def is_official_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in ORBAX_MARKERS)


# ---------------------------------------------------------------------- the tree
def read_tree(path: str) -> dict:
    """The checkpoint's metadata tree (nested dicts; leaves have .shape and .dtype)."""
    try:
        meta = ocp.PyTreeCheckpointer().metadata(path)
    except Exception as e:  # orbax raises several types for a missing / damaged metadata file
        raise ValueError(f"{path}: cannot read the orbax checkpoint metadata: {e}") from e
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or not tree:
        raise ValueError(f"{path}: the orbax checkpoint holds no parameter tree")
    return dict(tree)


def _leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def canonical_keys(tree: dict, source: str) -> tuple[str, dict[str, tuple]]:
    """(layout, {nested key: (on-disk path, shape, dtype)}) of an official tree."""
    top = set(tree)
    if any(k.startswith("transformer/stacked_layers") for k in top):
        raise ValueError(f"{source}: the official 'stacked_layers' layout is not supported; re-save it with "
                         f"gm.ckpts.save_params(gm.ckpts.load_params(path), new_path)")
    if all(k.startswith(("transformer/", "SigLiPFromPatches_0/")) for k in top):
        layout = "released"
    elif "embedder" in top:
        layout = "nested"
    else:
        hint = (" (this looks like the params/ folder of checkpoints.save: pass its parent directory)"
                if {"layers", "final_norm"} <= top else "")
        raise ValueError(f"{source}: not an official Gemma checkpoint{hint}: top-level keys {sorted(top)[:8]}; "
                         f"expected 'transformer/...' (released layout) or 'embedder', 'layer_0', ... "
                         f"(gm.ckpts.save_params)")
    keys = {}
    for disk, leaf in _leaves(tree):
        if layout == "released":
            head = disk[0]
            head = ("vision_encoder/" + head[len("SigLiPFromPatches_0/"):] if head.startswith("SigLiPFromPatches_0/")
                    else head[len("transformer/"):])
            name = re.sub(r"/mlp/(gating_einsum|linear)/w$", r"/mlp/\1", "/".join((head,) + disk[1:]))
        else:
            name = "/".join(disk)
        keys[name] = (disk, tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype))
    return layout, keys


# ---------------------------------------------------------------------- config
def _shape(shapes: dict, key: str, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"{source}: the official checkpoint lacks '{key}' (needed to infer the config)")
    return shapes[key]


def infer_config(shapes: dict[str, tuple], source: str, preset: str | None = None) -> GemmaConfig:
    """The full (multimodal when the tree has a vision encoder) config of an official tree."""
    vocab, d = _shape(shapes, "embedder/input_embedding", source)
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"layer_(\d+)/", k))}
    if not layers:
        raise ValueError(f"{source}: the official checkpoint has no 'layer_<i>/...' tensors")
    if "layer_0/attn/qkv_einsum/w" in shapes:
        _, n, _, h = shapes["layer_0/attn/qkv_einsum/w"]
        k = n
    else:
        n, _, h = _shape(shapes, "layer_0/attn/q_einsum/w", source)
        k = _shape(shapes, "layer_0/attn/kv_einsum/w", source)[1]
    gating = _shape(shapes, "layer_0/mlp/gating_einsum", source)
    f = gating[1] if gating[2] == d else gating[2]
    if "layer_0/attn/_query_norm/scale" not in shapes:
        raise ValueError(f"{source}: no QK-norm ('layer_0/attn/_query_norm'): not a Gemma 3 checkpoint "
                         f"(Gemma 1 / 2 have none)")
    vision = vision_config(shapes, source) if any(key.startswith(SIGLIP) for key in shapes) else None
    widths = (max(layers) + 1, d, n, k, h, f)
    if preset is not None:
        base = named_preset(preset)
    else:
        base = next((c for c in (make() for make in PRESETS.values())
                     if (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_dim) == widths),
                    None)
    if base is not None:
        rules = dict(sliding_window=base.sliding_window, query_pre_attn_scalar=base.query_pre_attn_scalar,
                     rope_local_base=base.rope_local_base, rope_global_base=base.rope_global_base,
                     rope_global_scale=base.rope_global_scale, max_context=base.max_context)
    else:
        multimodal = vision is not None
        rules = dict(sliding_window=1024 if multimodal else 512, query_pre_attn_scalar=float(h),
                     rope_global_scale=8.0 if multimodal else 1.0, max_context=131_072 if multimodal else 32_768)
    return GemmaConfig(vocab_size=max(vocab, MULTIMODAL_VOCAB_SIZE) if vision else vocab, num_layers=widths[0],
                       d_model=d, num_heads=n, num_kv_heads=k, head_dim=h, hidden_dim=f, vision=vision, **rules)


def vision_config(shapes: dict[str, tuple], source: str) -> SigLIPConfig:
    p, _, _, width = _shape(shapes, SIGLIP + "embedding/kernel", source)
    num_patches = _shape(shapes, SIGLIP + "pos_embedding", source)[1]
    depth = len({m.group(1) for k in shapes if (m := re.match(re.escape(BLOCK) + r"(\d+)/", k))})
    if depth == 0:
        raise ValueError(f"{source}: no SigLIP blocks '{BLOCK}<i>/...' (a scanned encoder is not supported)")
    block = BLOCK + "0/"
    side = math.isqrt(num_patches)
    return SigLIPConfig(image_size=side * p, patch_size=p, width=width, depth=depth,
                        mlp_dim=_shape(shapes, block + "MlpBlock_0/Dense_0/kernel", source)[1],
                        num_heads=_shape(shapes, block + "MultiHeadDotProductAttention_0/query/kernel", source)[1],
                        tokens_per_image=256 if side % 16 == 0 else num_patches)


# ---------------------------------------------------------------------- specs
def _same(x):
    return x


def official_specs(c: GemmaConfig, vocab_rows: int, fused_qkv: bool = False,
                   transposed_gating: bool = True) -> dict[str, Spec]:
    """Official key -> Spec for config `c`, grouped as they are read (embedder, layers, vision)."""
    d, n, k, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_dim
    pad = c.vocab_size - vocab_rows

    def embedding(x):
        return np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]) if pad > 0 else x

    specs = {"embedder/input_embedding": Spec((vocab_rows, d), ((("embedder", "embedding"), embedding),))}
    if c.vision is not None:
        w = c.vision.width
        specs["embedder/mm_input_projection/w"] = Spec((w, d), ((("vision", "projector", "projection", "w"), _same),))
        specs["embedder/mm_soft_embedding_norm/scale"] = Spec((w,), ((("vision", "projector", "norm_scale"), _same),))
    specs["final_norm/scale"] = Spec((d,), ((("final_norm", "scale"), _same),))

    def heads_first(i):
        return lambda x: x[i].transpose(1, 0, 2)  # [heads, D, H] -> [D, heads, H]

    for i in range(c.num_layers):
        o, ours = f"layer_{i}/", ("layers", i)
        att = ours + ("attn",)
        if fused_qkv:
            specs[o + "attn/qkv_einsum/w"] = Spec((3, n, d, h), tuple((att + (name, "w"), heads_first(j)) for j, name in
                                                                   enumerate(("q_proj", "k_proj", "v_proj"))))
        else:
            specs[o + "attn/q_einsum/w"] = Spec((n, d, h), ((att + ("q_proj", "w"), lambda x: x.transpose(1, 0, 2)),))
            specs[o + "attn/kv_einsum/w"] = Spec((2, k, d, h), ((att + ("k_proj", "w"), heads_first(0)),
                                                                (att + ("v_proj", "w"), heads_first(1))))
        specs[o + "attn/attn_vec_einsum/w"] = Spec((n, h, d), ((att + ("o_proj", "w"), _same),))
        specs[o + "attn/_query_norm/scale"] = Spec((h,), ((att + ("q_norm", "scale"), _same),))
        specs[o + "attn/_key_norm/scale"] = Spec((h,), ((att + ("k_norm", "scale"), _same),))
        mlp = ours + ("mlp",)
        if transposed_gating:  # [2, F, D]
            specs[o + "mlp/gating_einsum"] = Spec((2, f, d), ((mlp + ("gate_proj", "w"), lambda x: x[0].T),
                                                              (mlp + ("up_proj", "w"), lambda x: x[1].T)))
        else:  # [2, D, F]
            specs[o + "mlp/gating_einsum"] = Spec((2, d, f), ((mlp + ("gate_proj", "w"), lambda x: x[0]),
                                                              (mlp + ("up_proj", "w"), lambda x: x[1])))
        specs[o + "mlp/linear"] = Spec((f, d), ((mlp + ("down_proj", "w"), _same),))
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            specs[o + norm + "/scale"] = Spec((d,), ((ours + (norm, "scale"), _same),))
    if c.vision is not None:
        specs.update(official_vision_specs(c.vision))
    return specs


def official_vision_specs(v: SigLIPConfig) -> dict[str, Spec]:
    w, p, heads, mlp = v.width, v.patch_size, v.num_heads, v.mlp_dim
    hd = w // heads
    enc = ("vision", "encoder")
    specs = {SIGLIP + "embedding/kernel": Spec((p, p, 3, w), ((enc + ("patch_embedding",), _same),)),
             SIGLIP + "embedding/bias": Spec((w,), ((enc + ("patch_bias",), _same),)),
             SIGLIP + "pos_embedding": Spec((1, v.num_patches, w), ((enc + ("position_embedding",), lambda x: x[0]),)),
             SIGLIP + "Transformer/encoder_norm/scale": Spec((w,), ((enc + ("post_layernorm", "scale"), _same),)),
             SIGLIP + "Transformer/encoder_norm/bias": Spec((w,), ((enc + ("post_layernorm", "bias"), _same),))}
    for i in range(v.depth):
        b, ours = f"{BLOCK}{i}/", enc + ("layers", i)
        for j, ln in enumerate(("layer_norm1", "layer_norm2")):
            for leaf in ("scale", "bias"):
                specs[b + f"LayerNorm_{j}/{leaf}"] = Spec((w,), ((ours + (ln, leaf), _same),))
        attn = b + "MultiHeadDotProductAttention_0/"
        for name, ours_name in (("query", "q"), ("key", "k"), ("value", "v")):
            specs[attn + name + "/kernel"] = Spec((w, heads, hd), ((ours + (ours_name + "_proj", "w"), _same),))
            specs[attn + name + "/bias"] = Spec((heads, hd), ((ours + (ours_name + "_bias",), _same),))
        specs[attn + "out/kernel"] = Spec((heads, hd, w), ((ours + ("o_proj", "w"), _same),))
        specs[attn + "out/bias"] = Spec((w,), ((ours + ("o_bias",), _same),))
        for j, (fc, shape) in enumerate((("fc1", (w, mlp)), ("fc2", (mlp, w)))):
            specs[b + f"MlpBlock_0/Dense_{j}/kernel"] = Spec(shape, ((ours + (fc, "w"), _same),))
            specs[b + f"MlpBlock_0/Dense_{j}/bias"] = Spec((shape[1],), ((ours + (fc + "_bias",), _same),))
    return specs


def is_vision_key(key: str) -> bool:
    return key.startswith("vision_encoder/") or key.startswith("embedder/mm_")


def check_official(config: GemmaConfig, specs: dict[str, Spec], shapes: dict[str, tuple], source: str,
                   skip_vision: bool) -> None:
    """Raises one ValueError naming every missing, unexpected or mis-shaped official tensor."""
    check_shapes({key: spec.shape for key, spec in specs.items()}, shapes,
                 f"official checkpoint {source} does not match the config inferred from it "
                 f"({config.num_layers} layers, d_model {config.d_model}, {config.num_heads}/{config.num_kv_heads} "
                 f"heads of {config.head_dim}, MLP {config.hidden_dim}"
                 f"{', SigLIP depth %d' % config.vision.depth if config.vision else ''}):",
                 ignore=lambda key: key.startswith(UNUSED) or (skip_vision and is_vision_key(key)))


# ---------------------------------------------------------------------- reading
def group_of(key: str) -> str:
    """Tensors restored together: one decoder layer, one SigLIP block, else the first path component."""
    m = re.match(r"(layer_\d+|" + re.escape(BLOCK) + r"\d+)/", key)
    return m.group(1) if m else key.split("/")[0]


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def restore_arrays(path: str, disk_paths: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Reads only the tensors `disk_paths` (key -> on-disk path) as numpy arrays (orbax partial restore)."""
    item, args = {}, {}
    for disk in disk_paths.values():
        _set(item, disk, 0)
        _set(args, disk, ocp.RestoreArgs(restore_type=np.ndarray))
    try:
        out = ocp.PyTreeCheckpointer().restore(
            path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    except Exception as e:  # tensorstore / orbax raise many types for missing or damaged data files
        raise ValueError(f"{path}: cannot read {', '.join(sorted(disk_paths)[:3])}"
                         f"{' ...' if len(disk_paths) > 3 else ''} (truncated or damaged checkpoint?): {e}") from e
    return {key: np.asarray(_get(out, disk)) for key, disk in disk_paths.items()}


def _variable(model: nnx.Module, path: tuple) -> nnx.Variable:
    for key in path:
        model = model[key] if isinstance(key, int) else getattr(model, key)
    return model


def load_official(path: str | os.PathLike, dtype=None, text_only: bool = False,
                  preset: str | None = None) -> Transformer:
    """The model of an official orbax checkpoint. `dtype=None`: the stored dtype of the embedding table.
    `text_only`: the language model alone (no vision tensor is read). `preset`: the gemma/config.py
    preset whose window / RoPE / query scale / context to use (default: inferred, see the module doc)."""
    path = os.path.abspath(os.fspath(path))
    source = os.path.basename(path.rstrip("/")) or path
    _, keys = canonical_keys(read_tree(path), source)
    shapes = {key: shape for key, (_, shape, _) in keys.items()}
    config = infer_config(shapes, source, preset)
    vocab_rows = shapes["embedder/input_embedding"][0]
    if text_only:
        config = config.replace(vision=None, vocab_size=vocab_rows)
    gating = shapes.get("layer_0/mlp/gating_einsum", (2, 0, config.d_model))
    specs = official_specs(config, vocab_rows, fused_qkv="layer_0/attn/qkv_einsum/w" in shapes,
                           transposed_gating=gating[2] == config.d_model)
    check_official(config, specs, shapes, source, skip_vision=text_only)
    dtype = jnp.dtype(keys["embedder/input_embedding"][2] if dtype is None else dtype)
    model = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    groups: dict[str, list[str]] = {}
    for key in specs:
        groups.setdefault(group_of(key), []).append(key)
    with tqdm(total=len(specs), desc=f"loading {source}", unit="tensor", leave=False) as bar:
        for names in groups.values():
            arrays = restore_arrays(path, {key: keys[key][0] for key in names})
            for key in names:
                if arrays[key].shape != specs[key].shape:  # the metadata said otherwise: a damaged file
                    raise ValueError(f"{path}: tensor '{key}' reads as {arrays[key].shape}, its metadata says "
                                     f"{specs[key].shape} (damaged checkpoint?)")
                for target, to_ours in specs[key].targets:
                    _variable(model, target).set_value(jnp.asarray(to_ours(arrays[key]), dtype))
                bar.update()
            del arrays
            gc.collect()  # the restored tree sits in reference cycles: free each group before the next
    return model
