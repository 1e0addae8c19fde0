"""int4 in the MMA-fragment layout (Int4WeightOnly(layout="mma"), numerics.pack_int4_mma) on the GPU:
the C++ decode kernel (csrc/int4_mma_layout.cu) against the CPU reference on awkward shapes and every
block shape; the CUTLASS GEMM on that layout bitwise against the row-major CUTLASS op (same math, other
byte order); the Triton fallback kernels; the dispatcher across M; torch.compile without recompiles."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
    pytest.skip("needs a CUDA GPU with sm_80+", allow_module_level=True)

import fxquant  # noqa: E402
from fxquant import numerics as nq  # noqa: E402
from fxquant.lowering.cuda import build, cutlass  # noqa: E402
from fxquant.lowering.triton import dispatch as D  # noqa: E402

build.load()  # a failing build fails here, loudly
HOPPER = torch.cuda.get_device_capability() == (9, 0)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _weights(n, k, group, symmetric=False, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    q, sz = nq.quantize_int4_groupwise(w, group, symmetric)
    return nq.pack_int4(q), nq.pack_int4_mma(q), sz.to(dtype)


SHAPES = [(16, 64, 64), (48, 192, 64), (272, 640, 128), (4096, 4096, 128), (1024, 14336, 128), (80, 512, 256)]


@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_kernel_matches_cpu_reference(n, k, group, dtype):
    _, qm, sz = _weights(n, k, group, dtype=dtype)
    gen = torch.Generator().manual_seed(n + k)
    bias = torch.randn(n, generator=gen).to(dtype)
    for m, lead, b in ((1, (), None), (2, (), bias), (5, (), None), (8, (), bias), (9, (), None), (16, (), bias),
                       (17, (), None), (32, (), bias), (33, (), None), (3, (2,), bias),
                       (12, (2,), None)):  # M = 33: past the kernel, dequantize + cuBLAS
        x = torch.randn(*lead, m, k, generator=gen).to(dtype)
        ref = torch.ops.fxquant.int4_mma_weight_only_linear(x, qm, sz, b, group)
        got = torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x.cuda(), qm.cuda(), sz.cuda(),
                                                                 None if b is None else b.cuda(), group)
        assert got.shape == ref.shape and got.dtype == dtype
        assert _rel(got.cpu(), ref) <= 1e-2, (n, k, m, lead)


@pytest.mark.parametrize("xmode", ["global", "smem", "smem_sa"])
@pytest.mark.parametrize("variant", ["1,16,1", "1,16,2", "1,16,4", "1,8,4", "2,8,2", "2,4,4", "4,4,2", "4,2,1", "1,3,2"])
def test_every_block_shape_agrees(variant, xmode, monkeypatch):
    n, k, group = 272, 1536, 128  # 17 row blocks (a partial last block at RT 2 / 4), 24 K blocks
    _, qm, sz = _weights(n, k, group)
    x = torch.randn(32, k, device="cuda", dtype=torch.bfloat16)
    q, s = qm.cuda(), sz.cuda()
    ref = torch.ops.fxquant.int4_mma_weight_only_linear(x.cpu(), qm, sz, None, group)
    monkeypatch.setenv("FXQUANT_CXX_INT4_MMA_LAYOUT_VARIANT", variant)
    monkeypatch.setenv("FXQUANT_CXX_INT4_MMA_X", xmode)
    for m in (1, 3, 8, 11, 16, 23, 32):
        got = torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x[:m], q, s, None, group)
        assert _rel(got.cpu(), ref[:m]) <= 1e-2, (variant, m)


@pytest.mark.parametrize("n,k,group", [(272, 640, 128), (4096, 4096, 128), (1024, 14336, 128), (80, 512, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_x_through_shared_memory_gives_the_same_bits(n, k, group, dtype, monkeypatch):
    """x staged in shared memory (cp.async + ldmatrix) hands the MMAs the same pairs as the 4-byte
    global reads, in the same order: with one block shape the outputs are bitwise equal, at every M."""
    _, qm, sz = _weights(n, k, group, dtype=dtype)
    q, s = qm.cuda(), sz.cuda()
    bias = torch.randn(n, device="cuda", dtype=dtype)
    x = torch.randn(32, k, device="cuda", dtype=dtype)
    for variant in ("1,8,2", "2,4,1"):  # fixed: the launcher's own pick weighs shared memory, so may differ
        monkeypatch.setenv("FXQUANT_CXX_INT4_MMA_LAYOUT_VARIANT", variant)
        for m in (1, 2, 3, 7, 8, 9, 16, 17, 32):
            out = {}
            for mode in ("global", "smem"):
                monkeypatch.setenv("FXQUANT_CXX_INT4_MMA_X", mode)
                out[mode] = torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x[:m], q, s, bias, group)
            assert torch.equal(out["global"], out["smem"]), (n, k, m, variant)


@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_scale_after_the_mma_matches_cpu_reference(n, k, group, dtype, monkeypatch):
    """The scale and zero after the MMAs (the default at 9-16 tokens; forced here at every M): the MMAs
    on magic + q, scale and zero applied to the fp32 sums once per step; group 64 (two groups per step)
    falls back to the plain staged kernel."""
    _, qm, sz = _weights(n, k, group, dtype=dtype)
    gen = torch.Generator().manual_seed(n + k + 1)
    bias = torch.randn(n, generator=gen).to(dtype)
    monkeypatch.setenv("FXQUANT_CXX_INT4_MMA_X", "smem_sa")
    for m, b in ((1, None), (4, bias), (9, None), (16, bias), (32, None)):
        x = torch.randn(m, k, generator=gen).to(dtype)
        ref = torch.ops.fxquant.int4_mma_weight_only_linear(x, qm, sz, b, group)
        got = torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x.cuda(), qm.cuda(), sz.cuda(),
                                                                 None if b is None else b.cuda(), group)
        assert _rel(got.cpu(), ref) <= 1e-2, (n, k, m)


def test_x_rows_off_16_bytes_are_read_from_global_memory(monkeypatch):
    """cp.async copies 16-byte chunks: x rows whose stride is not a multiple of 8 elements take the
    global reads instead (the same result), also when shared memory is asked for."""
    n, k, group = 272, 640, 128
    _, qm, sz = _weights(n, k, group)
    q, s = qm.cuda(), sz.cuda()
    wide = torch.randn(5, k + 2, device="cuda", dtype=torch.bfloat16)
    x = wide[:, :k]  # row stride k + 2
    assert x.stride(0) % 8 != 0
    ref = torch.ops.fxquant.int4_mma_weight_only_linear(x.cpu(), qm, sz, None, group)
    monkeypatch.setenv("FXQUANT_CXX_INT4_MMA_X", "smem")
    got = torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x, q, s, None, group)
    assert _rel(got.cpu(), ref) <= 1e-2
    monkeypatch.setenv("FXQUANT_CXX_INT4_MMA_X", "global")
    assert torch.equal(got, torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x, q, s, None, group))


def test_decode_kernel_equals_the_row_major_kernel_closely():
    """Same dequantization arithmetic as gemv.cu's LEAN kernel; only the summation order differs."""
    qr, qm, sz = _weights(4096, 4096, 128)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    a = torch.ops.fxquant.cxx_int4_weight_only_linear(x, qr.cuda(), sz.cuda(), None, 128)
    b = torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x, qm.cuda(), sz.cuda(), None, 128)
    assert _rel(b, a) <= 2e-3


