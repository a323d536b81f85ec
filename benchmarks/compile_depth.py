"""Compile time of the fine-tuning step against depth, blocks unrolled vs scanned (`--scan-layers`).

    .venv/bin/python benchmarks/compile_depth.py [--depths 6,12,24,48] [--modes full,lora] [--vocab 4096]

The 270M's block (d_model 640, 4 heads, MLP 2048) stacked to each depth (5 local : 1 global), a small
vocabulary so the head does not hide the blocks, batch 2 x 256, f32, AdamW, `--remat full`: the Trainer's
own jitted step (trainer.abstract_step on this process's devices) traced, lowered and compiled by XLA for
this CPU; nothing runs. Prints the seconds of each phase and the compiled HLO's size per depth.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gemma.config import gemma3_270m  # noqa: E402
from gemma.train import sharding, trainer  # noqa: E402


def compile_time(depth: int, mode: str, scan: bool, vocab: int) -> dict:
    cfg = gemma3_270m().replace(num_layers=depth, layer_types=None, vocab_size=vocab)
    tc = trainer.TrainConfig(steps=10, batch_size=2, seq_len=256, remat="full", scan_layers=scan,
                             lora_rank=8 if mode == "lora" else None)
    t0 = time.perf_counter()
    step, args = trainer.abstract_step(cfg, tc, sharding.make_mesh())
    t1 = time.perf_counter()
    lowered = step.trace(*args).lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return {"setup": t1 - t0, "lower": t2 - t1, "compile": t3 - t2, "hlo_chars": len(compiled.as_text())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", default="6,12,24,48")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--vocab", type=int, default=4096)
    a = p.parse_args(argv)
    print(f"load average {os.getloadavg()}")
    print("| mode | layers | unrolled: trace + lower s | compile s | scanned: trace + lower s | compile s "
          "| compile unrolled / scanned |")
    print("|---|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        for depth in (int(d) for d in a.depths.split(",")):
            u, s = (compile_time(depth, mode, scan, a.vocab) for scan in (False, True))
            print(f"| {mode} | {depth} | {u['setup'] + u['lower']:.1f} | {u['compile']:.1f} | "
                  f"{s['setup'] + s['lower']:.1f} | {s['compile']:.1f} | {u['compile'] / s['compile']:.2f}x |",
                  flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
