"""The CUDA C++ kernels (lowering/cuda/csrc/gemv.cu) against the CPU reference op on the GPU.

Builds the library for this GPU (first run: about a minute; cached). Awkward shapes: N not a
multiple of the block's rows, K == group size, K not a multiple of 512, M from 0 to 33 (int8 above 16,
int4 above 32 or with K % 128 != 0 above 16, and float32 x take the dequantize + cuBLAS path), 3-D and
non-contiguous x, bias dtypes; every (row tiles, warps) shape of the int4 tensor-core kernel (FXQUANT_CXX_INT4_VARIANT).
Tolerance as tests/gpu/test_gpu_kernels.py: relative Frobenius error <= 1e-2 (bf16), 2e-3 (fp16).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import fxquant.lowering  # noqa: E402,F401
from fxquant import numerics as nq  # noqa: E402
from fxquant.lowering import cuda as cxx  # noqa: E402
from fxquant.lowering.triton import dispatch as D  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
OPS = torch.ops.fxquant


@pytest.fixture(scope="module", autouse=True)
def library():
    return cxx.load(verbose=False)  # a build failure fails every test here, with the compiler's words


def _pack(scheme, w, group):
    if scheme == "int4_wo":
        q, sz = nq.quantize_int4_groupwise(w, group)
        return (nq.pack_int4(q), sz), (group,)
    q, s = nq.quantize_int8_per_channel(w)
    return (q, s), ()


def _op(scheme, x, packed, bias, static):
    if scheme == "int4_wo":
        return OPS.cxx_int4_weight_only_linear(x, *packed, bias, *static)
    return OPS.cxx_int8_weight_only_linear(x, *packed, bias)


def _reference(scheme, x, packed, bias, static):
    """The Python CPU op (lowering/cpu.py) on the same inputs, in x's dtype."""
    p = tuple(t.cpu() for t in packed)
    b = None if bias is None else bias.cpu()
    if scheme == "int4_wo":
        return OPS.int4_weight_only_linear(x.cpu(), *p, b, *static)
    return OPS.int8_weight_only_linear(x.cpu(), *p, b)


def _check(out, ref, dtype, what):
    assert out.is_cuda and out.shape == ref.shape and out.dtype == ref.dtype, what
    if ref.numel() == 0:
        return
    out = out.cpu().double()
    err = float((out - ref.double()).norm() / ref.double().norm())
    assert torch.isfinite(out).all() and err <= TOL[dtype], f"{what}: rel err {err:.2e} > {TOL[dtype]}"


SHAPES = [(4096, 4096, 128), (100, 256, 128), (37, 128, 128), (24, 512, 32), (40, 2304, 256), (8, 544, 32)]


@pytest.mark.parametrize("scheme", ["int4_wo", "int8_wo"])
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_reference(scheme, n, k, group, dtype):
    g = torch.Generator().manual_seed(n * 7 + k)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    packed, static = _pack(scheme, w, group)
    packed = tuple(t.cuda() for t in packed)
    for m in (0, 1, 2, 3, 4, 5, 8, 13, 16, 17, 24, 32, 33):
        x = torch.randn(m, k, generator=g).to(dtype).cuda()
        for bias in (None, torch.randn(n, generator=g).to(dtype).cuda()):
            out = _op(scheme, x, packed, bias, static)
            _check(out, _reference(scheme, x, packed, bias, static), dtype,
                   f"{scheme} {n}x{k} g{group} M={m} bias={bias is not None}")


@pytest.mark.parametrize("scheme", ["int4_wo", "int8_wo"])
def test_gemv_3d_noncontiguous_and_float32(scheme):
    g = torch.Generator().manual_seed(1)
    n, k = 72, 384
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    packed, static = _pack(scheme, w, 128)
    packed = tuple(t.cuda() for t in packed)
    base = torch.randn(2, 3, 2 * k, generator=g).bfloat16().cuda()
    for x in (base[..., :k], base[..., 1:k + 1], base[:, :, ::2]):  # strided rows, misaligned, K stride 2
        _check(_op(scheme, x, packed, None, static), _reference(scheme, x, packed, None, static),
               torch.bfloat16, f"{scheme} x strides {x.stride()}")
    b32 = torch.randn(n, generator=g).cuda()  # a float32 bias on bf16 x: added in x's dtype
    x = base[0, :2, :k]
    _check(_op(scheme, x, packed, b32, static), _reference(scheme, x, packed, b32, static),
           torch.bfloat16, f"{scheme} float32 bias")
    w32 = torch.randn(n, k, generator=g) / k ** 0.5
    p32, s32 = _pack(scheme, w32, 128)
    p32 = tuple(t.cuda() for t in p32)
    x32 = torch.randn(3, k, generator=g).cuda()
    _check(_op(scheme, x32, p32, None, s32), _reference(scheme, x32, p32, None, s32), torch.float32,
           f"{scheme} float32 x (dequantize path)")


