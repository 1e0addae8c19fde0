"""CUDA kernels of every fxquant op against the CPU reference op on the same inputs.

Awkward shapes: N and K not multiples of 64/128, K == group size, M from 0 to 4097, 3-D and
non-contiguous x, bf16 and fp16 (fp32 on a few). Tolerance: relative Frobenius error
<= 1e-2 (bf16), 2e-3 (fp16), 1e-4 (fp32; 5e-4 for fp8 dynamic, whose fp8 MMA accumulates
below fp32 precision), as in tests/test_triton_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import fxquant.lowering  # noqa: E402,F401
from fxquant import numerics as nq  # noqa: E402

FP8_OK = torch.cuda.get_device_capability() >= (8, 9)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
# fp8 tensor-core products are exact but Hopper's fp8 MMA accumulates with less than fp32
# precision (measured 1.0e-4 - 1.3e-4 relative on K=96 in fp32 output).
FP8_MMA_FP32_TOL = 5e-4
OPS = torch.ops.fxquant


def pack(scheme, w, group=128, symmetric=False):
    if scheme == "int8_wo":
        q, s = nq.quantize_int8_per_channel(w)
        return (q, s), lambda x, b: OPS.int8_weight_only_linear(x, q, s, b)
    if scheme == "int4_wo":
        q, sz = nq.quantize_int4_groupwise(w, group, symmetric)
        p = nq.pack_int4(q)
        return (p, sz), lambda x, b: OPS.int4_weight_only_linear(x, p, sz, b, group)
    if scheme == "int8_dyn":
        q, s = nq.quantize_int8_weight_for_dynamic(w)
        return (q, s), lambda x, b: OPS.int8_dynamic_linear(x, q, s, b)
    if scheme in ("fp8_dyn_row", "fp8_dyn_tensor"):
        q, s = nq.quantize_fp8_weight(w, per_row=scheme == "fp8_dyn_row")
        pr = scheme == "fp8_dyn_row"
        return (q, s), lambda x, b: OPS.float8_dynamic_linear(x, q, s, b, pr)
    q, s = nq.quantize_fp8_weight(w, per_row=True)
    return (q, s), lambda x, b: OPS.float8_weight_only_linear(x, q, s, b)


def run_both(scheme, x, w, bias, group=128, symmetric=False):
    """(CUDA op output, CPU reference op output) on the same inputs. For M == 0 the reference is
    an empty tensor (numerics.quantize_fp8's per-tensor amax fails on empty input on the CPU)."""
    packed, cpu_fn = pack(scheme, w.cpu(), group, symmetric)
    out = _call(scheme, x, tuple(t.cuda() for t in packed), bias, group)
    if x.numel() == 0:
        return out, torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype)
    ref = cpu_fn(x.cpu(), None if bias is None else bias.cpu())
    return out, ref


def _call(scheme, x, packed, bias, group):
    q, s = packed
    if scheme == "int8_wo":
        return OPS.int8_weight_only_linear(x, q, s, bias)
    if scheme == "int4_wo":
        return OPS.int4_weight_only_linear(x, q, s, bias, group)
    if scheme == "int8_dyn":
        return OPS.int8_dynamic_linear(x, q, s, bias)
    if scheme == "fp8_dyn_row":
        return OPS.float8_dynamic_linear(x, q, s, bias, True)
    if scheme == "fp8_dyn_tensor":
        return OPS.float8_dynamic_linear(x, q, s, bias, False)
    return OPS.float8_weight_only_linear(x, q, s, bias)


def assert_close(out, ref, dtype, what):
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    assert out.is_cuda, what
    out = out.cpu()
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    den = ref.double().norm()
    err = float((out.double() - ref.double()).norm() / den) if den > 0 else float(out.abs().max())
    tol = TOL[dtype]
    if dtype == torch.float32 and "fp8_dyn" in what:
        tol = FP8_MMA_FP32_TOL
    assert err <= tol, f"{what}: rel err {err:.2e} > {tol:.0e}"


SCHEMES = ["int8_wo", "int4_wo", "fp8_wo", "int8_dyn", "fp8_dyn_row", "fp8_dyn_tensor"]
SHAPES = [(72, 96), (200, 320), (136, 4224)]  # (N, K): not multiples of 64/128 (4224 = 33*128)
MS = [0, 1, 2, 5, 16, 33, 100, 257, 1000, 4097]  # one per kernel family / M-bucket region


