"""Programmatic dependent launch (sm_90+) between the activation quantization and the GEMV /
GEMM of the dynamic schemes: bitwise the same outputs as without it, eagerly (a new x every
call, so a read before the wait would see the previous call's values) and replayed in a CUDA
graph, and the dispatcher turns it on for this GPU."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
    pytest.skip("programmatic dependent launch needs sm_90+", allow_module_level=True)

from fxquant import numerics as nq  # noqa: E402
from fxquant.lowering.triton import dispatch as D  # noqa: E402

KC = D.KernelConfig
CONFIGS = {
    "gemv": KC("gemv", bn=4, bk=1024, warps=4),
    "gemm_swap": KC("gemm", bm=16, bn=64, bk=128, warps=4, stages=4, split_k=1, swap=True),
    "gemm": KC("gemm", bm=64, bn=128, bk=128, warps=4, stages=4, split_k=1),
}


def _pack(scheme, w):
    if scheme == "int8_dyn":
        return nq.quantize_int8_weight_for_dynamic(w)
    return nq.quantize_fp8_weight(w, per_row=scheme == "fp8_dyn_row")


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("scheme", ["int8_dyn", "fp8_dyn_row", "fp8_dyn_tensor"])
def test_pdl_changes_no_bit(scheme, cfg, monkeypatch):
    c = CONFIGS[cfg]
    m = 1 if cfg == "gemv" else 16 if cfg == "gemm_swap" else 200
    w = torch.randn(1024, 14336, device="cuda") * 0.02  # long rows: the quantization takes a while
    q, s = _pack(scheme, w)
    x = torch.randn(m, 14336, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("FXQUANT_PDL", "0")
    assert not D._pdl(scheme, x, None)
    ref = D.linear(scheme, x, q, s, b, 0, c)
    monkeypatch.setenv("FXQUANT_PDL", "1")
    assert D._pdl(scheme, x, None)
    assert torch.equal(D.linear(scheme, x, q, s, b, 0, c), ref)
    for i in range(20):  # a missing wait would read the previous call's x, now and then
        xi = torch.randn_like(x) * (1 + i % 3)
        got = D.linear(scheme, xi, q, s, b, 0, c)
        monkeypatch.setenv("FXQUANT_PDL", "0")
        want = D.linear(scheme, xi, q, s, b, 0, c)
        monkeypatch.setenv("FXQUANT_PDL", "1")
        assert torch.equal(got, want), f"call {i}"
    # The same inside a CUDA graph (each replay re-quantizes a new x in place).
    xs = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        D.linear(scheme, xs, q, s, b, 0, c)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = D.linear(scheme, xs, q, s, b, 0, c)
    for i in range(5):
        xi = torch.randn_like(x) * (i + 1)
        xs.copy_(xi)
        g.replay()
        monkeypatch.setenv("FXQUANT_PDL", "0")
        want = D.linear(scheme, xi, q, s, b, 0, c)
        monkeypatch.setenv("FXQUANT_PDL", "1")
        assert torch.equal(out, want), f"replay {i}"
