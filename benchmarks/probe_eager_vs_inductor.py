"""The exported program of a dynamic-activation scheme, eager against Inductor-compiled (CPU):
how far Inductor's float32 intermediates move the outputs (a last-bit difference in x before the
activation is quantized moves an element by a whole step), and that with
`emulate_precision_casts=True` (Inductor rounds intermediates as eager does) the two are
bit-identical. Behind the fp8-dynamic floor in tests/gpu/test_gpu_export.py (BENCHMARKS.md S22).

    python benchmarks/probe_eager_vs_inductor.py
"""
import torch
import torch.nn as nn
from torch.export import Dim

import fxquant

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(512, 1024), nn.SiLU(), nn.Linear(1024, 512)).to(torch.bfloat16).eval()
dims = ({0: Dim("batch", min=1, max=64), 1: Dim("seq", min=1, max=512)},)
ex = torch.randn(3, 8, 512, dtype=torch.bfloat16)
for cfg in (fxquant.Float8DynamicActivationFloat8Weight(), fxquant.Int8DynamicActivationInt8Weight()):
    prog = fxquant.export_program(model, (ex,), cfg, dims)
    m = prog.module()
    for emulate in (False, True):
        c = torch.compile(m, options={"emulate_precision_casts": emulate})
        for shape in ((2, 8, 512), (5, 3, 512), (1, 1, 512)):
            x = torch.randn(*shape, dtype=torch.bfloat16)
            with torch.no_grad():
                a, b = m(x).float(), c(x).float()
            print(f"{cfg.scheme:15} emulate_precision_casts={emulate!s:5} x {shape}: "
                  f"{fxquant.sqnr(a, b):.1f} dB{' (identical)' if torch.equal(a, b) else ''}", flush=True)
