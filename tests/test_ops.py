"""The torch.ops.fxquant.* op boundary: opcheck, numerics vs references, M == 0, bad inputs."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fxquant  # noqa: F401  (registers the ops)
from fxquant import numerics as nq
from fxquant.configs import (Float8DynamicActivationFloat8Weight, Float8WeightOnly, Int4WeightOnly,
                             Int8DynamicActivationInt8Weight, Int8WeightOnly)
from fxquant.lowering.ops import ALL_OPS

N, K = 48, 128
CONFIGS = {
    "int8_wo": Int8WeightOnly(),
    "int4_g32": Int4WeightOnly(group_size=32),
    "int4_g64_sym": Int4WeightOnly(group_size=64, symmetric=True),
    "int4_g128": Int4WeightOnly(group_size=128),
    "int4_g64_mma": Int4WeightOnly(group_size=64, layout="mma"),
    "int8_dyn": Int8DynamicActivationInt8Weight(),
    "fp8_row": Float8DynamicActivationFloat8Weight("row"),
    "fp8_tensor": Float8DynamicActivationFloat8Weight("tensor"),
    "fp8_wo": Float8WeightOnly(),
}
# Each x shape: 2-D small M (ATen fast path for half on CPU), 3-D with M = 18 (dequantize path), M = 1.
X_SHAPES = [(5, K), (2, 9, K), (1, K)]
DTYPES = [torch.bfloat16, torch.float32]
U = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def make(name, dtype, bias, x_shape=(5, K), seed=0):
    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    x = torch.randn(*x_shape, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    packed, static = cfg.pack(w)
    return cfg, w, x, b, packed, static


def dequantized(cfg, packed, static):
    """The weight the op computes with, as exact float64 [N, K]."""
    if isinstance(cfg, Int4WeightOnly):
        return nq.dequantize_int4(packed[0], packed[1], static[0], torch.float32, cfg.packed_layout).double()
    if isinstance(cfg, (Int8WeightOnly, Int8DynamicActivationInt8Weight)):
        return nq.dequantize_int8_per_channel(*packed, torch.float32).double()
    return nq.dequantize_fp8_weight(*packed, torch.float32).double()


@contextlib.contextmanager
def fp8_allclose():
    """opcheck's schema check compares inputs before/after with torch.allclose, which has no CPU
    kernel for float8 (torch limitation, not fxquant's): compare float8 tensors bitwise instead."""
    orig = torch.allclose

    def allclose(a, b, *args, **kwargs):
        if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        return orig(a, b, *args, **kwargs)

    torch.allclose = allclose
    try:
        yield
    finally:
        torch.allclose = orig


def test_every_op_is_covered():
    covered = {cfg.op.name() for cfg in CONFIGS.values()}
    assert {op._opoverload.name() for op in ALL_OPS} == covered
    assert all(n.startswith("fxquant::") for n in covered)


# --------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("x_shape", X_SHAPES[:2], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_opcheck(name, dtype, bias, x_shape):
    cfg, _, x, b, packed, static = make(name, dtype, bias, x_shape)
    with fp8_allclose():
        torch.library.opcheck(cfg.op, (x, *packed, b, *static))


@pytest.mark.parametrize("name", CONFIGS)
def test_opcheck_empty_m(name, request):
    cfg, _, x, b, packed, static = make(name, torch.bfloat16, True, (0, K))
    with fp8_allclose():
        torch.library.opcheck(cfg.op, (x, *packed, b, *static))


# --------------------------------------------------------------------------- numerics
def _bound(dtype, x64, w64, ref, c=4.0):
    """c roundings of the output dtype, relative to |ref| + sum_k |x_k w_k| (accumulation)."""
    absdot = x64.abs() @ w64.abs().t()
    return c * U[dtype] * (ref.abs() + absdot) + 1e-30


@pytest.mark.parametrize("x_shape", X_SHAPES, ids=["2d", "3d", "m1"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("name", ["int8_wo", "int4_g32", "int4_g64_sym", "int4_g128", "fp8_wo"])
def test_weight_only_matches_linear_on_dequantized(name, dtype, bias, x_shape):
    cfg, _, x, b, packed, static = make(name, dtype, bias, x_shape)
    out = cfg.op(x, *packed, b, *static)
    assert out.dtype == dtype and out.shape == (*x_shape[:-1], N)
    w64 = dequantized(cfg, packed, static)
    x64 = x.double().reshape(-1, K)
    ref = x64 @ w64.t() + (b.double() if b is not None else 0)
    err = (out.double().reshape(-1, N) - ref).abs()
    # fp32 is the same arithmetic; half adds the dequantized weight's rounding + output rounding
    assert (err <= _bound(dtype, x64, w64, ref, c=4.0 if dtype != torch.float32 else 16.0)).all(), err.max()
    if dtype == torch.float32:  # dequantize + F.linear: same result as the op's reference path
        torch.testing.assert_close(out, F.linear(x, w64.float(), b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape", X_SHAPES, ids=["2d", "3d", "m1"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("name", ["int8_dyn", "fp8_row", "fp8_tensor"])
def test_dynamic_matches_reference(name, dtype, bias, x_shape):
    """Reference: quantize x exactly as the scheme says, multiply exactly in float64, rescale."""
    cfg, _, x, b, packed, static = make(name, dtype, bias, x_shape)
    out = cfg.op(x, *packed, b, *static)
    assert out.dtype == dtype and out.shape == (*x_shape[:-1], N)
    x2 = x.reshape(-1, K)
    qw, ws = packed
    if name == "int8_dyn":
        xq, xs = nq.quantize_int8_per_token(x2)
        assert xs.shape == (x2.shape[0], 1)
    else:
        xq, xs = nq.quantize_fp8(x2, per_row=name == "fp8_row")
    xq64, wq64 = xq.double(), qw.double()
    scale = xs.double() * ws.double().reshape(1, -1)
    prod = (xq64 @ wq64.t()) * scale
    ref = prod + (b.double() if b is not None else 0)
    absdot = (xq64.abs() @ wq64.abs().t()) * scale
    # int32 accumulation is exact; fp8 accumulates in fp32; then a few fp32 ops and the output rounding
    acc_u = 0.0 if name == "int8_dyn" else 2.0 ** -24 * K
    bound = acc_u * absdot + 4 * 2.0 ** -24 * prod.abs() + 2 * U[dtype] * (ref.abs() + prod.abs()) + 1e-30
    err = (out.double().reshape(-1, N) - ref).abs()
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("name,floor", [("int8_wo", 40), ("int8_dyn", 35), ("int4_g128", 18), ("int4_g32", 18),
                                        ("fp8_row", 25), ("fp8_tensor", 22), ("fp8_wo", 25)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_close_to_float_linear(name, floor, dtype):
    """Gaussian data: the op vs the unquantized linear, above the issue's SQNR floors."""
    cfg, w, x, b, packed, static = make(name, dtype, True, (2, 16, K))
    out = cfg.op(x, *packed, b, *static)
    ref = F.linear(x.double(), w.double(), b.double())
    assert nq.sqnr(ref, out) >= floor


# --------------------------------------------------------------------------- shapes and errors
@pytest.mark.parametrize("x_shape", [(0, K), (2, 0, K), (0, 3, K)], ids=["0xK", "2x0xK", "0x3xK"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_empty_m(name, dtype, x_shape, request):
    cfg, _, x, b, packed, static = make(name, dtype, True, x_shape)
    out = cfg.op(x, *packed, b, *static)
    assert out.shape == (*x_shape[:-1], N) and out.dtype == dtype


@pytest.mark.parametrize("fake", [False, True], ids=["cpu", "fake"])
@pytest.mark.parametrize("name", CONFIGS)
def test_wrong_k_message(name, fake):
    cfg, _, _, b, packed, static = make(name, torch.float32, True)
    x = torch.randn(3, K - 32)
    op_name = cfg.op.name().split("::")[1]
    msg = rf"fxquant\.{op_name}: x has K={K - 32} but the weight has K={K}"
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            args = [mode.from_tensor(t) for t in (x, *packed, b)]
            with pytest.raises(RuntimeError, match=msg):
                cfg.op(*args, *static)
    else:
        with pytest.raises(RuntimeError, match=msg):
            cfg.op(x, *packed, b, *static)


@pytest.mark.parametrize("bad", [torch.float64, torch.int32], ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_bad_x_dtype_message(name, bad):
    cfg, _, x, b, packed, static = make(name, torch.float32, False)
    op_name = cfg.op.name().split("::")[1]
    with pytest.raises(RuntimeError, match=rf"fxquant\.{op_name}: x must be float32/float16/bfloat16"):
        cfg.op(x.to(bad), *packed, b, *static)


def test_int8_dynamic_with_k_1_is_exact():
    # torch._int_mm on the CPU returned uninitialised memory for K == 1 (torch 2.13); found by the
    # random-shape test of the prequant ops. One input feature is a legal linear.
    from fxquant.lowering import decompose
    cfg = Int8DynamicActivationInt8Weight()
    w = torch.tensor([[0.5], [-2.0], [1.0]])
    x = torch.tensor([[-0.25], [3.0]])
    (qw, ws), _ = cfg.pack(w)
    want = x.double() @ nq.dequantize_int8_per_channel(qw, ws, torch.float32).double().t()
    for _ in range(5):  # garbage differed from call to call
        for fn in (torch.ops.fxquant.int8_dynamic_linear, decompose.fxquant_decompositions()[cfg.op]):
            torch.testing.assert_close(fn(x, qw, ws, None).double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 8, 24, 100, 130], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_int8_weight_only_small_m_with_any_k(dtype, k):
    # ATen's _weight_int8pack_mm in bf16 crashed (K = 100, 130, ...) or returned garbage (K = 8, 24)
    # when K % 16 != 0 (torch 2.13 CPU); the op must not take that path there.
    g = torch.Generator().manual_seed(k)
    cfg = Int8WeightOnly()
    w = torch.randn(7, k, generator=g).to(dtype)
    (q, s), _ = cfg.pack(w)
    for m in (1, 3, 5):
        x = torch.randn(m, k, generator=g).to(dtype)
        out = torch.ops.fxquant.int8_weight_only_linear(x, q, s, None)
        ref = x.double() @ nq.dequantize_int8_per_channel(q, s, torch.float32).double().t()
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