def test_dispatch_takes_the_cxx_kernel_and_falls_back_above_its_m():
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(256, 512, generator=g) / 512 ** 0.5).bfloat16()
    (p, sz), static = _pack("int4_wo", w, 128)
    p, sz = p.cuda(), sz.cuda()
    cfg = D.KernelConfig("cxx", bn=0, bk=0)
    for m in (1, 16, 17, 32, 33, 64):
        x = torch.randn(m, 512, generator=g).bfloat16().cuda()
        out = D.linear("int4_wo", x, p, sz, None, 128, cfg)
        _check(out, _reference("int4_wo", x, (p, sz), None, static), torch.bfloat16, f"dispatch M={m}")
    x = torch.randn(16, 512, generator=g).bfloat16().cuda()
    assert D.cxx_fits("int4_wo", x, p, sz, None, 128)
    assert not D.cxx_fits("int4_wo", x.float(), p, sz, None, 128)  # float32 x: Triton, not the slow fallback
    assert not D.cxx_fits("int4_wo", x, p, sz.float(), None, 128)
    assert not D.cxx_fits("int8_dyn", x, p, sz, None, 0)
    assert not D.cxx_fits("int4_wo", x, p, sz, torch.zeros(256, dtype=torch.bfloat16), 128)  # bias on the CPU
    x32 = torch.randn(1, 512, generator=g).cuda()
    out = D.linear("int4_wo", x32, p, sz, None, 128, cfg)  # cfg "cxx" but x float32: Triton GEMV
    _check(out, _reference("int4_wo", x32, (p, sz), None, static), torch.float32, "cxx cfg, float32 x")
    assert D.KernelConfig("cxx", bn=0, bk=0) in D.candidate_configs("int4_wo", 1, 128)
    assert D.KernelConfig("cxx", bn=0, bk=0) in D.candidate_configs("int4_wo", 32, 128)
    assert all(c.kind != "cxx" for c in D.candidate_configs("int4_wo", 33, 128))
    assert all(c.kind != "cxx" for c in D.candidate_configs("int8_wo", 17, 0))
    x32 = torch.randn(32, 512, generator=g).bfloat16().cuda()
    assert D.cxx_fits("int4_wo", x32, p, sz, None, 128)
    assert not D.cxx_fits("int4_wo", torch.randn(33, 512, generator=g).bfloat16().cuda(), p, sz, None, 128)
    # the dynamic schemes' C++ kernel (dynamic_mma.cu) is a candidate within its M range
    assert D.KernelConfig("cxx", bn=0, bk=0) in D.candidate_configs("int8_dyn", 1, 0)
    assert all(c.kind != "cxx" for c in D.candidate_configs("int8_dyn", D.CXX_MAX_M["int8_dyn"] + 1, 0))


@pytest.mark.parametrize("variant", ["1,16", "2,16", "1,8", "2,8", "2,4", "2,1", "4,4", "4,8", "bogus", ""])
@pytest.mark.parametrize("n,k", [(4096, 4096), (100, 256), (40, 2304)])
def test_int4_mma_variants(variant, n, k, monkeypatch):
    """Every (row tiles, warps) shape of the tensor-core kernel gives the reference's result (4 row
    tiles: only at M <= 16, the default above); an unparsable setting keeps the default choice."""
    if torch.cuda.get_device_capability() < (8, 0) or os.environ.get("FXQUANT_CXX_INT4_MMA") == "0":
        pytest.skip("the int4 tensor-core kernel does not run here (needs sm_80+, FXQUANT_CXX_INT4_MMA not 0)")
    monkeypatch.setenv("FXQUANT_CXX_INT4_VARIANT", variant)
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    packed, static = _pack("int4_wo", w, 128)
    packed = tuple(t.cuda() for t in packed)
    for m in (1, 3, 8, 9, 16, 17, 32):
        x = torch.randn(m, k, generator=g).bfloat16().cuda()
        bias = torch.randn(n, generator=g).bfloat16().cuda()
        _check(_op("int4_wo", x, packed, bias, static), _reference("int4_wo", x, packed, bias, static),
               torch.bfloat16, f"variant {variant} {n}x{k} M={m}")


