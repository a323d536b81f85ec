"""A fine-tuning step of Gemma 3 4B / 12B / 27B lowered for a TPU pod on this CPU, and what each chip holds.

    .venv/bin/python benchmarks/lower_train_step.py [--models 4b,12b,27b] [--mesh fsdp=64,tensor=4]
                                                   [--batch-size 64] [--seq-len 2048] [--lora-rank 8]
                                                   [--scan-layers]

For each text-only preset and each of full fine-tuning and LoRA (rank 8 on q k v o gate up down), the
Trainer's own jitted step (gemma.train.trainer.abstract_step: the same _train_step, shardings and donation
the Trainer uses) is traced and lowered to StableHLO for TPU (`lowering_platforms=("tpu",)`) over a
jax.sharding.AbstractMesh: no TPU, and nothing is allocated (parameters come from nnx.eval_shape). The step
runs in bfloat16 with full remat, f32 master weights (LoRA: the frozen weights f32 too, as the Trainer
keeps the model's dtype), AdamW. Attention is what "auto" resolves to on the host backend (the XLA
reference on a CPU): this checks the partitioning of the model and the optimizer, not the Pallas kernel.

Printed per run: the time of eval_shape + shardings, trace, and lowering; the bytes of parameters +
optimizer state in all and per device (by the input shardings; the TPU compiler's SPMD partitioner runs
later, on a TPU) against total / devices; and the largest tensors a device holds more than 1/devices of.
Exits 1 if a run's per-device bytes exceed 1.5 x total / devices.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from gemma import config as gconfig  # noqa: E402
from gemma.train import sharding, trainer  # noqa: E402

MODELS = {"4b": gconfig.gemma3_4b, "12b": gconfig.gemma3_12b, "27b": gconfig.gemma3_27b}
GiB = 2**30


def abstract_mesh(text: str) -> jax.sharding.AbstractMesh:
    sizes = sharding.parse_mesh(text)
    return jax.sharding.AbstractMesh(tuple(sizes.get(a, 1) for a in sharding.MESH_AXES), sharding.MESH_AXES)


def lower(model_config, train_config, mesh) -> dict:
    """Lowers one step; returns timings (s), bytes, and the tensors held above their even share."""
    t0 = time.perf_counter()
    step, args = trainer.abstract_step(model_config, train_config, mesh)
    t1 = time.perf_counter()
    with jax.sharding.use_abstract_mesh(mesh):
        traced = step.trace(*args)
        t2 = time.perf_counter()
        lowered = traced.lower(lowering_platforms=("tpu",))
    t3 = time.perf_counter()
    text = lowered.as_text()
    devices = math.prod(mesh.axis_sizes)
    state = args[:3]
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    per_device = sharding.bytes_per_device(state)
    over = []  # (bytes held, times the even share, path, shape, spec)
    for name, tree in zip(("trainable", "frozen", "opt"), state):
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            held = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            share = math.prod(x.shape) * x.dtype.itemsize / devices
            if held > share:
                over.append((held, held / share, name + jax.tree_util.keystr(path), x.shape, x.sharding.spec))
    over.sort(key=lambda r: -r[0])
    return {"setup_s": t1 - t0, "trace_s": t2 - t1, "lower_s": t3 - t2, "hlo_chars": len(text),
            "partitions": f"mhlo.num_partitions = {devices}" in text, "total": total, "per_device": per_device,
            "even": total / devices, "over": over, "over_bytes": sum(r[0] for r in over)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="4b,12b,27b")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--mesh", default="fsdp=64,tensor=4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--scan-layers", action="store_true", help="the blocks as a scan over their repeating group")
    a = p.parse_args(argv)
    mesh = abstract_mesh(a.mesh)
    devices = math.prod(mesh.axis_sizes)
    print(f"jax {jax.__version__}; abstract mesh {dict(zip(mesh.axis_names, mesh.axis_sizes))} = {devices} TPU "
          f"devices; batch {a.batch_size} x {a.seq_len}, bf16 compute, remat full, f32 parameters, AdamW"
          f"{', scanned layers' if a.scan_layers else ''}\n")
    print("| model | mode | eval_shape + shardings s | trace s | lower s | params + opt, total GiB | per device MiB "
          "| total / devices MiB | ratio | held above even share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for model in a.models.split(","):
        cfg = MODELS[model.strip().lower()]().text_only()
        for mode in a.modes.split(","):
            tc = trainer.TrainConfig(steps=1000, batch_size=a.batch_size, seq_len=a.seq_len,
                                     compute_dtype="bfloat16", remat="full", scan_layers=a.scan_layers,
                                     lora_rank=a.lora_rank if mode == "lora" else None)
            r = lower(cfg, tc, mesh)
            ratio = r["per_device"] / r["even"]
            failed |= ratio > 1.5 or not r["partitions"]
            kinds = {}
            for held, times, path, shape, spec in r["over"]:
                key = (path.split("[")[0], tuple(shape), str(spec))
                kinds.setdefault(key, [0, 0])
                kinds[key][0] += 1
                kinds[key][1] += held
            top = sorted(kinds.items(), key=lambda kv: -kv[1][1])[:2]
            above = "; ".join(f"{n} x {k[0]} {list(k[1])} {k[2]} ({b / 2**20:.2f} MiB)" for k, (n, b) in top)
            print(f"| {model} | {mode} | {r['setup_s']:.1f} | {r['trace_s']:.1f} | {r['lower_s']:.1f} | "
                  f"{r['total'] / GiB:.1f} | {r['per_device'] / 2**20:.1f} | {r['even'] / 2**20:.1f} | "
                  f"{ratio:.3f} | {r['over_bytes'] / 2**20:.2f} MiB: {above or '-'} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
