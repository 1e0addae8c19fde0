"""The activation-quantization prologue on the GPU: the prequant ops' CUDA kernels against the
CPU reference, and a compiled RMSNorm -> int8/fp8 linear model in which Inductor's fused kernel
quantizes x (no separate activation-quantization kernel runs)."""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import fxquant  # noqa: E402
from fxquant import numerics as nq  # noqa: E402

FP8_OK = torch.cuda.get_device_capability() >= (8, 9)
fxq = torch.ops.fxquant
SCHEMES = {
    "int8_dyn": (nq.quantize_int8_weight_for_dynamic, nq.quantize_int8_per_token,
                 fxq.int8_dynamic_linear_prequant),
    "fp8_row": (lambda w: nq.quantize_fp8_weight(w, per_row=True), lambda x: nq.quantize_fp8(x, True),
                fxq.float8_dynamic_linear_prequant),
}


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize("m", [1, 5, 16, 17, 300, 4097])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_prequant_kernels_match_cpu_reference(scheme, m):
    if scheme == "fp8_row" and not FP8_OK:
        pytest.skip("fp8 needs sm_89+")
    quant_w, quant_x, op = SCHEMES[scheme]
    n, k = 200, 320  # neither a multiple of 64/128
    g = torch.Generator().manual_seed(m)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    qw, ws = quant_w(w)
    xq, xs = quant_x(x)
    ref = op(xq, xs, qw, ws, b, torch.bfloat16)
    got = op(xq.cuda(), xs.cuda(), qw.cuda(), ws.cuda(), b.cuda(), torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert _rel(got.cpu(), ref) <= 1e-2


class _NormMLP(nn.Module):
    def __init__(self, d=512, h=1024):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.gate, self.up, self.down = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return collections.Counter(e.name for e in prof.events()
                               if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0)


@pytest.mark.parametrize("cfg", [fxquant.Int8DynamicActivationInt8Weight(),
                                 fxquant.Float8DynamicActivationFloat8Weight("row")], ids=["int8", "fp8_row"])
def test_compiled_model_quantizes_x_inside_inductor_kernels(cfg):
    if "float8" in cfg.describe() and not FP8_OK:
        pytest.skip("fp8 needs sm_89+")
    torch.manual_seed(0)
    model = _NormMLP().cuda().to(torch.bfloat16)
    x = torch.randn(2, 64, 512, device="cuda", dtype=torch.bfloat16)
    outs, kernels = {}, {}
    for fuse in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=fxquant.backend(cfg, fuse_act_quant=fuse))
        with torch.no_grad():
            outs[fuse] = compiled(x)
            kernels[fuse] = _kernels(lambda: compiled(x))
    unfused_quant = sum(c for k, c in kernels[False].items() if "act_quant" in k)
    assert unfused_quant == 2  # gate/up (one, fused siblings) and down
    assert not any("act_quant" in k for k in kernels[True]), kernels[True]
    assert sum(kernels[True].values()) < sum(kernels[False].values())
    with torch.no_grad():
        ref = model(x).float()
    assert fxquant.sqnr(ref, outs[True].float()) > fxquant.sqnr(ref, outs[False].float()) - 1.0


def test_prequant_op_autotunes_into_the_cache(monkeypatch, tmp_path):
    # FXQUANT_AUTOTUNE=1: the prequant op (what compiled int8 dynamic models call) tunes and
    # caches its shape like the whole op, and the result stays right.
    from fxquant.lowering.triton import dispatch as D
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FXQUANT_AUTOTUNE", "1")
    monkeypatch.setitem(D._tables, "cache", {})
    quant_w, quant_x, op = SCHEMES["int8_dyn"]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 320, generator=g) / 18
    x = torch.randn(5, 320, generator=g).to(torch.bfloat16)
    qw, ws = quant_w(w)
    xq, xs = quant_x(x)
    ref = op(xq, xs, qw, ws, None, torch.bfloat16)
    got = op(xq.cuda(), xs.cuda(), qw.cuda(), ws.cuda(), None, torch.bfloat16)
    key = D.config_key("int8_dyn", torch.bfloat16, 200, 320, 0, 5)
    dev = D._device_info(torch.device("cuda"))[0]
    assert key in D._load(D.cache_path()).get(dev, {})
    assert _rel(got.cpu(), ref) <= 1e-2
