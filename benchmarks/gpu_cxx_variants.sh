#!/usr/bin/env bash
# One GPU call for a change to a C++ kernel: builds the op library (saved to $OUT/fxq_libs.tgz for later
# calls' carry), runs the C++ GPU tests (FXQ_TEST_K: a pytest -k expression run first, then the rest of
# tests/gpu/test_gpu_cxx.py), and times the kernel's settings against each other and bf16 cuBLAS with
# benchmarks/variants.py (speedup over bf16 and weight TB/s per point, checked against the reference).
#   FXQ_SETTINGS (required): the --env values, separated by spaces, e.g.
#     FXQ_SETTINGS="FXQUANT_CXX_INT4_VARIANT=1,16 FXQUANT_CXX_INT4_VARIANT=2,8"
#   FXQ_SCHEME (default w4a16_g128@cuda), FXQ_MS (default 1,2,4,8), FXQ_TEST_S (each pytest run's limit, 150 s),
#   FXQ_VARIANT_S (variants.py's limit, 240 s). A failed build stops the call.
# Carry .whl and .devrun/fxq_libs.tgz.
set -u
: "${FXQ_SETTINGS:?set FXQ_SETTINGS to the variants.py --env values to compare, separated by spaces}"
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_cxx_variants}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
. benchmarks/device_env.sh
T0=$(date +%s)
OUT="$OUT" FXQ_BUILD=1 FXQ_SAVE_LIBS=1 bash benchmarks/gpu_tests_part.sh > "$OUT/build.txt" 2>&1
echo "library at $(( $(date +%s) - T0 )) s"
if grep -q "^build .* failed" "$OUT/build.txt"; then grep "^build .* failed" "$OUT/build.txt"; exit 1; fi  # build_libs says so
if [ -n "${FXQ_TEST_K:-}" ]; then
  timeout -s INT -k 15 "${FXQ_TEST_S:-150}" python3 -m pytest tests/gpu/test_gpu_cxx.py -q -rfE -p no:cacheprovider -k "$FXQ_TEST_K" > "$OUT/tests_k.log" 2>&1
  echo "tests -k '$FXQ_TEST_K' rc=$? ($(( $(date +%s) - T0 )) s): $(pytest_final "$OUT/tests_k.log")"
  grep -E "^FAILED|^ERROR|Error" "$OUT/tests_k.log" | head -5
fi
ENVS=()
set -f  # a setting is not a file pattern
for s in $FXQ_SETTINGS; do ENVS+=(--env "$s"); done
set +f
timeout -s INT -k 15 "${FXQ_VARIANT_S:-240}" python3 benchmarks/variants.py --scheme "${FXQ_SCHEME:-w4a16_g128@cuda}" \
  --ms "${FXQ_MS:-1,2,4,8}" "${ENVS[@]}" --out "$OUT/variants.json" > "$OUT/variants.txt" 2>&1
echo "variants rc=$? ($(( $(date +%s) - T0 )) s)"
timeout -s INT -k 15 "${FXQ_TEST_S:-150}" python3 -m pytest tests/gpu/test_gpu_cxx.py -q -rfE -p no:cacheprovider \
  ${FXQ_TEST_K:+-k "not ($FXQ_TEST_K)"} > "$OUT/tests_cxx.log" 2>&1
echo "test_gpu_cxx rc=$? ($(( $(date +%s) - T0 )) s): $(pytest_final "$OUT/tests_cxx.log")"
grep -E "^FAILED|^ERROR" "$OUT/tests_cxx.log" | head -5
sed -n '/speedup over bf16 per shape/,$p' "$OUT/variants.txt"