def test_bad_inputs_are_clear_errors():
    _, qm, sz = _weights(32, 128, 64)
    x = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="MMA-fragment layout needs N % 16 == 0"):
        torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x, qm[:24].cuda(), sz[:, :24].cuda(), None, 64)
    with pytest.raises(RuntimeError, match="x has K=96"):
        torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x[:, :96], qm.cuda(), sz.cuda(), None, 64)


@pytest.mark.skipif(not HOPPER, reason="the CUTLASS GEMMs need sm_90")
@pytest.mark.parametrize("variant", sorted(cutlass.VARIANTS))
@pytest.mark.parametrize("n,k,group", [(272, 640, 128), (4096, 4096, 128), (1024, 2048, 64), (96, 1024, 256)])
def test_cutlass_on_the_mma_layout_equals_the_row_major_op(variant, n, k, group):
    build.load_cutlass()
    qr, qm, sz = _weights(n, k, group)
    qr, qm, sz = qr.cuda(), qm.cuda(), sz.cuda()
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(n + k)
    for m, b in ((1, None), (130, bias), (1000, None)):
        x = torch.randn(m, k, generator=gen).to(device="cuda", dtype=torch.bfloat16)
        assert cutlass.fits("int4_mma", x, qm, sz, b, group, *variant)
        got = cutlass.linear("int4_mma", x, qm, sz, b, group, *variant)
        want = cutlass.linear("int4_wo", x, qr, sz, b, group, *variant)
        assert torch.equal(got, want), (variant, n, k, m)
        ref = torch.ops.fxquant.int4_mma_weight_only_linear(x.cpu(), qm.cpu(), sz.cpu(), None if b is None else b.cpu(), group)
        # CUTLASS rounds zero - 8 scale to bf16 (cutlass.py: 4.4e-3 on the weights): one token's 96
        # outputs drew 1.04e-2 once (S26) with an unseeded x, hence the seed and the margin
        assert _rel(got.cpu(), ref) <= 1.5e-2


