"""fp8 dynamic schemes through torch._scaled_mm and int8 dynamic through torch._int_mm (KernelConfig
kind "scaled_mm") on the GPU, against
the CPU reference op: the whole op and the prequant op, per-row and per-tensor, M from 1 to 4097,
with and without bias, and the shapes and dtypes where it must fall back to the Triton GEMM."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a CUDA GPU with fp8 (sm_89+)", allow_module_level=True)

import fxquant.lowering  # noqa: E402,F401
from fxquant import numerics as nq  # noqa: E402
from fxquant.lowering.triton import dispatch as D  # noqa: E402

fxq = torch.ops.fxquant
SCALED_MM = D.KernelConfig("scaled_mm", bn=0, bk=0)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("n,k", [(256, 4096), (200, 320), (48, 96)])
@pytest.mark.parametrize("m", [1, 17, 300, 4097])
@pytest.mark.parametrize("per_row", [True, False], ids=["row", "tensor"])
def test_scaled_mm_matches_cpu_reference(per_row, m, n, k):
    g = torch.Generator().manual_seed(m * n)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if m % 2 else None
    qw, ws = nq.quantize_fp8_weight(w, per_row=per_row)
    scheme = "fp8_dyn_row" if per_row else "fp8_dyn_tensor"
    assert D.scaled_mm_fits(scheme, n, k, torch.bfloat16) == (n % 16 == 0 and k % 16 == 0)
    ref = fxq.float8_dynamic_linear(x, qw, ws, b, per_row)
    got = D.linear(scheme, x.cuda(), qw.cuda(), ws.cuda(), None if b is None else b.cuda(), 0, SCALED_MM)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert _rel(got.cpu(), ref) <= 1e-2, f"{scheme} m={m} n={n} k={k}"


def test_scaled_mm_fp16_output_falls_back():
    # The rowwise kernel only writes bf16: fp16 takes the Triton GEMM and is still right.
    w, x = torch.randn(256, 512) / 23, torch.randn(64, 512).half()
    qw, ws = nq.quantize_fp8_weight(w, per_row=True)
    ref = fxq.float8_dynamic_linear(x, qw, ws, None, True)
    got = D.linear("fp8_dyn_row", x.cuda(), qw.cuda(), ws.cuda(), None, 0, SCALED_MM)
    assert _rel(got.cpu(), ref) <= TOL[torch.float16]
    qt, wt = nq.quantize_fp8_weight(w, per_row=False)  # per-tensor writes fp16 itself
    got = D.linear("fp8_dyn_tensor", x.cuda(), qt.cuda(), wt.cuda(), None, 0, SCALED_MM)
    assert _rel(got.cpu(), fxq.float8_dynamic_linear(x, qt, wt, None, False)) <= TOL[torch.float16]


@pytest.mark.parametrize("m", [16, 1000])
def test_prequant_op_takes_scaled_mm(monkeypatch, m):
    # linear_prequant follows the table: force scaled_mm there and compare with the CPU op.
    monkeypatch.setattr(D, "get_config", lambda *a, **kw: SCALED_MM)
    ran = []
    real = D._run_scaled_mm
    monkeypatch.setattr(D, "_run_scaled_mm", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    w, x = torch.randn(512, 1024) / 32, torch.randn(m, 1024).to(torch.bfloat16)
    b = torch.randn(512).to(torch.bfloat16)
    qw, ws = nq.quantize_fp8_weight(w, per_row=True)
    xq, xs = nq.quantize_fp8(x, True)
    ref = fxq.float8_dynamic_linear_prequant(xq, xs, qw, ws, b, torch.bfloat16)
    got = fxq.float8_dynamic_linear_prequant(xq.cuda(), xs.cuda(), qw.cuda(), ws.cuda(), b.cuda(),
                                              torch.bfloat16)
    assert ran, "the prequant op did not take torch._scaled_mm"
    assert _rel(got.cpu(), ref) <= 1e-2


@pytest.mark.parametrize("scheme,w_per_row", [("fp8_dyn_row", False), ("fp8_dyn_tensor", True)])
def test_scaled_mm_mixed_scale_granularity(scheme, w_per_row):
    # A per-tensor scale beside a per-row one is broadcast for the rowwise kernel.
    w, x = torch.randn(256, 512) / 23, torch.randn(33, 512).to(torch.bfloat16)
    b = torch.randn(256).to(torch.bfloat16)
    qw, ws = nq.quantize_fp8_weight(w, per_row=w_per_row)
    ref = fxq.float8_dynamic_linear(x, qw, ws, b, scheme == "fp8_dyn_row")
    got = D.linear(scheme, x.cuda(), qw.cuda(), ws.cuda(), b.cuda(), 0, SCALED_MM)
    assert _rel(got.cpu(), ref) <= 1e-2


@pytest.mark.parametrize("n,k", [(256, 4096), (200, 320), (4100, 96)])
@pytest.mark.parametrize("m", [1, 16, 17, 300, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_int8_dynamic_through_int_mm(m, n, k, dtype, monkeypatch):
    # int8 dynamic's "scaled_mm" kind: torch._int_mm (cuBLAS) + the Triton scale epilogue, where
    # M > 16 and N, K are multiples of 8; elsewhere the Triton GEMM. Against the CPU reference op.
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(m + n)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if m % 2 else None
    qw, ws = nq.quantize_int8_weight_for_dynamic(w)
    assert D.scaled_mm_fits("int8_dyn", n, k, dtype, M=m) == (m > 16 and n % 8 == 0 and k % 8 == 0)
    ref = fxq.int8_dynamic_linear(x, qw, ws, b)
    calls.clear()  # the CPU reference op itself may use torch._int_mm
    got = D.linear("int8_dyn", x.cuda(), qw.cuda(), ws.cuda(), None if b is None else b.cuda(), 0, SCALED_MM)
    assert got.dtype == dtype and got.shape == (m, n)
    assert _rel(got.cpu(), ref) <= TOL[dtype], f"int8 m={m} n={n} k={k} {dtype}"
    assert bool(calls) == (m > 16 and n % 8 == 0 and k % 8 == 0)  # cuBLAS ran exactly where it fits
