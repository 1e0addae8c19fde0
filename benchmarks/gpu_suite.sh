#!/usr/bin/env bash
# One call on a GPU machine: the GPU test suite (tests/gpu), then benchmarks/linear.py.
#
# Phase 1 runs the test suite (kernel and TMA tests as FXQ_SHARDS pytest processes, each other tests/gpu
# file in its own process) and, beside them, FXQ_WARMERS
# processes that only compile the benchmark's kernels (all share Triton's on-disk cache, so
# compilation runs in parallel). Phase 2 runs the benchmark alone on the GPU (timed numbers).
# Files under $OUT (default out/gpu_suite, at most 8): env.txt gpu_tests.log bench.log
# linear.json linear.png linear_table.txt, and with FXQ_TUNE=1 tuned_configs.json tune_log.json.
# The last lines printed are a short summary: test counts, then the speedup table.
#
# Env: FXQ_TUNE=1 (autotune every (scheme, shape, M) into the on-disk cache before measuring),
#      FXQ_BENCH_ARGS (extra linear.py args), FXQ_SHARDS / FXQ_WARMERS (8 / 8),
#      FXQ_PHASE1_TIMEOUT / FXQ_BENCH_TIMEOUT (seconds: 200 / 320), PYTHON (python3),
#      FXQ_SKIP_TESTS (space-separated tests/gpu file names to leave out, e.g. "test_gpu_export.py").
#      FXQ_SAVE_LIBS=1 (pack the built op libraries into $OUT/fxq_libs.tgz: carried back as
#      .devrun/fxq_libs.tgz, a later call skips their build; see benchmarks/device_env.sh; with
#      FXQ_TUNE=1 too that is a ninth file under $OUT, one more than comes back).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_suite}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# FXQUANT_CACHE_DIR: set by benchmarks/device_env.sh (sourced below)
SHARDS=${FXQ_SHARDS:-8}
WARMERS=${FXQ_WARMERS:-8}
TUNE=""
[ "${FXQ_TUNE:-0}" = 1 ] && TUNE="--tune"
T0=$(date +%s)
LOGS=$(mktemp -d)
. benchmarks/device_env.sh  # CUTLASS headers, peers: carried in .whl

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem \
    --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nproc
} > "$OUT/env.txt" 2>&1

# The C++ and CUTLASS op libraries are built once here (minutes on first use; cached under
# $FXQUANT_CACHE_DIR), not by every test process of phase 1 at once. The CUTLASS one needs its
# headers: carry .whl/nvidia_cutlass-*.whl (installed above); on Hopper without them
# tests/gpu/test_gpu_cutlass.py fails by design.
build_libs "$LOGS"
echo "library builds done at $(( $(date +%s) - T0 )) s"
[ "${FXQ_SAVE_LIBS:-0}" = 1 ] && save_libs "$OUT"  # for .devrun/ in later calls' carry

# ---- phase 1: tests + benchmark compile warmers, all in parallel. The kernel tests are split
# into shards; every other tests/gpu file runs in a process of its own, so a crash there (a
# segfault in AOTInductor's loader has been seen) cannot take other tests down with it.
SHARDED="tests/gpu/test_gpu_kernels.py tests/gpu/test_gpu_tma.py"  # the long kernel-correctness files
for i in $(seq 0 $((SHARDS - 1))); do
  FXQUANT_TEST_SHARD="$i/$SHARDS" timeout -s INT -k 15 "${FXQ_PHASE1_TIMEOUT:-200}" \
    $PY -m pytest $SHARDED -q -rfE -p no:cacheprovider > "$LOGS/test_$i.log" 2>&1 \
    || echo "(pytest shard $i/$SHARDS exit code $?)" >> "$LOGS/test_$i.log" &
done
NT=$SHARDS
for f in tests/gpu/test_*.py; do
  case " $SHARDED " in *" $f "*) continue;; esac
  case " ${FXQ_SKIP_TESTS:-} " in *" $(basename "$f") "*) echo "skipped by FXQ_SKIP_TESTS: $f"; continue;; esac
  timeout -s INT -k 15 "${FXQ_PHASE1_TIMEOUT:-200}" $PY -m pytest "$f" -q -rfE -p no:cacheprovider \
    > "$LOGS/test_$NT.log" 2>&1 || echo "(pytest $f exit code $?)" >> "$LOGS/test_$NT.log" &
  NT=$((NT + 1))
