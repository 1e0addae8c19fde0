#!/usr/bin/env bash
# One GPU call (session 26): tune the MMA-fragment int4 layout (scheme int4_mma, row w4a16_g128_mma) at
# the M buckets its untuned rule guesses (C++ decode up to 16, CUTLASS tiles beyond): every candidate
# of dispatch.candidate_configs (CUTLASS tiles, Triton GEMMs, dequantize + cuBLAS), timed as linear.py
# does. The result, tuned_configs.json, is what the shipped table takes (configs.json, "h100").
# Env: FXQ_TUNE_MS (default 16,32,64,128,256,512,1024,2048), FXQ_WARM_S, FXQ_TUNE_BUDGET.
# Files under $OUT: env.txt build_*.log warm_*.log tune.log tuned_configs.json tune_log.json.
# Carry .whl (CUTLASS headers, tqdm) and, if there, .devrun/fxq_libs.tgz.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_int4_mma_tune}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
. benchmarks/device_env.sh
device_info "$OUT/env.txt"
# The warm shards compile the Triton candidates while the libraries build (they wait on the
# build's lock when they reach a C++ / CUTLASS candidate).
build_libs "$OUT" &
MS=${FXQ_TUNE_MS:-16,32,64,128,256,512,1024,2048}
for i in 0 1 2 3; do
  timeout -s INT -k 10 ${FXQ_WARM_S:-150} python3 benchmarks/linear.py --warm-only --tune --peers none \
    --schemes w4a16_g128_mma --ms "$MS" --shard $i/4 > "$OUT/warm_$i.log" 2>&1 &
done
wait
save_libs "$OUT"
echo "warm done at $(( $(date +%s) - T0 )) s"
timeout -s INT -k 10 $(( ${FXQ_TUNE_BUDGET:-200} + 100 )) python3 benchmarks/linear.py --tune --tune-budget ${FXQ_TUNE_BUDGET:-200} \
  --peers none --schemes w4a16_g128_mma --ms "$MS" --out "$OUT" > "$OUT/tune.log" 2>&1
echo "tune rc $? at $(( $(date +%s) - T0 )) s"
grep "^tune w4a16" "$OUT/tune.log" | sed 's/^tune //'
