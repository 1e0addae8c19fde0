#!/usr/bin/env bash
# One GPU call for fxquant::gqa_attention (backend option gqa_kernel): its GPU tests (decode and
# prefill kernels) and the fold's, benchmarks/attention.py (one layer's decode attention: HF's form
# under Inductor, the SDPA fold, the kernel and its tile / split alternatives; with FXQ_PREFILL_ATTN=1
# also a 2048-token prefill with the prefill kernel's tilings), then benchmarks/llm.py on FXQ_LAYERS (default 8)
# layers with FXQ_LLM_SCHEMES (default bf16-inductor,bf16-inductor+gqa,int4,int4+sdpafold) at
# FXQ_BATCHES (default 1,32), FXQ_NEW_TOKENS (default 256) new tokens. FXQ_SKIP_TESTS=1,
# FXQ_SKIP_ATTN=1 skip parts; FXQ_TEST_FILES replaces the test files. Files under $OUT: gqa_kernel_tests.log, attention.json/.log, attention_prefill.log + prefill/attention.json,
# llm.json/.png/.log. Env: FXQ_LLM_TIMEOUT (s, default 330), FXQ_TEST_TIMEOUT (s, default 300; S21: the prefill
# test file alone did not finish in 200 s on a fresh machine).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_gqa_kernel}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
. benchmarks/device_env.sh
T0=$(date +%s)
if [ "${FXQ_SKIP_TESTS:-0}" != 1 ]; then
  timeout "${FXQ_TEST_TIMEOUT:-300}" $PY -m pytest ${FXQ_TEST_FILES:-tests/gpu/test_gpu_gqa_kernel.py tests/gpu/test_gpu_gqa_prefill.py tests/gpu/test_gpu_gqa.py} -q -rfE -p no:cacheprovider \
    > "$OUT/gqa_kernel_tests.log" 2>&1
  echo "gqa tests rc=$? ($(( $(date +%s) - T0 )) s): $(pytest_final "$OUT/gqa_kernel_tests.log")"
  grep -E "^FAILED|^ERROR" "$OUT/gqa_kernel_tests.log" | head -8
fi
if [ "${FXQ_SKIP_ATTN:-0}" != 1 ]; then
  T1=$(date +%s)
  timeout 150 $PY benchmarks/attention.py --out "$OUT" --batches "${FXQ_ATTN_BATCHES:-1,8,32}" \
    --caches "${FXQ_CACHES:-384,2304}" > "$OUT/attention.log" 2>&1
  echo "attention rc=$? ($(( $(date +%s) - T1 )) s)"
  tail -4 "$OUT/attention.log" | grep -i error
  if [ "${FXQ_PREFILL_ATTN:-0}" = 1 ]; then
    timeout 120 $PY benchmarks/attention.py --out "$OUT/prefill" --batches 1 --caches 2064 --qlen 2048 --filled 1.0 \
      --configs "" --prefill-configs 128:64:8:3,128:32:4:3,128:64:8:2 > "$OUT/attention_prefill.log" 2>&1
    echo "prefill attention rc=$?"
  fi
fi
T2=$(date +%s)
timeout "${FXQ_LLM_TIMEOUT:-330}" $PY benchmarks/llm.py --out "$OUT" --layers "${FXQ_LAYERS:-8}" \
  --schemes "${FXQ_LLM_SCHEMES:-bf16-inductor,bf16-inductor+gqa,int4,int4+sdpafold}" --batches "${FXQ_BATCHES:-1,32}" \
  --new-tokens "${FXQ_NEW_TOKENS:-256}" --prefill 0 --repeats 3 > "$OUT/llm.log" 2>&1
echo "llm rc=$? ($(( $(date +%s) - T2 )) s)"
grep "^\[" "$OUT/llm.log" | grep -v "set up\|reference" | tail -14; sed -n '/^scheme /,$p' "$OUT/llm.log"
[ -f "$OUT/attention.log" ] && sed -n '/^us per layer/,$p' "$OUT/attention.log"
[ -f "$OUT/attention_prefill.log" ] && sed -n '/^us per layer/,$p' "$OUT/attention_prefill.log"
