#!/usr/bin/env bash
# One GPU call for weight-only GEMMs at large M (issue 6's W4A16 M = 4096 target):
#   1. FXQ_BUILD=1: the op libraries built (or loaded) first, then saved to $OUT/fxq_libs.tgz for carry;
#   2. gpu_tests_part.sh on FXQ_TESTS (its FILE[:SHARDS] entries, shards in parallel; default
#      tests/gpu/test_gpu_kernels.py:2; "-" skips), each process limited to FXQ_TEST_S (default 240);
#   3. variants.py of each FXQ_SCHEMES row (default w4a16_g128@deq) over FXQ_SETTINGS (space-separated
#      NAME=VALUE[;NAME=VALUE] settings, e.g. FXQUANT_DEQ_ROWS=1024 or FXQUANT_CUTLASS_SCHED=4,tokens) at
#      FXQ_MS (default 1024,2048,4096,8192), each against bf16 in the same round-robin; FXQ_VARIANTS_ARGS
#      are passed on (e.g. --bias).
# $OUT gets log.txt, gpu_tests_part.log, variants_<i>.txt/json, fxq_libs.tgz. Carry .whl and .devrun/fxq_libs.tgz.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_large_m}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
. benchmarks/device_env.sh > "$OUT/log.txt" 2>&1
T0=$(date +%s)
FAILED=0
{
if [ "${FXQ_BUILD:-0}" = 1 ]; then
  build_libs "$OUT"
  save_libs "$OUT"
  echo "build ($(( $(date +%s) - T0 )) s)"
fi
if [ "${FXQ_TESTS:-}" != - ]; then
  OUT="$OUT" FXQ_TEST_S="${FXQ_TEST_S:-240}" bash benchmarks/gpu_tests_part.sh ${FXQ_TESTS:-tests/gpu/test_gpu_kernels.py:2} \
    > "$OUT/tests_summary.txt" 2>&1
  sed -n '/^================ GPU tests/,$p' "$OUT/tests_summary.txt"
  grep -q "failed [1-9]\|error [1-9]\|exit code" "$OUT/tests_summary.txt" && FAILED=1
  echo "tests done ($(( $(date +%s) - T0 )) s)"
fi
set -f
ENVS=()
for s in ${FXQ_SETTINGS:-FXQUANT_DEQ_ROWS=0}; do ENVS+=(--env "$s"); done
i=0
for scheme in ${FXQ_SCHEMES:-w4a16_g128@deq}; do
  timeout -s INT -k 15 "${FXQ_VARIANTS_S:-200}" python3 benchmarks/variants.py --scheme "$scheme" \
    --ms "${FXQ_MS:-1024,2048,4096,8192}" "${ENVS[@]}" ${FXQ_VARIANTS_ARGS:-} --out "$OUT/variants_$i.json" > "$OUT/variants_$i.txt" 2>&1
  rc=$?; [ $rc = 0 ] || FAILED=1
  echo "variants $scheme rc=$rc ($(( $(date +%s) - T0 )) s)"
  i=$((i + 1))
done
set +f
} >> "$OUT/log.txt" 2>&1
grep -v "^device_env" "$OUT/log.txt"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests_part.log" 2>/dev/null | head -20
for f in "$OUT"/variants_*.txt; do [ -f "$f" ] && { echo "== $f"; sed -n '/speedup over bf16 per shape/,$p' "$f"; }; done
exit $FAILED
