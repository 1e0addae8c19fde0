#!/usr/bin/env bash
# Part of the GPU test suite in one call: each argument is "tests/gpu/FILE[:SHARDS]" (several files
# joined by "+" share the shards: "a.py+b.py:8"); every entry's shards run as parallel pytest processes.
# Used when the whole suite does not fit one call's 600 s: split the files over two calls.
#   FXQ_BUILD=1   build the C++ and CUTLASS libraries first (cached under FXQUANT_CACHE_DIR; none to
#                 build when the call carries .devrun/fxq_libs.tgz from the same sources: device_env.sh)
#   FXQ_SAVE_LIBS=1  then pack the built libraries into $OUT/fxq_libs.tgz (put it in .devrun/ and carry it)
#   FXQ_TEST_S    per-process limit in seconds (default 330)
# Writes $OUT/gpu_tests_part.log (every process's log) and prints a summary last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_tests_part}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
LOGS=$(mktemp -d)
. benchmarks/device_env.sh  # CUTLASS headers, peers: carried in .whl
if [ "${FXQ_BUILD:-0}" = 1 ]; then
  build_libs "$LOGS"
  echo "library builds done at $(( $(date +%s) - T0 )) s"
  [ "${FXQ_SAVE_LIBS:-0}" = 1 ] && save_libs "$OUT"
fi
NP=0
for entry in "$@"; do
  files=$entry; shards=1
  if [[ $entry =~ ^(.*):([0-9]+)$ ]]; then files=${BASH_REMATCH[1]}; shards=${BASH_REMATCH[2]}; fi
  for i in $(seq 0 $((shards - 1))); do
    FXQUANT_TEST_SHARD="$i/$shards" timeout -s INT -k 15 "${FXQ_TEST_S:-330}" \
      python3 -m pytest ${files//+/ } -q -rfE -p no:cacheprovider > "$LOGS/test_$NP.log" 2>&1 \
      || echo "(exit code $?)" >> "$LOGS/test_$NP.log" &
    echo "$entry shard $i/$shards" > "$LOGS/name_$NP"
    NP=$((NP + 1))
  done
done
wait
for i in $(seq 0 $((NP - 1))); do echo "==== $(cat "$LOGS/name_$i")"; cat "$LOGS/test_$i.log"; done \
  > "$OUT/gpu_tests_part.log"
echo "================ GPU tests ($(( $(date +%s) - T0 )) s, $NP processes)"
for i in $(seq 0 $((NP - 1))); do  # (exit code 124: cut by FXQ_TEST_S; 5: no test in that shard)
  echo "$(cat "$LOGS/name_$i"): $(pytest_final "$LOGS/test_$i.log") $(grep -h "^(exit code" "$LOGS/test_$i.log")"
done
[ "$NP" -gt 0 ] && pytest_totals "$LOGS"/test_*.log
grep -hE "^(FAILED|ERROR) " "$OUT/gpu_tests_part.log" | cut -c1-220 | head -15
rm -rf "$LOGS"
