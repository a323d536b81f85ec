"""Parity fixture from the OFFICIAL google-deepmind `gemma` package: a tiny multimodal Gemma 3 checkpoint
written by the official package itself, and the official forward on it (f32).

Run from the repository root with the official package's own environment (the test suite does not
need it):

    /work/venv_gemma/bin/python tests/reference/make_official_fixtures.py

(gemma 4.0.1, jax/flax/orbax as pinned there; ~1 minute on 2 CPU cores, deterministic.) The official
package is also called `gemma`, like this repository's top-level package: the repo root is dropped
from sys.path before importing it.

Model: `gm.nn.Gemma3_4B` with a shrunk `TransformerConfig` (the official SigLiP encoder is
configurable, so the vision tower is shrunk too):
  text   7 layers (pattern 5 local : 1 global, as Gemma 3), embed_dim 8, 4 query heads, 2 kv heads,
         head_dim 6, hidden 24, vocab 262144 (the real table height: <start_of_image> = 255999 and
         <end_of_image> = 256000 must be ids of the table), QK-norm, post-norms, transposed gating,
         sliding window 1024, RoPE 10k local / 1M global with global scale 8 (the 4B/12B/27B values,
         which is what the loader infers for a multimodal tree of unknown shape).
  vision SigLiPFromPatches: 448 px, patch 14 (32 x 32 = 1024 patches), width 16, depth 2, MLP 40,
         2 heads; 1024 patches avg-pooled 2 x 2 to 256 soft tokens per image (the real count).
Parameters: `model.init` gives the tree; every leaf is then redrawn from numpy (seed 20250611) with
a per-leaf scale (N(0, 1/fan_in) matrices, N(0, 0.5^2) RMSNorm scales, 1 + N(0, 0.2^2) LayerNorm
scales, N(0, 0.2^2) biases) so that no tensor is zero and norms / biases are really tested. As the
released checkpoints, text weights are stored in bfloat16 and the vision encoder and the embedder's
mm_* projection in float32.

Writes tests/fixtures/official_tiny/:
  ckpt/        the checkpoint, in the layout of the RELEASED checkpoints ('transformer/...',
               'SigLiPFromPatches_0/...'): the nested `model.init` tree converted by the official
               package's own `_checkpoint._nested_to_flat` and written by `gm.ckpts.save_params`.
               The script checks that `gm.ckpts.load_params` reads it back bit for bit.
  nested_keys.json   the nested tree that `gm.ckpts.save_params(model.init(...)['params'])` would write
               (what a fine-tune with the official package saves): '/'-joined key -> [shape, dtype].
  io.npz       (np.load(..., allow_pickle=False)); the official forward runs in float32 on the stored
               (bf16-valued) weights: `model.apply({'params': params_f32}, tokens, images=...,
               return_hidden_states=True)`.
    image_u8          uint8 [448, 448, 3]   the image (already 448 px: the official resize is then the
                                            identity, checked; pixels = u8 / 127.5 - 1)
    mm_tokens         int32 [L]             prompt with one <start_of_image> (255999) at index 20, BOS first
    mm_tokens_with_mm int32 [L + 259]       the official expansion (\\n\\n=108, boi, 256 x -2, eoi, 108)
    mm_text_index     int32 [L]             index into the expanded sequence of each prompt token's output
                                            (the official forward returns outputs at these positions)
    mm_hidden         f32   [L, 8]          final-normed hidden states (official output order)
    mm_logit_rows     int32 [R]             prompt indices with stored logits
    mm_logit_cols     int32 [C]             vocabulary columns with stored logits
    mm_logits         f32   [R, C]          logits[rows][:, cols]
    soft_embeddings   f32   [256, 8]        official `_encode_vision(image)`: the image's soft tokens
    text_tokens       int32 [T]             a text-only prompt (forward without images)
    text_hidden       f32   [T, 8]
    text_logit_rows / text_logit_cols / text_logits   as for mm_
  meta.json    versions, config, shapes, the checks made here.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The official package is also named `gemma` (and the repo has a `kernels` package): keep the repo
# root off sys.path so `from gemma import gm` imports the official one.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from gemma import gm  # noqa: E402
from gemma.gm.ckpts import _checkpoint  # noqa: E402
from gemma.gm.nn import _config, _gemma  # noqa: E402
from gemma.gm.nn.vision import _vision, _vision_utils  # noqa: E402
from gemma.gm.utils import _types  # noqa: E402
from gemma.gm.vision import _preprocess, _token_utils  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "official_tiny"
SEED = 20250611
BOI = 255999
IMAGE_SIZE = 448
PROMPT_LEN, IMAGE_AT, TEXT_LEN = 880, 20, 40


def tiny_config() -> _config.TransformerConfig:
    vision = _vision.SigLiPFromPatches(
        siglip_encoder=_vision_utils.ViTModel(width=16, depth=2, mlp_dim=40, num_heads=2),
        num_mm_tokens_per_image_prepool=(IMAGE_SIZE // 14) ** 2, num_mm_tokens_per_image=256,
        image_height=IMAGE_SIZE, image_width=IMAGE_SIZE)
    return _config.TransformerConfig(
        num_embed=262_144, embed_dim=8, hidden_dim=24, num_heads=4, head_dim=6, num_kv_heads=2,
        final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
        attention_types=_config.make_attention_layers_types(_gemma.GEMMA3_ATTENTION_PATTERN, num_layers=7),
        query_pre_attn_norm=_config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
        attn_logits_soft_cap=None, sliding_window_size=1024, transpose_gating_einsum=True,
        local_base_frequency=10_000, global_base_frequency=1_000_000, global_scale_factor=8.0,
        vision_encoder=vision)


def fan_in(key: str, shape: tuple[int, ...]) -> int:
    """Contracted size of each official matrix (see the layouts in checkpoints/from_official.py)."""
    name = key.split("/")[-2] if key.endswith(("/w", "/kernel")) else key.split("/")[-1]
    if name == "q_einsum":  # [N, D, H]
        return shape[1]
    if name == "kv_einsum":  # [2, K, D, H]
        return shape[2]
    if name == "attn_vec_einsum":  # [N, H, D]
        return shape[0] * shape[1]
    if name == "gating_einsum":  # [2, F, D]
        return shape[2]
    if name == "out":  # SigLIP attention out kernel [heads, head_dim, W]
        return shape[0] * shape[1]
    if name == "embedding":  # SigLIP conv kernel [p, p, 3, W]
        return shape[0] * shape[1] * shape[2]
    return shape[0]  # linear [F, D], mm_input_projection [W, D], Dense / DenseGeneral [in, ...]


def randomize(params, rng: np.random.Generator):
    """Every leaf redrawn with a scale by role; text leaves bf16, vision + mm_* f32 (release dtypes)."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    out = {}
    for key in sorted(flat):
        shape = tuple(flat[key].shape)
        vision = key.startswith("vision_encoder/") or "/mm_" in key
        if key.endswith("input_embedding"):
            x = rng.normal(0.0, 1.0, shape)
        elif key.endswith("/bias"):
            x = rng.normal(0.0, 0.2, shape)
        elif key.endswith("/scale") and key.startswith("vision_encoder/"):  # LayerNorm: plain w
            x = 1.0 + rng.normal(0.0, 0.2, shape)
        elif key.endswith("/scale"):  # Gemma RMSNorm: (1 + w)
            x = rng.normal(0.0, 0.5, shape)
        elif key.endswith("pos_embedding"):
            x = rng.normal(0.0, 0.5, shape)
        else:
            x = rng.normal(0.0, fan_in(key, shape) ** -0.5, shape)
        out[key] = jnp.asarray(x, jnp.float32 if vision else jnp.bfloat16)
    return flax.traverse_util.unflatten_dict(out, sep="/")


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Blocky random colours plus gradients (structure for the encoder; compresses in the npz)."""
    blocks = rng.integers(0, 256, (size // 16, size // 16, 3))
    big = np.repeat(np.repeat(blocks, 16, 0), 16, 1)
    yy, xx = np.mgrid[0:size, 0:size]
    grad = np.stack([xx * 255 // (size - 1), yy * 255 // (size - 1), (xx + yy) * 255 // (2 * size - 2)], -1)
    return ((big + grad) // 2).astype(np.uint8)


def logit_selection(rng: np.random.Generator, logits: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Columns: 2048 random ids, the special ids, and the top-8 of every stored row."""
    cols = set(rng.choice(logits.shape[-1], 2048, replace=False).tolist()) | {0, 1, 2, 106, 108, BOI, 256000,
                                                                             262143}
    for r in rows:
        cols |= set(np.argsort(-logits[r])[:8].tolist())
    return np.asarray(sorted(cols), np.int32)


