#!/usr/bin/env bash
# One GPU call for the int4 decode kernel fed by bulk copies (fxquant/lowering/cuda/csrc/int4_bulk.cuh):
# builds the C++ library (saved to $OUT/fxq_libs.tgz for later calls' carry), runs its bit-equality
# tests, times it against the register-fed kernel (FXQUANT_CXX_INT4_BULK=0) at several (stages,
# warps) with benchmarks/variants.py (speedup over bf16 and weight TB/s), then the rest of
# test_gpu_cxx.py. Carry .whl and .devrun/fxq_libs.tgz. Env: FXQ_BULK_SETTINGS (S,W,TPW settings
# separated by spaces), FXQ_MS (default 1,4,8).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_int4_bulk}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
. benchmarks/device_env.sh
T0=$(date +%s)
OUT="$OUT" FXQ_BUILD=1 FXQ_SAVE_LIBS=1 bash benchmarks/gpu_tests_part.sh > "$OUT/build.txt" 2>&1
echo "library at $(( $(date +%s) - T0 )) s"; grep -i "error\|failed" "$OUT/build.txt" | head -5
timeout 150 python3 -m pytest tests/gpu/test_gpu_cxx.py -q -rfE -p no:cacheprovider -k bulk > "$OUT/tests_bulk.log" 2>&1
echo "bulk tests rc=$? ($(( $(date +%s) - T0 )) s): $(pytest_final "$OUT/tests_bulk.log")"
grep -E "^FAILED|^ERROR|Error" "$OUT/tests_bulk.log" | head -5
ENVS="--env FXQUANT_CXX_INT4_BULK=0"
for s in ${FXQ_BULK_SETTINGS:-3,8,2 4,8,1 2,8,4 3,4,4 2,16,1}; do ENVS="$ENVS --env FXQUANT_CXX_INT4_BULK=$s"; done
timeout "${FXQ_VARIANT_S:-240}" python3 benchmarks/variants.py --scheme w4a16_g128@cuda --ms "${FXQ_MS:-1,4,8}" $ENVS \
  --out "$OUT/variants.json" > "$OUT/variants.txt" 2>&1
echo "variants rc=$? ($(( $(date +%s) - T0 )) s)"
timeout "${FXQ_TEST_S:-150}" python3 -m pytest tests/gpu/test_gpu_cxx.py -q -rfE -p no:cacheprovider -k "not bulk" \
  > "$OUT/tests_cxx.log" 2>&1
echo "test_gpu_cxx rc=$? ($(( $(date +%s) - T0 )) s): $(pytest_final "$OUT/tests_cxx.log")"
grep -E "^FAILED|^ERROR" "$OUT/tests_cxx.log" | head -5
sed -n '/speedup over bf16 per shape/,$p' "$OUT/variants.txt"
