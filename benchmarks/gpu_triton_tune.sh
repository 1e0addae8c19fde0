#!/usr/bin/env bash
# One GPU call (session 15): the triton_op path's GPU tests, then tuning of its Triton-only
# kernels where the table picks another kind (weight-only M >= 128: CUTLASS / dequantize + cuBLAS),
# then the @triton_op rows measured against bf16 with those tunings. No C++ / CUTLASS library is
# built (FXQUANT_CXX=0 throughout): nothing here runs them.
# Env: FXQ_SKIP_TESTS=1, FXQ_TUNE_MS, FXQ_MS, FXQ_WARM_S, FXQ_TUNE_S, FXQ_TUNE_BUDGET, FXQ_BUDGET_S,
# FXQ_BENCH_SCHEMES.
# Files under $OUT: env.txt t_triton_ops.log t_export.log tune.log tuned_configs.json
# linear.json linear_table.txt linear.png. Carry .whl (tqdm).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_triton_tune}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FXQUANT_CXX=0
T0=$(date +%s)
. benchmarks/device_env.sh  # carried in .whl
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u; } > "$OUT/env.txt" 2>&1
TW="w4a16_g128@triton_op,w8a16@triton_op,fp8_wo@triton_op"
TUNE_MS=${FXQ_TUNE_MS:-128,256,512,1024,2048,4096,8192}
MS=${FXQ_MS:-1,16,64,256,512,1024,4096}
L="$OUT/logs_tmp"; mkdir -p "$L"
if [ "${FXQ_SKIP_TESTS:-0}" != 1 ]; then
  for i in 0 1 2; do
    FXQUANT_TEST_SHARD=$i/3 timeout -s INT -k 10 300 python3 -m pytest tests/gpu/test_gpu_triton_ops.py \
      -q -rfE -p no:cacheprovider > "$L/t_triton_ops_$i.log" 2>&1 &
  done
  timeout -s INT -k 10 300 python3 -m pytest tests/gpu/test_gpu_export.py -q -rfE \
    -k "triton_ops_export and (int8 or int4)" -p no:cacheprovider > "$L/t_export.log" 2>&1 &
fi
for i in 0 1 2 3; do
  timeout -s INT -k 10 ${FXQ_WARM_S:-200} python3 benchmarks/linear.py --warm-only --tune --triton-only --peers none \
    --schemes "$TW" --ms "$TUNE_MS" --shard $i/4 > "$L/warm_$i.log" 2>&1 &
done
wait
echo "phase A (tests, warm) done at $(( $(date +%s) - T0 )) s" | tee "$L/times.log"
cat "$L"/t_triton_ops_*.log > "$OUT/t_triton_ops.log" 2>/dev/null
cp "$L/t_export.log" "$OUT/" 2>/dev/null
timeout -s INT -k 10 ${FXQ_TUNE_S:-300} python3 benchmarks/linear.py --tune --triton-only --tune-budget ${FXQ_TUNE_BUDGET:-150} \
  --peers none --schemes "$TW" --ms "$TUNE_MS" --out "$L/tune" > "$L/tune_run.log" 2>&1
echo "tune rc $? at $(( $(date +%s) - T0 )) s" | tee -a "$L/times.log"
cp "$L/tune/tuned_configs.json" "$OUT/" 2>/dev/null
REM=$(( ${FXQ_BUDGET_S:-570} - $(date +%s) + T0 ))
if [ "$REM" -ge 60 ]; then
  timeout -s INT -k 10 "$REM" python3 benchmarks/linear.py --out "$OUT" --peers none \
    --schemes "${FXQ_BENCH_SCHEMES:-w4a16_g128@triton_op,w8a16@triton_op,w8a8_int8@triton_op,fp8_row@triton_op,fp8_wo@triton_op}" \
    --ms "$MS" > "$L/bench.log" 2>&1
  echo "bench rc $? at $(( $(date +%s) - T0 )) s" | tee -a "$L/times.log"
else
  echo "bench skipped: $REM s left" | tee -a "$L/times.log"
fi
cat "$L/times.log" "$L"/warm_*.log "$L/tune_run.log" "$L/bench.log" > "$OUT/tune.log" 2>/dev/null
echo "== fxquant triton_op tune call summary"
cat "$L/times.log"
for f in "$L"/t_triton_ops_*.log "$L/t_export.log"; do [ -f "$f" ] && grep -hE "passed|failed|error" "$f" | tail -1; done
grep -hsE "^(FAILED|ERROR) " "$L"/t_*.log | cut -c1-220 | head -12
grep -E "tune .* best" "$L/tune_run.log" | tail -12
cat "$OUT/linear_table.txt" 2>/dev/null || tail -20 "$L/bench.log"
rm -rf "$L"
