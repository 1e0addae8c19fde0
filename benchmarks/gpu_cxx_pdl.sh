#!/usr/bin/env bash
# One GPU-machine call after a change to the C++ op library: builds it (saved to $OUT/fxq_libs.tgz for
# later calls' carry), measures the dynamic schemes with programmatic dependent launch on (the default)
# and off (FXQUANT_PDL=0) with benchmarks/variants.py (round-robin, checked against the fp32 reference),
# then runs the C++ library's GPU test files with the time left. Carry .whl (CUTLASS headers).
# Prints the tables last. About 9 minutes, 4 of them the library build.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_cxx_pdl}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
. benchmarks/device_env.sh
T0=$(date +%s)
OUT="$OUT" FXQ_BUILD=1 FXQ_SAVE_LIBS=1 bash benchmarks/gpu_tests_part.sh > "$OUT/build.txt" 2>&1
echo "libraries at $(( $(date +%s) - T0 )) s"
V="timeout ${FXQ_VARIANT_S:-80} python3 benchmarks/variants.py --ms 1,16,32"
$V --scheme w8a8_int8 --env FXQUANT_PDL=1 --env FXQUANT_PDL=0 --out "$OUT/w8a8.json" > "$OUT/variants.txt" 2>&1
$V --scheme fp8_row --env FXQUANT_PDL=1 --env FXQUANT_PDL=0 --out "$OUT/fp8_row.json" >> "$OUT/variants.txt" 2>&1
echo "measurements at $(( $(date +%s) - T0 )) s"
OUT="$OUT" FXQ_TEST_S=${FXQ_TEST_S:-230} bash benchmarks/gpu_tests_part.sh tests/gpu/test_gpu_cxx.py:2 \
  tests/gpu/test_gpu_cxx_dynamic.py:3 > "$OUT/tests.txt" 2>&1
echo "all done at $(( $(date +%s) - T0 )) s"
tail -8 "$OUT/tests.txt"
grep -vE "^(warm|tune|  )" "$OUT/variants.txt" | tail -30
