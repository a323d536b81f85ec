"""Tiny random Gemma 3 parity fixtures from the peer implementation (HF transformers, torch, f32).

Run from the repository root (needs torch + transformers 5.x; the test suite does not):

    /work/venv311/bin/python tests/reference/make_tiny_fixtures.py

Writes, deterministically (fixed seeds), under tests/fixtures/tiny/:

  window/                 Gemma3ForCausalLM, 7 layers (layer 5 global), W=8, T=24, 4q/2kv heads
  mqa/                    Gemma3ForCausalLM, 6 layers, 4q/1kv heads, W=16, T=20
  scaled/                 Gemma3ForCausalLM, 6 layers, 2q/2kv heads, head_dim 32,
                          query_pre_attn_scalar 24, global RoPE linear x8 (theta 1e6), local theta 1e4,
                          W=8, T=24
  window_multimodal_v5/   Gemma3ForConditionalGeneration (tiny SigLIP + projector) whose text part
                          is a weight-for-weight copy of `window` (transformers v5 save layout)
  KEYS.md                 safetensors key names of each layout and the Hub -> v5 key mapping

Each model directory holds HF's `save_pretrained` output (config.json, model.safetensors, f32)
and `io.npz`:
  input_ids        int32 [B, T]     random ids in [0, V)
  logits           f32   [B, T, V]  model(input_ids).logits (eager attention, no cache)
  padded_input_ids int32 [B, T]     row 0 = input_ids[0]; row 1 = 3 pad ids (0) + input_ids[1, :T-3]
  padded_mask      int32 [B, T]     1 = real token
  padded_positions int32 [B, T]     clip(cumsum(mask) - 1, 0)
  padded_logits    f32   [B, T, V]  model(padded_input_ids, attention_mask=mask, position_ids=positions)
                                    (only positions with mask == 1 are meaningful)
window_multimodal_v5/io.npz additionally holds an image forward:
  mm_input_ids       int32 [B, Tm]   text with <boi> + mm_tokens_per_image image tokens + <eoi>
  mm_token_type_ids  int32 [B, Tm]   1 at image-token positions (HF's bidirectional image block)
  mm_pixel_values    f32   [B, 3, S, S]  random, already "normalized" (fed straight to SigLIP)
  mm_image_features  f32   [B, mm_tokens_per_image, d_model]  projector output (get_image_features)
  mm_logits          f32   [B, Tm, V] model(input_ids, pixel_values, token_type_ids).logits
  mm_logits_no_tti   f32   [B, Tm, V] same without token_type_ids (plain causal over image tokens)
  image_token_id, boi_token_id, eoi_token_id  int32 scalars
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The repo's top-level `kernels` package shadows the `kernels` (HF hub kernels) package that
# transformers probes at import: keep the repo root off sys.path while this script runs.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

torch.set_num_threads(2)

OUT = ROOT / "tests" / "fixtures" / "tiny"
B = 2
N_PAD = 3
V = 256


def layer_types(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]


def text_config(name: str) -> tuple[Gemma3TextConfig, int]:
    common = dict(
        vocab_size=V,
        hidden_size=48,
        intermediate_size=64,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        attn_implementation="eager",
        dtype="float32",
    )
    if name == "window":
        cfg = Gemma3TextConfig(
            num_hidden_layers=7,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=layer_types(7),
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            **common,
        )
        return cfg, 24
    if name == "mqa":
        cfg = Gemma3TextConfig(
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            layer_types=layer_types(6),
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            **common,
        )
        return cfg, 20
    if name == "scaled":
        cfg = Gemma3TextConfig(
            num_hidden_layers=6,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=8,
            layer_types=layer_types(6),
            # What HF makes of the 4B Hub config (rope_theta 1e6, rope_local_base_freq 1e4,
            # rope_scaling {"rope_type": "linear", "factor": 8.0}): scaling on full_attention only.
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            **common,
        )
        # The legacy (v4 / Hub) spelling must give the same rope_parameters.
        legacy = Gemma3TextConfig(
            num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
            rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
        )
        assert legacy.rope_parameters == cfg.rope_parameters, (legacy.rope_parameters, cfg.rope_parameters)
        return cfg, 24
    raise ValueError(name)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter so that no norm weight is zero and nothing is at its init value."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        n = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "vision_tower" in name and ("layer_norm" in name or "layernorm" in name):
            # SigLIP uses plain LayerNorm (w, b), not (1 + w).
            val = (1.0 + 0.1 * n) if name.endswith("weight") else 0.05 * n
        elif "norm" in name:  # Gemma RMSNorm (1 + w), incl. q_norm/k_norm and mm_soft_emb_norm
            val = 0.1 * n
        elif "embed_tokens" in name:
            val = 0.5 * n
        elif "position_embedding" in name:
            val = 0.1 * n
        else:
            val = 0.05 * n
        p.copy_(val.to(p.dtype))


@torch.no_grad()
def forward_logits(model, **kw) -> np.ndarray:
    return model(**kw, use_cache=False).logits.float().numpy()


def make_io(model, T: int, seed: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    logits = forward_logits(model, input_ids=ids)

    padded = ids.clone()
    padded[1, :N_PAD] = 0
    padded[1, N_PAD:] = ids[1, : T - N_PAD]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :N_PAD] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    plogits = forward_logits(model, input_ids=padded, attention_mask=mask, position_ids=pos)

    # Sanity: the unpadded row is unchanged by padding the other row; the padded row equals the
    # same tokens run unpadded (up to float noise).
    np.testing.assert_allclose(plogits[0], logits[0], rtol=0, atol=1e-5)
    solo = forward_logits(model, input_ids=ids[1:2, : T - N_PAD])
    np.testing.assert_allclose(plogits[1, N_PAD:], solo[0], rtol=0, atol=1e-4)

    return dict(
        input_ids=ids.numpy().astype(np.int32),
        logits=logits.astype(np.float32),
        padded_input_ids=padded.numpy().astype(np.int32),
        padded_mask=mask.numpy().astype(np.int32),
        padded_positions=pos.numpy().astype(np.int32),
        padded_logits=plogits.astype(np.float32),
    )


def safetensors_keys(d: Path) -> list[str]:
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def save(model, d: Path, io: dict[str, np.ndarray]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    np.savez(d / "io.npz", **io)
    # Every stored tensor must be f32.
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        for k in f.keys():
            assert f.get_tensor(k).dtype == torch.float32, k


def check_reload(cls, d: Path, io: dict[str, np.ndarray]) -> None:
    m = cls.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    np.testing.assert_array_equal(forward_logits(m, input_ids=torch.from_numpy(io["input_ids"]).long()), io["logits"])


def hub_key(saved_key: str) -> str:
    """Hub layout of google/gemma-3-4b-it from the key names transformers 5.x writes to disk.

    Observed: v5 `save_pretrained` already writes `language_model.model.*` and `multi_modal_projector.*`
    (Hub spelling) but `vision_tower.*` without the Hub's `vision_model.` level.
    """
    if saved_key.startswith("vision_tower.") and not saved_key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + saved_key[len("vision_tower."):]
    return saved_key


def check_layout_loads(d: Path, sd: dict[str, torch.Tensor], io: dict[str, np.ndarray]) -> None:
    """A safetensors file with keys `sd` + d/config.json must load and reproduce mm_logits bit for bit."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text((d / "config.json").read_text())
        save_file(sd, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        m = Gemma3ForConditionalGeneration.from_pretrained(tmp, attn_implementation="eager",
                                                           dtype=torch.float32).eval()
        got = forward_logits(m, input_ids=torch.from_numpy(io["mm_input_ids"]).long(),
                             pixel_values=torch.from_numpy(io["mm_pixel_values"]),
                             token_type_ids=torch.from_numpy(io["mm_token_type_ids"]).long())
        np.testing.assert_array_equal(got, io["mm_logits"])


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    keys: dict[str, list[str]] = {}
    window_model = None
    window_io = None
    for i, name in enumerate(["window", "mqa", "scaled"]):
        cfg, T = text_config(name)
        torch.manual_seed(1000 + i)
        model = Gemma3ForCausalLM(cfg).eval()
        assert model.config._attn_implementation == "eager"
        randomize(model, seed=2000 + i)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        io = make_io(model, T, seed=3000 + i)
        d = OUT / name
        save(model, d, io)
        check_reload(Gemma3ForCausalLM, d, io)
        saved = json.loads((d / "config.json").read_text())
        print(f"== {name}: T={T}")
        for k in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "layer_types",
                  "rope_parameters", "tie_word_embeddings", "final_logit_softcapping", "attn_logit_softcapping",
                  "hidden_activation", "rms_norm_eps", "dtype"]:
            print(f"   {k}: {saved.get(k)}")
        keys[name] = safetensors_keys(d)
        if name == "window":
            window_model, window_io, window_cfg = model, io, cfg

    # ---- multimodal (v5 layout), text part = copy of `window` ----
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_channels=3, image_size=56, patch_size=14, layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh", vision_use_head=False,
    )
    mm_cfg = Gemma3Config(
        text_config=window_cfg.to_dict(), vision_config=vision.to_dict(),
        mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 3, eoi_token_index=V - 2,
        tie_word_embeddings=True,
    )
    mm_cfg._attn_implementation = "eager"
    torch.manual_seed(1010)
    mm = Gemma3ForConditionalGeneration(mm_cfg).eval()
    mm.set_attn_implementation("eager")
    randomize(mm, seed=2010)
    missing, unexpected = mm.model.language_model.load_state_dict(window_model.model.state_dict(), strict=True)
    assert not missing and not unexpected
    assert mm.lm_head.weight.data_ptr() == mm.model.language_model.embed_tokens.weight.data_ptr()
    io = make_io(mm, 24, seed=3000)
    np.testing.assert_array_equal(io["input_ids"], window_io["input_ids"])
    np.testing.assert_allclose(io["logits"], window_io["logits"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(io["padded_logits"], window_io["padded_logits"], rtol=0, atol=1e-6)
    print("== window_multimodal_v5: text logits max |diff| vs window:",
          float(np.abs(io["logits"] - window_io["logits"]).max()))

    # Image forward: [bos, t, t, t, <boi>, img x4, <eoi>, t x k]
    n_img = mm_cfg.mm_tokens_per_image
    g = torch.Generator().manual_seed(4000)
    Tm = 16
    mm_ids = torch.randint(3, V - 3, (B, Tm), generator=g)
    mm_ids[:, 0] = 2
    mm_ids[:, 4] = mm_cfg.boi_token_index
    mm_ids[:, 5:5 + n_img] = mm_cfg.image_token_index
    mm_ids[:, 5 + n_img] = mm_cfg.eoi_token_index
    tti = (mm_ids == mm_cfg.image_token_index).long()
    pix = torch.randn(B, 3, vision.image_size, vision.image_size, generator=g)
    with torch.no_grad():
        feats = mm.model.get_image_features(pix, return_dict=True).pooler_output.float().numpy()
    io.update(
        mm_input_ids=mm_ids.numpy().astype(np.int32),
        mm_token_type_ids=tti.numpy().astype(np.int32),
        mm_pixel_values=pix.numpy().astype(np.float32),
        mm_image_features=feats.astype(np.float32),
        mm_logits=forward_logits(mm, input_ids=mm_ids, pixel_values=pix, token_type_ids=tti),
        mm_logits_no_tti=forward_logits(mm, input_ids=mm_ids, pixel_values=pix),
        image_token_id=np.int32(mm_cfg.image_token_index),
        boi_token_id=np.int32(mm_cfg.boi_token_index),
        eoi_token_id=np.int32(mm_cfg.eoi_token_index),
    )
    # The bidirectional image block must matter (else the fixture would not test it).
    d_bi = np.abs(io["mm_logits"][:, 5:5 + n_img] - io["mm_logits_no_tti"][:, 5:5 + n_img]).max()
    assert d_bi > 1e-3, d_bi
    # Text before the image is unaffected by the image.
    np.testing.assert_allclose(io["mm_logits"][:, :5], io["mm_logits_no_tti"][:, :5], rtol=0, atol=1e-6)
    d = OUT / "window_multimodal_v5"
    save(mm, d, io)
    check_reload(Gemma3ForConditionalGeneration, d, io)
    keys["window_multimodal_v5"] = safetensors_keys(d)
    saved = json.loads((d / "config.json").read_text())
    print("   mm_tokens_per_image:", saved["mm_tokens_per_image"], "image/boi/eoi:",
          saved["image_token_index"], saved["boi_token_index"], saved["eoi_token_index"])
    print("   vision_config:", {k: saved["vision_config"].get(k) for k in
                                ["image_size", "patch_size", "hidden_size", "num_hidden_layers",
                                 "num_attention_heads", "vision_use_head", "hidden_act"]})

    # ---- the three spellings of the multimodal keys, each verified to load ----
    sd = load_file(str(d / "model.safetensors"))
    hub_sd = {hub_key(k): v for k, v in sd.items()}
    check_layout_loads(d, hub_sd, io)
    print("== Hub-layout keys load into Gemma3ForConditionalGeneration and reproduce mm_logits exactly")
    keys["hub"] = sorted(hub_sd)
    mem_sd = {k: v.detach().clone() for k, v in mm.state_dict().items() if k != "lm_head.weight"}
    check_layout_loads(d, mem_sd, io)
    print("== module-name keys (model.language_model.* ...) also load and reproduce mm_logits exactly")
    keys["module"] = sorted(mem_sd)

    write_keys_md(keys)
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"   {p.relative_to(ROOT)}  {p.stat().st_size} B")
    print(f"total {total / 1e6:.2f} MB")


def pick(keys: list[str], pats: list[str]) -> list[str]:
    out = []
    for pat in pats:
        out += [k for k in keys if pat in k and k not in out][:99]
    return out


def write_keys_md(keys: dict[str, list[str]]) -> None:
    def block(ks: list[str], pats: list[str]) -> str:
        return "\n".join(pick(ks, pats))

    causal_pats = ["embed_tokens", "layers.0.", "model.norm", "lm_head"]
    mm_pats = ["embed_tokens", "language_model.model.layers.0.", "language_model.model.norm", "lm_head",
               "vision_tower.embeddings", "encoder.layers.0.", "post_layernorm", "multi_modal_projector"]
    n = len(keys["window_multimodal_v5"])
    text = f"""# Safetensors key names (generated by tests/reference/make_tiny_fixtures.py)

transformers {__import__('transformers').__version__}, torch {torch.__version__}. All tensors f32. Linear
weights are torch layout `[out_features, in_features]`; `mm_input_projection_weight` is
`[vision_hidden, text_hidden]` (used as `x @ W`); `patch_embedding.weight` is a Conv2d
`[vision_hidden, 3, patch, patch]`; `position_embedding.weight` is `[num_patches, vision_hidden]`.
Gemma norm weights are `w` in `(1 + w)` (the SigLIP LayerNorms are plain `w`, `b`).
Embeddings are tied: no file holds `lm_head.weight` (it is `embed_tokens.weight`).

## (i) Gemma3ForCausalLM `save_pretrained` (tiny/window: {len(keys['window'])} tensors, 7 layers)

Per-layer names shown for layer 0; identical for every layer, local or global. Text-only Hub
checkpoints (gemma-3-270m, gemma-3-1b) use the same names. Loaded by from_pretrained as is.

```
{block(keys['window'], causal_pats)}
```

## (ii) Gemma3ForConditionalGeneration `save_pretrained` with transformers 5.x (tiny/window_multimodal_v5: {n} tensors)

SURPRISE: v5 `save_pretrained` does NOT write its module names; it reverts the load-time renaming for
the language model and projector (Hub spelling `language_model.model.*`, `multi_modal_projector.*`)
but writes the vision tower WITHOUT the Hub's `vision_model.` level (`vision_tower.*`).

```
{block(keys['window_multimodal_v5'], mm_pats)}
```

## (ii-b) Module names (`model.state_dict()`) of Gemma3ForConditionalGeneration in transformers 5.x

```
{block(keys['module'], ['model.language_model.embed_tokens', 'model.language_model.layers.0.', 'model.language_model.norm', 'model.vision_tower.embeddings', 'model.vision_tower.encoder.layers.0.', 'model.vision_tower.post_layernorm', 'model.multi_modal_projector'])}
```

## (iii) Hub layout of google/gemma-3-4b-it (also 12b/27b; transformers 4.x save)

```
{block(keys['hub'], ['language_model.model.embed_tokens', 'language_model.model.layers.0.', 'language_model.model.norm', 'vision_tower.vision_model.embeddings', 'vision_tower.vision_model.encoder.layers.0.', 'vision_tower.vision_model.post_layernorm', 'multi_modal_projector'])}
```

## Mapping between the spellings

transformers 5.x renames at load time (`conversion_mapping.py`: model_type `gemma3` uses the `llava`
rules; class `Gemma3Model` uses the `LlavaModel` rules, scoped under `model.`; `SiglipVisionModel` uses the
`CLIPVisionModel` rule `PrefixChange(prefix_to_remove="vision_model")`, scoped under `model.vision_tower.`):

```
llava:        ^language_model.lm_head        -> lm_head
              ^language_model                -> model.language_model
              ^vision_tower                  -> model.vision_tower
              ^multi_modal_projector         -> model.multi_modal_projector
LlavaModel:   ^language_model.model          -> language_model         (inside model.)
CLIPVision:   ^vision_model.(.+)             -> \\1                     (inside model.vision_tower.)
```

| Hub (iii) | v5 file (ii) | v5 module name (ii-b) |
|---|---|---|
| `language_model.model.X` | `language_model.model.X` | `model.language_model.X` |
| `language_model.lm_head.weight` (absent, tied) | (absent, tied) | `lm_head.weight` |
| `vision_tower.vision_model.X` | `vision_tower.X` | `model.vision_tower.X` |
| `multi_modal_projector.X` | `multi_modal_projector.X` | `model.multi_modal_projector.X` |

`X` for the text part equals the Gemma3ForCausalLM name minus its leading `model.`. The script
verifies that a file in each of the three spellings (with the same config.json) loads with
`Gemma3ForConditionalGeneration.from_pretrained` and reproduces `mm_logits` bit for bit. A loader
should accept all three (strip `model.`, then the `language_model[.model]`/`vision_tower[.vision_model]`
prefixes).

## All keys

### (i) tiny/window
```
{chr(10).join(keys['window'])}
```

### (ii) tiny/window_multimodal_v5/model.safetensors
```
{chr(10).join(keys['window_multimodal_v5'])}
```
"""
    (OUT / "KEYS.md").write_text(text)


if __name__ == "__main__":
    main()
