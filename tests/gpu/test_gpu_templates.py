"""The GEMM ops as Inductor templates (backend option `templates`, lowering/templates.py) on CUDA:
the pointwise work after a linear is fused into the template's epilogue, the results equal the
op's (the template rounds to the output dtype before the epilogue, as the op does), and where M
is dynamic or small the op stays. Skipped without a GPU."""
import pytest
import torch
import torch.nn as nn
from torch._inductor.utils import run_and_get_code

import fxquant
from fxquant.numerics import sqnr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCHEMES = [
    fxquant.Int8WeightOnly(),
    fxquant.Int4WeightOnly(group_size=128),
    fxquant.Int4WeightOnly(group_size=32, symmetric=True),
    fxquant.Float8WeightOnly(),
    fxquant.Int8DynamicActivationInt8Weight(),
    fxquant.Float8DynamicActivationFloat8Weight(granularity="row"),
]
FP8 = ("Float8",)


class Block(nn.Module):
    """A linear with bias, SiLU and a residual add after it: an epilogue to fuse."""

    def __init__(self, k=512, n=384):
        super().__init__()
        self.fc = nn.Linear(k, n)

    def forward(self, x, r):
        return torch.nn.functional.silu(self.fc(x)) + r


def _skip_fp8(cfg):
    if type(cfg).__name__.startswith(FP8) and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 needs sm_89+")


def _run(cfg, templates, x, r, dynamic=False):
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16).cuda().eval()
    torch._dynamo.reset()
    f = torch.compile(model, backend="fxquant", dynamic=dynamic,
                      options={"config": cfg, "templates": templates})
    with torch.no_grad():
        out, code = run_and_get_code(f, x, r)
        plain = model(x, r).float()
    return out, "\n".join(code), plain


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.describe())
def test_template_fuses_the_epilogue_and_equals_the_op(cfg):
    _skip_fp8(cfg)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4, 72, 512, device="cuda", dtype=torch.bfloat16, generator=g)  # M = 288: not a tile multiple
    r = torch.randn(4, 72, 384, device="cuda", dtype=torch.bfloat16, generator=g)
    want, code_op, plain = _run(cfg, False, x, r)
    got, code, _ = _run(cfg, "always", x, r)
    assert "triton_tem_fused" in code and "gemm_tiles" in code, code[-3000:]
    assert "torch.ops.fxquant" not in code.split("def call(")[-1], "the op is still called"
    # the same numbers as the op (same rounding points; accumulation order may differ)
    assert sqnr(want.float(), got.float()) > 45, sqnr(want.float(), got.float())
    assert sqnr(plain, got.float()) > 15


class NoBias(nn.Module):
    """N = 200 and K = 384: neither a multiple of the tiles (K of the 8-bit tiles' 256); no bias."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(384, 200, bias=False)

    def forward(self, x):
        return self.fc(x).float() * 2


@pytest.mark.parametrize("cfg", [SCHEMES[0], SCHEMES[1], SCHEMES[4], SCHEMES[5]], ids=lambda c: c.describe())
def test_template_without_bias_on_ragged_shapes(cfg):
    _skip_fp8(cfg)
    torch.manual_seed(0)
    model = NoBias().to(torch.bfloat16).cuda().eval()
    x = torch.randn(3, 50, 384, device="cuda", dtype=torch.bfloat16)
    outs = []
    for templates in (False, "always"):
        torch._dynamo.reset()
        f = torch.compile(model, backend="fxquant", options={"config": cfg, "templates": templates})
        with torch.no_grad():
            out, code = run_and_get_code(f, x)
        outs.append(out)
    assert "triton_tem_fused" in "\n".join(code)
    assert sqnr(outs[0], outs[1]) > 45, sqnr(outs[0], outs[1])


@pytest.mark.parametrize("cfg", [SCHEMES[0], SCHEMES[1], SCHEMES[4]], ids=lambda c: c.describe())
def test_benchmarked_choice_runs(cfg):
    """templates=True: Inductor benchmarks the op against the template at compile time; either
    way the output is right."""
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(2, 256, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    r = torch.randn(2, 256, 384, device="cuda", dtype=torch.bfloat16, generator=g)
    want, _, _ = _run(cfg, False, x, r)
    got, code, _ = _run(cfg, True, x, r)
    assert sqnr(want.float(), got.float()) > 45


def test_small_or_dynamic_m_keeps_the_op():
    """Also fp8 per tensor: its activations are quantized inside the op (no prequant op to lower)."""
    _skip_fp8(fxquant.Float8WeightOnly())
    x = torch.randn(4, 72, 512, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(4, 72, 384, device="cuda", dtype=torch.bfloat16)
    _, code, _ = _run(fxquant.Float8DynamicActivationFloat8Weight(granularity="tensor"), "always", x, r)
    assert "triton_tem" not in code and "fxquant.float8_dynamic_linear" in code
    cfg = fxquant.Int8WeightOnly()
    x = torch.randn(1, 8, 512, device="cuda", dtype=torch.bfloat16)  # M = 8 < TEMPLATE_MIN_M
    r = torch.randn(1, 8, 384, device="cuda", dtype=torch.bfloat16)
    _, code, _ = _run(cfg, "always", x, r)
    assert "triton_tem" not in code and "fxquant.int8_weight_only_linear" in code
    x = torch.randn(4, 72, 512, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(4, 72, 384, device="cuda", dtype=torch.bfloat16)
    _, code, _ = _run(cfg, "always", x, r, dynamic=True)
    assert "triton_tem" not in code and "fxquant.int8_weight_only_linear" in code