@pytest.mark.parametrize("n,k,group", [(4096, 4096, 128), (100, 384, 96), (40, 2304, 32), (72, 1024, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_mma_lean_matches_classic(n, k, group, dtype, monkeypatch):
    """The LEAN int4 tensor-core kernel (one LOP3 per pair, hoisted addresses, a group shift, rows past
    M reading row M - 1) gives the classic kernel's output bit for bit, for every M bucket (LEAN is the
    default at M <= 16, classic above) and a group that is not a power of two (the division path), and
    both match the reference."""
    if torch.cuda.get_device_capability() < (8, 0) or os.environ.get("FXQUANT_CXX_INT4_MMA") == "0":
        pytest.skip("the int4 tensor-core kernel does not run here (needs sm_80+, FXQUANT_CXX_INT4_MMA not 0)")
    g = torch.Generator().manual_seed(n + k + group)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    packed, static = _pack("int4_wo", w, group)
    packed = tuple(t.cuda() for t in packed)
    for m in (1, 3, 8, 9, 16, 17, 32):
        x = torch.randn(m, k, generator=g).to(dtype).cuda()
        bias = torch.randn(n, generator=g).to(dtype).cuda()
        monkeypatch.setenv("FXQUANT_CXX_INT4_KERNEL", "classic")
        classic = _op("int4_wo", x, packed, bias, static)
        monkeypatch.setenv("FXQUANT_CXX_INT4_KERNEL", "lean")
        lean = _op("int4_wo", x, packed, bias, static)
        assert torch.equal(lean, classic), f"{n}x{k} g{group} M={m} {dtype}: max diff {(lean - classic).abs().max()}"
        _check(lean, _reference("int4_wo", x, packed, bias, static), dtype, f"lean {n}x{k} g{group} M={m}")


def _cuda_kernels(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.parametrize("setting,mma_ms", [(None, range(2, 17)), ("1", range(1, 17)), ("0", ())])
def test_int8_mma_runs_in_its_range(setting, mma_ms, monkeypatch):
    """int8_mma.cu's tensor-core kernel serves 2 <= M <= 16 (FXQUANT_CXX_INT8_MMA=1: M = 1 too; 0: never),
    K % 64 == 0; the CUDA-core GEMV the rest of M <= 16 and K % 64 != 0. Each matches the reference."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the int8 tensor-core kernel needs sm_80+")
    if setting is None:
        monkeypatch.delenv("FXQUANT_CXX_INT8_MMA", raising=False)
    else:
        monkeypatch.setenv("FXQUANT_CXX_INT8_MMA", setting)
    g = torch.Generator().manual_seed(5)
    for n, k in ((200, 1024), (48, 320)):  # 320 % 64 != 0: the GEMV at every M
        w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
        packed, static = _pack("int8_wo", w, 0)
        packed = tuple(t.cuda() for t in packed)
        for m in (1, 2, 9, 16):
            x = torch.randn(m, k, generator=g).bfloat16().cuda()
            bias = torch.randn(n, generator=g).bfloat16().cuda()
            out = {}
            names = _cuda_kernels(lambda: out.setdefault("y", _op("int8_wo", x, packed, bias, static)))
            want = "int8_mma_kernel" if m in mma_ms and k % 64 == 0 else "gemv_kernel"
            assert any(want in name for name in names), (n, k, m, setting, names)
            _check(out["y"], _reference("int8_wo", x, packed, bias, static), torch.bfloat16, f"{n}x{k} M={m}")


@pytest.mark.parametrize("variant", ["1,16", "1,3", "2,8", "2,4", "4,4", "4,16", "bogus"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_mma_block_shapes(variant, dtype, monkeypatch):
    """Every block shape of the int8 tensor-core kernel (16, 32 or 64 rows; 64 only at 9-16 tokens, else
    the default shape) matches the reference, with N not a multiple of 64 and warps that get unequal
    numbers of K-tiles (K = 1088: 17 tiles)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the int8 tensor-core kernel needs sm_80+")
    monkeypatch.setenv("FXQUANT_CXX_INT8_VARIANT", variant)
    g = torch.Generator().manual_seed(6)
    n, k = 100, 1088
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    packed, static = _pack("int8_wo", w, 0)
    packed = tuple(t.cuda() for t in packed)
    for m in (2, 5, 8, 9, 16):
        x = torch.randn(m, k, generator=g).to(dtype).cuda()
        bias = torch.randn(n, generator=g).to(dtype).cuda()
        _check(_op("int8_wo", x, packed, bias, static), _reference("int8_wo", x, packed, bias, static), dtype,
               f"int8 variant {variant} M={m}")


def test_cuda_graph_capture():
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(512, 1024, generator=g) / 32).bfloat16()
    (q, s), _ = _pack("int8_wo", w, 0)
    q, s = q.cuda(), s.cuda()
    x = torch.randn(4, 1024, generator=g).bfloat16().cuda()
    ref = OPS.cxx_int8_weight_only_linear(x, q, s, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OPS.cxx_int8_weight_only_linear(x, q, s, None)
    x.copy_(torch.randn(4, 1024, generator=g).bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, OPS.cxx_int8_weight_only_linear(x, q, s, None))
    assert not torch.equal(out, ref)
