"""The triton_op forms of the fxquant ops (lowering/triton/triton_ops.py), on CPU.

The kernels run under TRITON_INTERPRET=1 against the CPU reference ops, with a synthetic table
that gives every kernel family an M range (GEMV, swapped split-K GEMM, plain GEMM), so one call
launches all of them and only the one whose range holds M may write. The property that makes
the ops traceable without recompiles is checked on a symbolic trace: no guard on M, and grids
that are 0 outside their range. Graph-level use (torch.compile, torch.export, AOTInductor) needs
a GPU: tests/gpu/test_gpu_triton_ops.py.
"""
from __future__ import annotations

import dataclasses

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton")

from fxquant import numerics as nq  # noqa: E402
import fxquant.lowering  # noqa: E402,F401
from fxquant.lowering.triton import triton_ops as T  # noqa: E402
from helpers import pack_weight, scheme_op  # noqa: E402

D = T.D
KC = D.KernelConfig
CPU = torch.device("cpu")
GEMV = KC("gemv", bn=8, bk=64)
SWAP_SPLIT = KC("gemm", bm=16, bn=32, bk=32, warps=4, stages=2, split_k=2, swap=True)
PLAIN = KC("gemm", bm=32, bn=32, bk=32, warps=4, stages=2, split_k=1)


def _table(scheme: str, group: int) -> dict:
    """m1-m4: GEMV; m8-m16: swapped split-K; m32+: plain GEMM (and one CUTLASS entry, whose
    Triton fallback must be used)."""
    t = {D.bucket_key(scheme, group, b): GEMV.to_json() for b in (1, 2, 4)}
    t.update({D.bucket_key(scheme, group, b): SWAP_SPLIT.to_json() for b in (8, 16)})
    t.update({D.bucket_key(scheme, group, b): PLAIN.to_json() for b in D.M_BUCKETS if b >= 32})
    t[D.bucket_key(scheme, group, 64)] = {"kind": "cutlass", "bn": 128, "bk": 64, "bm": 128,
                                          "fallback": PLAIN.to_json()}
    return t


@pytest.fixture
def table(monkeypatch):
    def use(scheme: str, group: int = 0):
        monkeypatch.setitem(D._tables, "cache", {})
        monkeypatch.setitem(D._tables, "shipped", {"cpu": _table(scheme, group)})
        T.m_ranges.cache_clear()
    yield use
    T.m_ranges.cache_clear()


def test_ranges_merge_equal_buckets_and_replace_other_kinds(table):
    table("int8_wo")
    r = T.m_ranges("int8_wo", 40, 96, 0, torch.bfloat16, CPU)
    kinds = [(x.lo, x.hi, x.cfg.kind, x.cfg.bm, x.cfg.split_k) for x in r]
    # GEMV buckets stay apart (BLOCK_M differs); the CUTLASS m64 entry became its fallback,
    # equal to its neighbours, so m32..last is one open-ended range.
    assert kinds == [(0, 1, "gemv", 1, 1), (1, 2, "gemv", 2, 1), (2, 4, "gemv", 4, 1),
                     (4, 16, "gemm", 16, 2), (16, None, "gemm", 32, 1)]
    assert all(not x.cfg.tma for x in r)


def test_deq_and_cutlass_buckets_take_the_measured_triton_only_kernel(table):
    """Where the table's choice and its fallback are not Triton kernels (deq: dequantize + cuBLAS),
    the "triton|" entry tuned by `linear.py --tune --triton-only` is used; the exact shape's entry
    before the M bucket's; without one, the default GEMM."""
    table("int8_wo")
    t = D._tables["shipped"]["cpu"]
    for b in (256, 512, 1024, 2048, 4096, 8192):
        t[D.bucket_key("int8_wo", 0, b)] = {"kind": "cutlass", "bn": 128, "bk": 64, "bm": 256,
                                            "fallback": {"kind": "deq", "bn": 64, "bk": 128}}
    tuned = KC("gemm", bm=64, bn=64, bk=32, warps=4, stages=3, split_k=1, swap=True)
    exact = KC("gemm", bm=128, bn=64, bk=32, warps=8, stages=3, split_k=1)
    t[D.TRITON_ONLY + D.bucket_key("int8_wo", 0, 1024)] = tuned.to_json()
    t[D.TRITON_ONLY + D.config_key("int8_wo", torch.bfloat16, 40, 96, 0, 4096)] = exact.to_json()
    t[D.TRITON_ONLY + D.bucket_key("int8_wo", 0, 4096)] = tuned.to_json()  # the exact key wins
    r = T.m_ranges("int8_wo", 40, 96, 0, torch.bfloat16, CPU)
    by_hi = {x.hi: x.cfg for x in r}
    default = KC("gemm", bm=128, bn=128, bk=64, warps=8, stages=3)
    assert [(x.lo, x.hi) for x in r if x.lo >= 128] == [(128, 256), (256, 512), (512, 1024), (1024, 2048),
                                                        (2048, 4096), (4096, None)]
    assert by_hi[1024] == tuned and by_hi[4096] == exact
    assert by_hi[512] == dataclasses.replace(default, split_k=1)
    assert D.triton_only_config("int8_wo", 4096, 40, 96, 0, torch.bfloat16, CPU) == exact
    assert D.triton_only_config("int8_wo", 4096, 48, 96, 0, torch.bfloat16, CPU) == tuned  # another shape
    assert D.triton_only_config("int8_wo", 64, 40, 96, 0, torch.bfloat16, CPU) is None


