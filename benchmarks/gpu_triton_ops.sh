#!/usr/bin/env bash
# One GPU call that checks the triton_op path (lowering/triton/triton_ops.py) and measures it beside
# the run-time dispatcher. Written in session 14; first run in session 15 (BENCHMARKS.md S15).
#
# Phase A (parallel): build the C++ and CUTLASS libraries (the dispatcher's rows need them);
# tests/gpu/test_gpu_triton_ops.py in 3 shards and the triton tests of test_gpu_export.py (these
# run with FXQUANT_CXX=0: they compare against Triton-only dispatcher compiles, no library needed);
# linear.py --warm-only for the @triton_op rows. After the builds: warm the dispatcher rows.
# Phase B: linear.py alone on the GPU, dispatcher rows and @triton_op rows in one round-robin.
# Files under $OUT (8 at the end; raw logs sit in $OUT/logs_tmp until then, so a call cut short
# still returns them): env.txt t_triton_ops.log t_export.log warm_build.log bench.log
# linear.json linear.png linear_table.txt. Carry .whl (tqdm, nvidia-cutlass wheels) in the run call.
# Env: FXQ_MS (M list, default 1,8,16,64,256,512,1024,4096), FXQ_BUDGET_S (whole call, default 560).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_triton_ops}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
. benchmarks/device_env.sh  # carried in .whl
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u; } > "$OUT/env.txt" 2>&1
MS=${FXQ_MS:-1,8,16,64,256,512,1024,4096}
S="w4a16_g128,w8a16,w8a8_int8,fp8_row,fp8_wo"
TS="w4a16_g128@triton_op,w8a16@triton_op,w8a8_int8@triton_op,fp8_row@triton_op,fp8_wo@triton_op"
L="$OUT/logs_tmp"; mkdir -p "$L"  # under $OUT from the start: a call cut short still returns them
timeout -k 10 280 python3 -c "from fxquant.lowering.cuda import build; build.load()" > "$L/build_cxx.log" 2>&1 &
B1=$!
timeout -k 10 280 python3 -c "from fxquant.lowering.cuda import build; build.load_cutlass()" \
  > "$L/build_cutlass.log" 2>&1 &
B2=$!
for i in 0 1 2; do
  FXQUANT_TEST_SHARD=$i/3 FXQUANT_CXX=0 timeout -s INT -k 10 330 python3 -m pytest tests/gpu/test_gpu_triton_ops.py \
    -q -rfE -p no:cacheprovider > "$L/t_triton_ops_$i.log" 2>&1 &
done
# (not test_triton_package_runs_without_fxquant: it loads the package, issue 5's crash on that machine)
FXQUANT_CXX=0 timeout -s INT -k 10 330 python3 -m pytest tests/gpu/test_gpu_export.py -q -rfE \
  -k "triton_ops_export and (int8 or int4)" -p no:cacheprovider > "$L/t_export.log" 2>&1 &
for i in 0 1 2 3; do
  FXQUANT_CXX=0 timeout -s INT -k 10 250 python3 benchmarks/linear.py --warm-only --peers none --schemes "$TS" \
    --ms "$MS" --shard $i/4 > "$L/warm_t$i.log" 2>&1 &
done
wait $B1; R1=$?
wait $B2; R2=$?
echo "library builds done at $(( $(date +%s) - T0 )) s (C++ rc $R1, CUTLASS rc $R2)" | tee "$L/times.log"
for i in 0 1 2 3; do
  timeout -s INT -k 10 120 python3 benchmarks/linear.py --warm-only --peers none --schemes "$S" --ms "$MS" \
    --shard $i/4 > "$L/warm_d$i.log" 2>&1 &
done
wait
echo "phase A done at $(( $(date +%s) - T0 )) s" | tee -a "$L/times.log"
cat "$L"/t_triton_ops_*.log > "$OUT/t_triton_ops.log"
cp "$L/t_export.log" "$OUT/"
REM=$(( ${FXQ_BUDGET_S:-560} - $(date +%s) + T0 ))
if [ "$REM" -ge 90 ]; then
  timeout -s INT -k 10 "$REM" python3 benchmarks/linear.py --out "$OUT" --peers none --schemes "$S,$TS" \
    --ms "$MS" > "$OUT/bench.log" 2>&1
  echo "bench rc $? at $(( $(date +%s) - T0 )) s" | tee -a "$L/times.log"
else
  echo "bench skipped: $REM s left" | tee -a "$L/times.log" "$OUT/bench.log"
fi
cat "$L/times.log" "$L"/build_*.log "$L"/warm_*.log > "$OUT/warm_build.log"
echo "== fxquant triton_op call summary"
cat "$L/times.log"
for f in "$L"/t_triton_ops_*.log "$L/t_export.log"; do grep -hE "passed|failed|error" "$f" | tail -1; done
grep -hE "^(FAILED|ERROR) " "$L"/t_*.log | cut -c1-220 | head -12
cat "$OUT/linear_table.txt" 2>/dev/null || tail -20 "$OUT/bench.log"
rm -rf "$L"
