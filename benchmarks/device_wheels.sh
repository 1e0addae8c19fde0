# Sourced by the gpu_*.sh scripts: installs the wheels a run call carries in .whl (the CUTLASS
# headers' nvidia_cutlass, tqdm, peers) into /tmp/site and puts it (and gemlite's source) on PYTHONPATH.
# Without the CUTLASS headers the dispatcher warns and runs other kernels where CUTLASS would win.
if ls .whl/*.whl >/dev/null 2>&1; then
  ${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/.whl/gemlite_src${PYTHONPATH:+:$PYTHONPATH}
fi