def _skip_fp8(scheme):
    if "fp8" in scheme and not FP8_OK:
        pytest.skip("fp8 needs sm_89+")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N,K", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_m(scheme, N, K, dtype):
    _skip_fp8(scheme)
    torch.manual_seed(N * K)
    group = 32 if K % 128 else 128
    w = torch.randn(N, K, dtype=dtype, device="cuda")
    bias = torch.randn(N, dtype=dtype, device="cuda")
    for M in MS:
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        b = bias if M % 2 else None
        out, ref = run_both(scheme, x, w, b, group)
        assert_close(out, ref, dtype, f"{scheme} M={M} N={N} K={K} {dtype} bias={b is not None}")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_3d_and_noncontiguous(scheme):
    _skip_fp8(scheme)
    torch.manual_seed(1)
    N, K = 200, 320
    w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
    x3 = torch.randn(3, 7, K, dtype=torch.bfloat16, device="cuda")
    out, ref = run_both(scheme, x3, w, None, 32)
    assert_close(out, ref, torch.bfloat16, f"{scheme} 3-D")
    for M in (1, 5, 300):
        xt = torch.randn(K, M, dtype=torch.bfloat16, device="cuda").t()  # stride_k != 1
        out, ref = run_both(scheme, xt, w, None, 32)
        assert_close(out, ref, torch.bfloat16, f"{scheme} transposed M={M}")
        xs = torch.randn(M, 2 * K, dtype=torch.bfloat16, device="cuda")[:, ::2]  # strided columns
        out, ref = run_both(scheme, xs, w, None, 32)
        assert_close(out, ref, torch.bfloat16, f"{scheme} strided M={M}")


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_groups_k_equals_group(group, symmetric):
    torch.manual_seed(group)
    for K in (group, 3 * group):
        w = torch.randn(104, K, dtype=torch.bfloat16, device="cuda")
        for M in (1, 4, 16, 200):
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            out, ref = run_both("int4_wo", x, w, None, group, symmetric)
            assert_close(out, ref, torch.bfloat16, f"int4 g{group} sym={symmetric} K={K} M={M}")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fp32_activations(scheme):
    _skip_fp8(scheme)
    torch.manual_seed(3)
    w = torch.randn(72, 96, device="cuda")
    for M in (1, 7, 130):
        x = torch.randn(M, 96, device="cuda")
        out, ref = run_both(scheme, x, w, torch.randn(72, device="cuda"), 32)
        assert_close(out, ref, torch.float32, f"{scheme} fp32 M={M}")


def test_compile_dynamic_m_no_recompile():
    """One compiled graph serves every M: the per-M choice is made inside the launcher."""
    torch.manual_seed(4)
    N, K = 256, 512
    w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
    (p, sz), _ = pack("int4_wo", w.cpu(), 128)
    p, sz = p.cuda(), sz.cuda()

    def f(x):
        return torch.ops.fxquant.int4_weight_only_linear(x, p, sz, None, 128).relu()

    cf = torch.compile(f, dynamic=True, fullgraph=True)
    x0 = torch.randn(3, K, dtype=torch.bfloat16, device="cuda")
    cf(x0)
    # (M == 1 is left out: torch itself specializes sizes 0 and 1 of dynamic dims.)
    with torch.compiler.set_stance("fail_on_recompile"):
        for M in (2, 16, 100, 2000):
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            torch.testing.assert_close(cf(x), f(x), rtol=0, atol=0)


def test_cuda_graph_capture():
    torch.manual_seed(5)
    w = torch.randn(256, 512, dtype=torch.bfloat16, device="cuda")
    for scheme in SCHEMES if FP8_OK else ["int8_wo", "int4_wo", "int8_dyn"]:
        packed, _ = pack(scheme, w.cpu(), 128)
        packed = tuple(t.cuda() for t in packed)
        for M in (1, 8, 64, 300):
            x = torch.randn(M, 512, dtype=torch.bfloat16, device="cuda")
            eager = _call(scheme, x, packed, None, 128)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                _call(scheme, x, packed, None, 128)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = _call(scheme, x, packed, None, 128)
            g.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(out, eager, rtol=0, atol=0, msg=f"{scheme} M={M}")


def test_fp8_error_below_sm89(monkeypatch):
    from fxquant.lowering.triton import dispatch as D
    dev = torch.device("cuda", torch.cuda.current_device())
    key, sms, _ = D._device_info(dev)
    monkeypatch.setitem(D._DEV_CACHE, dev.index, (key, sms, (8, 0)))
    w = torch.randn(64, 64, device="cuda")
    q, s = nq.quantize_fp8_weight(w)
    with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
        OPS.float8_weight_only_linear(torch.randn(2, 64, device="cuda"), q, s, None)


@pytest.mark.parametrize("rows", ["0", "64", "128"])
@pytest.mark.parametrize("scheme", ["int8_wo", "int4_wo", "fp8_wo"])
def test_dequant_then_cublas_in_row_chunks(scheme, rows, monkeypatch):
    """Kind "deq" (dequantize, then cuBLAS into out's column slice) in one pass and in row chunks
    with a short last one, with and without bias, against the CPU reference."""
    _skip_fp8(scheme)
    from fxquant.lowering.triton import dispatch as D
    monkeypatch.setenv("FXQUANT_DEQ_ROWS", rows)
    torch.manual_seed(int(rows) + 7)
    N, K = 200, 320
    w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(N, dtype=torch.bfloat16, device="cuda")
    packed, cpu_fn = pack(scheme, w.cpu(), 32)
    q, s = (t.cuda() for t in packed)
    cfg = D.KernelConfig("deq", bn=64, bk=128, warps=4)
    chunks = []
    real = D._dequantize_into
    monkeypatch.setattr(D, "_dequantize_into", lambda *a, **k: chunks.append(k["rows"]) or real(*a, **k))
    for M in (1, 33, 300):
        x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
        for b in (None, bias):
            out = D.linear(scheme, x, q, s, b, 32 if scheme == "int4_wo" else 0, cfg)
            ref = cpu_fn(x.cpu(), None if b is None else b.cpu())
            assert_close(out, ref, torch.bfloat16, f"{scheme} deq rows={rows} M={M} bias={b is not None}")
    assert set(chunks) == ({200} if rows == "0" else {int(rows), 200 % int(rows)})  # the chunks it ran
