#!/bin/bash
# One lent-GPU session's attention checks and timings (benchmarks/gpu_attention.py), each part under a
# time limit so a hung kernel costs its part only; logs go to $OUT (default .).
# 1. the GPU-verified paths' checks; 2. the checks of the variants not yet run on a GPU (persistent
# forward, Hopper backward); 3. timings, leaving out whatever did not pass its check.
# Usage, from the repo root on the GPU machine: bash benchmarks/gpu_run.sh [extra sections, e.g. sweep]
export PYTHONUNBUFFERED=1
OUT=${OUT:-.}
NEW="pallas_gpu persistent,pallas_gpu hopper bwd"
timeout 170 python3 benchmarks/gpu_attention.py --sections ceilings,check --skip "$NEW" --out "$OUT" 2>&1 | tee "$OUT/check.log"
timeout 120 python3 benchmarks/gpu_attention.py --sections check --skip "pallas_gpu triton,cudnn" --out "$OUT" 2>&1 | tee "$OUT/check_new.log"
skip=""
ok() { grep -q "^check $1.* ok$" "$2"; }  # a check line that ran and was within its bound
ok "pallas_gpu        fwd  bfloat16 W=1024 ragged" "$OUT/check.log" || skip="pallas_gpu,"
ok "pallas_gpu persistent fwd  bfloat16 W=1024 ragged" "$OUT/check_new.log" || skip="${skip}pallas_gpu persistent,"
ok "pallas_gpu hopper bwd grad bfloat16" "$OUT/check_new.log" || skip="${skip}pallas_gpu hopper bwd,"
echo "left out of the timings: ${skip:-nothing}"
timeout 300 python3 benchmarks/gpu_attention.py --sections ceilings,prefill,decode${1:+,$1} --skip "$skip" --out "$OUT" 2>&1 | tee "$OUT/prefill.log"
