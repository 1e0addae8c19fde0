#!/usr/bin/env bash
# The triton_op path's GPU tests alone (tests/gpu/test_gpu_triton_ops.py in 3 shards, the
# Triton-package export tests), FXQUANT_CXX=0: no library build. About 2 minutes.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_triton_tests}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FXQUANT_CACHE_DIR=${FXQUANT_CACHE_DIR:-/tmp/fxquant_cache} FXQUANT_CXX=0
for i in 0 1 2; do
  FXQUANT_TEST_SHARD=$i/3 timeout -s INT -k 10 ${FXQ_TEST_S:-400} python3 -m pytest tests/gpu/test_gpu_triton_ops.py \
    -q -rfE -p no:cacheprovider > "$OUT/t_triton_ops_$i.log" 2>&1 &
done
timeout -s INT -k 10 ${FXQ_TEST_S:-400} python3 -m pytest tests/gpu/test_gpu_export.py -q -rfE \
  -k "${FXQ_EXPORT_K:-triton_ops_export and (int8 or int4)}" -p no:cacheprovider > "$OUT/t_export.log" 2>&1 &
wait
for f in "$OUT"/t_*.log; do echo "$(basename "$f"): $(grep -hE "passed|failed|error" "$f" | tail -1)"; done
grep -hE "^(FAILED|ERROR) " "$OUT"/t_*.log | cut -c1-220 | head -12
grep -hE "^E  +[A-Za-z_.]+(Error|Exception)" "$OUT"/t_*.log | cut -c1-300 | sort | uniq -c | head -8
