"""The CUTLASS int4 GEMM (lowering/cuda/csrc_cutlass, kind "cutlass") on a Hopper GPU: the op
against the CPU reference on awkward shapes, every tile variant; the dispatcher's use of it and
its fallbacks; CUDA-graph capture. Needs sm_90 and CUTLASS's headers (pip install nvidia-cutlass)."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs a Hopper (sm_90) GPU", allow_module_level=True)

import fxquant  # noqa: E402,F401
from fxquant import numerics as nq  # noqa: E402
from fxquant.lowering.cuda import build, cutlass  # noqa: E402
from fxquant.lowering.triton import dispatch as D  # noqa: E402
from helpers import plain_then_cudagraphs  # noqa: E402

build.load_cutlass()  # a missing header or compiler fails here, loudly: this file must not skip on Hopper


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _weights(n, k, group, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    q, sz = nq.quantize_int4_groupwise(w, group, symmetric)
    return nq.pack_int4(q), sz.to(torch.bfloat16)


@pytest.mark.parametrize("variant", sorted(cutlass.VARIANTS), ids=lambda v: f"{v[0]}x{v[1]}" + ("_streamk" if v[2] == 0 else "") + ("_ping" if v[3] == 4 else ""))
@pytest.mark.parametrize("n,k,group", [(200, 384, 128), (4096, 4096, 128), (264, 1024, 64), (1000, 2048, 256)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_op_matches_cpu_reference(variant, n, k, group, symmetric):
    qw, sz = _weights(n, k, group, symmetric)
    gen = torch.Generator().manual_seed(n + k)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    for m, lead, with_bias in ((1, (), False), (7, (), True), (129, (), False), (300, (3,), True), (1000, (), True)):
        x = torch.randn(*lead, m, k, generator=gen).to(torch.bfloat16)
        b = bias if with_bias else None
        ref = torch.ops.fxquant.int4_weight_only_linear(x, qw, sz, b, group)
        xc, qc, sc, bc = x.cuda(), qw.cuda(), sz.cuda(), (b.cuda() if b is not None else None)
        assert cutlass.fits("int4_wo", xc, qc, sc, bc, group, *variant)
        got = cutlass.linear("int4_wo", xc, qc, sc, bc, group, *variant)
        assert got.shape == ref.shape and got.dtype == torch.bfloat16
        assert _rel(got.cpu(), ref) <= 1e-2, (m, lead)


def test_inputs_it_cannot_take_are_refused():
    qw, sz = _weights(256, 512, 128, False)
    qc, sc = qw.cuda(), sz.cuda()
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    assert cutlass.fits("int4_wo", x, qc, sc, None, 128, 128, 256)
    assert not cutlass.fits("int4_wo", x.half(), qc, sc.half(), None, 128, 128, 256)  # fp16
    assert not cutlass.fits("int4_wo", x, qc, sc, None, 128, 96, 256)  # no such tile
    qw32, sz32 = _weights(256, 512, 32, False)
    assert not cutlass.fits("int4_wo", x, qw32.cuda(), sz32.cuda(), None, 32, 128, 256)  # group < the 64-wide K tile
    qw_odd, sz_odd = _weights(252, 512, 128, False)  # N % 8 != 0
    assert not cutlass.fits("int4_wo", x, qw_odd.cuda(), sz_odd.cuda(), None, 128, 128, 256)
    assert not cutlass.fits("int4_wo", x.view(-1)[1:1 + 299 * 512].view(299, 512), qc, sc, None, 128, 128, 256)  # misaligned


def test_dispatcher_uses_it_from_the_table_and_falls_back():
    calls = []
    real = cutlass.linear

    def spy(*a, **kw):
        calls.append(a[6:8])
        return real(*a, **kw)
    qw, sz = _weights(28672, 4096, 128, False)
    qc, sc = qw.cuda(), sz.cuda()
    cutlass.linear, saved = spy, cutlass.linear
    try:
        x = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
        assert D.get_config("int4_wo", 1024, 28672, 4096, 128, x.dtype, x.device).kind == "cutlass"
        got = torch.ops.fxquant.int4_weight_only_linear(x, qc, sc, None, 128)
        assert calls == [(128, 256)]
        ref = x.float() @ nq.dequantize_int4(qc, sc, 128, torch.bfloat16).float().t()
        assert _rel(got, ref) <= 1e-2
        # fp16 activations: the table's entry cannot run; its fallback (dequantize + cuBLAS) does
        xh = x.half()
        goth = torch.ops.fxquant.int4_weight_only_linear(xh, qc, sc.half(), None, 128)
        assert calls == [(128, 256)] and _rel(goth, ref) <= 1e-2
    finally:
        cutlass.linear = saved


@pytest.mark.parametrize("split_k", [1, 0], ids=["persistent", "streamk"])
def test_cuda_graph_replay(split_k):
    qw, sz = _weights(1024, 2048, 128, False)
    qc, sc = qw.cuda(), sz.cuda()
    x = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    eager = cutlass.linear("int4_wo", x, qc, sc, None, 128, 128, 256, split_k)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cutlass.linear("int4_wo", x, qc, sc, None, 128, 128, 256, split_k)  # warm-up outside the capture
        with torch.cuda.graph(g, stream=s):
            out = cutlass.linear("int4_wo", x, qc, sc, None, 128, 128, 256, split_k)
    torch.cuda.current_stream().wait_stream(s)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert _rel(out, cutlass.linear("int4_wo", x, qc, sc, None, 128, 128, 256, split_k)) == 0.0
    assert _rel(out, eager) > 0.1  # it computed on the new x



@pytest.mark.parametrize("scheme", ["int4_wo", "int8_wo", "fp8_wo"])
def test_compiled_model_with_cuda_graphs_runs_it(scheme):
    """A model compiled with mode reduce-overhead and dynamic M: the shipped table's CUTLASS
    entries (4096x4096; int4 M = 129-2048, int8 M = 129-8192, fp8 M = 65-4096) run inside cudagraph
    trees with no skip and one graph, match the plain (no CUDA graph) compile, and match the model
    run on numerics.py's dequantized weights (biases included)."""
    calls = []
    real = cutlass.linear

    def spy(*a, **kw):
        calls.append(a[1].numel() // a[1].shape[-1])
        return real(*a, **kw)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096))
    model = model.to(torch.bfloat16).cuda().eval()
    cfg = {"int4_wo": fxquant.Int4WeightOnly(group_size=128, layout="rows"), "int8_wo": fxquant.Int8WeightOnly(),
           "fp8_wo": fxquant.Float8WeightOnly()}[scheme]
    seqs = {"int4_wo": (150, 256, 512, 1000), "int8_wo": (256, 512, 1000), "fp8_wo": (70, 150, 256, 512, 1000)}[scheme]
    xs = [torch.randn(2, s, 4096, dtype=torch.bfloat16, device="cuda") for s in seqs]
    group = 128 if scheme == "int4_wo" else 0
    assert all(D.get_config(scheme, x.shape[0] * x.shape[1], 4096, 4096, group, x.dtype, x.device).kind
               == "cutlass" for x in xs)
    import inspect
    made = []  # who asked for int4 arrays: prepare_int4 (compile time) or _int4_arrays (a call)
    real_arrays = cutlass.scales_and_zeros
    cutlass.scales_and_zeros = lambda t: made.append(inspect.stack()[1].function) or real_arrays(t)
    cutlass.linear, saved = spy, cutlass.linear
    try:
        # rounds: warm-up, record, replay; calls counts the CUDA-graph compile's calls only
        want, got, frames, skips = plain_then_cudagraphs(model, xs, cfg, between=calls.clear)
    finally:
        cutlass.linear = saved
        cutlass.scales_and_zeros = real_arrays
        torch._dynamo.reset()
    assert frames == 1 and skips == 0
    # int4: the arrays were made at compile time only, never by a call
    assert set(made) == ({"prepare_int4"} if scheme == "int4_wo" else set()), made
    assert sorted(set(calls)) == [2 * s for s in seqs]  # every M ran the CUTLASS kernel (warm-up / record)
    for rnd in got:
        for a, b in zip(rnd, want):
            assert a.shape == b.shape and _rel(a, b) == 0.0
    deq = _dequantized_copy(model, scheme)
    with torch.no_grad():
        for x, a in zip(xs, want):
            assert _rel(a, deq(x)) <= 1e-2