done
for i in $(seq 0 $((WARMERS - 1))); do
  timeout -s INT -k 15 "${FXQ_PHASE1_TIMEOUT:-200}" $PY benchmarks/linear.py --warm-only $TUNE \
    --shard "$i/$WARMERS" ${FXQ_BENCH_ARGS:-} > "$LOGS/warm_$i.log" 2>&1 &
done
wait
for i in $(seq 0 $((NT - 1))); do
  echo "==== test process $i"; cat "$LOGS/test_$i.log"
done > "$OUT/gpu_tests.log"
cat "$LOGS"/warm_*.log > "$OUT/bench.log"
T1=$(date +%s)
echo "phase 1 (tests + compile) took $((T1 - T0)) s" | tee -a "$OUT/bench.log"

# ---- phase 2: the benchmark, alone on the GPU (clocks, power and throttle reasons sampled)
Q=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu
nvidia-smi --query-gpu=$Q,clocks_event_reasons.active --format=csv,noheader -lms 500 \
  > "$LOGS/smi.csv" 2>/dev/null &
SMI=$!
timeout "${FXQ_BENCH_TIMEOUT:-320}" $PY benchmarks/linear.py --out "$OUT" $TUNE ${FXQ_BENCH_ARGS:-} \
  >> "$OUT/bench.log" 2>&1
BENCH_RC=$?
kill $SMI 2>/dev/null
T2=$(date +%s)
$PY - "$LOGS/smi.csv" >> "$OUT/env.txt" 2>&1 <<'PYEOF'
import statistics, sys
rows = [l.split(", ") for l in open(sys.argv[1]) if l.count(",") >= 6]
def col(i):
    v = []
    for r in rows:
        try:
            v.append(float(r[i].split()[0]))
        except (ValueError, IndexError):
            pass
    return v
busy = [r for r in rows if r[5].split()[0] not in ("0",)]
print(f"phase-2 samples: {len(rows)} ({len(busy)} with the GPU busy)")
for name, i in (("sm MHz", 1), ("mem MHz", 2), ("power W", 3), ("temp C", 4), ("util %", 5)):
    v = col(i)
    if v:
        print(f"  {name:8s} min {min(v):7.0f}  median {statistics.median(v):7.0f}  max {max(v):7.0f}")
reasons = {}
for r in rows:
    reasons[r[6].strip()] = reasons.get(r[6].strip(), 0) + 1
print("  clock-event reasons (bitmask: samples):", reasons)
PYEOF

# ---- summary (printed last)
echo
echo "================ fxquant GPU suite summary ($((T2 - T0)) s; phase 2 $((T2 - T1)) s, rc=$BENCH_RC)"
head -3 "$OUT/env.txt"
grep -A7 "phase-2 samples" "$OUT/env.txt"
grep -h "^ceilings" "$OUT/bench.log"
# counted from each process's last pytest summary line only (pytest_totals, device_env.sh)
DONE=$(for i in $(seq 0 $((NT - 1))); do pytest_final "$LOGS/test_$i.log"; done | grep -c .)
echo "GPU tests: $(pytest_totals "$LOGS"/test_*.log)($DONE/$NT pytest processes printed a summary; non-zero exit codes below)"
grep -h "exit code" "$OUT/gpu_tests.log"
grep -hE "^(FAILED|ERROR) " "$OUT/gpu_tests.log" | cut -c1-220 | head -15
grep -hE "^(warm|tune) .*(Error|error)" "$OUT/bench.log" | cut -c1-220 | head -8
if [ -f "$OUT/linear_table.txt" ]; then
  echo "speedup vs bf16 cuBLAS (bf16 rows: µs; '!' = output out of tolerance):"
  cat "$OUT/linear_table.txt"
else
  echo "benchmark produced no table; last lines of bench.log:"
  tail -20 "$OUT/bench.log"
fi
rm -rf "$LOGS"
