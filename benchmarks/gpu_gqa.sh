#!/usr/bin/env bash
# One GPU call for the grouped-query attention fold (backend option fold_gqa): its GPU tests, then
# benchmarks/llm.py on FXQ_LAYERS (default 8) layers with bf16 Inductor, bf16 Inductor + the fold
# alone, and FXQ_SCHEMES (default int4,int4+nofold), decode at batch 1 and 32 (FXQ_BATCHES) of
# FXQ_NEW_TOKENS (default 32) tokens. FXQ_LLM_SCHEMES replaces the whole scheme list; FXQ_SKIP_TESTS=1.
# Files under $OUT: gqa_tests.log, llm.json, llm.png, llm.log. Env: FXQ_LLM_TIMEOUT (s, default 420).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_gqa}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
. benchmarks/device_env.sh
T0=$(date +%s)
if [ "${FXQ_SKIP_TESTS:-0}" != 1 ]; then
  timeout 150 $PY -m pytest tests/gpu/test_gpu_gqa.py -q -rfE -p no:cacheprovider > "$OUT/gqa_tests.log" 2>&1
  echo "gqa tests rc=$? ($(( $(date +%s) - T0 )) s): $(pytest_final "$OUT/gqa_tests.log")"
fi
T1=$(date +%s)
timeout "${FXQ_LLM_TIMEOUT:-420}" $PY benchmarks/llm.py --out "$OUT" --layers "${FXQ_LAYERS:-8}" \
  --schemes "${FXQ_LLM_SCHEMES:-bf16-inductor,bf16-inductor+fold,${FXQ_SCHEMES:-int4,int4+nofold}}" --batches "${FXQ_BATCHES:-1,32}" \
  --new-tokens "${FXQ_NEW_TOKENS:-32}" --prefill 0 --repeats 3 > "$OUT/llm.log" 2>&1
echo "llm rc=$? ($(( $(date +%s) - T1 )) s)"
grep -sE "FAILED|Error" "$OUT/gqa_tests.log" | head -5
grep "^\[" "$OUT/llm.log" | grep -v "set up\|reference" | tail -14; sed -n '/^scheme /,$p' "$OUT/llm.log"