def _dequantized_copy(model, scheme):
    """model with each Linear's weight replaced by numerics.py's dequantization of its packing."""
    import copy
    deq = copy.deepcopy(model)
    for mod in deq.modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.data
            if scheme == "int4_wo":
                q, sz = nq.quantize_int4_groupwise(w, 128, False)
                mod.weight.data = nq.dequantize_int4(nq.pack_int4(q), sz, 128, w.dtype)
            elif scheme == "int8_wo":
                mod.weight.data = nq.dequantize_int8_per_channel(*nq.quantize_int8_per_channel(w), w.dtype)
            else:
                mod.weight.data = nq.dequantize_fp8_weight(*nq.quantize_fp8_weight(w), w.dtype)
    return deq


def _int8_weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = nq.quantize_int8_per_channel(torch.randn(n, k, generator=g) / k ** 0.5, torch.bfloat16)
    return q, s


@pytest.mark.parametrize("variant", sorted(cutlass.VARIANTS), ids=lambda v: f"{v[0]}x{v[1]}" + ("_streamk" if v[2] == 0 else "") + ("_ping" if v[3] == 4 else ""))
@pytest.mark.parametrize("n,k", [(200, 384), (4096, 4096), (264, 1024), (1000, 14336)])
def test_int8_op_matches_cpu_reference(variant, n, k):
    qw, s = _int8_weights(n, k)
    gen = torch.Generator().manual_seed(n + k)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    for m, lead, with_bias in ((1, (), False), (7, (), True), (129, (), False), (300, (3,), True), (1000, (), True)):
        x = torch.randn(*lead, m, k, generator=gen).to(torch.bfloat16)
        b = bias if with_bias else None
        ref = x.float() @ nq.dequantize_int8_per_channel(qw, s, torch.bfloat16).float().t()
        ref = ref + (b.float() if b is not None else 0)
        # what the kernel computes: the exact int8 product, scaled per row in float32
        exact = (x.double() @ qw.double().t()) * s.double() + (b.double() if b is not None else 0)
        xc, qc, sc, bc = x.cuda(), qw.cuda(), s.cuda(), (b.cuda() if b is not None else None)
        assert cutlass.fits("int8_wo", xc, qc, sc, bc, 0, *variant)
        got = cutlass.linear("int8_wo", xc, qc, sc, bc, 0, *variant)
        assert got.shape == ref.shape and got.dtype == torch.bfloat16
        assert _rel(got.cpu(), ref) <= 1e-2, (m, lead)
        assert _rel(got.cpu(), exact) <= 2e-3, (m, lead)  # bf16 output rounding (~1.7e-3) and fp32 sums only


