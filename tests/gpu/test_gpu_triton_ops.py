"""The triton_op forms of the fxquant ops on CUDA (lowering/triton/triton_ops.py): eager calls
against the CPU reference over every M range of the shipped table, and the backend's
`embed_kernels=True`, where Inductor compiles our Triton kernels into its own code: one dynamic
compile for every M (no recompiles), with and without CUDA graphs. Skipped without a GPU."""
import pytest
import torch
import torch.nn as nn

import fxquant
from helpers import pack_weight, scheme_op

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCHEMES = ["int8_wo", "int4_wo", "fp8_wo", "int8_dyn", "fp8_dyn_row", "fp8_dyn_tensor"]
MS = (1, 2, 5, 16, 33, 100, 300, 1100, 4100)  # with both ends of every range of the H100 table


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_triton_op_matches_cpu_reference_at_every_range(scheme):
    """Eager calls (one launch: the M range's kernel) against the CPU op on the same packed
    weights: relative error <= 1e-2 in bf16 (the kernels' documented tolerance)."""
    from fxquant.lowering.triton import triton_ops as T
    name, static = scheme_op(scheme, 128)
    g = torch.Generator().manual_seed(0)
    n, k = 1000, 1024  # N not a multiple of 64 or 128
    packed = pack_weight(scheme, torch.randn(n, k, generator=g), 128)
    bias = torch.randn(n, generator=g).bfloat16()
    op, ref_op = getattr(torch.ops.fxquant, f"triton_{name}"), getattr(torch.ops.fxquant, name)
    dev = tuple(t.cuda() for t in packed)
    ranges = T.m_ranges(scheme, n, k, static[0] if scheme == "int4_wo" else 0, torch.bfloat16,
                        torch.device("cuda", torch.cuda.current_device()))
    assert len(ranges) >= 3 and ranges[0].cfg.kind == "gemv"
    ms = sorted({*MS, *(r.lo + 1 for r in ranges), *(r.hi for r in ranges if r.hi)})  # both ends of each
    for m in ms:
        x = torch.randn(m, k, generator=g).bfloat16()
        out = op(x.cuda(), *dev, bias.cuda(), *static)
        ref = ref_op(x, *packed, bias, *static)
        assert out.shape == (m, n) and _rel(out.cpu(), ref) <= 1e-2, (scheme, m)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.SiLU(), nn.Linear(1024, 384)).to(torch.bfloat16).cuda()


CONFIGS = [(fxquant.Int4WeightOnly(group_size=128), 18.0), (fxquant.Int8WeightOnly(), 38.0),
           (fxquant.Int8DynamicActivationInt8Weight(), 30.0),
           (fxquant.Float8DynamicActivationFloat8Weight(granularity="row"), 25.0),
           (fxquant.Float8WeightOnly(), 25.0)]
SHAPES = ((2, 3), (4, 5), (2, 50), (8, 300), (2, 2048))  # M = 6 .. 4096; no size-1 dim, batch != seq


@pytest.mark.parametrize("cfg,floor", CONFIGS, ids=lambda v: getattr(v, "describe", lambda: str(v))())
def test_embedded_kernels_one_dynamic_compile(cfg, floor):
    """embed_kernels=True: Inductor's code launches our Triton kernels itself (no call of an
    fxquant op left), one dynamic compile serves M = 6..4096 with no recompile, and outputs
    match the run-time dispatcher's compile on the same weights."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code
    model = _mlp()
    xs = [torch.randn(b, s, 512, dtype=torch.bfloat16, device="cuda") for b, s in SHAPES]
    with torch.no_grad():
        torch._dynamo.reset()
        want = [w.clone() for w in map(torch.compile(model, backend=fxquant.backend(cfg), dynamic=True), xs)]
        torch._dynamo.reset()
        counters.clear()
        be = fxquant.backend(cfg, embed_kernels=True)
        f = torch.compile(model, backend=be, dynamic=True)
        first, code = run_and_get_code(f, xs[0])
        got = [first] + [f(x) for x in xs[1:]]
        frames = counters["stats"]["unique_graphs"]
        ref = [model(x) for x in xs]
    src = "\n".join(code)
    assert "torch.ops.fxquant" not in src and "gemm_kernel" in src
    assert frames == 1
    assert [r.status for r in be.report] == ["quantized", "quantized"]
    for x, g, w, r in zip(xs, got, want, ref):
        assert g.shape == w.shape
        assert fxquant.sqnr(w.float(), g.float()) >= 30, x.shape  # other kernels, same weights
        assert fxquant.sqnr(r.float(), g.float()) >= floor, x.shape


@pytest.mark.parametrize("cfg", [fxquant.Int4WeightOnly(group_size=128), fxquant.Int8DynamicActivationInt8Weight()],
                         ids=lambda c: c.describe())
def test_embedded_kernels_under_cuda_graphs(cfg):
    """mode reduce-overhead with embed_kernels: replays match the plain embedded compile's outputs,
    no CUDA-graph skips, one graph for every M."""
    from torch._dynamo.utils import counters
    model = _mlp()
    xs = [torch.randn(b, s, 512, dtype=torch.bfloat16, device="cuda") for b, s in SHAPES]
    with torch.no_grad():
        torch._dynamo.reset()
        plain = torch.compile(model, backend=fxquant.backend(cfg, embed_kernels=True), dynamic=True)
        want = [plain(x).clone() for x in xs]
        torch._dynamo.reset()
        counters.clear()
        f = torch.compile(model, backend="fxquant", dynamic=True,
                          options={"config": cfg, "mode": "reduce-overhead", "embed_kernels": True})
        rounds = [[f(x).clone() for x in xs] for _ in range(3)]
        frames = counters["stats"]["unique_graphs"]
        skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    assert frames == 1 and skips == 0
    for got in rounds:
        for w, g in zip(want, got):
            assert fxquant.sqnr(w.float(), g.float()) >= 40


class GatedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(512, 1024, bias=False), nn.Linear(512, 1024, bias=False)
        self.down = nn.Linear(1024, 512, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("cfg", [fxquant.Int8DynamicActivationInt8Weight(),
                                 fxquant.Float8DynamicActivationFloat8Weight(granularity="row")],
                         ids=lambda c: c.describe())
def test_embedded_gated_mlp_has_no_opaque_op(cfg):
    """A gated MLP with a dynamic scheme: sibling fusion (gate/up), the fused SwiGLU quantization
    (swiglu_quantize) and the prequant down projection all become Triton launches in Inductor's
    code; outputs match the dispatcher's compile."""
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    model = GatedMLP().to(torch.bfloat16).cuda()
    xs = [torch.randn(b, s, 512, dtype=torch.bfloat16, device="cuda") for b, s in SHAPES]
    with torch.no_grad():
        torch._dynamo.reset()
        want = [w.clone() for w in map(torch.compile(model, backend=fxquant.backend(cfg), dynamic=True), xs)]
        torch._dynamo.reset()
        f = torch.compile(model, backend=fxquant.backend(cfg, embed_kernels=True), dynamic=True)
        first, code = run_and_get_code(f, xs[0])
        got = [first] + [f(x) for x in xs[1:]]
    src = "\n".join(code)
    assert "torch.ops.fxquant" not in src and "swiglu_quant_kernel" in src
    for w, g in zip(want, got):
        assert fxquant.sqnr(w.float(), g.float()) >= 30
