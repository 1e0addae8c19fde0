#!/usr/bin/env bash
# One GPU-machine call after the int4 kernel's programmatic dependent launch (PDL) change: builds the
# C++ library (saved to $OUT/fxq_libs.tgz for later calls' carry; carry .devrun/fxq_libs.tgz so the
# unchanged CUTLASS library is not rebuilt), measures int4 g128 on the C++ kernel with PDL on (the
# default) and off (FXQUANT_PDL=0) with benchmarks/variants.py, then runs the C++ library's GPU test
# files. Carry .whl (CUTLASS headers). Prints the tables last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_int4_pdl}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
. benchmarks/device_env.sh
T0=$(date +%s)
OUT="$OUT" FXQ_BUILD=1 FXQ_SAVE_LIBS=1 bash benchmarks/gpu_tests_part.sh > "$OUT/build.txt" 2>&1
echo "libraries at $(( $(date +%s) - T0 )) s"; grep -i "fail" "$OUT/build.txt" | head -3
timeout "${FXQ_VARIANT_S:-120}" python3 benchmarks/variants.py --scheme w4a16_g128@cuda --ms 1,16,32 \
  --env FXQUANT_PDL=1 --env FXQUANT_PDL=0 --out "$OUT/int4_pdl.json" > "$OUT/variants.txt" 2>&1
echo "measurements at $(( $(date +%s) - T0 )) s"
OUT="$OUT" FXQ_TEST_S=${FXQ_TEST_S:-220} bash benchmarks/gpu_tests_part.sh tests/gpu/test_gpu_cxx.py:3 \
  tests/gpu/test_gpu_cxx_dynamic.py:2 > "$OUT/tests.txt" 2>&1
echo "all done at $(( $(date +%s) - T0 )) s"
tail -8 "$OUT/tests.txt"
grep -vE "^(warm|tune|  )" "$OUT/variants.txt" | tail -20
