"""The CUTLASS W8A8 int8 dynamic GEMM (csrc_cutlass/scaled_int8_gemm.cuh, kind "cutlass" for
int8_dyn) on a Hopper GPU: every tile against the CPU reference on awkward shapes, its input
checks, the dispatcher's use of it (plain and prequantized activations) and CUDA-graph capture."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs a Hopper (sm_90) GPU", allow_module_level=True)

import fxquant  # noqa: E402,F401
from fxquant import numerics as nq  # noqa: E402
from fxquant.lowering.cuda import build, cutlass  # noqa: E402
from fxquant.lowering.triton import dispatch as D  # noqa: E402

build.load_cutlass()  # a missing header or compiler fails here, loudly: this file must not skip on Hopper


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nq.quantize_int8_weight_for_dynamic(torch.randn(n, k, generator=g) / k ** 0.5)


def _name(v):
    return f"{v[1]}x{v[0]}" + ("_streamk" if v[2] == 0 else "") + ("_ping" if v[3] == 4 else "") + ("_cl2" if v[4] == 2 else "")


@pytest.mark.parametrize("variant", sorted(cutlass.I8_VARIANTS), ids=_name)
@pytest.mark.parametrize("n,k", [(200, 384), (4096, 4096), (264, 1040), (1000, 2064)])
def test_op_matches_the_int32_reference(variant, n, k):
    # Same quantized activations on both sides: the int32 product is exact, so what is left is
    # float32 rounding of the scales and one bf16 rounding of the output (2^-9 relative at most).
    qw, ws = _weights(n, k)
    gen = torch.Generator().manual_seed(n + k)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    qc, wsc = qw.cuda(), ws.cuda()
    for m, with_bias in ((1, False), (7, True), (33, False), (129, True), (1000, True), (4097, False)):
        xq, xs = nq.quantize_int8_per_token(torch.randn(m, k, generator=gen))
        ref = (xq.double() @ qw.double().t()) * xs.double() * ws.double()[None, :]
        if with_bias:
            ref = ref + bias.double()
        bc = bias.cuda() if with_bias else None
        assert cutlass.fits_int8_dynamic(xq.cuda(), qc, wsc, bc, *variant)
        got = cutlass.int8_dynamic_linear(xq.cuda(), xs.cuda(), qc, wsc, bc, *variant)
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        err = (got.cpu().double() - ref).abs()
        assert float((err - ref.abs() * 2 ** -8).max()) <= 1e-6, (m, with_bias)  # per element, bf16's half step


def test_dispatcher_runs_every_tile_on_bf16_activations(monkeypatch):
    calls = []
    real = cutlass.int8_dynamic_linear
    monkeypatch.setattr(cutlass, "int8_dynamic_linear", lambda *a: calls.append(a[5:]) or real(*a))
    qw, ws = _weights(1024, 1536)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(1024, generator=gen).to(torch.bfloat16)
    for m, lead in ((40, ()), (300, (3,)), (513, ())):
        x = torch.randn(*lead, m, 1536, generator=gen).to(torch.bfloat16)
        ref = torch.ops.fxquant.int8_dynamic_linear(x, qw, ws, bias)  # the CPU op
        for v in cutlass.I8_VARIANTS:
            cfg = D.KernelConfig("cutlass", bn=v[0], bk=128, bm=v[1], split_k=v[2], warps=v[3], cluster=v[4])
            got = D.linear("int8_dyn", x.cuda(), qw.cuda(), ws.cuda(), bias.cuda(), 0, cfg)
            assert got.shape == ref.shape and _rel(got.cpu(), ref) <= 1e-2, (m, v)
            assert calls.pop() == v and not calls  # the CUTLASS tile ran, not a fallback


def test_inputs_it_cannot_take_are_refused():
    qw, ws = _weights(256, 512)
    qc, wsc = qw.cuda(), ws.cuda()
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    t = (256, 128, 1, 0, 1)
    assert cutlass.fits("int8_dyn", x, qc, wsc, None, 0, *t)
    assert not cutlass.fits("int8_dyn", x.half(), qc, wsc, None, 0, *t)  # fp16 output
    assert not cutlass.fits("int8_dyn", x, qc, wsc, None, 0, 96, 128, 1, 0, 1)  # no such tile
    assert not cutlass.fits("int8_dyn", x, qc, wsc[:1], None, 0, *t)  # a per-tensor weight scale
    assert not cutlass.fits("int8_dyn", x, qc, wsc.bfloat16(), None, 0, *t)  # scales not float32
    q252, s252 = _weights(252, 512)  # N % 8
    assert not cutlass.fits("int8_dyn", x, q252.cuda(), s252.cuda(), None, 0, *t)
    q264, s264 = _weights(256, 264)  # K % 16
    assert not cutlass.fits("int8_dyn", x[:, :264], q264.cuda(), s264.cuda(), None, 0, *t)
    b = torch.zeros(257, device="cuda", dtype=torch.bfloat16)[1:]  # misaligned bias
    assert not cutlass.fits("int8_dyn", x, qc, wsc, b, 0, *t)
    # The op's own checks, for direct calls
    xq, xs = nq.quantize_int8_per_token(torch.randn(300, 512))
    xq, xs = xq.cuda(), xs.cuda().reshape(-1)
    op = torch.ops.fxquant.cutlass_int8_dynamic_linear
    with pytest.raises(RuntimeError, match="x_scales must be float32 with one scale per row"):
        op(xq, xs[:10], qc, wsc, None, 0)
    with pytest.raises(RuntimeError, match="bias must be bf16"):
        op(xq, xs, qc, wsc, torch.zeros(256, device="cuda"), 0)
    with pytest.raises(RuntimeError, match="unknown variant 99"):
        op(xq, xs, qc, wsc, None, 99)
    with pytest.raises(RuntimeError, match="every tensor must be on xq's CUDA device"):
        op(xq, xs.cpu(), qc, wsc, None, 0)


def test_prequant_op_takes_it_from_the_table_and_falls_back(monkeypatch):
    calls = []
    real = cutlass.int8_dynamic_linear

    def spy(*a, **kw):
        calls.append(a[5:7])
        return real(*a, **kw)
    monkeypatch.setattr(cutlass, "int8_dynamic_linear", spy)
    real_get = D.get_config

    def table(scheme, m, n, k, group, dtype, device, allow_cxx=True, allow_scaled_mm=True, allow_cutlass=True):
        if scheme == "int8_dyn" and allow_cutlass:
            return D.KernelConfig("cutlass", bn=256, bk=128, bm=128, warps=0)
        return real_get(scheme, m, n, k, group, dtype, device, allow_cxx, allow_scaled_mm, allow_cutlass)
    monkeypatch.setattr(D, "get_config", table)
    qw, ws = _weights(512, 1024)
    qc, wsc = qw.cuda(), ws.cuda()
    xq, xs = nq.quantize_int8_per_token(torch.randn(2, 100, 1024))
    ref = torch.ops.fxquant.int8_dynamic_linear_prequant(xq, xs, qw, ws, None, torch.bfloat16)  # CPU
    got = torch.ops.fxquant.int8_dynamic_linear_prequant(xq.cuda(), xs.cuda(), qc, wsc, None, torch.bfloat16)
    assert calls == [(256, 128)] and got.shape == (2, 100, 512)
    assert _rel(got.cpu(), ref) <= 1e-2
    # fp16 output: the CUTLASS kernel writes bf16 only, so the other kernels run
    got16 = torch.ops.fxquant.int8_dynamic_linear_prequant(xq.cuda(), xs.cuda(), qc, wsc, None, torch.float16)
    assert calls == [(256, 128)] and got16.dtype == torch.float16
    assert _rel(got16.cpu(), ref) <= 1e-2


@pytest.mark.parametrize("variant", [(256, 128, 0, 0, 1), (128, 128, 1, 0, 1), (256, 128, 0, 0, 2)], ids=_name)
def test_cuda_graph_replay(variant):
    # stream-K allocates its workspace per call: inside a capture it comes from the graph's pool
    qw, ws = _weights(4096, 4096)
    qc, wsc = qw.cuda(), ws.cuda()
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = D.KernelConfig("cutlass", bn=variant[0], bk=128, bm=variant[1], split_k=variant[2], warps=variant[3],
                         cluster=variant[4])
    eager = D.linear("int8_dyn", x, qc, wsc, None, 0, cfg)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        D.linear("int8_dyn", x, qc, wsc, None, 0, cfg)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = D.linear("int8_dyn", x, qc, wsc, None, 0, cfg)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, D.linear("int8_dyn", x, qc, wsc, None, 0, cfg))  # deterministic, new input
    assert not torch.equal(out, eager)
