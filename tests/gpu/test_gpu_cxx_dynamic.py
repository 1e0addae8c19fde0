"""The C++ dynamic-activation kernels (lowering/cuda/csrc/dynamic_mma.cu: int8 and e4m3 on 8-bit
tensor cores) against the Python CPU ops on the same inputs.

int8: the kernel quantizes x with the CPU's arithmetic (IEEE division, round half to even) and
sums exactly in int32, then scales in the CPU's order: the outputs must be bit-identical.
e4m3: the quantized x is bit-identical too, but float32 sums run in another order: relative
Frobenius error <= 1e-2 (bf16) / 2e-3 (fp16), as tests/gpu/test_gpu_kernels.py.
M from 0 to 33: the kernel quantizes x itself up to M = 4 (plain ops), the prequant ops take
1..32 tokens in 8-token tiles; the rest, float32 x, K % 64 != 0, take the ATen path.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from pdl_helpers import late_copy  # noqa: E402

import fxquant.lowering  # noqa: E402,F401
from fxquant import numerics as nq  # noqa: E402
from fxquant.lowering import cuda as cxx  # noqa: E402
from fxquant.lowering.triton import dispatch as D  # noqa: E402

OPS = torch.ops.fxquant
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
FP8_OK = torch.cuda.get_device_capability() >= (8, 9)
SCHEMES = ["int8", "fp8_row", "fp8_tensor"]


@pytest.fixture(scope="module", autouse=True)
def library():
    return cxx.load(verbose=False)


def _weights(scheme, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    if scheme == "int8":
        q, s = nq.quantize_int8_weight_for_dynamic(w)
    else:
        q, s = nq.quantize_fp8_weight(w, per_row=scheme == "fp8_row")
    return q, s, g


def _plain(scheme, x, q, s, b):
    if scheme == "int8":
        return OPS.cxx_int8_dynamic_linear(x, q, s, b), OPS.int8_dynamic_linear(x.cpu(), q.cpu(), s.cpu(), _cpu(b))
    per_row = scheme == "fp8_row"
    return (OPS.cxx_float8_dynamic_linear(x, q, s, b, per_row),
            OPS.float8_dynamic_linear(x.cpu(), q.cpu(), s.cpu(), _cpu(b), per_row))


def _cpu(t):
    return None if t is None else t.cpu()


def _check(out, ref, exact, dtype, what):
    assert out.is_cuda and out.shape == ref.shape and out.dtype == ref.dtype, what
    if ref.numel() == 0:
        return
    out = out.cpu()
    assert torch.isfinite(out.float()).all(), what
    if exact:
        bad = (out != ref).sum().item()
        assert bad == 0, f"{what}: {bad} of {ref.numel()} elements differ from the CPU op"
        return
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err <= TOL[dtype], f"{what}: rel err {err:.2e} > {TOL[dtype]}"


SHAPES = [(4096, 4096), (100, 256), (40, 2304), (24, 512), (8, 640), (64, 14336)]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_op_matches_cpu(scheme, n, k, dtype):
    if scheme != "int8" and not FP8_OK:
        pytest.skip("e4m3 needs sm_89+")
    q, s, g = _weights(scheme, n, k, n * 7 + k)
    q, s = q.cuda(), s.cuda()
    for m in (0, 1, 2, 3, 4, 5, 9):
        x = (torch.randn(m, k, generator=g) * 2).to(dtype).cuda()
        for b in (None, torch.randn(n, generator=g).to(dtype).cuda()):
            out, ref = _plain(scheme, x, q, s, b)
            _check(out, ref, scheme == "int8", dtype, f"{scheme} {n}x{k} M={m} bias={b is not None} {dtype}")


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n,k", [(4096, 4096), (100, 256), (40, 2304), (8, 640)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_prequant_op_matches_cpu(fp8, n, k, out_dtype):
    if fp8 and not FP8_OK:
        pytest.skip("e4m3 needs sm_89+")
    q, s, g = _weights("fp8_row" if fp8 else "int8", n, k, n + k)
    q, s = q.cuda(), s.cuda()
    name = ("float8" if fp8 else "int8") + "_dynamic_linear_prequant"
    for m in (1, 2, 7, 8, 9, 16, 17, 31, 32, 33):
        x = torch.randn(m, k, generator=g) * 2
        xq, xs = nq.quantize_fp8(x, True) if fp8 else nq.quantize_int8_per_token(x)
        for b in (None, torch.randn(n, generator=g).bfloat16().cuda()):
            out = getattr(OPS, "cxx_" + name)(xq.cuda(), xs.cuda(), q, s, b, out_dtype)
            ref = getattr(OPS, name)(xq, xs, q.cpu(), s.cpu(), _cpu(b), out_dtype)
            _check(out, ref, not fp8, out_dtype, f"{name} {n}x{k} M={m} bias={b is not None} {out_dtype}")


def test_per_tensor_scale_spans_all_tokens():
    """fp8 per tensor: one activation scale over every token (a per-row mix-up shows at M >= 2)."""
    if not FP8_OK:
        pytest.skip("e4m3 needs sm_89+")
    q, s, g = _weights("fp8_tensor", 256, 512, 3)
    x = torch.randn(3, 512, generator=g)
    x[1] *= 100  # token 1 sets the scale of all three
    x = x.bfloat16().cuda()
    out, ref = _plain("fp8_tensor", x, q.cuda(), s.cuda(), None)
    _check(out, ref, False, torch.bfloat16, "per tensor")
    row = OPS.cxx_float8_dynamic_linear(x, q.cuda(), s.cuda(), None, True).cpu()
    assert not torch.equal(row, out.cpu())  # per-row quantization differs here


def test_3d_noncontiguous_and_fallbacks():
    q, s, g = _weights("int8", 96, 256, 5)
    q, s = q.cuda(), s.cuda()
    x = torch.randn(2, 256, 2, generator=g).bfloat16().cuda().transpose(1, 2)  # [2, 2, 256], stride 1 != 1
    out, ref = _plain("int8", x, q, s, None)
    assert out.shape == (2, 2, 96)
    _check(out, ref, True, torch.bfloat16, "3-D non-contiguous")
    xf = torch.randn(3, 256, generator=g).cuda()  # float32 x: the ATen path
    out, ref = _plain("int8", xf, q, s, None)
    assert torch.equal(out.cpu(), ref)
    q2, s2, _ = _weights("int8", 96, 224, 6)  # K % 64 != 0: the ATen path
    x2 = torch.randn(2, 224, generator=g).bfloat16().cuda()
    out, ref = _plain("int8", x2, q2.cuda(), s2.cuda(), None)
    _check(out, ref, True, torch.bfloat16, "K = 224")


def _kernel_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("scheme", ["int8_dyn", "fp8_dyn_row", "fp8_dyn_tensor"])
def test_dispatch_cxx_kind_runs_the_mma_kernel(scheme):
    """kind "cxx": M <= CXX_QUANT_MAX_M[scheme] one launch of the kernel quantizing x itself; beyond, our Triton
    quantization, then the prequant kernel; matching D.reference_linear."""
    if scheme != "int8_dyn" and not FP8_OK:
        pytest.skip("e4m3 needs sm_89+")
    n, k = 512, 1024
    q, s, g = _weights({"int8_dyn": "int8", "fp8_dyn_row": "fp8_row", "fp8_dyn_tensor": "fp8_tensor"}[scheme], n, k, 9)
    q, s = q.cuda(), s.cuda()
    b = torch.randn(n, generator=g).bfloat16().cuda()
    cfg = D.KernelConfig("cxx", bn=0, bk=0)
    for m in (1, 4, 5, 32):
        x = torch.randn(m, k, generator=g).bfloat16().cuda()
        assert D.cxx_fits(scheme, x, q, s, b, 0)
        out = D.linear(scheme, x, q, s, b, 0, cfg)
        ref = D.reference_linear(scheme, x, q, s, b, 0)
        err = float((out.float() - ref).norm() / ref.norm())
        assert err <= 1e-2, f"{scheme} M={m}: {err:.2e}"
        names = _kernel_names(lambda: D.linear(scheme, x, q, s, b, 0, cfg))
        mma = [nm for nm in names if "dynamic_mma_kernel" in nm]
        assert len(mma) == 1, names
        assert (len(names) == 1) == (m <= D.CXX_QUANT_MAX_M[scheme]), names  # the quantization: in the kernel, or before


def test_prequant_dispatch_takes_a_cxx_entry(monkeypatch):
    """linear_prequant (activations quantized by the norm / SwiGLU) runs the prequant kernel for a
    "cxx" table entry, and the entry's fallback where the kernel does not fit (float32 output)."""
    q, s, g = _weights("int8", 256, 512, 11)
    q, s = q.cuda(), s.cuda()
    xq, xs = nq.quantize_int8_per_token(torch.randn(6, 512, generator=g))
    xq, xs = xq.cuda(), xs.cuda()
    real = D.get_config

    def fake(scheme, m, n, k, group, dtype, device, allow_cxx=True, **kw):
        if allow_cxx:
            return D.KernelConfig("cxx", bn=0, bk=0)
        return real(scheme, m, n, k, group, dtype, device, allow_cxx=False, **kw)
    monkeypatch.setattr(D, "get_config", fake)
    names = _kernel_names(lambda: D.linear_prequant("int8_dyn", xq, xs, q, s, None, torch.bfloat16))
    assert any("dynamic_mma_kernel" in nm for nm in names), names
    out = D.linear_prequant("int8_dyn", xq, xs, q, s, None, torch.bfloat16)
    ref = OPS.int8_dynamic_linear_prequant(xq.cpu(), xs.cpu(), q.cpu(), s.cpu(), None, torch.bfloat16)
    assert torch.equal(out.cpu(), ref)
    names = _kernel_names(lambda: D.linear_prequant("int8_dyn", xq, xs, q, s, None, torch.float32))
    assert not any("dynamic_mma_kernel" in nm for nm in names), names