@pytest.mark.parametrize("cfg", [D.KernelConfig("gemm", bm=16, bn=64, bk=128, warps=4, stages=3, split_k=0, swap=True),
                                 D.KernelConfig("gemm", bm=64, bn=128, bk=64, warps=4, stages=3),
                                 D.KernelConfig("deq", bn=64, bk=128, warps=4)], ids=["swap", "gemm", "deq"])
def test_triton_fallbacks_read_the_layout(cfg):
    _, qm, sz = _weights(272, 640, 128)
    for m in (3, 40, 300):
        x = torch.randn(m, 640, device="cuda", dtype=torch.bfloat16)
        got = D.linear("int4_mma", x, qm.cuda(), sz.cuda(), None, 128, cfg)
        ref = torch.ops.fxquant.int4_mma_weight_only_linear(x.cpu(), qm, sz, None, 128)
        assert _rel(got.cpu(), ref) <= 1e-2, (cfg.kind, m)


def test_dispatcher_across_m():
    _, qm, sz = _weights(1024, 2048, 128)
    q, s = qm.cuda(), sz.cuda()
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    for m in (1, 7, 16, 17, 32, 33, 64, 65, 129, 600, 2048):
        x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        got = torch.ops.fxquant.int4_mma_weight_only_linear(x, q, s, bias, 128)
        ref = torch.ops.fxquant.int4_mma_weight_only_linear(x.cpu(), qm, sz, bias.cpu(), 128)
        assert _rel(got.cpu(), ref) <= 1e-2, m
        cfg = D.get_config("int4_mma", m, 1024, 2048, 128, torch.bfloat16, x.device)
        assert cfg.kind == ("cxx" if m <= D.CXX_MAX_M["int4_mma"] else "cutlass" if HOPPER else cfg.kind), (m, cfg)


def test_compiled_model_serves_every_m_without_recompiles():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 256)).cuda().bfloat16()
    be = fxquant.backend(fxquant.Int4WeightOnly(group_size=128, layout="mma"))
    compiled = torch.compile(model, backend=be, dynamic=True)
    rowmajor = torch.compile(model, backend="fxquant", dynamic=True,
                             options={"config": fxquant.Int4WeightOnly(group_size=128, layout="rows")})
    for m in (2, 5, 16, 33, 300, 1024):  # (M = 1 would be a second graph: Dynamo specializes size 1)
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            got, want = compiled(x), rowmajor(x)
        assert _rel(got, want) <= 1e-2, m
    assert len(be.compiled_graphs) == 1