def test_int8_inputs_it_cannot_take_are_refused():
    qw, s = _int8_weights(256, 512)
    qc, sc = qw.cuda(), s.cuda()
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    assert cutlass.fits("int8_wo", x, qc, sc, None, 0, 128, 256)
    assert not cutlass.fits("int8_wo", x.half(), qc, sc.half(), None, 0, 128, 256)  # fp16
    q96, s96 = _int8_weights(256, 96)  # K = 96: not a multiple of the 64-wide K tile
    assert not cutlass.fits("int8_wo", x[:, :96], q96.cuda(), s96.cuda(), None, 0, 128, 256)
    assert not cutlass.fits("int8_wo", x, qc.view(torch.uint8), sc, None, 0, 128, 256)  # not int8
    assert not cutlass.fits("int4_wo", x, qc, sc, None, 128, 128, 256)  # an int8 weight is no int4 one
    # A failure after the launch set-up is an error naming the status (a number in a C++ message
    # once crashed the process there: BENCHMARKS.md S11)
    for variant in (15, 3 << 6, 1 << 12):  # no such tile; raster order 3; scheduler bits past the split count's
        with pytest.raises(RuntimeError, match="CUTLASS status 1"):
            torch.ops.fxquant.cutlass_int8_weight_only_linear(x, qc, sc, None, variant)


