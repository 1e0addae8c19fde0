#!/usr/bin/env bash
# One GPU call for the end-to-end numbers: the CUDA-graph backend tests, the main job on the GPU
# (bf16, mode reduce-overhead) and benchmarks/llm.py. Files under $OUT: e2e_tests.log main_job.txt
# llm.json llm.png llm.log. Env: FXQ_MAIN_MODEL (an fp16 MiniLM copy, since the 90 MB package does
# not travel; default .whl/minilm_fp16), FXQ_LLM_ARGS, FXQ_LLM_TIMEOUT (s, default 330),
# FXQ_SKIP_TESTS=1, FXQ_SKIP_MAIN=1.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_e2e}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
. benchmarks/device_env.sh  # carried in .whl
T0=$(date +%s)
if [ "${FXQ_SKIP_TESTS:-0}" != 1 ]; then
  timeout 200 $PY -m pytest tests/gpu/test_gpu_backend.py -q -rfE -p no:cacheprovider -k reduce_overhead \
    > "$OUT/e2e_tests.log" 2>&1; echo "tests rc=$? ($(( $(date +%s) - T0 )) s)"
  tail -3 "$OUT/e2e_tests.log"
fi
if [ "${FXQ_SKIP_MAIN:-0}" != 1 ]; then
  T1=$(date +%s)
  timeout 200 $PY -m fxquant --model "${FXQ_MAIN_MODEL:-.whl/minilm_fp16}" --device cuda --dtype bfloat16 \
    --mode reduce-overhead --batch-size 32 --no-progress > "$OUT/main_job.txt" 2>&1
  echo "main job rc=$? ($(( $(date +%s) - T1 )) s)"
fi
T2=$(date +%s)
timeout "${FXQ_LLM_TIMEOUT:-330}" $PY benchmarks/llm.py --out "$OUT" ${FXQ_LLM_ARGS:-} > "$OUT/llm.log" 2>&1
echo "llm rc=$? ($(( $(date +%s) - T2 )) s)"
echo "================ main job"; grep -v "^\s*$" "$OUT/main_job.txt" 2>/dev/null | head -14
echo "================ llm"; grep "^\[" "$OUT/llm.log" | tail -12; sed -n '/^scheme /,$p' "$OUT/llm.log"
