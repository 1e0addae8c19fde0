"""Int4WeightOnly(layout="mma"): the config, its op (CPU kernel, fake, ATen decomposition), the Triton
kernels reading the layout under TRITON_INTERPRET=1, the dispatcher's untuned choices, sibling fusion,
export and the saved-weights format. The CUDA kernels run in tests/gpu/test_gpu_int4_mma.py."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is (re)imported

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fxquant  # noqa: E402
from fxquant import numerics as nq  # noqa: E402
from fxquant.persist import config_from_json, config_to_json  # noqa: E402
from helpers import interpreted_kernels  # noqa: E402

MMA = fxquant.Int4WeightOnly(group_size=64, layout="mma")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_config_validates_the_layout():
    with pytest.raises(ValueError, match="layout='cols' is invalid; allowed values: 'auto', 'rows', 'mma'"):
        fxquant.Int4WeightOnly(layout="cols")
    with pytest.raises(ValueError, match="needs group_size >= 64"):
        fxquant.Int4WeightOnly(group_size=32, layout="mma")
    assert MMA.check(48, 128, torch.float32) is None
    assert "out_features % 16 == 0" in MMA.check(40, 128, torch.float32)
    assert "in_features=96 is not a multiple of group_size=64" in MMA.check(48, 96, torch.float32)
    assert MMA.op is torch.ops.fxquant.int4_mma_weight_only_linear.default
    assert fxquant.Int4WeightOnly(layout="rows").op is torch.ops.fxquant.int4_weight_only_linear.default
    assert fxquant.Int4WeightOnly().layout == "auto"  # packed without a choice (pack called directly): rows
    assert fxquant.Int4WeightOnly().op is torch.ops.fxquant.int4_weight_only_linear.default
    assert config_from_json(config_to_json(MMA)) == MMA
    # a file written before the field existed reads as the row-major layout
    old = '{"class": "Int4WeightOnly", "fields": {"group_size": 64, "symmetric": false}, "scheme": "int4_weight_only"}'
    assert config_from_json(old).layout == "rows"


@settings(max_examples=15, deadline=None)
@given(rb=st.integers(1, 4), kb=st.integers(1, 3), m=st.integers(1, 9), bias=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_op_equals_the_row_major_op(rb, kb, m, bias, seed):
    """Same quantization, other byte order: the ops compute the same float32 result."""
    n, k = 16 * rb, 128 * kb
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    (qm, sz), static = MMA.pack(w)
    (qr, _), _ = fxquant.Int4WeightOnly(group_size=64).pack(w)
    got = torch.ops.fxquant.int4_mma_weight_only_linear(x, qm, sz, b, *static)
    want = torch.ops.fxquant.int4_weight_only_linear(x, qr, sz, b, *static)
    assert torch.equal(got, want)


def test_op_refuses_shapes_the_layout_cannot_hold():
    x = torch.randn(2, 128)
    with pytest.raises(RuntimeError, match="MMA-fragment layout needs N % 16 == 0, K % 64 == 0 and group_size % 64"):
        torch.ops.fxquant.int4_mma_weight_only_linear(x, torch.zeros(24, 64, dtype=torch.uint8),
                                                      torch.zeros(2, 24, 2), None, 64)
    with pytest.raises(RuntimeError, match="group_size % 64 == 0"):
        torch.ops.fxquant.int4_mma_weight_only_linear(x, torch.zeros(16, 64, dtype=torch.uint8),
                                                      torch.zeros(4, 16, 2), None, 32)


def test_opcheck():
    (qm, sz), static = MMA.pack(torch.randn(32, 128))
    torch.library.opcheck(torch.ops.fxquant.int4_mma_weight_only_linear.default,
                          (torch.randn(3, 128), qm, sz, torch.randn(32), *static))


_MODS = interpreted_kernels(["common", "act_quant", "gemv", "gemm", "dispatch"], "gemv.gemv_kernel")
D = _MODS[-1]
KC = D.KernelConfig


@pytest.mark.parametrize("cfg", [KC("gemm", bm=16, bn=32, bk=64, warps=4, stages=2, swap=True),
                                 KC("gemm", bm=16, bn=16, bk=128, warps=4, stages=2, split_k=2, swap=True),
                                 KC("gemm", bm=16, bn=32, bk=32, warps=4, stages=2),
                                 KC("deq", bn=16, bk=64, warps=4)], ids=["swap", "splitk", "gemm", "deq"])
def test_triton_kernels_read_the_layout(cfg):
    g = torch.Generator().manual_seed(3)
    w, x, b = torch.randn(48, 256, generator=g), torch.randn(3, 256, generator=g), torch.randn(48, generator=g)
    (qm, sz), (group,) = fxquant.Int4WeightOnly(group_size=128, layout="mma").pack(w.bfloat16())
    x, b = x.bfloat16(), b.bfloat16()
    got = D.linear("int4_mma", x, qm, sz, b, group, cfg)
    ref = torch.ops.fxquant.int4_mma_weight_only_linear(x, qm, sz, b, group)
    assert _rel(got, ref) <= 1e-2


def test_a_gemv_config_runs_as_a_gemm():
    """The GEMV reads row-major bytes only: a gemv entry (say, from a cache) must not run on this layout."""
    cfg = D._runnable(KC("gemv", bn=4, bk=256), "int4_mma", 1, 48, 256, 128, False)
    assert cfg.kind == "gemm"
    assert D.default_config("int4_mma", 1, 48, 256, 128).kind == "gemm"


def test_tuned_entries_then_the_rule(monkeypatch):
    """H100: the four tuned shapes take their table entries at M >= 17 (sessions 26-27), other shapes
    and M <= 16 the rule; every CUTLASS or C++ entry carries a Triton fallback for where that library
    is missing (tuned at M = 32-256; the untuned default at 512-2048)."""
    monkeypatch.setattr(D, "_device_info", lambda device: ("h100", 132, (9, 0)))
    monkeypatch.setattr(D, "_table", lambda which, real=D._table: real(which) if which == "shipped" else {})
    cuda = torch.device("cuda")
    entries = {k: e for k, e in D._table("shipped")["h100"].items() if k.startswith("int4_mma|")}
    assert len(entries) == 28 and all(int(k.rsplit("|m", 1)[1]) >= 32 for k in entries)
    for key, e in entries.items():
        assert e["kind"] in ("cutlass", "cxx") and e["fallback"]["kind"] in ("gemm", "deq"), key
        assert e["kind"] == "cutlass" or key.endswith("|m32"), key  # C++ only where it runs (M <= 32)
    # session 27's stream-K tiles: 28672x4096 took 256 rows x 32 / 64 / 128 tokens at M = 17-128,
    # 4096x4096 the 128 x 64 tile at M = 33-64; 6144x4096 at M = 256 the 64 x 256 ping-pong (session 26)
    for m, bm in ((17, 32), (64, 64), (128, 128)):
        c = D.get_config("int4_mma", m, 28672, 4096, 128, torch.bfloat16, cuda)
        assert (c.kind, c.bn, c.bm, c.split_k) == ("cutlass", 256, bm, 0), m
    c = D.get_config("int4_mma", 40, 4096, 4096, 128, torch.bfloat16, cuda)
    assert (c.kind, c.bn, c.bm, c.split_k) == ("cutlass", 128, 64, 0)
    c = D.get_config("int4_mma", 200, 6144, 4096, 128, torch.bfloat16, cuda)
    assert (c.kind, c.bn, c.bm, c.warps) == ("cutlass", 64, 256, 4)
    fb = D.get_config("int4_mma", 200, 6144, 4096, 128, torch.bfloat16, cuda, allow_cutlass=False)
    assert fb == D.KernelConfig.from_json(entries["int4_mma|bfloat16|6144x4096|g128|m256"]["fallback"])
    # M = 17-32 on the other three: the C++ decode kernel, its Triton fallback where it is barred
    c = D.get_config("int4_mma", 32, 4096, 4096, 128, torch.bfloat16, cuda)
    assert c.kind == "cxx"
    fb = D.get_config("int4_mma", 32, 4096, 4096, 128, torch.bfloat16, cuda, allow_cxx=False)
    assert fb == D.KernelConfig.from_json(entries["int4_mma|bfloat16|4096x4096|g128|m32"]["fallback"])
    # a shape the table does not name: the rule
    assert D.get_config("int4_mma", 32, 5120, 8192, 128, torch.bfloat16, cuda).kind == "cxx"
    for m, tile in ((33, (128, 64, 0)), (128, (128, 128, 0)), (256, (128, 128, 0)), (257, (128, 256, 1)),
                    (5000, (128, 256, 1))):
        c = D.get_config("int4_mma", m, 5120, 8192, 128, torch.bfloat16, cuda)
        assert (c.kind, c.bn, c.bm, c.split_k, c.warps) == ("cutlass", *tile, 0), m
    c = D.get_config("int4_mma", 32, 5120, 8192, 128, torch.bfloat16, cuda, allow_cxx=False)
    assert (c.kind, c.bn, c.bm, c.split_k) == ("cutlass", 128, 32, 0)


def test_untuned_choices(monkeypatch):
    monkeypatch.setattr(D, "_device_info", lambda device: ("h100", 132, (9, 0)))
    monkeypatch.setattr(D, "_table", lambda which: {})  # the rule alone
    cuda = torch.device("cuda")
    for m in (1, 16, 17, 32):
        assert D.get_config("int4_mma", m, 4096, 4096, 128, torch.bfloat16, cuda).kind == "cxx", m
    c = D.get_config("int4_mma", 33, 4096, 4096, 128, torch.bfloat16, cuda)
    assert (c.kind, c.bn, c.bm, c.split_k, c.warps) == ("cutlass", 128, 64, 0, 0)
    c = D.get_config("int4_mma", 4096, 4096, 4096, 128, torch.bfloat16, cuda)
    assert (c.kind, c.bn, c.bm, c.split_k, c.warps) == ("cutlass", 128, 256, 1, 0)
    assert D.get_config("int4_mma", 4096, 4096, 4096, 128, torch.bfloat16, cuda, allow_cutlass=False).kind == "deq"
    assert D.get_config("int4_mma", 8, 4096, 4096, 128, torch.bfloat16, cuda, allow_cxx=False).kind == "cutlass"
    assert D.get_config("int4_mma", 8, 4096, 4096, 128, torch.bfloat16, cuda, allow_cxx=False,
                        allow_cutlass=False).kind == "gemm"
    monkeypatch.setattr(D, "_device_info", lambda device: ("a100", 108, (8, 0)))
    assert D.get_config("int4_mma", 64, 4096, 4096, 128, torch.bfloat16, cuda).kind == "gemm"


def test_reference_linear_reads_the_layout_in_row_chunks(monkeypatch):
    monkeypatch.setattr(D, "DEQ_CHUNK_ELEMS", 256 * 20)  # 20 rows of K = 256: chunks of 16 rows
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(64, 256, generator=g), torch.randn(3, 256, generator=g)
    (qm, sz), (group,) = fxquant.Int4WeightOnly(group_size=128, layout="mma").pack(w)
    ref = D.reference_linear("int4_mma", x, qm, sz, None, group)
    assert torch.allclose(ref, torch.ops.fxquant.int4_mma_weight_only_linear(x, qm, sz, None, group), atol=1e-5)


class QKV(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(128, 64), torch.nn.Linear(128, 32), torch.nn.Linear(128, 32)

    def forward(self, x):
        return self.q(x).sum(-1) + self.k(x).sum(-1) * self.v(x).sum(-1)


def test_siblings_fuse_along_n_on_the_layout():
    """Buffer rows 16R.. are weight rows 16R..: concatenating packed siblings is exact."""
    torch._dynamo.reset()
    model, x = QKV(), torch.randn(4, 128)
    fused = fxquant.backend(MMA)
    apart = fxquant.backend(MMA, fuse_siblings=False)
    with torch.no_grad():
        a = torch.compile(model, backend=fused)(x)
        torch._dynamo.reset()
        b = torch.compile(model, backend=apart)(x)
    assert torch.equal(a, b)
    op = str(torch.ops.fxquant.int4_mma_weight_only_linear.default)
    assert [c[op] for c in fused.compiled_graphs] == [1]
    assert [c[op] for c in apart.compiled_graphs] == [3]


def test_export_decomposes_the_op():
    from fxquant.export import export_program
    model, x = torch.nn.Sequential(torch.nn.Linear(128, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16)), torch.randn(2, 128)
    ep = export_program(model, (x,), fxquant.Int4WeightOnly(group_size=64, layout="mma"))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("fxquant" in t for t in targets)
    with torch.no_grad():
        want = torch.compile(model, backend=fxquant.backend(fxquant.Int4WeightOnly(group_size=64)))(x)
    assert _rel(ep.module()(x), want) <= 1e-5
