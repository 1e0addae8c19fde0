#!/usr/bin/env bash
# One GPU call (session 27; gpu_int4_mma_tune.sh runs it with S26's defaults): builds the libraries, then
# tunes the weight-only schemes with every candidate of dispatch.candidate_configs (the CUTLASS stream-K
# tiles narrow along the tokens among them), timed as linear.py does; the result, tuned_configs.json, is
# what the shipped table takes (configs.json, "h100").
# Env: FXQ_SCHEMES (default w4a16_g128_mma,w4a16_g128), FXQ_TUNE_MS (default 32,64,128,256), FXQ_WARM_S,
# FXQ_TUNE_BUDGET.
# Files under $OUT: env.txt fxq_libs.tgz tune.log tuned_configs.json linear_table.txt linear.json.
# Carry .whl (CUTLASS headers, tqdm) and, if there, .devrun/fxq_libs.tgz.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_narrow_tiles}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
. benchmarks/device_env.sh
device_info "$OUT/env.txt"
L=$(mktemp -d)
build_libs "$L" &
SCHEMES=${FXQ_SCHEMES:-w4a16_g128_mma,w4a16_g128}
MS=${FXQ_TUNE_MS:-32,64,128,256}
for i in 0 1 2 3; do  # Triton candidates compile while the libraries build
  timeout -s INT -k 10 ${FXQ_WARM_S:-200} python3 benchmarks/linear.py --warm-only --tune --peers none \
    --schemes "$SCHEMES" --ms "$MS" --shard $i/4 > "$L/warm_$i.log" 2>&1 &
done
wait
save_libs "$OUT"
tail -n 3 "$L"/build_*.log | grep -i "error\|fail" | head -5
echo "warm done at $(( $(date +%s) - T0 )) s"
timeout -s INT -k 10 $(( ${FXQ_TUNE_BUDGET:-240} + 100 )) python3 benchmarks/linear.py --tune \
  --tune-budget ${FXQ_TUNE_BUDGET:-240} --peers none --schemes "$SCHEMES" --ms "$MS" --out "$L/lin" > "$OUT/tune.log" 2>&1
echo "tune rc $? at $(( $(date +%s) - T0 )) s"
for f in tuned_configs.json linear_table.txt linear.json; do cp "$L/lin/$f" "$OUT/" 2>/dev/null; done
grep "^tune " "$OUT/tune.log" | sed 's/^tune //; s/KernelConfig(//; s/, swap=False, group_m=8, tma=False, cluster=1)//'
