#!/usr/bin/env bash
# One GPU call (session 26): tune the MMA-fragment int4 layout (scheme int4_mma, row w4a16_g128_mma) at
# the M buckets its untuned rule guesses (C++ decode up to 16, CUTLASS tiles beyond): every candidate
# of dispatch.candidate_configs (CUTLASS tiles, Triton GEMMs, dequantize + cuBLAS), timed as linear.py
# does. The result, tuned_configs.json, is what the shipped table takes (configs.json, "h100").
# Env: FXQ_TUNE_MS (default 16,32,64,128,256,512,1024,2048), FXQ_WARM_S, FXQ_TUNE_BUDGET.
# Files under $OUT (at most 8 come back from the device): env.txt fxq_libs.tgz tune.log tuned_configs.json
# linear_table.txt linear.json; the build and warm logs stay on the device unless they fail.
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
L=$(mktemp -d)
build_libs "$L" &
MS=${FXQ_TUNE_MS:-16,32,64,128,256,512,1024,2048}
for i in 0 1 2 3; do
  timeout -s INT -k 10 ${FXQ_WARM_S:-150} python3 benchmarks/linear.py --warm-only --tune --peers none \
    --schemes w4a16_g128_mma --ms "$MS" --shard $i/4 > "$L/warm_$i.log" 2>&1 &
done
wait
save_libs "$OUT"
echo "warm done at $(( $(date +%s) - T0 )) s"
timeout -s INT -k 10 $(( ${FXQ_TUNE_BUDGET:-200} + 100 )) python3 benchmarks/linear.py --tune --tune-budget ${FXQ_TUNE_BUDGET:-200} \
  --peers none --schemes w4a16_g128_mma --ms "$MS" --out "$L/lin" > "$OUT/tune.log" 2>&1
echo "tune rc $? at $(( $(date +%s) - T0 )) s"
for f in tuned_configs.json linear_table.txt linear.json; do cp "$L/lin/$f" "$OUT/" 2>/dev/null; done
tail -n 3 "$L"/build_*.log | grep -i "error\|fail" | head -5
grep "^tune w4a16" "$OUT/tune.log" | sed 's/^tune //'