def test_default_layout_is_mma_where_its_kernels_run():
    """Int4WeightOnly()'s layout="auto": on an sm_90 GPU with both libraries, a bf16 weight that fits gets the
    MMA-fragment op and one that does not (N % 16) the row-major op, each saying why in the report; an fp16
    model, or another GPU, gets row-major throughout. Outputs equal the explicit layouts' compiles."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 264)).cuda()
    x = torch.randn(3, 40, 512, device="cuda")
    mma = str(torch.ops.fxquant.int4_mma_weight_only_linear.default)
    rows = str(torch.ops.fxquant.int4_weight_only_linear.default)
    for dtype in (torch.bfloat16, torch.float16):
        m, xd = model.to(dtype), x.to(dtype)
        torch._dynamo.reset()
        be = fxquant.backend(fxquant.Int4WeightOnly(group_size=128))
        with torch.no_grad():
            got = torch.compile(m, backend=be)(xd)
        fits = HOPPER and dtype == torch.bfloat16
        assert [(c[mma], c[rows]) for c in be.compiled_graphs] == [(1, 1) if fits else (0, 2)], dtype
        notes = [r.reason for r in be.report]
        assert notes[1] == "layout='rows' (auto: [N, K]=[264, 1024] does not fit 'mma')"
        if fits:
            assert notes[0] == "layout='mma' (auto)"
        else:
            assert notes[0].startswith("layout='rows' (auto: ") and ("float16" in notes[0] or not HOPPER), notes[0]
        # the same bytes as an explicit per-layer choice would pack: the first layer's explicit layout's compile
        torch._dynamo.reset()
        first = fxquant.Int4WeightOnly(group_size=128, layout="mma" if fits else "rows")
        with torch.no_grad():
            a = torch.compile(m[0], backend=fxquant.backend(first))(xd)
            last = fxquant.backend(fxquant.Int4WeightOnly(group_size=128, layout="rows"))
            want = torch.compile(m[2], backend=last)(m[1](a))
        assert _rel(got, want) <= 1e-2, dtype


def test_saved_default_choices_load_and_compile(tmp_path):
    """quantize_weights -> save -> load(device="cuda") -> compile with the default Int4WeightOnly(): each weight
    keeps the layout chosen for it on this GPU ("mma" where it fits on Hopper, "rows" for N % 16), nothing is
    packed again, and the output is bitwise the compile from the float model's."""
    import warnings
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.SiLU(),
                                torch.nn.Linear(1024, 264)).cuda().bfloat16()
    x = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
    cfg = fxquant.Int4WeightOnly(group_size=128)
    qw = fxquant.quantize_weights(model, cfg)
    layouts = ["mma" if HOPPER else "rows", "rows"]
    assert [qw[f"{i}.weight"].config.layout for i in (0, 2)] == layouts
    back = fxquant.load(fxquant.save(qw, tmp_path / "w.safetensors"), device="cuda")
    assert [back[f"{i}.weight"].config.layout for i in (0, 2)] == layouts
    be = fxquant.backend(prepacked=back, fuse_siblings=False)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(model, backend=be)(x)
        torch._dynamo.reset()
        want = torch.compile(model, backend=fxquant.backend(cfg, fuse_siblings=False))(x)
        ref = model(x)
    assert torch.equal(got, want)
    mma = str(torch.ops.fxquant.int4_mma_weight_only_linear.default)
    rows = str(torch.ops.fxquant.int4_weight_only_linear.default)
    assert [(c[mma], c[rows]) for c in be.compiled_graphs] == [(1, 1) if HOPPER else (0, 2)]
    assert not [w for w in caught if "prepacked weights given" in str(w.message)]  # nothing packed again
    if HOPPER:
        assert be.report[0].reason == "layout='mma' (auto, prepacked)"
    assert _rel(got, ref) <= 0.15  # int4 g128 on random weights: about 0.1
