#!/bin/bash
# One lent-GPU session's attention checks and timings (benchmarks/gpu_attention.py), each part under a
# time limit so a hung kernel costs its part only; logs go to $OUT (default .).
# Usage, from the repo root on the GPU machine: bash benchmarks/gpu_run.sh [extra sections, e.g. sweep]
export PYTHONUNBUFFERED=1
OUT=${OUT:-.}
skip=""
timeout 200 python3 benchmarks/gpu_attention.py --sections ceilings,check --out "$OUT" 2>&1 | tee "$OUT/check.log"
grep -q "check pallas_gpu        fwd  bfloat16" "$OUT/check.log" || skip="--skip pallas_gpu"
timeout 300 python3 benchmarks/gpu_attention.py --sections ceilings,prefill,decode${1:+,$1} $skip --out "$OUT" 2>&1 | tee "$OUT/prefill.log"
