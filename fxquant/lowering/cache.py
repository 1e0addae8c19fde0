"""Where fxquant keeps files across processes (tuned kernel configs, the built C++ library)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$FXQUANT_CACHE_DIR, else $XDG_CACHE_HOME/fxquant (default ~/.cache/fxquant)."""
    root = os.environ.get("FXQUANT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fxquant")
    return Path(root)