def test_prepared_int4_arrays_are_used_and_freed():
    """The quantization pass prepares CUTLASS's scale / zero arrays once per packed int4 weight; the
    call then runs no array kernels, and the arrays die with the packed weight."""
    import gc
    from fxquant.lowering import ops
    qw, sz = _weights(1024, 2048, 128, False)
    qc, sc = qw.cuda(), sz.cuda()
    x = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    plain = cutlass.linear("int4_wo", x, qc, sc, None, 128, 128, 256)
    ops.prepare_args(torch.ops.fxquant.int4_weight_only_linear.default, (qc, sc, None, 128))
    assert id(sc) in cutlass._prepared
    made = []
    real = cutlass.scales_and_zeros
    cutlass.scales_and_zeros = lambda t: made.append(t) or real(t)
    try:
        got = cutlass.linear("int4_wo", x, qc, sc, None, 128, 128, 256)
    finally:
        cutlass.scales_and_zeros = real
    assert made == [] and torch.equal(got, plain)
    sc[0, 0, 0] = sc[0, 0, 0] * 2  # written in place: the prepared arrays are stale and not used
    cutlass.scales_and_zeros = lambda t: made.append(t) or real(t)
    try:
        changed = cutlass.linear("int4_wo", x, qc, sc, None, 128, 128, 256)
    finally:
        cutlass.scales_and_zeros = real
    assert len(made) == 1 and not torch.equal(changed, plain)
    made.clear()  # it held sc
    key = id(sc)
    del sc
    gc.collect()
    assert key not in cutlass._prepared


@pytest.mark.parametrize("variant", sorted(cutlass.VARIANTS), ids=lambda v: f"{v[0]}x{v[1]}" + ("_streamk" if v[2] == 0 else "") + ("_ping" if v[3] == 4 else ""))
def test_int8_scale_and_bias_are_applied_to_the_exact_product(variant):
    # Small integers make the int8 product exact in float32, and so is acc * s for s = 1 + 2^-7:
    # the epilogue's acc * s + b rounds once, to exactly (acc * s + b).to(bf16). Scaling the weight
    # first (bf16(q * s), the old form) would not: q * s needs 14 significant bits.
    g = torch.Generator().manual_seed(1)
    n, k, m = 256, 256, 300
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    x = torch.randint(-2, 3, (m, k), generator=g).to(torch.bfloat16)
    s = torch.full((n,), 1 + 2.0 ** -7).to(torch.bfloat16)
    b = torch.randint(-64, 65, (n,), generator=g).to(torch.bfloat16)
    acc = x.double() @ q.double().t()
    want = (acc * s.double() + b.double()).to(torch.bfloat16)
    got = cutlass.linear("int8_wo", x.cuda(), q.cuda(), s.cuda(), b.cuda(), 0, *variant)
    assert torch.equal(got.cpu(), want)