def test_cuda_graph_replay():
    q, s, g = _weights("int8", 1024, 2048, 13)
    q, s = q.cuda(), s.cuda()
    xs = [torch.randn(m, 2048, generator=g).bfloat16().cuda() for m in (1, 3)]
    eager = [OPS.cxx_int8_dynamic_linear(x, q, s, None) for x in xs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        [OPS.cxx_int8_dynamic_linear(x, q, s, None) for x in xs]
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [OPS.cxx_int8_dynamic_linear(x, q, s, None) for x in xs]
    graph.replay()
    torch.cuda.synchronize()
    for o, e in zip(outs, eager):
        assert torch.equal(o, e)


def test_device_mismatch_is_a_clear_error():
    """Run in a child process: on the GPU machine a crash inside an extension's error path once
    killed the process (BENCHMARKS.md S11); this must raise, naming the tensor and devices."""
    code = ("import torch, fxquant.lowering\n"
            "from fxquant.lowering import cuda as c; c.load()\n"
            "q = torch.zeros(16, 128, dtype=torch.int8, device='cuda')\n"
            "try:\n"
            "    torch.ops.fxquant.cxx_int8_dynamic_linear(torch.zeros(2, 128, device='cuda').bfloat16(), q,"
            " torch.ones(16), None)\n"
            "except RuntimeError as e:\n"
            "    print('RAISED', str(e).splitlines()[0])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "RAISED fxquant.cxx_int8_dynamic_linear: w_scales is on cpu but x is on cuda:0" in r.stdout, r.stdout


@pytest.mark.parametrize("scheme", ["int8_dyn", "fp8_dyn_row", "fp8_dyn_tensor"])
def test_programmatic_dependent_launch_gives_the_same_bits(scheme, monkeypatch):
    """By default (sm_90+) the prequant kernel starts while our quantization runs and waits before
    reading x; its outputs are bitwise those with FXQUANT_PDL=0, eager and in a CUDA graph."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90+")
    if scheme != "int8_dyn" and not FP8_OK:
        pytest.skip("e4m3 needs sm_89+")
    n, k = 4096, 4096  # enough blocks that some start before the quantization ends
    q, s, g = _weights({"int8_dyn": "int8", "fp8_dyn_row": "fp8_row", "fp8_dyn_tensor": "fp8_tensor"}[scheme], n, k, 21)
    q, s = q.cuda(), s.cuda()
    cfg = D.KernelConfig("cxx", bn=0, bk=0)
    xs = [torch.randn(m, k, generator=g).bfloat16().cuda() * 4 for m in (5, 16, 32)]
    assert all(D.cxx_fits(scheme, x, q, s, None, 0) and x.shape[0] > D._cxx_quant_max_m(scheme) for x in xs)
    monkeypatch.setenv("FXQUANT_PDL", "0")
    assert not D._cxx_pdl(xs[0])
    plain = [D.linear(scheme, x, q, s, None, 0, cfg) for x in xs]
    monkeypatch.delenv("FXQUANT_PDL")
    assert D._cxx_pdl(xs[0])
    for _ in range(3):  # a race would show as a difference on some repetition
        for x, want in zip(xs, plain):
            assert torch.equal(D.linear(scheme, x, q, s, None, 0, cfg), want)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        [D.linear(scheme, x, q, s, None, 0, cfg) for x in xs]
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [D.linear(scheme, x, q, s, None, 0, cfg) for x in xs]
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for o, want in zip(outs, plain):
            assert torch.equal(o, want)


@pytest.mark.parametrize("fp8", [False, True])
def test_programmatic_dependent_launch_waits_for_the_kernel_before(fp8):
    """A kernel right before the PDL-launched prequant kernel triggers it first and writes xq and its
    scales only ~50 us later: without its griddepcontrol.wait the prequant kernel would read the
    zeros that were there; with it, the outputs equal those of a plain launch on the data."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90+")
    if fp8 and not FP8_OK:
        pytest.skip("e4m3 needs sm_89+")
    m, n, k = 16, 4096, 4096
    q, s, g = _weights("fp8_row" if fp8 else "int8", n, k, 23)
    q, s = q.cuda(), s.cuda()
    x = torch.randn(m, k, generator=g) * 3
    xq, xs = nq.quantize_fp8(x, True) if fp8 else nq.quantize_int8_per_token(x)
    src = torch.zeros(m * k + 4096, dtype=torch.uint8)  # xq's bytes, then the scales' at a 16-byte offset
    src[: m * k] = xq.view(torch.uint8).reshape(-1)
    src[m * k: m * k + 4 * m] = xs.reshape(-1).view(torch.uint8)
    src = src.cuda()
    op = OPS.cxx_float8_dynamic_linear_prequant if fp8 else OPS.cxx_int8_dynamic_linear_prequant
    views = lambda buf: (buf[: m * k].view(xq.dtype).view(m, k), buf[m * k: m * k + 4 * m].view(torch.float32).view(m, 1))
    want = op(*views(src), q, s, None, torch.bfloat16)
    sink = torch.empty(1024, device="cuda")
    for _ in range(3):
        dst = torch.zeros_like(src)
        torch.cuda.synchronize()
        late_copy(src, dst, sink)
        got = op(*views(dst), q, s, None, torch.bfloat16, True)  # launched right behind it, with PDL
        torch.cuda.synchronize()
        assert torch.equal(got, want)
