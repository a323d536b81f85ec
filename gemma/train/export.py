"""LoRA adapters in PEFT's layout, both ways: what `peft.PeftModel.from_pretrained(hf_model, path)` loads.

    export.save_peft(model, "out/adapter", base_model="google/gemma-3-270m")  # adapter_config.json +
                                                                              # adapter_model.safetensors
    export.load_peft(model, "out/adapter")   # attaches a PEFT-made (or our) adapter to our model

PEFT stores, per adapted Linear, lora_A.weight [r, in] and lora_B.weight [out, r] with the update
(lora_alpha / r) * B @ A on HF's [out, in] weight; ours are a over the weight's contracted axes and b
over its others (lora.LoRAEinsum), the same factors in our layout. The HF names and the flattening of
the heads follow checkpoints.params, the table the weights themselves are imported with.
The merged model goes to HF transformers through checkpoints.save_hf.
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from gemma.train import lora
from kernels.dense import einsum_axes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# --lora-targets names -> the HF module name inside a decoder layer
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_LEAF_TO_TARGET = {name.split(".")[-1]: t for t, name in HF_MODULES.items()}


def _prefix(model) -> str:
    """PEFT's key prefix of the decoder layers: Gemma3ForCausalLM, or the v5 module names of
    Gemma3ForConditionalGeneration (the tower and projector are never adapted)."""
    return "base_model.model.model.language_model.layers." if model.config.vision is not None else \
        "base_model.model.model.layers."


def _adapters(model):
    """(layer index, target name, LoRAEinsum) of every adapter of the model."""
    for i, block in enumerate(model.layers):
        for name, (sub, attr) in lora.TARGETS.items():
            layer = getattr(getattr(block, sub), attr)
            if isinstance(layer, lora.LoRAEinsum):
                yield i, name, layer


def _target_modules(model, targets) -> list[str] | str:
    leaves = [HF_MODULES[t].split(".")[-1] for t in targets]
    if model.config.vision is None:
        return leaves
    return rf".*language_model.*\.({'|'.join(leaves)})"  # keeps the SigLIP q/k/v_proj out


def peft_tensors(model) -> dict[str, np.ndarray]:
    """PEFT file key -> lora_A [r, in] / lora_B [out, r] (f32) for every adapter of `model`."""
    out, prefix = {}, _prefix(model)
    for i, name, layer in _adapters(model):
        key = f"{prefix}{i}.{HF_MODULES[name]}"
        a = np.asarray(layer.a[...], np.float32)
        b = np.asarray(layer.b[...], np.float32)
        out[key + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, layer.rank).T)
        out[key + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(layer.rank, -1).T)
    return out


def save_peft(model, path: str | os.PathLike, base_model: str | None = None) -> str:
    """Writes the model's LoRA adapters as a PEFT adapter directory; returns the path. `base_model`
    is recorded as base_model_name_or_path (the HF id or directory of the base the adapter is for)."""
    found = lora.settings(model)
    if found is None:
        raise ValueError("the model has no LoRA adapters to save (gemma.train.lora.apply adds them)")
    path = os.path.abspath(os.fspath(path))
    tensors = peft_tensors(model)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": found["rank"], "lora_alpha": found["alpha"],
              "target_modules": _target_modules(model, found["targets"]), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
              "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return path


def _read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file) or not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        raise FileNotFoundError(f"{path}: a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    with open(file) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
    unsupported = []
    if config.get("peft_type") != "LORA":
        unsupported.append(f"peft_type {config.get('peft_type')!r} (only 'LORA')")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias"):
        if config.get(flag):
            unsupported.append(f"{flag}=true")
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias {config['bias']!r} (only 'none')")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            unsupported.append(f"a per-module {field}")
    for field in ("layers_to_transform", "modules_to_save", "trainable_token_indices"):
        if config.get(field):
            unsupported.append(f"{field} {config[field]!r}")
    if unsupported:
        raise ValueError(f"{file}: cannot load this adapter as LoRA on every layer: " + "; ".join(unsupported))
    return config


def load_peft(model, path: str | os.PathLike):
    """Attaches the PEFT LoRA adapter at `path` to `model` (in place, as lora.LoRAEinsum modules with
    f32 factors); returns the model. Every tensor is checked against the model before any is set."""
    path = os.fspath(path)
    config = _read_config(path)
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    pattern = re.compile(r"(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
    found, unexpected = {}, []
    for key, value in tensors.items():
        m = pattern.fullmatch(key)
        if m is None or m.group(3) not in _LEAF_TO_TARGET or int(m.group(1)) >= model.config.num_layers:
            unexpected.append(key)
            continue
        found[int(m.group(1)), _LEAF_TO_TARGET[m.group(3)], m.group(4)] = (key, value)
    targets = sorted({t for _, t, _ in found}, key=list(lora.TARGETS).index)
    missing = [f"layers.{i}.{HF_MODULES[t]}.lora_{ab}.weight" for i in range(model.config.num_layers)
               for t in targets for ab in "AB" if (i, t, ab) not in found]
    if not targets or unexpected or missing:
        lines = [f"{path}: the adapter does not fit this model ({model.config.num_layers} layers, LoRA on "
                 f"{', '.join(HF_MODULES.values())}):"]
        if not targets:
            lines.append("  no lora_A / lora_B tensors of a decoder projection")
        for title, items in (("unexpected", unexpected), ("missing", missing)):
            if items:
                lines.append(f"  {len(items)} {title} tensor(s): " + "; ".join(items[:10])
                             + (f"; ... and {len(items) - 10} more" if len(items) > 10 else ""))
        raise ValueError("\n".join(lines))

    misshaped = []
    for (i, name, ab), (key, value) in found.items():
        sub, attr = lora.TARGETS[name]
        base = getattr(getattr(model.layers[i], sub), attr)
        if isinstance(base, lora.LoRAEinsum):
            raise ValueError(f"the model already has LoRA adapters on {name}; merge them first (lora.merge)")
        _, rhs, _, _, contract, rest = einsum_axes(base.spec)
        sizes = dict(zip(rhs, base.w.shape))
        fan_in, fan_out = (int(np.prod([sizes[c] for c in axes])) for axes in (contract, rest))
        expected = (rank, fan_in) if ab == "A" else (fan_out, rank)
        if value.shape != expected:
            misshaped.append(f"{key}: expected {expected}, found {tuple(value.shape)}")
    if misshaped:
        raise ValueError(f"{path}: mis-shaped adapter tensor(s) for r={rank}: " + "; ".join(misshaped[:10]))

    lora.apply(model, rank, alpha, targets)
    for i, name, layer in _adapters(model):
        a, b = found[i, name, "A"][1], found[i, name, "B"][1]
        layer.a.set_value(jnp.asarray(a.T.reshape(layer.a[...].shape), jnp.float32))
        layer.b.set_value(jnp.asarray(b.T.reshape(layer.b[...].shape), jnp.float32))
    return model
