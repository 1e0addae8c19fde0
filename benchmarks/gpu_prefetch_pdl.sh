#!/usr/bin/env bash
# One GPU-machine call for the two kernel experiments of BENCHMARKS.md S16 (FXQUANT_CXX_L2_PREFETCH,
# FXQUANT_CXX_PDL; both off by default). It builds the op libraries (saved to $OUT/fxq_libs.tgz for
# later calls' carry), runs benchmarks/variants.py for each experiment against the shipped kernels
# (one round-robin per scheme; the column labels are the values: 0 = the shipped kernels,
# 512 / 2048 / 4096 = L2 prefetch bytes per row, 1 = PDL, 4,4 = int4 blocks of 64 rows and 4 warps),
# then the experiments' same-bits GPU tests.
# Carry .whl (CUTLASS headers). Prints the tables last. Not yet run; estimated 9 minutes, about 4 of
# them the library build.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_prefetch_pdl}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
. benchmarks/device_env.sh
T0=$(date +%s)
# 1. the libraries (saved for carry), 2. the measurements (variants.py checks every output against the
# fp32 reference), 3. the GPU tests with whatever time is left (same-bits checks of both experiments).
OUT="$OUT" FXQ_BUILD=1 FXQ_SAVE_LIBS=1 bash benchmarks/gpu_tests_part.sh > "$OUT/build.txt" 2>&1
echo "libraries at $(( $(date +%s) - T0 )) s"
V="timeout ${FXQ_VARIANT_S:-80} python3 benchmarks/variants.py --ms 1,16"
$V --scheme w4a16_g128@cuda --env FXQUANT_CXX_L2_PREFETCH=0 --env FXQUANT_CXX_L2_PREFETCH=512 \
  --env FXQUANT_CXX_L2_PREFETCH=2048 --env FXQUANT_CXX_INT4_VARIANT=4,4 --out "$OUT/int4_l2.json" \
  > "$OUT/variants.txt" 2>&1
$V --scheme w8a8_int8 --env FXQUANT_CXX_L2_PREFETCH=0 --env FXQUANT_CXX_L2_PREFETCH=4096 \
  --env "FXQUANT_CXX_PDL=1" --out "$OUT/w8a8.json" >> "$OUT/variants.txt" 2>&1
$V --scheme fp8_row --env FXQUANT_CXX_L2_PREFETCH=0 --env FXQUANT_CXX_L2_PREFETCH=4096 \
  --env "FXQUANT_CXX_PDL=1" --out "$OUT/fp8_row.json" >> "$OUT/variants.txt" 2>&1
echo "measurements at $(( $(date +%s) - T0 )) s"
OUT="$OUT" FXQ_TEST_S=${FXQ_TEST_S:-110} bash benchmarks/gpu_tests_part.sh \
  "tests/gpu/test_gpu_cxx.py::test_int4_l2_prefetch_experiment_gives_the_same_bits" \
  "tests/gpu/test_gpu_cxx.py::test_int4_mma_variants" \
  "tests/gpu/test_gpu_cxx_dynamic.py::test_programmatic_dependent_launch_gives_the_same_bits" \
  "tests/gpu/test_gpu_cxx_dynamic.py::test_programmatic_dependent_launch_waits_for_the_kernel_before" \
  "tests/gpu/test_gpu_cxx_dynamic.py::test_l2_prefetch_experiment_gives_the_same_bits" > "$OUT/tests.txt" 2>&1
echo "all done at $(( $(date +%s) - T0 )) s"
tail -8 "$OUT/tests.txt"
grep -vE "^(warm|tune|  )" "$OUT/variants.txt" | tail -40
