"""A gated MLP's `silu(gate) * up` feeding a per-token dynamic linear becomes one
`fxquant.swiglu_quantize` op (patterns/swiglu.py, passes/act_quant.py) instead of Inductor's
fused quantization of that product."""
import collections
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fxquant
from fxquant import numerics as nq
from fxquant.lowering import decompose
from fxquant.passes import act_quant

fxq = torch.ops.fxquant
H, I = 64, 96
CONFIGS = {"int8_dyn": fxquant.Int8DynamicActivationInt8Weight(),
           "fp8_row": fxquant.Float8DynamicActivationFloat8Weight("row")}


class _MLP(nn.Module):
    """Llama's MLP: down(act(gate(x)) * up(x)); `leak` also returns the product (a second user)."""

    def __init__(self, act=F.silu, leak=False):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), nn.Linear(I, H)
        self.act, self.leak = act, leak

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x)
        return (self.down(h), h) if self.leak else self.down(h)


def _split_graphs(monkeypatch):
    """Record, per compile, the call_function targets left after the activation-quant pass."""
    seen = []
    real = act_quant.split_activation_quant

    def spy(graph):
        n = real(graph)
        seen.append(collections.Counter(node.target for node in graph.nodes if node.op == "call_function"))
        return n
    monkeypatch.setattr(sys.modules["fxquant.backend"], "split_activation_quant", spy)
    return seen


