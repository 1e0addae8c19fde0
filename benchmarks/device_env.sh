# Sourced by the gpu_*.sh scripts, from the repository root, at the start of a GPU-machine call.
# 1. Installs the wheels the call carries in .whl (nvidia_cutlass for the CUTLASS headers, tqdm,
#    peers) into /tmp/site and puts it (and gemlite's source) on PYTHONPATH. Without the CUTLASS
#    headers the dispatcher warns and runs other kernels where CUTLASS would win.
# 2. Sets FXQUANT_CACHE_DIR (default .devrun/fxquant_cache) and, when the call carries
#    .devrun/fxq_libs.tgz (the built op libraries an earlier call saved with FXQ_SAVE_LIBS=1),
#    unpacks it there: the libraries then load at once instead of building for 3-4 minutes. A
#    library built from other sources, torch or CUTLASS has another cache tag and is rebuilt.
if ls .whl/*.whl >/dev/null 2>&1; then
  ${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/.whl/gemlite_src${PYTHONPATH:+:$PYTHONPATH}
fi
export FXQUANT_CACHE_DIR=${FXQUANT_CACHE_DIR:-$PWD/.devrun/fxquant_cache}
# A build killed by an earlier call's time limit leaves its lock: the loader would wait on it forever.
for lock in "$FXQUANT_CACHE_DIR"/cxx/*/lock; do [ -e "$lock" ] && rm -rf "${lock%/lock}"; done
if [ -f .devrun/fxq_libs.tgz ]; then
  mkdir -p "$FXQUANT_CACHE_DIR" && tar -xzf .devrun/fxq_libs.tgz -C "$FXQUANT_CACHE_DIR" \
    && echo "device_env: carried libraries $(tar -tzf .devrun/fxq_libs.tgz | tr '\n' ' ')"
fi

# build_libs LOGDIR: the C++ and CUTLASS op libraries built (or loaded from the cache) here, the two
# builds in parallel, not by every test or benchmark process at once; each build's log in LOGDIR,
# and a line for each that failed. The paths of those that loaded go to $FXQUANT_CACHE_DIR/current_libs.txt
# (save_libs packs those).
build_libs() {
  local lib
  for lib in load load_cutlass; do
    { ${PYTHON:-python3} -c "from fxquant.lowering.cuda import build; print('FXQ_LIB', build.$lib(), flush=True)" \
        > "$1/build_$lib.log" 2>&1 || echo "build $lib failed: $(tail -1 "$1/build_$lib.log")"; } &
  done
  wait
  grep -h '^FXQ_LIB ' "$1/build_load.log" "$1/build_load_cutlass.log" 2>/dev/null | cut -d' ' -f2- \
    > "$FXQUANT_CACHE_DIR/current_libs.txt"
}

# save_libs DIR: the op libraries the last build_libs loaded into DIR/fxq_libs.tgz, for .devrun/ in later
# calls' carry. Only those (nothing is built here): stale builds left in the cache by other sources
# would make the file too large for the device tool to return.
save_libs() {
  local dest f libs=()
  dest=$(cd "$1" && pwd) || return
  while IFS= read -r f; do
    [ -f "$f" ] && libs+=("${f#"$FXQUANT_CACHE_DIR"/}")
  done < <(cat "$FXQUANT_CACHE_DIR/current_libs.txt" 2>/dev/null)
  if [ ${#libs[@]} = 0 ]; then
    echo "save_libs: no library loaded by build_libs: nothing saved"
    return 1
  fi
  (cd "$FXQUANT_CACHE_DIR" && tar -czf "$dest/fxq_libs.tgz" "${libs[@]}") \
    && echo "saved $(du -h "$dest/fxq_libs.tgz" | cut -f1) of libraries (${libs[*]}) to $dest/fxq_libs.tgz"
}

# device_info FILE: the GPU, driver, clock, torch / CUDA / Triton versions and the date, into FILE.
device_info() {
  { nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
    ${PYTHON:-python3} -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    date -u; } > "$1" 2>&1
}

# pytest_totals LOG...: "passed N  failed N  error N  skipped N  xfailed N" from each log's last
# pytest summary line only (tracebacks and captured output in the logs hold look-alike lines).
PYTEST_FINAL='^(=+ )?(no tests ran|[0-9]+ [a-z]+(, [0-9]+ [a-z]+)*) in [0-9.]+s( \([0-9:]+\))?( =+)?$'
pytest_final() { grep -E "$PYTEST_FINAL" "$1" | tail -1; }
pytest_totals() {
  local f w finals
  finals=$(for f in "$@"; do pytest_final "$f"; done)
  for w in passed failed error skipped xfailed; do
    echo -n "$w $(grep -oE "(^|, |=+ )[0-9]+ ${w}s?\b" <<< "$finals" | grep -oE '[0-9]+' | awk '{s+=$1} END {print s+0}')  "
  done
  echo
}
