"""The activation-quantization prologue: per-token dynamic ops split into ATen quantization +
an op on quantized activations (passes/act_quant.py), so Inductor fuses the quantization into
the kernel producing x."""
import collections
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant import numerics as nq
from fxquant.lowering import decompose

fxq = torch.ops.fxquant
K, N = 96, 40
SPLIT = {  # config: (whole op, prequant op, quantize)
    "int8_dyn": (fxquant.Int8DynamicActivationInt8Weight(), fxq.int8_dynamic_linear.default,
                 fxq.int8_dynamic_linear_prequant.default, nq.quantize_int8_per_token),
    "fp8_row": (fxquant.Float8DynamicActivationFloat8Weight("row"), fxq.float8_dynamic_linear.default,
                fxq.float8_dynamic_linear_prequant.default, lambda x: nq.quantize_fp8(x, True)),
}


def _inputs(dtype, shape, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    x = torch.randn(*shape, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return w, x, b


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", [(5,), (2, 3), (0,)], ids=["2d", "3d", "m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", SPLIT)
def test_prequant_op_equals_the_whole_op(name, dtype, shape, bias):
    cfg, whole, pre, quantize = SPLIT[name]
    w, x, b = _inputs(dtype, shape, bias)
    packed, static = cfg.pack(w)
    xq, xs = quantize(x)
    got = pre(xq, xs, *packed, b, dtype)
    want = whole(x, *packed, b, *static)
    assert got.dtype == dtype and got.shape == (*shape, N)
    assert torch.equal(got, want)
    # ... and its plain-ATen decomposition (what an exported program runs) computes the same
    assert torch.equal(decompose.fxquant_decompositions()[pre](xq, xs, *packed, b, dtype), want)


@pytest.mark.parametrize("name", SPLIT)
def test_prequant_opcheck(name):
    cfg, _, pre, quantize = SPLIT[name]
    w, x, b = _inputs(torch.bfloat16, (2, 3), True)
    packed, _ = cfg.pack(w)
    xq, xs = quantize(x)
    if xq.dtype == torch.float8_e4m3fn:  # torch.allclose has no CPU float8 kernel: skip that check
        tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(pre, (xq, xs, *packed, b, torch.bfloat16), test_utils=tests[1:])
    else:
        torch.library.opcheck(pre, (xq, xs, *packed, b, torch.bfloat16))


def test_prequant_op_rejects_bad_inputs():
    cfg = fxquant.Int8DynamicActivationInt8Weight()
    w, x, _ = _inputs(torch.float32, (4,), False)
    (qw, ws), _ = cfg.pack(w)
    xq, xs = nq.quantize_int8_per_token(x)
    with pytest.raises(RuntimeError, match="xq has K=95 but the weight has K=96"):
        fxq.int8_dynamic_linear_prequant(xq[:, :95], xs, qw, ws, None, torch.float32)
    with pytest.raises(RuntimeError, match="x_scales must be float32"):
        fxq.int8_dynamic_linear_prequant(xq, xs.reshape(-1), qw, ws, None, torch.float32)
    with pytest.raises(RuntimeError, match=r"x_scales \(1, 1\) must have one scale per token of xq \(4, 96\)"):
        fxq.int8_dynamic_linear_prequant(xq, xs[:1], qw, ws, None, torch.float32)  # was broadcast silently
    with pytest.raises(RuntimeError, match="out_dtype must be"):
        fxq.int8_dynamic_linear_prequant(xq, xs, qw, ws, None, torch.int32)
    with pytest.raises(RuntimeError, match="xq and the weight must be torch.int8, got torch.float32"):
        fxq.int8_dynamic_linear_prequant(x, xs, qw, ws, None, torch.float32)
    with pytest.raises(RuntimeError, match="must be torch.float8_e4m3fn, got torch.int8"):
        fxq.float8_dynamic_linear_prequant(xq, xs, qw, ws, None, torch.float32)
    with pytest.raises(RuntimeError, match="at least one dim"):
        fxq.int8_dynamic_linear_prequant(xq[0, 0], xs[0, 0], qw, ws, None, torch.float32)


class _NormQKV(nn.Module):
    """RMSNorm feeding two sibling linears (fused horizontally), then a third linear whose input
    comes from a cat (an Inductor kernel too)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(K)
        self.q, self.k = nn.Linear(K, 64), nn.Linear(K, 32)
        self.o = nn.Linear(96, K)

    def forward(self, x):
        h = self.norm(x)
        return self.o(torch.cat([self.q(h), self.k(h)], -1))


def _compile(model, cfg, x, **options):
    torch._dynamo.reset()
    be = fxquant.backend(cfg, **options)
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x)
    return be, out


@pytest.mark.parametrize("name", SPLIT)
def test_split_rewrites_every_per_token_op_and_matches_unsplit(name, monkeypatch):
    cfg, whole, pre, _ = SPLIT[name]
    torch.manual_seed(0)
    model, x = _NormQKV().to(torch.bfloat16), torch.randn(3, 5, K, dtype=torch.bfloat16)
    seen = []
    from fxquant.passes import act_quant

    real = act_quant.split_activation_quant

    def spy(graph):
        n = real(graph)
        seen.append((n, collections.Counter(node.target for node in graph.nodes if node.op == "call_function")))
        return n
    monkeypatch.setattr(sys.modules["fxquant.backend"], "split_activation_quant", spy)
    _, unsplit = _compile(model, cfg, x, fuse_act_quant=False)
    assert seen == []  # the option turns the pass off
    be, split = _compile(model, cfg, x, inductor={"emulate_precision_casts": True})
    (count, ops), = seen
    assert count == 2 and ops[pre] == 2 and ops[whole] == 0  # fused q/k + o
    # With the bf16 rounding of x kept (emulated casts), splitting changes no bit.
    assert torch.equal(split, unsplit)
    # Inductor's default keeps the producer's float32 value: within quantization noise.
    _, fused = _compile(model, cfg, x)
    ref = model(x).float()
    assert fxquant.sqnr(ref, fused.float()) > fxquant.sqnr(ref, unsplit.float()) - 1.0


def test_per_tensor_fp8_and_weight_only_are_not_split(monkeypatch):
    torch.manual_seed(0)
    model, x = _NormQKV().to(torch.bfloat16), torch.randn(3, 5, K, dtype=torch.bfloat16)
    from fxquant.passes import act_quant
    counts = []
    real = act_quant.split_activation_quant
    monkeypatch.setattr(sys.modules["fxquant.backend"], "split_activation_quant",
                        lambda g: counts.append(real(g)) or counts[-1])
    for cfg in (fxquant.Float8DynamicActivationFloat8Weight("tensor"), fxquant.Int8WeightOnly()):
        _compile(model, cfg, x)
    assert counts == [0, 0]


def test_split_graph_compiles_once_for_every_m(monkeypatch):
    cfg = fxquant.Int8DynamicActivationInt8Weight()
    model = nn.Sequential(nn.RMSNorm(K), nn.Linear(K, N)).to(torch.bfloat16)
    from fxquant.passes import act_quant
    counts = []
    real = act_quant.split_activation_quant
    monkeypatch.setattr(sys.modules["fxquant.backend"], "split_activation_quant",
                        lambda g: counts.append(real(g)) or counts[-1])
    torch._dynamo.reset()
    be = fxquant.backend(cfg)
    compiled = torch.compile(model, backend=be, dynamic=True)
    with torch.no_grad():
        for m in (3, 17, 64):
            xm = torch.randn(m, K, dtype=torch.bfloat16)
            assert fxquant.sqnr(model(xm).float(), compiled(xm).float()) > 30
    assert len(be.compiled_graphs) == 1  # one dynamic compile serves every M
    assert counts == [1]  # ... and its graph (symbolic M) was split


def test_exact_division_is_on_while_compiling_split_graphs(monkeypatch):
    # Inductor's Triton code divides float32 approximately unless asked not to; the split's
    # quantization must divide as numerics.py does.
    import torch._inductor.config as inductor_config
    if not hasattr(getattr(inductor_config, "eager_numerics", None), "division_rounding"):
        pytest.skip("this torch's Inductor has no eager_numerics.division_rounding")
    seen = []
    from fxquant.passes import act_quant
    real = act_quant.split_activation_quant

    def spy(graph):
        seen.append(inductor_config.eager_numerics.division_rounding)
        return real(graph)
    monkeypatch.setattr(sys.modules["fxquant.backend"], "split_activation_quant", spy)
    model, x = nn.Sequential(nn.RMSNorm(K), nn.Linear(K, N)).to(torch.bfloat16), torch.randn(4, K).bfloat16()
    _compile(model, fxquant.Int8DynamicActivationInt8Weight(), x)
    _compile(model, fxquant.Int8WeightOnly(), x)  # not split: Inductor's default stays
    _compile(model, fxquant.Int8DynamicActivationInt8Weight(), x, inductor={act_quant.EXACT_DIVISION: False})
    assert seen == [True, False, False]  # the user's inductor= options win
    assert inductor_config.eager_numerics.division_rounding is False  # restored after the compile


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 40), n=st.integers(1, 50), k=st.integers(1, 80), lead=st.sampled_from([(), (2,)]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), bias=st.booleans(),
       name=st.sampled_from(sorted(SPLIT)), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_prequant_equals_whole_op_on_random_shapes(m, n, k, lead, dtype, bias, name, seed, scale):
    cfg, whole, pre, quantize = SPLIT[name]
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    x = (torch.randn(*lead, m, k, generator=g) * scale).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    packed, static = cfg.pack(w)
    xq, xs = quantize(x)
    assert torch.equal(pre(xq, xs, *packed, b, dtype), whole(x, *packed, b, *static))
