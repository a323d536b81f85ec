"""Gemma 3 text-model configuration: one frozen dataclass, presets, HF import.

Every figure of the presets comes from the Gemma 3 technical report and the
released checkpoints (see ../shared/DESIGN.md, "Figures to know").
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

import kernels
from vision.config import SigLIPConfig

LayerType = Literal["local", "global"]

VOCAB_SIZE = 262_144  # text vocabulary; ids >= this are never sampled
MULTIMODAL_VOCAB_SIZE = 262_208  # rows in the 4B/12B/27B embedding tables


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture of a Gemma 3 decoder.

    Attributes:
      vocab_size: rows of the (tied) embedding table.
      num_layers: decoder layers.
      d_model: residual width D.
      num_heads: query heads N.
      num_kv_heads: key/value heads K (N % K == 0; K == 1 is MQA).
      head_dim: H.
      hidden_dim: GeGLU hidden width F.
      sliding_window: W; a local-layer query at i sees keys j with i - W < j <= i.
      query_pre_attn_scalar: queries are scaled by query_pre_attn_scalar ** -0.5.
      rope_local_base / rope_global_base: RoPE wavelength bases per layer type.
      rope_global_scale: linear RoPE scaling factor of global layers (positions / factor).
      layer_types: per-layer "local" or "global"; default: global when (i + 1) % 6 == 0.
      rms_eps: epsilon of every RMSNorm.
      final_logit_softcap / attn_logit_softcap: None for Gemma 3 (kept for imports).
      max_context: longest context the checkpoint was trained for.
      attention_impl: kernels.attention implementation used by the model.
      vision: the SigLIP tower of multimodal models (None: text only).
      image_token_id / boi_token_id / eoi_token_id: the image soft token and the
        <start_of_image> / <end_of_image> ids that frame each image's block.
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_dim: int
    sliding_window: int
    query_pre_attn_scalar: float
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    rope_global_scale: float = 1.0
    layer_types: tuple[LayerType, ...] | None = None
    rms_eps: float = 1e-6
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    max_context: int = 131_072
    attention_impl: str = "auto"
    vision: SigLIPConfig | None = None
    image_token_id: int = 262_144
    boi_token_id: int = 255_999
    eoi_token_id: int = 256_000

    def __post_init__(self):
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", SigLIPConfig(**self.vision))
        if self.layer_types is None:
            types = tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(self.num_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        problems = []
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads",
                     "head_dim", "hidden_dim", "sliding_window"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % max(self.num_kv_heads, 1):
            problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_types) != self.num_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries, expected num_layers={self.num_layers}")
        bad = [t for t in self.layer_types if t not in ("local", "global")]
        if bad:
            problems.append(f"layer_types entries must be 'local' or 'global', got {sorted(set(bad))}")
        if self.attention_impl not in kernels.IMPLS + ("auto",):
            problems.append(f"attention_impl must be one of {kernels.IMPLS + ('auto',)}, got {self.attention_impl!r}")
        if problems:
            raise ValueError("invalid GemmaConfig: " + "; ".join(problems))

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (G = N / K)."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_global_layers(self) -> int:
        return sum(t == "global" for t in self.layer_types)

    @property
    def num_local_layers(self) -> int:
        return self.num_layers - self.num_global_layers

    def text_only(self) -> "GemmaConfig":
        return self.replace(vision=None)

    def replace(self, **changes: Any) -> "GemmaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GemmaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GemmaConfig fields {unknown}; expected a subset of {sorted(names)}")
        return cls(**d)

    # ------------------------------------------------------------------ HF import
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | os.PathLike) -> "GemmaConfig":
        """Builds the config from an HF `config.json` (path, dir or dict).

        Accepts Gemma3ForCausalLM configs and the `text_config` of a
        Gemma3ForConditionalGeneration, with Hub-style keys (rope_theta,
        rope_local_base_freq, rope_scaling, sliding_window_pattern) or
        transformers v5 keys (layer_types, rope_parameters).
        """
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                hf = json.load(f)
        mm = {}
        if "text_config" in hf:
            if hf.get("vision_config"):
                mm = dict(vision=SigLIPConfig.from_hf(hf["vision_config"], int(hf.get("mm_tokens_per_image", 256))),
                          image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 262_144))),
                          boi_token_id=int(hf.get("boi_token_index", 255_999)),
                          eoi_token_id=int(hf.get("eoi_token_index", 256_000)))
            text = dict(hf["text_config"] or {})
            if "vocab_size" not in text:
                text["vocab_size"] = MULTIMODAL_VOCAB_SIZE
            hf = text
        required = ["vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads",
                    "intermediate_size"]
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"HF config lacks {missing}; is it a Gemma 3 config.json?")
        num_layers = int(hf["num_hidden_layers"])
        num_heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // num_heads)

        if hf.get("layer_types"):
            layer_types = tuple(_hf_layer_type(t) for t in hf["layer_types"])
        else:
            pattern = int(hf.get("sliding_window_pattern") or 6)
            layer_types = tuple("global" if (i + 1) % pattern == 0 else "local" for i in range(num_layers))

        local_base, global_base, global_scale = 10_000.0, 1_000_000.0, 1.0
        rope_params = hf.get("rope_parameters")
        if isinstance(rope_params, dict) and ("full_attention" in rope_params or "sliding_attention" in rope_params):
            full = rope_params.get("full_attention") or {}
            sliding = rope_params.get("sliding_attention") or {}
            global_base = float(full.get("rope_theta", global_base))
            local_base = float(sliding.get("rope_theta", local_base))
            global_scale = _linear_factor(full)
            if _linear_factor(sliding) != 1.0:
                raise ValueError("RoPE scaling on sliding-window layers is not part of Gemma 3")
        else:
            if isinstance(rope_params, dict):  # a single dict applying to global layers
                global_base = float(rope_params.get("rope_theta", global_base))
                global_scale = _linear_factor(rope_params)
            global_base = float(hf.get("rope_theta", global_base))
            local_base = float(hf.get("rope_local_base_freq", local_base))
            if hf.get("rope_scaling"):
                global_scale = _linear_factor(hf["rope_scaling"])

        return cls(
            vocab_size=int(hf["vocab_size"]),
            num_layers=num_layers,
            d_model=int(hf["hidden_size"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            hidden_dim=int(hf["intermediate_size"]),
            sliding_window=int(hf.get("sliding_window") or 4096),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or head_dim),
            rope_local_base=local_base,
            rope_global_base=global_base,
            rope_global_scale=global_scale,
            layer_types=layer_types,
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            max_context=int(hf.get("max_position_embeddings") or 131_072),
            **mm,
        )


def _hf_layer_type(t: str) -> LayerType:
    if t == "sliding_attention":
        return "local"
    if t == "full_attention":
        return "global"
    raise ValueError(f"unknown HF layer type {t!r}; expected 'sliding_attention' or 'full_attention'")


def _linear_factor(rope: dict[str, Any] | None) -> float:
    if not rope:
        return 1.0
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return 1.0
    if kind != "linear":
        raise ValueError(f"RoPE scaling type {kind!r} is not supported; Gemma 3 uses 'linear'")
    return float(rope.get("factor", 1.0))


# ---------------------------------------------------------------------- presets
def gemma3_270m() -> GemmaConfig:
    return GemmaConfig(vocab_size=VOCAB_SIZE, num_layers=18, d_model=640, num_heads=4, num_kv_heads=1,
                       head_dim=256, hidden_dim=2048, sliding_window=512, query_pre_attn_scalar=256,
                       max_context=32_768)


def gemma3_1b() -> GemmaConfig:
    return GemmaConfig(vocab_size=VOCAB_SIZE, num_layers=26, d_model=1152, num_heads=4, num_kv_heads=1,
                       head_dim=256, hidden_dim=6912, sliding_window=512, query_pre_attn_scalar=256,
                       max_context=32_768)


def gemma3_4b() -> GemmaConfig:
    return GemmaConfig(vocab_size=MULTIMODAL_VOCAB_SIZE, num_layers=34, d_model=2560, num_heads=8,
                       num_kv_heads=4, head_dim=256, hidden_dim=10240, sliding_window=1024,
                       query_pre_attn_scalar=256, rope_global_scale=8.0, vision=SigLIPConfig())


def gemma3_12b() -> GemmaConfig:
    return GemmaConfig(vocab_size=MULTIMODAL_VOCAB_SIZE, num_layers=48, d_model=3840, num_heads=16,
                       num_kv_heads=8, head_dim=256, hidden_dim=15360, sliding_window=1024,
                       query_pre_attn_scalar=256, rope_global_scale=8.0, vision=SigLIPConfig())


def gemma3_27b() -> GemmaConfig:
    return GemmaConfig(vocab_size=MULTIMODAL_VOCAB_SIZE, num_layers=62, d_model=5376, num_heads=32,
                       num_kv_heads=16, head_dim=128, hidden_dim=21504, sliding_window=1024,
                       query_pre_attn_scalar=168, rope_global_scale=8.0, vision=SigLIPConfig())


def tiny(**changes: Any) -> GemmaConfig:
    """A 7-layer (6 local + 1 global) random-init config for fast tests."""
    base = GemmaConfig(vocab_size=512, num_layers=7, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       hidden_dim=128, sliding_window=8, query_pre_attn_scalar=16, max_context=4096)
    return base.replace(**changes)


PRESETS = {
    "gemma3-270m": gemma3_270m,
    "gemma3-1b": gemma3_1b,
    "gemma3-4b": gemma3_4b,
    "gemma3-12b": gemma3_12b,
    "gemma3-27b": gemma3_27b,
}


def preset(name: str) -> GemmaConfig:
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[key]()