@pytest.mark.parametrize("sched", ["2,auto", "8,rows", "4,tokens", "1,tokens"])
@pytest.mark.parametrize("scheme", ["int4_wo", "int8_wo"])
def test_scheduler_order_gives_the_same_bits(scheme, sched, monkeypatch):
    """FXQUANT_CUTLASS_SCHED only reorders the output tiles (no split-K here): the same bits as the
    default order, on a grid of several tiles both ways."""
    n, k = 1024, 1024
    qw, s = _weights(n, k, 128, False) if scheme == "int4_wo" else _int8_weights(n, k)
    qc, sc = qw.cuda(), s.cuda()
    x = torch.randn(1000, k, device="cuda", dtype=torch.bfloat16)
    monkeypatch.delenv("FXQUANT_CUTLASS_SCHED", raising=False)
    want = cutlass.linear(scheme, x, qc, sc, None, 128, 128, 256)
    monkeypatch.setenv("FXQUANT_CUTLASS_SCHED", sched)
    assert cutlass._sched() != 0
    got = cutlass.linear(scheme, x, qc, sc, None, 128, 128, 256)
    assert torch.equal(got, want), sched


@pytest.mark.parametrize("sched", ["1,auto,any", "1,auto,det,4", "1,auto,any,8"])
@pytest.mark.parametrize("tile", [(128, 64, 0, 0), (256, 32, 0, 0)], ids=["128x64", "256x32"])
def test_streamk_reduction_and_split_options_match_the_reference(tile, sched, monkeypatch):
    """FXQUANT_CUTLASS_SCHED's reduction order and split-K count change only how the stream-K tiles'
    partial sums are added: still within the reference's bound, on a grid of few tiles (N = 4096 at
    M = 48: 32 or 16 tiles for 132 SMs), where the K loops are split."""
    n, k = 4096, 4096
    qw, sz = _weights(n, k, 128, False)
    x = torch.randn(48, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = torch.ops.fxquant.int4_weight_only_linear(x, qw, sz, None, 128)
    monkeypatch.setenv("FXQUANT_CUTLASS_SCHED", sched)
    assert cutlass._sched() != 0
    got = cutlass.linear("int4_wo", x.cuda(), qw.cuda(), sz.cuda(), None, 128, *tile)
    assert _rel(got.cpu(), ref) <= 1e-2, sched


@pytest.mark.parametrize("scheme", ["int4_wo", "int8_wo"])
def test_bias_views_reach_the_epilogue(scheme):
    """The bias is added in the epilogue (int4 since S24; before, a second pass over out). A bias
    view that is misaligned or strided is copied for it and gives the same bits as a plain copy;
    the op itself refuses a misaligned one by name."""
    n, k = 256, 512
    qw, s = _weights(n, k, 128, False) if scheme == "int4_wo" else _int8_weights(n, k)
    qc, sc = qw.cuda(), s.cuda()
    x = torch.randn(300, k, device="cuda", dtype=torch.bfloat16)
    store = torch.randn(2 * n + 1, device="cuda", dtype=torch.bfloat16)
    plain = cutlass.linear(scheme, x, qc, sc, None, 128, 128, 256).float()
    for view in (store[1:n + 1], store[: 2 * n : 2]):  # 2 bytes off 16-byte alignment; every other value
        assert view.data_ptr() % 16 or not view.is_contiguous()
        got = cutlass.linear(scheme, x, qc, sc, view, 128, 128, 256)
        assert torch.equal(got, cutlass.linear(scheme, x, qc, sc, view.clone(), 128, 128, 256))
        assert _rel(got, plain + view.float()) <= 4e-3  # rounded once, against acc + bias in fp32
    variant = cutlass.VARIANTS[(128, 256, 1, 0)]
    with pytest.raises(RuntimeError, match="bad bias"):
        if scheme == "int8_wo":
            torch.ops.fxquant.cutlass_int8_weight_only_linear(x, qc, sc, store[1:n + 1], variant)
        else:
            sa, za = cutlass.scales_and_zeros(sc)
            torch.ops.fxquant.cutlass_int4_weight_only_linear(x, qc, sa, za, store[1:n + 1], 128, variant)
