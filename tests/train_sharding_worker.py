"""Three training steps of a tiny model on a mesh, in a process of its own, for tests/test_train_sharding.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_sharding_worker.py '{"mesh": "fsdp=8"}'

The argument is JSON: "runs", a list of {"mesh": a sharding.make_mesh string over all devices, or null
for a mesh of the first device alone; "cases": a list of {"lora": bool, "kv_heads": int}, default full and
LoRA on 2 and on 1 KV heads}, and, for a multi-process run, "distributed": {"port", "process_id",
"num_processes"} (CPU collectives through gloo, the coordinator bound to 127.0.0.1). Every process builds
the same model and data (fixed seeds) and feeds only its own rows of each global batch
(data.make_iterator's shard_index/shard_count). The last stdout line is "RESULT {json}": per run and case
the three losses and the sharding specs and per-device shard shapes of a few parameters.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS, BATCH, SEQ = 3, 8, 32
CASES = [{"lora": False, "kv_heads": 2}, {"lora": True, "kv_heads": 2},
         {"lora": False, "kv_heads": 1}, {"lora": True, "kv_heads": 1}]


def model_config(kv_heads: int):
    """tiny() cut to 2 layers (one local, one global): d_model 64, 4 query heads, `kv_heads` KV heads,
    MLP 128, vocabulary 512, so fsdp=8 and tensor=2 divide every dimension but a single KV head."""
    from gemma import config
    return config.tiny(num_layers=2, layer_types=("local", "global"), num_kv_heads=kv_heads)


def examples(vocab_size: int):
    import numpy as np
    from gemma.train import data
    rng = np.random.default_rng(0)
    return [data.Example(rng.integers(3, vocab_size, k).astype(np.int32), np.r_[False, rng.random(k - 1) < 0.7])
            for k in rng.integers(5, 30, 64)]


def _spec(variable) -> list:
    spec = variable.get_value().sharding.spec
    return [list(s) if isinstance(s, tuple) else s for s in tuple(spec) + (None,) * (variable.ndim - len(spec))]


def run_case(case: dict, mesh) -> dict:
    import jax
    from flax import nnx
    from gemma.train import data, trainer
    from gemma.transformer import Transformer

    cfg = model_config(case["kv_heads"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    t = trainer.Trainer(model, trainer.TrainConfig(steps=STEPS, batch_size=BATCH, seq_len=SEQ, learning_rate=1e-3,
                                                   warmup_steps=0, lora_rank=4 if case["lora"] else None), mesh)
    it = data.make_iterator(examples(cfg.vocab_size), batch_size=BATCH, seq_len=SEQ, seed=0, prefetch=0,
                            shard_index=jax.process_index(), shard_count=jax.process_count())
    losses = [t.step([next(it)])["loss"] for _ in range(STEPS)]
    params = {"embedding": t.frozen["embedder"]["embedding"] if case["lora"] else t.trainable["embedder"]["embedding"]}
    attn = (t.frozen if case["lora"] else t.trainable)["layers"][0]["attn"]
    params["q_proj.w"] = attn["q_proj"]["base"]["w"] if case["lora"] else attn["q_proj"]["w"]
    params["k_proj.w"] = attn["k_proj"]["base"]["w"] if case["lora"] else attn["k_proj"]["w"]
    if case["lora"]:
        lora_attn = t.trainable["layers"][0]["attn"]
        params["k_proj.a"], params["k_proj.b"] = lora_attn["k_proj"]["a"], lora_attn["k_proj"]["b"]
    shard_shapes = {k: list(v.get_value().sharding.shard_shape(v.get_value().shape)) for k, v in params.items()}
    return {"losses": losses, "specs": {k: _spec(v) for k, v in params.items()}, "shard_shapes": shard_shapes}


def run(spec: dict) -> list[dict]:
    """The results of spec["cases"] on spec["mesh"] (None: the first device alone)."""
    import jax
    from gemma.train import sharding
    mesh = sharding.make_mesh(spec["mesh"]) if spec.get("mesh") else sharding.make_mesh("fsdp=1", jax.devices()[:1])
    return [run_case(case, mesh) for case in spec.get("cases", CASES)]


def main():
    spec = json.loads(sys.argv[1])
    import jax
    jax.config.update("jax_platforms", "cpu")
    dist = spec.get("distributed")
    if dist:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        address = f"127.0.0.1:{dist['port']}"
        jax.distributed.initialize(coordinator_address=address, coordinator_bind_address=address,
                                   num_processes=dist["num_processes"], process_id=dist["process_id"],
                                   initialization_timeout=60)
    results = [run(r) for r in spec["runs"]]
    out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "devices": jax.device_count(), "local_devices": jax.local_device_count(), "results": results}
    print("RESULT " + json.dumps(out), flush=True)
    if dist:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
