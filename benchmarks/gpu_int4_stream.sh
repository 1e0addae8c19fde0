#!/usr/bin/env bash
# One GPU call (session 29): the persistent int4 decode probe (probe_int4_mma_stream.py) against the
# shipped MMA-layout decode kernel and two read-only ceilings, M = 1 (FXQ_MS). Carry .whl and
# .devrun/fxq_libs.tgz. Files under $OUT: env.txt stream.json stream.log.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_int4_stream}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
. benchmarks/device_env.sh
device_info "$OUT/env.txt"
L=$(mktemp -d)
build_libs "$L"
echo "libraries ready at $(( $(date +%s) - T0 )) s"
timeout -s INT -k 10 ${FXQ_PROBE_S:-400} python3 benchmarks/${FXQ_PROBE:-probe_int4_mma_stream.py} --ms "${FXQ_MS:-1}" \
  ${FXQ_CONFIGS:+--configs $FXQ_CONFIGS} --out "$OUT/stream.json" 2>&1 | tee "$OUT/stream.log" | tail -40
echo "probe done at $(( $(date +%s) - T0 )) s"
