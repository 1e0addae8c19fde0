import os
import sys

import torch

# Tests run from a checkout without installing too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # On a CPU-only machine Triton can only run interpreted, and the variable must be set before
    # triton is first imported (torch._inductor imports it), or its jitted helpers stay compiled.
    os.environ.setdefault("TRITON_INTERPRET", "1")
