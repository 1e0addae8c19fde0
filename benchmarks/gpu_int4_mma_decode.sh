#!/usr/bin/env bash
# One GPU call (session 26): the MMA-fragment int4 decode kernel with x through shared memory
# (csrc/int4_mma_layout.cu, FXQUANT_CXX_INT4_MMA_X): its GPU tests, then x staged against x read
# from global memory (variants.py), then both int4 layouts against bf16 at every M (int4_layouts.py,
# the dispatcher's choices with the shipped table). Carry .whl and .devrun/fxq_libs.tgz.
# Env: FXQ_TEST_S (per test process, default 240), FXQ_X_MS, FXQ_SHAPES_SWEEP / FXQ_SWEEP_MS / FXQ_SWEEP_X (the
# block-shape sweep's shapes, M list and x mode), FXQ_MS (int4_layouts.py's M list), FXQ_TESTS (test files:
# shards, as gpu_tests_part.sh takes them), FXQ_SKIP_CEILING=1 (no read-ceiling probe).
# Files under $OUT: env.txt fxq_libs.tgz gpu_tests_part.log x_modes.json block_shapes.json read_ceiling.json
# int4_layouts.json bench.txt (at most 8: the device tool returns no more).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_int4_mma_decode}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
. benchmarks/device_env.sh
device_info "$OUT/env.txt"
L=$(mktemp -d)
build_libs "$L" && save_libs "$OUT"
echo "libraries ready at $(( $(date +%s) - T0 )) s"
OUT=$OUT FXQ_TEST_S=${FXQ_TEST_S:-240} bash benchmarks/gpu_tests_part.sh ${FXQ_TESTS:-tests/gpu/test_gpu_int4_mma.py:4 \
  tests/gpu/test_gpu_cxx_dynamic.py:2} 2>&1 | tail -8
echo "tests done at $(( $(date +%s) - T0 )) s"
{ timeout -s INT -k 10 200 python3 benchmarks/variants.py --scheme w4a16_g128_mma@cuda --ms "${FXQ_X_MS:-1,2,4,8,16,24,32}" \
    --env FXQUANT_CXX_INT4_MMA_X=global --env FXQUANT_CXX_INT4_MMA_X=smem --env FXQUANT_CXX_INT4_MMA_X=smem_sa \
    --out "$OUT/x_modes.json" 2>&1 | tail -24
  echo "x modes done at $(( $(date +%s) - T0 )) s"
  timeout -s INT -k 10 150 python3 benchmarks/variants.py --scheme w4a16_g128_mma@cuda --ms ${FXQ_SWEEP_MS:-1,32} \
    $(for v in ${FXQ_SHAPES_SWEEP:-1,16,2 1,8,2 2,8,2 2,4,2 1,16,1 1,16,4 2,16,2}; do
        echo --env "FXQUANT_CXX_INT4_MMA_LAYOUT_VARIANT=$v${FXQ_SWEEP_X:+;FXQUANT_CXX_INT4_MMA_X=$FXQ_SWEEP_X}"; done) \
    --out "$OUT/block_shapes.json" 2>&1 | tail -16
  echo "block shapes done at $(( $(date +%s) - T0 )) s"
  if [ "${FXQ_SKIP_CEILING:-0}" != 1 ]; then
    timeout -s INT -k 10 120 python3 benchmarks/probe_read_ceiling.py --scheme w4a16_g128_mma@cuda \
      --env FXQUANT_CXX_INT4_MMA_X=smem --out "$OUT/read_ceiling.json" 2>&1 | tail -8
    timeout -s INT -k 10 120 python3 benchmarks/probe_read_ceiling.py --scheme w4a16_g128@cuda 2>&1 | tail -8
  fi
  echo "read ceiling done at $(( $(date +%s) - T0 )) s"
  timeout -s INT -k 10 200 python3 benchmarks/int4_layouts.py --ms "${FXQ_MS:-1,4,16,24,32,64,256,4096}" \
    --out "$OUT/int4_layouts.json" 2>&1 | tail -18
  echo "layouts done at $(( $(date +%s) - T0 )) s"; } > "$OUT/bench.txt" 2>&1
cat "$OUT/bench.txt"