def main() -> None:
    rng = np.random.default_rng(SEED)
    config = tiny_config()
    model = gm.nn.Gemma3_4B(config=config, dtype=jnp.float32)
    dummy = jnp.ones((1, 4), jnp.int32)
    init = jax.jit(lambda: model.init(jax.random.key(0), tokens=dummy))()["params"]
    params = randomize(init, rng)
    nested_keys = {k: [list(v.shape), str(v.dtype)] for k, v in
                   flax.traverse_util.flatten_dict(params, sep="/").items()}

    # The released layout, written by the official package's own saver.
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    flat = _checkpoint._nested_to_flat(params)
    gm.ckpts.save_params(flat, OUT / "ckpt", wait_until_finished=True)
    restored = gm.ckpts.load_params(OUT / "ckpt")
    same = jax.tree.map(lambda a, b: bool(a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))),
                        restored, params)
    assert all(jax.tree.leaves(same)), "official load_params does not read back what save_params wrote"

    params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), restored)
    image = smooth_image(rng, IMAGE_SIZE)

    # The official preprocessing is the identity resize + (x - 127.5) / 127.5 for a 448 px image.
    pixels = _preprocess.pre_process_image(jnp.asarray(image, jnp.float32), image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    pre_diff = float(np.abs(np.asarray(pixels) - (image.astype(np.float32) / 127.5 - 1.0)).max())
    assert pre_diff < 1e-6, pre_diff

    def forward(tokens, images=None):
        out = model.apply({"params": params32}, tokens=jnp.asarray(tokens)[None], images=images,
                          return_hidden_states=True)
        return np.asarray(out.logits[0], np.float32), np.asarray(out.hidden_states[0], np.float32)

    special = {0, 1, 2, BOI, 256000}
    def text_ids(n):
        ids = rng.integers(3, 255_000, n)
        return [int(i) for i in ids if int(i) not in special]

    mm_tokens = [2] + text_ids(IMAGE_AT - 1) + [BOI] + text_ids(PROMPT_LEN - IMAGE_AT - 1)
    mm_tokens = np.asarray(mm_tokens, np.int32)
    images = jnp.asarray(image)[None, None]  # [B, N, H, W, C]
    mm_logits, mm_hidden = forward(mm_tokens, images)
    inputs = _types.Input(text=jnp.asarray(mm_tokens)[None], images=images, config=model.config.input_config)
    with_mm = np.asarray(inputs.tokens_with_mm[0], np.int32)
    text_index = np.asarray(_token_utils._get_new_text_tokens_positions(
        offset_on=jnp.asarray(mm_tokens == BOI), offset_by=256 + 3), np.int32)
    soft = model.apply({"params": params32}, images, method=lambda m, im: m._encode_vision(im))
    soft = np.asarray(soft, np.float32).reshape(256, -1)

    assert len(with_mm) == PROMPT_LEN + 259 > 1024, len(with_mm)

    text_tokens = np.asarray([2] + text_ids(TEXT_LEN - 1), np.int32)
    text_logits, text_hidden = forward(text_tokens)

    mm_rows = np.asarray(sorted({0, 1, IMAGE_AT - 1, IMAGE_AT, IMAGE_AT + 1, IMAGE_AT + 2, 300, 500, 777,
                                 PROMPT_LEN - 3, PROMPT_LEN - 2, PROMPT_LEN - 1}), np.int32)
    text_rows = np.arange(0, TEXT_LEN, 4, dtype=np.int32)
    mm_cols = logit_selection(rng, mm_logits, mm_rows)
    text_cols = logit_selection(rng, text_logits, text_rows)

    np.savez_compressed(
        OUT / "io.npz", image_u8=image, mm_tokens=mm_tokens, mm_tokens_with_mm=with_mm, mm_text_index=text_index,
        mm_hidden=mm_hidden, mm_logit_rows=mm_rows, mm_logit_cols=mm_cols,
        mm_logits=mm_logits[mm_rows][:, mm_cols], soft_embeddings=soft,
        text_tokens=text_tokens, text_hidden=text_hidden, text_logit_rows=text_rows, text_logit_cols=text_cols,
        text_logits=text_logits[text_rows][:, text_cols])
    (OUT / "nested_keys.json").write_text(json.dumps(nested_keys, indent=0, sort_keys=True) + "\n")

    sizes = {str(p.relative_to(OUT)): p.stat().st_size for p in sorted(OUT.rglob("*")) if p.is_file()}
    meta = dict(
        generated_by="tests/reference/make_official_fixtures.py",
        versions={n: metadata.version(n) for n in ("gemma", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy")},
        seed=SEED,
        model="gm.nn.Gemma3_4B(config=<tiny TransformerConfig>, dtype=float32)",
        config=dict(num_embed=262_144, embed_dim=8, hidden_dim=24, num_heads=4, head_dim=6, num_kv_heads=2,
                    num_layers=7, attention_pattern="5 local, 1 global", sliding_window_size=1024,
                    query_pre_attn_norm="BY_ONE_OVER_SQRT_HEAD_DIM", local_base_frequency=10_000,
                    global_base_frequency=1_000_000, global_scale_factor=8.0,
                    vision=dict(image_size=IMAGE_SIZE, patch_size=14, width=16, depth=2, mlp_dim=40, num_heads=2,
                                num_mm_tokens_per_image_prepool=(IMAGE_SIZE // 14) ** 2,
                                num_mm_tokens_per_image=256)),
        layout="released (flat): 'transformer/...' and 'SigLiPFromPatches_0/...' keys, "
               "official _checkpoint._nested_to_flat + gm.ckpts.save_params",
        dtypes="text bfloat16; vision_encoder and embedder mm_* float32",
        checks=dict(load_params_round_trip_bit_exact=True, preprocess_identity_max_abs_diff=pre_diff,
                    expanded_length=int(len(with_mm)),
                    mm_logits_abs_max=float(np.abs(mm_logits).max()),
                    text_logits_abs_max=float(np.abs(text_logits).max())),
        files=sizes, total_bytes=sum(sizes.values()))
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    for name, size in sizes.items():
        print(f"{name}: {size} bytes")
    print(f"total {meta['total_bytes']} bytes; logits |max| mm {meta['checks']['mm_logits_abs_max']:.2f} "
          f"text {meta['checks']['text_logits_abs_max']:.2f}")


if __name__ == "__main__":
    main()
