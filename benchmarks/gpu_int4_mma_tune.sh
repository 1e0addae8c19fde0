#!/usr/bin/env bash
# One GPU call (session 26): tune the MMA-fragment int4 layout (scheme int4_mma, row w4a16_g128_mma) at
# the M buckets its untuned rule guesses (C++ decode up to 16, CUTLASS tiles beyond). The tuning call is
# benchmarks/gpu_narrow_tiles.sh's; this sets S26's scheme, M list and time limits as its defaults.
# Env: FXQ_TUNE_MS (default 16,32,64,128,256,512,1024,2048), FXQ_WARM_S, FXQ_TUNE_BUDGET.
# Files under $OUT: those of gpu_narrow_tiles.sh. Carry .whl and, if there, .devrun/fxq_libs.tgz.
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_int4_mma_tune} FXQ_SCHEMES=w4a16_g128_mma FXQ_TUNE_MS=${FXQ_TUNE_MS:-16,32,64,128,256,512,1024,2048} \
  FXQ_WARM_S=${FXQ_WARM_S:-150} FXQ_TUNE_BUDGET=${FXQ_TUNE_BUDGET:-200} exec bash benchmarks/gpu_narrow_tiles.sh