_ENTRY = st.sampled_from([GEMV.to_json(), SWAP_SPLIT.to_json(), PLAIN.to_json(), {"kind": "deq", "bn": 64, "bk": 128},
                          {"kind": "cutlass", "bn": 128, "bk": 64, "bm": 128, "fallback": PLAIN.to_json()},
                          {"kind": "cxx", "bn": 0, "bk": 0, "fallback": GEMV.to_json()}])


@settings(max_examples=40, deadline=None)
@given(entries=st.dictionaries(st.sampled_from(D.M_BUCKETS), _ENTRY), n=st.integers(1, 300), k=st.integers(16, 600))
def test_ranges_tile_all_m_with_runnable_triton_kernels(entries, n, k):
    """Whatever the table holds: the ranges are contiguous from 0 to open-ended, neighbours differ,
    every config is a Triton GEMV (only up to GEMV_MAX_M, BLOCK_M covering its range) or GEMM
    (split-K within the K tiles, no TMA), never deq / cutlass / cxx."""
    D._tables["shipped"] = {"cpu": {D.bucket_key("int8_wo", 0, b): e for b, e in entries.items()}}
    D._tables["cache"] = {}
    T.m_ranges.cache_clear()
    try:
        r = T.m_ranges("int8_wo", n, k, 0, torch.bfloat16, CPU)
    finally:
        D._tables.pop("shipped", None)
        D._tables.pop("cache", None)
        T.m_ranges.cache_clear()
    assert r[0].lo == 0 and r[-1].hi is None
    assert all(a.hi == b.lo and a.lo < a.hi for a, b in zip(r, r[1:]))
    assert all(a.cfg != b.cfg for a, b in zip(r, r[1:]))
    for x in r:
        assert x.cfg.kind in ("gemv", "gemm") and not x.cfg.tma
        if x.cfg.kind == "gemv":
            assert x.hi is not None and x.hi <= D.GEMV_MAX_M and x.cfg.bm >= x.hi
        else:
            assert 1 <= x.cfg.split_k <= max(1, -(-k // D._fix_bk(x.cfg.bk, "int8_wo", 0, k, "gemm")))


def test_in_range_is_one_exactly_inside():
    r = T.MRange(4, 16, GEMV)
    assert [T.in_range(m, r) for m in (0, 4, 5, 16, 17, 10_000)] == [0, 0, 1, 1, 0, 0]
    assert [T.in_range(m, T.MRange(16, None, GEMV)) for m in (16, 17, 1 << 20)] == [0, 1, 1]


SCHEMES = ["int8_wo", "int4_wo", "fp8_wo", "int8_dyn", "fp8_dyn_row", "fp8_dyn_tensor"]


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("launch_all", [False, True], ids=["live_range_only", "every_range"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_triton_op_matches_reference_in_every_range(scheme, launch_all, table, monkeypatch):
    """M at both ends of every range (and 0): the result is the CPU reference op's (relative error
    <= 1e-2 in bf16, as for the kernels themselves). every_range: the 0/1 factors are not plain
    ints, so every range launches as in a traced graph (the inactive ones with an empty grid) and
    the split-K ranges share one buffer pair sized by those factors. (Every kernel computes the
    same function, so numbers cannot show an extra launch: the symbolic test below counts them.)"""
    import numpy as np
    if launch_all:
        in_range = T.in_range
        monkeypatch.setattr(T, "in_range", lambda m, r: np.int64(in_range(m, r)))
    group = 32 if scheme == "int4_wo" else 0
    name, static = scheme_op(scheme, group)
    table("fp8_dyn_row" if scheme == "fp8_dyn_tensor" else scheme, group)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 96, generator=g)
    packed = pack_weight(scheme, w, group)
    bias = torch.randn(40, generator=g).bfloat16()
    op = getattr(torch.ops.fxquant, f"triton_{name}")
    ref_op = getattr(torch.ops.fxquant, name)
    ranges = T.m_ranges("fp8_dyn_row" if scheme == "fp8_dyn_tensor" else scheme, 40, 96, group,
                        torch.bfloat16, CPU)
    ms = sorted({0, *(r.lo + 1 for r in ranges), *(r.hi for r in ranges if r.hi)})
    assert ms == [0, 1, 2, 3, 4, 5, 16, 17]
    for m in ms:
        x = torch.randn(m, 96, generator=g).bfloat16()
        out = op(x, *packed, bias, *static)
        ref = ref_op(x, *packed, bias, *static)
        assert out.shape == ref.shape == (m, 40) and out.dtype == torch.bfloat16
        if m:
            assert _rel(out, ref) <= 1e-2, (scheme, m)


DEQGEMM = KC("deqgemm", bm=16, bn=32, bk=32, warps=4, stages=2)


@pytest.mark.parametrize("launch_all", [False, True], ids=["live_range_only", "every_range"])
@pytest.mark.parametrize("scheme", ["int8_wo", "int4_wo", "fp8_wo"])
def test_dequantize_then_gemm_range_matches_reference(scheme, launch_all, table, monkeypatch):
    """A "deqgemm" range (our dequantize kernel, then our GEMM on the plain weight), as tuned for
    weight-only M >= 256 by `linear.py --tune --triton-only`: the twin at M in and out of that range,
    and the dispatcher forced to it, equal the CPU reference op (every_range: its scratch and grids
    scaled by a 0/1 factor that is not a plain int, as when traced)."""
    import numpy as np
    if launch_all:
        in_range = T.in_range
        monkeypatch.setattr(T, "in_range", lambda m, r: np.int64(in_range(m, r)))
    group = 32 if scheme == "int4_wo" else 0
    name, static = scheme_op(scheme, group)
    table(scheme, group)
    D._tables["shipped"]["cpu"][D.TRITON_ONLY + D.bucket_key(scheme, group, 32)] = DEQGEMM.to_json()
    for b in D.M_BUCKETS:
        if b >= 32:
            D._tables["shipped"]["cpu"][D.bucket_key(scheme, group, b)] = {"kind": "deq", "bn": 64, "bk": 128}
    r = T.m_ranges(scheme, 40, 96, group, torch.bfloat16, CPU)
    assert [(x.lo, x.hi) for x in r if x.cfg.kind == "deqgemm"] == [(16, 32)]
    assert {x.cfg.kind for x in r if x.lo >= 32} == {"gemm"}  # deq buckets without a tuned entry
    g = torch.Generator().manual_seed(3)
    packed = pack_weight(scheme, torch.randn(40, 96, generator=g), group)
    bias = torch.randn(40, generator=g).bfloat16()
    op = getattr(torch.ops.fxquant, f"triton_{name}")
    ref_op = getattr(torch.ops.fxquant, name)
    for m in (16, 17, 32, 33):
        x = torch.randn(m, 96, generator=g).bfloat16()
        ref = ref_op(x, *packed, bias, *static)
        assert _rel(op(x, *packed, bias, *static), ref) <= 1e-2, (scheme, m)
        assert _rel(D.linear(scheme, x, packed[0], packed[1], bias, group, DEQGEMM), ref) <= 1e-2


def test_prequant_and_3d_input(table):
    table("int8_dyn")
    g = torch.Generator().manual_seed(2)
    qw, ws = nq.quantize_int8_weight_for_dynamic(torch.randn(40, 96, generator=g))
    x = torch.randn(2, 5, 96, generator=g).bfloat16()
    xq, xs = nq.quantize_int8_per_token(x)
    out = torch.ops.fxquant.triton_int8_dynamic_linear_prequant(xq, xs, qw, ws, None, torch.float16)
    ref = torch.ops.fxquant.int8_dynamic_linear_prequant(xq, xs, qw, ws, None, torch.float16)
    assert out.shape == (2, 5, 40) and out.dtype == torch.float16
    assert _rel(out, ref) <= 2e-3
    qw8, s8 = nq.quantize_int8_per_channel(torch.randn(40, 96, generator=g))
    xt = torch.randn(96, 6, generator=g).bfloat16().t()  # non-contiguous
    ref = torch.ops.fxquant.int8_weight_only_linear(xt, qw8, s8, None)
    assert _rel(torch.ops.fxquant.triton_int8_weight_only_linear(xt, qw8, s8, None), ref) <= 1e-2


@pytest.mark.parametrize("fp8", [False, True])
def test_swiglu_quantize_twin_is_the_same_kernel(fp8):
    """triton_swiglu_quantize (3-D gate / up) gives exactly what the CUDA op's launcher gives."""
    from fxquant.lowering.triton.act_quant import quantize_swiglu
    g = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(2, 3, 80, generator=g).bfloat16() for _ in range(2))
    q, s = torch.ops.fxquant.triton_swiglu_quantize(gate, up, fp8)
    q_ref, s_ref = quantize_swiglu(gate.reshape(6, 80), up.reshape(6, 80), fp8)
    assert q.shape == (2, 3, 80) and s.shape == (2, 3, 1)
    assert torch.equal(q.reshape(6, 80).view(torch.int8), q_ref.view(torch.int8))
    assert torch.equal(s.reshape(6), s_ref)


def test_errors_name_the_op():
    qw, s = nq.quantize_int8_per_channel(torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="triton_int8_weight_only_linear: x has K=16 but the weight has K=32"):
        torch.ops.fxquant.triton_int8_weight_only_linear(torch.randn(2, 16), qw, s, None)
    assert T.triton_target(torch.ops.fxquant.int4_weight_only_linear.default) \
        == torch.ops.fxquant.triton_int4_weight_only_linear.default
    assert T.triton_target(torch.ops.fxquant.swiglu_quantize.default) \
        == torch.ops.fxquant.triton_swiglu_quantize.default
    assert T.triton_target(torch.ops.aten.mm.default) is None


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 5000))
@example(m=2)
@example(m=4)
@example(m=5)
@example(m=16)
@example(m=17)
def test_symbolic_trace_has_no_guard_on_m_and_exactly_one_live_launch(m):
    """Traced with a symbolic M (as torch.compile / torch.export trace the op; symbolic sizes are
    >= 2, 0 and 1 being specialized), the body adds no guard on M, and its grids, evaluated at
    any M, leave exactly one GEMM/GEMV launch non-empty: the one whose range holds M."""
    from torch.fx.experimental.proxy_tensor import make_fx
    D._tables["shipped"] = {"cpu": _table("int8_wo", 0)}
    D._tables["cache"] = {}
    T.m_ranges.cache_clear()
    grids = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **k: grids.append((self.kernel, grid, k.get("BLOCK_M", k.get("BM"))))

    qw, s = nq.quantize_int8_per_channel(torch.randn(40, 96))
    try:
        orig = T.wrap_triton
        T.wrap_triton = Recorder
        gm = make_fx(lambda x: T.linear_body("int8_wo", x, qw, s, None), tracing_mode="symbolic")(
            torch.randn(7, 96).bfloat16())
        ranges = T.m_ranges("int8_wo", 40, 96, 0, torch.bfloat16, CPU)
        n_ranges = len(ranges)
    finally:
        T.wrap_triton = orig
        D._tables.pop("shipped", None)
        D._tables.pop("cache", None)
        T.m_ranges.cache_clear()
    zeros = sum(n.target is torch.ops.aten.zeros.default for n in gm.graph.nodes)
    m_node = next(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder").shape[0].node
    sym = m_node.expr
    on_m = [str(g.expr) for g in m_node.shape_env.guards if sym in g.expr.free_symbols]
    assert not on_m  # (make_fx made K symbolic too: the op's K check guards K, as it should)
    live = []
    for i, (kernel, grid, block_m) in enumerate(grids):
        size = 1
        for d in grid:
            size *= int(d.node.expr.subs(sym, m)) if isinstance(d, torch.SymInt) else d
        if size:
            live.append((i, kernel, block_m))
    assert len(grids) == n_ranges == 5  # one launch per range, in range order
    want = next(i for i, r in enumerate(ranges) if r.lo < m and (r.hi is None or m <= r.hi))
    assert [i for i, _, _ in live] == [want]
    assert live[0][1] is (D.gemv_kernel if m <= 4 else D.gemm_kernel)
    assert live[0][2] == ranges[want].cfg.bm
    assert zeros == 1  # one zeroed counter buffer, shared by the split-K ranges
