"""The CUTLASS fp8 weight-only GEMM (csrc_cutlass/fp8.cu, kind "cutlass") on a Hopper GPU: every
tile against the CPU op and the exact product, what it refuses, the dispatcher's use of it and its
fallback, CUDA-graph capture. Needs sm_90 and CUTLASS's headers (pip install nvidia-cutlass)."""
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

TILE_IDS = lambda v: f"{v[0]}x{v[1]}" + ("_streamk" if v[2] == 0 else "") + ("_ping" if v[3] == 4 else "")  # noqa: E731


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w[:, : k // 8] *= 1e-3  # small values: e4m3 subnormals must convert exactly too
    return nq.quantize_fp8_weight(w, per_row=True)


@pytest.mark.parametrize("variant", sorted(cutlass.VARIANTS), ids=TILE_IDS)
@pytest.mark.parametrize("n,k", [(200, 384), (4096, 4096), (264, 1024), (1000, 14336)])
def test_op_matches_cpu_op_and_exact_product(variant, n, k):
    q, s = _weights(n, k)
    gen = torch.Generator().manual_seed(n + k)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    for m, lead, with_bias in ((1, (), False), (7, (), True), (129, (), False), (300, (3,), True), (1000, (), True)):
        x = torch.randn(*lead, m, k, generator=gen).to(torch.bfloat16)
        b = bias if with_bias else None
        ref = torch.ops.fxquant.float8_weight_only_linear(x, q, s, b)
        # what the kernel computes: the exact e4m3 product, scaled per row in float32
        exact = (x.double() @ q.double().t()) * s.double() + (b.double() if b is not None else 0)
        xc, qc, sc, bc = x.cuda(), q.cuda(), s.cuda(), (b.cuda() if b is not None else None)
        assert cutlass.fits("fp8_wo", xc, qc, sc, bc, 0, *variant)
        got = cutlass.linear("fp8_wo", xc, qc, sc, bc, 0, *variant)
        assert got.shape == ref.shape and got.dtype == torch.bfloat16
        assert _rel(got.cpu(), ref) <= 1e-2, (m, lead)
        assert _rel(got.cpu(), exact) <= 2e-3, (m, lead)  # bf16 output rounding (~1.7e-3) and fp32 sums only


def test_subnormal_weights_convert_exactly():
    # One weight row of e4m3 subnormals (2^-9 .. 7 * 2^-9) and x of ones: each output is its row's
    # sum times the scale, exactly representable in bf16.
    k = 256
    q = torch.zeros(8, k, dtype=torch.float8_e4m3fn)
    q[0] = torch.tensor([(i % 7 + 1) * 2.0 ** -9 for i in range(k)]).to(torch.float8_e4m3fn)
    q[1] = (-q[0].float()).to(torch.float8_e4m3fn)
    s = torch.ones(8)
    x = torch.ones(128, k, dtype=torch.bfloat16)
    got = cutlass.linear("fp8_wo", x.cuda(), q.cuda(), s.cuda(), None, 0, 128, 128)
    want = q.float().sum(1)
    assert want[0] > 0 and want[1] == -want[0]
    assert torch.equal(got.cpu().float(), want.to(torch.bfloat16).float().expand(128, 8))


@pytest.mark.parametrize("variant", sorted(cutlass.VARIANTS), ids=TILE_IDS)
def test_float32_scale_and_bias_are_applied_to_the_exact_product(variant):
    # Small integers (exact in e4m3) make the product exact in float32, and so is acc * s for the
    # float32 s = 1 + 2^-10: the epilogue's acc * s + b rounds once, to exactly (acc * s + b).to(bf16).
    # A scale rounded to bf16 (1.0) or a weight scaled before the product would not.
    g = torch.Generator().manual_seed(1)
    n, k, m = 256, 256, 300
    q = torch.randint(-8, 9, (n, k), generator=g).float().to(torch.float8_e4m3fn)
    x = torch.randint(-2, 3, (m, k), generator=g).to(torch.bfloat16)
    s = torch.full((n,), 1 + 2.0 ** -10)
    b = torch.randint(-64, 65, (n,), generator=g).to(torch.bfloat16)
    acc = x.double() @ q.double().t()
    want = (acc * s.double() + b.double()).to(torch.bfloat16)
    got = cutlass.linear("fp8_wo", x.cuda(), q.cuda(), s.cuda(), b.cuda(), 0, *variant)
    assert torch.equal(got.cpu(), want)


def test_unknown_variant_is_an_error_naming_the_status():
    q, s = _weights(256, 512)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="CUTLASS status 1"):
        torch.ops.fxquant.cutlass_float8_weight_only_linear(x, q.cuda(), s.cuda(), None, 15)
    with pytest.raises(RuntimeError, match="bad scales"):  # per-tensor scale: the op guards direct calls
        torch.ops.fxquant.cutlass_float8_weight_only_linear(x, q.cuda(), s[:1].cuda(), None, 1)


def test_dispatcher_runs_a_cutlass_entry_and_falls_back():
    calls = []
    real = cutlass.linear

    def spy(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)
    q, s = _weights(4096, 4096)
    qc, sc = q.cuda(), s.cuda()
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ nq.dequantize_fp8_weight(qc, sc, torch.bfloat16).float().t()
    cfg = D.KernelConfig("cutlass", bn=128, bk=64, bm=256, warps=0)
    assert cfg in D.candidate_configs("fp8_wo", 512, 0)
    cutlass.linear, saved = spy, cutlass.linear
    try:
        got = D.linear("fp8_wo", x, qc, sc, None, 0, cfg)
        assert calls == ["fp8_wo"] and _rel(got, ref) <= 1e-2
        # fp16 activations: the CUTLASS GEMM cannot take them; a Triton kernel runs instead
        goth = D.linear("fp8_wo", x.half(), qc, sc, None, 0, cfg)
        assert calls == ["fp8_wo"] and goth.dtype == torch.float16 and _rel(goth, ref) <= 1e-2
    finally:
        cutlass.linear = saved


def test_cuda_graph_replay():
    q, s = _weights(1024, 2048)
    qc, sc = q.cuda(), s.cuda()
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    eager = cutlass.linear("fp8_wo", x, qc, sc, b, 0, 128, 256, 0)
    g = torch.cuda.CUDAGraph()
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        cutlass.linear("fp8_wo", x, qc, sc, b, 0, 128, 256, 0)  # warm-up outside the capture
        with torch.cuda.graph(g, stream=st):
            out = cutlass.linear("fp8_wo", x, qc, sc, b, 0, 128, 256, 0)
    torch.cuda.current_stream().wait_stream(st)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert _rel(out, cutlass.linear("fp8_wo", x, qc, sc, b, 0, 128, 256, 0)) == 0.0
    assert _rel(out, eager) > 0.1  # it computed on the new x
