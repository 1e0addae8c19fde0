#!/usr/bin/env bash
# One GPU call for the int4 decode kernel (issue 6). Steps (each skippable):
#   1. gpu_cxx_variants.sh: library build (saved for carry), C++ GPU tests, variants.py of FXQ_SETTINGS
#      against each other and bf16 (FXQ_MS; FXQ_SKIP_TESTS=1 runs variants.py alone, no build or tests);
#   2. probe_read_ceiling.py: the same settings at M = 1 against a read-only kernel over the same bytes;
#   3. Nsight Compute stall reasons (gpu_ncu.sh, WarpStateStats) of FXQ_NCU_ROWS at FXQ_NCU_MS (default 1), once per
#      FXQ_NCU_ENVS entry (space-separated NAME=VALUE, "-" for none; default "-").
# At most 8 files come back from a call: the bulky outputs stay in a scratch folder and $OUT gets
# variants.txt/json, read_ceiling.txt/json, ncu_<i>.md (points table + stalls), fxq_libs.tgz, log.txt.
#   FXQ_SETTINGS (required), FXQ_MS (default 1,2,4,8), FXQ_TEST_K, FXQ_SKIP_TESTS, FXQ_SKIP_READ, FXQ_SKIP_NCU
# Carry .whl and .devrun/fxq_libs.tgz.
set -u
: "${FXQ_SETTINGS:?set FXQ_SETTINGS (see gpu_cxx_variants.sh)}"
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_int4_decode}
SCRATCH=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
. benchmarks/device_env.sh > "$SCRATCH/device_env.txt" 2>&1  # the carried libraries and wheels, for every step
T0=$(date +%s)
FAILED=0  # the call's exit status: 1 when a step did not finish cleanly (each step's rc is in log.txt)
ENVS=()
set -f
for s in $FXQ_SETTINGS; do ENVS+=(--env "$s"); done
set +f
{
if [ "${FXQ_SKIP_TESTS:-0}" = 1 ]; then
  timeout -s INT -k 15 240 python3 benchmarks/variants.py --scheme "${FXQ_SCHEME:-w4a16_g128@cuda}" \
    --ms "${FXQ_MS:-1,2,4,8}" "${ENVS[@]}" --out "$OUT/variants.json" > "$OUT/variants.txt" 2>&1
  rc=$?; [ $rc = 0 ] || FAILED=1
  echo "variants rc=$rc ($(( $(date +%s) - T0 )) s)"
else
  OUT="$SCRATCH/v" bash benchmarks/gpu_cxx_variants.sh 2>&1
  rc=$?; [ $rc = 0 ] || FAILED=1
  echo "variants call rc=$rc ($(( $(date +%s) - T0 )) s)"
  cp "$SCRATCH"/v/variants.* "$OUT"/ 2>/dev/null
  [ -f "$SCRATCH/v/fxq_libs.tgz" ] && cp "$SCRATCH/v/fxq_libs.tgz" "$OUT"/
fi
if [ "${FXQ_SKIP_READ:-0}" != 1 ]; then
  timeout -s INT -k 15 120 python3 benchmarks/probe_read_ceiling.py "${ENVS[@]}" --out "$OUT/read_ceiling.json" \
    > "$OUT/read_ceiling.txt" 2>&1
  rc=$?; [ $rc = 0 ] || FAILED=1
  echo "read ceiling rc=$rc ($(( $(date +%s) - T0 )) s)"
fi
if [ "${FXQ_SKIP_NCU:-0}" != 1 ]; then
  i=0
  set -f  # an assignment is not a file pattern
  for e in ${FXQ_NCU_ENVS:--}; do
    [ "$e" = - ] && e=
    env ${e:+"$e"} OUT="$SCRATCH/ncu$i" FXQ_NCU_S=150 FXQ_NCU_RAW=1 FXQ_NCU_MS="${FXQ_NCU_MS:-1}" \
      FXQ_NCU_ROWS="${FXQ_NCU_ROWS:-w4a16_g128@cuda,w8a16@cuda,bf16}" \
      FXQ_NCU_SECTIONS="SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats MemoryWorkloadAnalysis InstructionStats" \
      timeout -s INT -k 15 240 bash benchmarks/gpu_ncu.sh > "$SCRATCH/ncu$i.txt" 2>&1
    rc=$?; [ $rc = 0 ] || FAILED=1
    echo "ncu ${e:-default} rc=$rc ($(( $(date +%s) - T0 )) s)"
    { echo "# ncu, setting: ${e:-default}"; cat "$SCRATCH/ncu$i/ncu_table.md" "$SCRATCH/ncu$i/ncu_stalls.md"; } > "$OUT/ncu_$i.md" 2>&1
    i=$((i + 1))
  done
  set +f
fi
} > "$OUT/log.txt" 2>&1
cat "$OUT/log.txt" | grep -v "^device_env" | tail -n 30
sed -n '/speedup over bf16 per shape/,$p' "$OUT/variants.txt"
tail -n 6 "$OUT/read_ceiling.txt" 2>/dev/null
for f in "$OUT"/ncu_*.md; do [ -f "$f" ] && grep -E "^# |w4a16|w8a16|bf16" "$f" | cut -c1-400; done
exit "$FAILED"
