#!/bin/bash
# One lent-GPU session's attention checks and timings (benchmarks/gpu_attention.py), each part under a
# time limit so a hung kernel costs its part only; logs go to $OUT (default .). At most ~580 s in all.
# 1. the default paths' checks (pallas_gpu: on a Hopper GPU the Hopper forward and backward; Triton's;
# cudnn; auto); 2. the checks of the Hopper forward's variants (raw, persistent, paired); 3. the issue's
# target case, the anatomy of the Hopper forward, and the shapes kernels.hopper_route was decided on;
# 4. the whole prefill and decode tables. 3 and 4 leave out whatever did not pass its check.
# Usage, from the repo root on the GPU machine: bash benchmarks/gpu_run.sh [extra sections, e.g. sweep]
# (SMOKE=1 PYTHON=... runs it at toy sizes on any machine, to check the script itself)
export PYTHONUNBUFFERED=1
OUT=${OUT:-.}
bench=(${PYTHON:-python3} benchmarks/gpu_attention.py ${SMOKE:+--smoke} --out "$OUT")
NEW="pallas_gpu raw,pallas_gpu persistent,pallas_gpu paired,pallas_gpu paired persistent"
timeout 180 "${bench[@]}" --sections ceilings,check --skip "$NEW" 2>&1 | tee "$OUT/check.log"
timeout 110 "${bench[@]}" --sections check --skip "pallas_gpu,pallas_gpu triton,cudnn,auto" 2>&1 | tee "$OUT/check_new.log"
skip=""
ok() {  # a bf16 check line of impl $1 ($2: fwd or grad) in log $3, case $4 (a pattern), within its bound
  grep -Eq "^check $1 +$2 +bfloat16 $4: rel err .* ok$" "$3"
}
ragged="W=[0-9]+ ragged"
ok "pallas_gpu" fwd "$OUT/check.log" "$ragged" && ok "pallas_gpu" grad "$OUT/check.log" "$ragged" \
  || skip="pallas_gpu,auto,"  # auto's windowed layers are pallas_gpu's
ok "pallas_gpu triton" grad "$OUT/check.log" "$ragged" || skip="${skip}pallas_gpu triton,"
ok "auto" grad "$OUT/check.log" "W=[0-9]+" && ok "auto" grad "$OUT/check.log" "W=None" || skip="${skip}auto,"
for impl in "pallas_gpu raw" "pallas_gpu persistent" "pallas_gpu paired" "pallas_gpu paired persistent"; do
  ok "$impl" fwd "$OUT/check_new.log" "$ragged" || skip="${skip}${impl},"
done
echo "left out of the timings: ${skip:-nothing}"
timeout 150 "${bench[@]}" --sections ceilings,target,route,anatomy --skip "$skip" 2>&1 | tee "$OUT/target.log"
timeout 140 "${bench[@]}" --sections ceilings,prefill,decode${1:+,$1} --skip "$skip" 2>&1 | tee "$OUT/prefill.log"
