"""benchmarks/finetune_gpu.py (run on a lent GPU): its FLOP count and a smoke run on this CPU."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

from gemma import config as gconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "finetune_gpu.py")
spec = importlib.util.spec_from_file_location("finetune_gpu", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_visible_pairs_count_the_attention_contract():
    cfg = gconfig.tiny()  # 6 local layers (window 8) and 1 global
    for seq in (5, 8, 9, 64):
        i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
        causal = int(np.sum(j <= i))
        local = int(np.sum((j <= i) & (j > i - cfg.sliding_window)))
        assert bench.visible_pairs(cfg, seq) == 6 * local + causal


def test_peak_lookup():
    class Dev:
        device_kind = "NVIDIA H100 80GB HBM3"
    assert bench.peak_flops(Dev(), "bfloat16", None) == 989.4e12
    assert bench.peak_flops(Dev(), "float32", None) is None
    assert bench.peak_flops(Dev(), "float32", 67.0) == 67e12


def test_smoke_run():
    r = subprocess.run([sys.executable, SCRIPT, "--smoke"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])
    assert out["tokens_per_s"] > 0 and out["mfu"] is None and len(out["losses"]) == 2