def _compile(model, cfg, x, dynamic=None):
    torch._dynamo.reset()
    be = fxquant.backend(cfg)
    compiled = torch.compile(model, backend=be, dynamic=dynamic)
    with torch.no_grad():
        return be, compiled, compiled(x)


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
@pytest.mark.parametrize("shape", [(5,), (2, 3), (0,)], ids=["2d", "3d", "m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_op_equals_numerics_and_its_decomposition(fp8, shape, dtype):
    g = torch.Generator().manual_seed(0)
    gu = (torch.randn(*shape, 2 * I, generator=g) * 4).to(dtype)
    gate, up = gu[..., :I], gu[..., I:]  # strided views, as after the gate/up split
    q, s = fxq.swiglu_quantize(gate, up, fp8)
    assert q.shape == (*shape, I) and s.shape == (*shape, 1) and s.dtype == torch.float32
    assert q.dtype == (torch.float8_e4m3fn if fp8 else torch.int8)
    rq, rs = nq.quantize_swiglu_per_token(gate.reshape(-1, I), up.reshape(-1, I), fp8)
    assert torch.equal(q.reshape(-1, I).float(), rq.float()) and torch.equal(s.reshape(-1, 1), rs)
    dq, ds = decompose.fxquant_decompositions()[fxq.swiglu_quantize.default](gate, up, fp8)
    assert torch.equal(dq.float(), q.float()) and torch.equal(ds, s)
    # numerics: quantizing eager's silu(gate) * up, nothing else
    h = F.silu(gate) * up
    hq, hs = nq.quantize_fp8(h.reshape(-1, I), True) if fp8 else nq.quantize_int8_per_token(h.reshape(-1, I))
    assert torch.equal(hq.float(), rq.float()) and torch.equal(hs, rs)


def test_opcheck():
    gate, up = torch.randn(2, 3, I, dtype=torch.bfloat16), torch.randn(2, 3, I, dtype=torch.bfloat16)
    torch.library.opcheck(fxq.swiglu_quantize.default, (gate, up, False))
    # torch.allclose has no CPU float8 kernel: the fp8 variant skips the output comparison
    torch.library.opcheck(fxq.swiglu_quantize.default, (gate, up, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_op_rejects_bad_inputs():
    a = torch.randn(4, I)
    with pytest.raises(RuntimeError, match=r"gate \(4, 96\) and up \(4, 95\) must have the same shape"):
        fxq.swiglu_quantize(a, a[:, :95], False)
    with pytest.raises(RuntimeError, match="must share one float dtype, got torch.float32 and torch.bfloat16"):
        fxq.swiglu_quantize(a, a.bfloat16(), False)
    with pytest.raises(RuntimeError, match="must share one float dtype"):
        fxq.swiglu_quantize(a.int(), a.int(), False)


def _traced(fn, *args):
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx
    return make_fx(fn, decomposition_table=select_decomp_table())(*args).graph


@pytest.mark.parametrize("form", ["aten_silu", "decomposed", "sigmoid", "swapped"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("flatten", [False, True])
def test_pattern_finds_gate_and_up(form, dtype, flatten):
    from fxquant.patterns import swiglu

    def f(g, u):
        if form == "aten_silu":
            s = torch.ops.aten.silu.default(g)
        elif form == "sigmoid":
            s = (g.float() * torch.sigmoid(g.float())).to(g.dtype)
        else:  # Inductor's decomposition: g / (exp(-g) + 1), in float32
            s = (g.float() / (torch.exp(-g.float()) + 1)).to(g.dtype)
        h = u * s if form == "swapped" else s * u
        return h.view(-1, I) if flatten else h
    graph = _traced(f, torch.randn(2, 3, I, dtype=dtype), torch.randn(2, 3, I, dtype=dtype))
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    got = swiglu.operands(out)
    gate, up = [n for n in graph.nodes if n.op == "placeholder"]
    assert got == (gate, up, flatten)


def test_pattern_takes_gate_and_up_before_their_views():
    # gate/up are [M, I] GEMM outputs viewed as [B, S, I]; x is the product flattened back to
    # [M, I]: the op reads the 2-D tensors (Inductor would copy a strided N-D view first).
    from fxquant.patterns import swiglu

    def f(g2, u2):
        g, u = g2.view(2, 3, I), u2.view(2, 3, I)
        return (torch.ops.aten.silu.default(g) * u).view(-1, I)
    graph = _traced(f, torch.randn(6, I), torch.randn(6, I))
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert swiglu.operands(out) == (*[n for n in graph.nodes if n.op == "placeholder"], True)


def test_pattern_keeps_views_that_regroup_rows():
    # gate/up are [3, 2I] tensors viewed as [6, I]: their rows are not x's rows, so the op must
    # get the [6, I] views (a rewrite onto the [3, 2I] tensors gave K = 2I to the next linear).
    from fxquant.patterns import swiglu

    def f(g2, u2):
        g, u = g2.view(6, I), u2.view(6, I)
        return (torch.ops.aten.silu.default(g) * u).view(-1, I)
    graph = _traced(f, torch.randn(3, 2 * I), torch.randn(3, 2 * I))
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    got = swiglu.operands(out)
    assert got is not None and got.flatten and got.gate.args[0].op == "placeholder"
    assert tuple(got.gate.meta["val"].shape) == (6, I)


@pytest.mark.parametrize("case", ["broadcast_up", "other_act", "two_users", "view_not_2d", "view_two_users"])
def test_pattern_rejects(case):
    from fxquant.patterns import swiglu

    def f(g, u):
        s = torch.tanh(g) if case == "other_act" else torch.ops.aten.silu.default(g)
        h = s * (u[:, :1] if case == "broadcast_up" else u)
        if case == "two_users":
            return h, h + 1
        if case == "view_two_users":
            v = h.view(-1, I)
            return v, v + 1
        return h.view(3, 2, I) if case == "view_not_2d" else h
    graph = _traced(f, torch.randn(6, I), torch.randn(6, I))
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert swiglu.operands(out) is None


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)  # float32 on CPU is inlined earlier
def test_gated_mlp_gets_one_swiglu_op(name, dtype, monkeypatch):
    monkeypatch.setattr(act_quant, "SWIGLU_DEVICES", ("cpu", "cuda"))
    seen = _split_graphs(monkeypatch)
    torch.manual_seed(0)
    model, x = _MLP().to(dtype), torch.randn(2, 5, H, dtype=dtype)
    _, _, out = _compile(model, CONFIGS[name], x)
    ops, = seen
    assert ops[fxq.swiglu_quantize.default] == 1
    pre = fxq.float8_dynamic_linear_prequant.default if name == "fp8_row" else fxq.int8_dynamic_linear_prequant.default
    assert ops[pre] == 2  # gate/up (fused) and down
    # the silu and the product are gone (dead after the rewrite)
    assert not any(ops[t] for t in (torch.ops.aten.silu.default, torch.ops.aten.exp.default, torch.ops.aten.sigmoid.default))
    assert out.shape == (2, 5, H)
    # same quantization as the unfused path up to h's rounding: close to it and to the float model
    monkeypatch.setattr(act_quant, "SWIGLU_DEVICES", ())
    _, _, unfused = _compile(model, CONFIGS[name], x)
    ref = model(x).float()
    assert fxquant.sqnr(ref, out.float()) > fxquant.sqnr(ref, unfused.float()) - 1.0
    assert fxquant.sqnr(ref, out.float()) > (20 if name == "fp8_row" else 25)


@pytest.mark.parametrize("why", ["second_user", "gelu", "gpu_only", "env_off"])
def test_other_forms_keep_inductors_fusion(why, monkeypatch):
    monkeypatch.setattr(act_quant, "SWIGLU_DEVICES", ("cuda",) if why == "gpu_only" else ("cpu", "cuda"))
    if why == "env_off":
        monkeypatch.setenv("FXQUANT_SWIGLU_QUANT", "0")
    seen = _split_graphs(monkeypatch)
    torch.manual_seed(0)
    model = _MLP(act=F.gelu if why == "gelu" else F.silu, leak=why == "second_user").to(torch.bfloat16)
    _compile(model, CONFIGS["int8_dyn"], torch.randn(2, 5, H, dtype=torch.bfloat16))
    ops, = seen
    assert ops[fxq.swiglu_quantize.default] == 0
    assert ops[fxq.int8_dynamic_linear_prequant.default] == 2  # still split, by the generic pattern


def test_one_dynamic_compile_serves_every_m(monkeypatch):
    monkeypatch.setattr(act_quant, "SWIGLU_DEVICES", ("cpu", "cuda"))
    seen = _split_graphs(monkeypatch)
    torch.manual_seed(0)
    model = _MLP().to(torch.bfloat16)
    be, compiled, _ = _compile(model, CONFIGS["fp8_row"], torch.randn(3, H, dtype=torch.bfloat16), dynamic=True)
    with torch.no_grad():
        for m in (5, 17, 64):  # (M = 1 is Dynamo's own 0/1 specialization, not fxquant's)
            xm = torch.randn(m, H, dtype=torch.bfloat16)
            assert fxquant.sqnr(model(xm).float(), compiled(xm).float()) > 20
    assert len(be.compiled_graphs) == 1 and len(seen) == 1  # no recompiles
    assert seen[0][fxq.swiglu_quantize.default] == 1


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 20), i=st.integers(1, 200), lead=st.sampled_from([(), (2,)]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), fp8=st.booleans(),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_op_on_random_shapes(m, i, lead, dtype, fp8, seed, scale):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(*lead, m, i, generator=g) * scale).to(dtype)
    up = (torch.randn(*lead, m, i, generator=g) * scale).to(dtype)
    h = (F.silu(gate) * up).float()
    assume(torch.isfinite(h).all())  # float16 silu(300) * 300 overflows in the model itself
    q, s = fxq.swiglu_quantize(gate, up, fp8)
    # dequantized q is h within half a quantization step (int8) / e4m3's relative precision
    deq = q.float() * s
    # (fp8: 3 mantissa bits, and values under half its smallest subnormal, 2**-9, flush to 0)
    tol = s * 0.5 if not fp8 else h.abs() * 2.0 ** -4 + s * 2.0 ** -10
    assert ((deq - h).abs() <= tol * (1 + 1e-4)).all()  # slack: float32 rounding of h / s and q * s
