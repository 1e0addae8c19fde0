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


def _compile_both(model, x, settings, backend_for):
    """Per setting (applied by backend_for(setting), which returns the backend): the compiled
    model's output and the CUDA kernels (name -> launches) of one more call."""
    outs, kernels = {}, {}
    for setting in settings:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend_for(setting))
        with torch.no_grad():
            outs[setting] = compiled(x)
            kernels[setting] = _kernels(lambda: compiled(x))
    return outs, kernels


@pytest.mark.parametrize("cfg", [fxquant.Int8DynamicActivationInt8Weight(),
                                 fxquant.Float8DynamicActivationFloat8Weight("row")], ids=["int8", "fp8_row"])
def test_compiled_model_quantizes_x_inside_inductor_kernels(cfg):
    if "float8" in cfg.describe() and not FP8_OK:
        pytest.skip("fp8 needs sm_89+")
    torch.manual_seed(0)
    model = _NormMLP().cuda().to(torch.bfloat16)
    x = torch.randn(2, 64, 512, device="cuda", dtype=torch.bfloat16)
    outs, kernels = _compile_both(model, x, (False, True), lambda fuse: fxquant.backend(cfg, fuse_act_quant=fuse))
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("i", [96, 1000, 14336, 17000])  # 17000: the two-pass kernel
@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_swiglu_quant_kernel_matches_cpu_reference(fp8, i, dtype):
    if fp8 and not FP8_OK:
        pytest.skip("fp8 needs sm_89+")
    for m in (1, 7, 300, 2049):
        g = torch.Generator().manual_seed(m + i)
        gu = (torch.randn(m, 2 * i, generator=g) * 3).to(dtype)
        gu[m // 2] = 0  # a zero row
        ref_q, ref_s = fxq.swiglu_quantize(gu[:, :i], gu[:, i:], fp8)
        gpu = gu.cuda()
        q, s = fxq.swiglu_quantize(gpu[:, :i], gpu[:, i:], fp8)  # strided views, as after the split
        assert q.dtype == ref_q.dtype and q.shape == (m, i) and s.shape == (m, 1)
        q, s = q.cpu().float(), s.cpu()
        # exp in the kernel and in ATen's CPU silu may differ in the last float32 bit: that can
        # move h by one step of its dtype, and a quantized value by one step, rarely.
        assert torch.allclose(s, ref_s, rtol=2 ** -7, atol=0)
        diff = (q - ref_q.float()).abs()
        step = ref_q.float().abs().clamp(min=1.0) * 0.125 if fp8 else torch.ones_like(diff)
        assert (diff <= step + 1e-6).all()
        assert (diff > 0).sum() <= diff.numel() // 1000, int((diff > 0).sum())


@pytest.mark.parametrize("cfg", [fxquant.Int8DynamicActivationInt8Weight(),
                                 fxquant.Float8DynamicActivationFloat8Weight("row")], ids=["int8", "fp8_row"])
def test_compiled_mlp_quantizes_swiglu_in_one_kernel(cfg, monkeypatch):
    if "float8" in cfg.describe() and not FP8_OK:
        pytest.skip("fp8 needs sm_89+")
    torch.manual_seed(0)
    model = _NormMLP().cuda().to(torch.bfloat16)
    x = torch.randn(2, 64, 512, device="cuda", dtype=torch.bfloat16)

    def backend_for(on):
        monkeypatch.setenv("FXQUANT_SWIGLU_QUANT", on)
        return fxquant.backend(cfg)

    outs, kernels = _compile_both(model, x, ("0", "1"), backend_for)
    assert kernels["1"]["swiglu_quant_kernel"] == 1 and "swiglu_quant_kernel" not in kernels["0"]
    assert sum(kernels["1"].values()) <= sum(kernels["0"].values())
    with torch.no_grad():
        ref = model(x).float()
    assert fxquant.sqnr(ref, outs["1"].float()) > fxquant.sqnr(ref, outs["0"].float()) - 1.0
