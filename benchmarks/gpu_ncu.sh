#!/usr/bin/env bash
# Nsight Compute counters of every kernel of the given linear.py rows (benchmarks/ncu_kernels.py),
# one launch per (row, shape, M), caches flushed before each: $OUT/ncu_points.txt, ncu.csv,
# ncu_table.md, ncu_kernels.png.
#   FXQ_NCU_ROWS, FXQ_NCU_MS, FXQ_NCU_SHAPES: ncu_kernels.py's --rows / --ms / --shapes
#   FXQ_NCU_S: seconds for the profiled points (default 300); points left then are not profiled,
#              and what was profiled is still parsed
#   FXQ_NCU_SECTIONS: ncu sections (default "SpeedOfLight Occupancy LaunchStats"; e.g. add
#              WarpStateStats SchedulerStats for stall reasons)
#   FXQ_NCU_RAW=1: also $OUT/ncu_raw.csv, every collected metric, and $OUT/ncu_stalls.md (printed):
#              per kernel the largest stall reasons (needs WarpStateStats in FXQ_NCU_SECTIONS)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_ncu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
. benchmarks/device_env.sh  # the CUTLASS headers (without them the dispatcher runs other kernels), carried libraries
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
REP=$(mktemp -d)/prof
T0=$(date +%s)
build_libs "$(dirname "$REP")"  # here, not inside the profiled process
echo "libraries ready at $(( $(date +%s) - T0 )) s"
SECTIONS=()
for sec in ${FXQ_NCU_SECTIONS:-SpeedOfLight Occupancy LaunchStats}; do SECTIONS+=(--section "$sec"); done
$NCU --clock-control none --profile-from-start off --target-processes application-only "${SECTIONS[@]}" \
  -o "$REP" -f python3 benchmarks/ncu_kernels.py \
  --rows "${FXQ_NCU_ROWS:-w4a16_g128,w8a16,w8a8_int8,fp8_row,bf16}" --ms "${FXQ_NCU_MS:-1,16,128,512,4096}" \
  --shapes "${FXQ_NCU_SHAPES:-6144x4096,4096x4096,28672x4096,4096x14336}" --budget-s "${FXQ_NCU_S:-300}" \
  > "$OUT/ncu_points.txt" 2>&1
echo "ncu run rc $? in $(( $(date +%s) - T0 )) s"
$NCU --import "$REP.ncu-rep" --csv --page details > "$OUT/ncu.csv" 2>&1
if [ "${FXQ_NCU_RAW:-0}" = 1 ]; then  # every metric, and the stall reasons condensed
  $NCU --import "$REP.ncu-rep" --csv --page raw > "$OUT/ncu_raw.csv" 2>&1
  python3 benchmarks/ncu_kernels.py --stalls "$OUT/ncu_raw.csv" --points "$OUT/ncu_points.txt" > "$OUT/ncu_stalls.md" 2>&1
  cat "$OUT/ncu_stalls.md"
fi
python3 benchmarks/ncu_kernels.py --parse "$OUT/ncu.csv" --points "$OUT/ncu_points.txt" --plot "$OUT/ncu_kernels.png" \
  > "$OUT/ncu_table.md" 2>&1
echo "parse rc $?"
grep -A200 "total us" "$OUT/ncu_table.md" | head -120
