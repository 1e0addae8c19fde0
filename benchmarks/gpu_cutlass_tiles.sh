#!/usr/bin/env bash
# One GPU call (session 27): the CUTLASS weight-only tiles at 16-256 tokens side by side. Builds the
# libraries, times the int4 MMA-layout GEMM with each tile in FXQ_TILES against bf16 (linear.py rows
# "w4a16_g128_mma@cutlass_<tile>"), then the stream-K options (FXQUANT_CUTLASS_SCHED: partial sums in
# any order, split-K counts) on FXQ_SCHED_ROWS (variants.py), then the GPU test files in FXQ_TESTS.
# Env: FXQ_TILES, FXQ_MS, FXQ_SCHED_ROWS, FXQ_SCHED_MS, FXQ_TESTS ("" for none), FXQ_TEST_S.
# Files under $OUT: env.txt fxq_libs.tgz tiles.txt tiles.json sched.json bench.txt gpu_tests_part.log.
# Carry .whl and .devrun/fxq_libs.tgz.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_cutlass_tiles}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
. benchmarks/device_env.sh
device_info "$OUT/env.txt"
L=$(mktemp -d)
build_libs "$L" && save_libs "$OUT"
tail -n 3 "$L"/build_*.log | grep -i "error\|fail" | head -5
echo "libraries ready at $(( $(date +%s) - T0 )) s"
ROWS=$(for t in ${FXQ_TILES:-streamk_128x64 streamk_128x32 streamk_256x64 streamk_256x32 streamk_256x128 64x128 128x128}; do
  echo -n "w4a16_g128_mma@cutlass_$t,"; done)
{ timeout -s INT -k 10 ${FXQ_TILES_S:-200} python3 benchmarks/linear.py --peers none --schemes "${ROWS%,}" \
    --ms "${FXQ_MS:-32,64,128,256}" --out "$L/lin" 2>&1 | tail -3
  cp "$L/lin/linear_table.txt" "$OUT/tiles.txt"; cp "$L/lin/linear.json" "$OUT/tiles.json"
  echo "tiles done at $(( $(date +%s) - T0 )) s"
  for row in ${FXQ_SCHED_ROWS:-w4a16_g128_mma@cutlass_streamk_128x64 w4a16_g128_mma@cutlass_streamk_256x64}; do
    timeout -s INT -k 10 120 python3 benchmarks/variants.py --scheme "$row" --ms "${FXQ_SCHED_MS:-64}" \
      --env FXQUANT_CUTLASS_SCHED=1,auto --env FXQUANT_CUTLASS_SCHED=1,auto,any \
      --env FXQUANT_CUTLASS_SCHED=1,auto,det,2 --env FXQUANT_CUTLASS_SCHED=1,auto,det,4 \
      --env FXQUANT_CUTLASS_SCHED=1,auto,any,4 --env FXQUANT_CUTLASS_SCHED=1,auto,any,8 \
      --out "$OUT/sched_${row##*_}.json" 2>&1 | tail -12
  done
  echo "sched done at $(( $(date +%s) - T0 )) s"; } > "$OUT/bench.txt" 2>&1
if [ -n "${FXQ_TESTS-tests/gpu/test_gpu_cutlass.py:4}" ]; then
  OUT=$OUT FXQ_TEST_S=${FXQ_TEST_S:-200} bash benchmarks/gpu_tests_part.sh ${FXQ_TESTS-tests/gpu/test_gpu_cutlass.py:4} 2>&1 | tail -6
  echo "tests done at $(( $(date +%s) - T0 )) s"
fi
cat "$OUT/bench.txt"; cat "$OUT/tiles.txt" 2>/dev/null
