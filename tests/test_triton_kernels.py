"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against the CPU reference ops.

Every kernel family (GEMV, tensor-core GEMM plain / swapped / split-K, dequantize + GEMM,
activation quantization) runs on small awkward shapes. Tolerance (documented in BENCHMARKS.md):
relative Frobenius error ||out - ref|| / ||ref|| <= 1e-2 in bf16, 2e-3 in fp16, 1e-4 in fp32
(the kernels and the reference round at different points: the weight-only GEMV and the int8/fp8
epilogues apply the scale after the dot, the reference rounds the dequantized weight first).
Activation quantization must match numerics.py bit for bit.
"""
from __future__ import annotations

import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is (re)imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from fxquant import numerics as nq  # noqa: E402
import fxquant.lowering  # noqa: E402,F401  (registers torch.ops.fxquant.*)
from helpers import interpreted_kernels, pack_weight  # noqa: E402


_MODS = interpreted_kernels(["common", "act_quant", "gemv", "gemm", "dispatch"], "gemv.gemv_kernel")
D, AQ = _MODS[-1], _MODS[1]
KC = D.KernelConfig
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
REF = {
    "int8_wo": lambda x, w, b, g: torch.ops.fxquant.int8_weight_only_linear(x, *w, b),
    "int4_wo": lambda x, w, b, g: torch.ops.fxquant.int4_weight_only_linear(x, *w, b, g),
    "fp8_wo": lambda x, w, b, g: torch.ops.fxquant.float8_weight_only_linear(x, *w, b),
    "int8_dyn": lambda x, w, b, g: torch.ops.fxquant.int8_dynamic_linear(x, *w, b),
    "fp8_dyn_row": lambda x, w, b, g: torch.ops.fxquant.float8_dynamic_linear(x, *w, b, True),
    "fp8_dyn_tensor": lambda x, w, b, g: torch.ops.fxquant.float8_dynamic_linear(x, *w, b, False),
}


pack = pack_weight


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def check(scheme, cfg, M=3, N=40, K=96, group=32, dtype=torch.bfloat16, bias=True, x3d=False,
          noncontig=False, symmetric=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g).to(dtype)
    packed = pack(scheme, w, group, symmetric)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    if noncontig:  # a transposed view: stride_xk != 1
        x = torch.randn(K, M, generator=g).to(dtype).t()
    elif x3d:
        x = torch.randn(2, M, K, generator=g).to(dtype)
    else:
        x = torch.randn(M, K, generator=g).to(dtype)
    out = D.linear(scheme, x, *packed, b, group if scheme == "int4_wo" else 0, cfg)
    ref = REF[scheme](x, packed, b, group)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{scheme} {cfg} M={M} N={N} K={K} {dtype}: rel err {err:.2e}"


GEMV = KC("gemv", bn=8, bk=64, warps=4)
GEMM = KC("gemm", bm=16, bn=32, bk=32, warps=4, stages=2)
GEMM_SWAP = KC("gemm", bm=16, bn=32, bk=64, warps=4, stages=2, swap=True)
GEMM_SPLIT = KC("gemm", bm=16, bn=16, bk=32, warps=4, stages=2, split_k=2, swap=True)
DEQ = KC("deq", bn=16, bk=64, warps=4)
SCHEMES = list(REF)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("cfg", [GEMV, GEMM, GEMM_SWAP, GEMM_SPLIT], ids=["gemv", "gemm", "swap", "splitk"])
def test_kernel_families(scheme, cfg):
    check(scheme, cfg, M=3, N=40, K=96)


def test_split_k_last_split_reduces():
    # Three splits over several tiles, with bias: the last-arriving split sums the others.
    cfg = KC("gemm", bm=16, bn=16, bk=32, warps=4, stages=2, split_k=3)
    for scheme in ("int8_wo", "int4_wo", "int8_dyn"):
        check(scheme, cfg, M=20, N=24, K=96)


@pytest.mark.parametrize("scheme", ["int8_wo", "int4_wo", "fp8_wo"])
def test_dequant_then_gemm(scheme):
    check(scheme, DEQ, M=5, N=40, K=96)


SCALED_MM = KC("scaled_mm", bn=0, bk=0)


@pytest.mark.parametrize("scheme", ["fp8_dyn_row", "fp8_dyn_tensor"])
def test_fp8_scaled_mm(scheme):
    # torch._scaled_mm (the CPU build has one) after our activation quantization; 3-D, bias
    # and no bias, M not a multiple of 16.
    check(scheme, SCALED_MM, M=5, N=48, K=96)
    check(scheme, SCALED_MM, M=17, N=32, K=64, bias=False, x3d=True)


@pytest.mark.parametrize("scheme,w_per_row", [("fp8_dyn_row", False), ("fp8_dyn_tensor", True)])
def test_scaled_mm_with_the_other_weight_scale_granularity(scheme, w_per_row):
    # The ops accept either weight-scale granularity with either activation granularity; the
    # per-tensor one is broadcast for the rowwise kernel.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 96, generator=g).bfloat16()
    q, s = nq.quantize_fp8_weight(w, per_row=w_per_row)
    x = torch.randn(5, 96, generator=g).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    out = D.linear(scheme, x, q, s, b, 0, SCALED_MM)
    assert rel_err(out, REF[scheme](x, (q, s), b, 0)) <= TOL[torch.bfloat16]


def test_scaled_mm_fits_and_falls_back():
    assert D.scaled_mm_fits("fp8_dyn_row", 4096, 4096, torch.bfloat16)
    assert not D.scaled_mm_fits("fp8_dyn_row", 4096, 4096, torch.float16)  # rowwise: bf16 out only
    assert D.scaled_mm_fits("fp8_dyn_tensor", 4096, 4096, torch.float16)
    assert not D.scaled_mm_fits("fp8_dyn_tensor", 4096, 4096, torch.float32)
    assert not D.scaled_mm_fits("fp8_dyn_row", 40, 4096, torch.bfloat16)  # N % 16
    assert not D.scaled_mm_fits("fp8_dyn_row", 4096, 72, torch.bfloat16)  # K % 16
    assert D.scaled_mm_fits("int8_dyn", 4096, 4096, torch.bfloat16)  # torch._int_mm
    assert not D.scaled_mm_fits("int8_dyn", 4096, 4096, torch.bfloat16, M=16)  # _int_mm wants M > 16
    assert not D.scaled_mm_fits("int8_dyn", 4100, 4096, torch.bfloat16)  # N % 8
    assert not D.scaled_mm_fits("int8_wo", 4096, 4096, torch.bfloat16)
    assert not D.scaled_mm_fits("fp8_dyn_tensor", 4096, 4096, torch.float16, 4096)  # per-row w: rowwise
    assert D.scaled_mm_fits("fp8_dyn_tensor", 4096, 4096, torch.bfloat16, 4096)
    assert D._runnable(SCALED_MM, "fp8_dyn_row", 64, 4096, 4096, 0, True) is SCALED_MM
    assert D._runnable(SCALED_MM, "fp8_dyn_row", 64, 4096, 4096, 0, False).kind == "gemm"
    # Where it does not fit, the op still runs (a Triton GEMM) and is right.
    check("fp8_dyn_row", SCALED_MM, M=5, N=40, K=72, dtype=torch.float16)
    assert any(c.kind == "scaled_mm" for c in D.candidate_configs("fp8_dyn_row", 256, 0))
    assert any(c.kind == "scaled_mm" for c in D.candidate_configs("int8_dyn", 256, 0))
    assert not any(c.kind == "scaled_mm" for c in D.candidate_configs("int8_dyn", 16, 0))


@pytest.mark.parametrize("bias", [True, False])
def test_int8_through_int_mm(bias, monkeypatch):
    # torch._int_mm (cuBLAS on the GPU; the CPU build has one) and the Triton scale epilogue;
    # M, N off the epilogue's tiles, 3-D x. At M <= 16 (_int_mm's limit) a Triton GEMM runs.
    check("int8_dyn", SCALED_MM, M=37, N=48, K=96, bias=bias)
    check("int8_dyn", SCALED_MM, M=9, N=40, K=64, bias=bias, x3d=True)
    check("int8_dyn", SCALED_MM, M=5, N=48, K=96, bias=bias)
    xq, xs = nq.quantize_int8_per_token(torch.randn(40, 96).bfloat16())
    qw, ws = nq.quantize_int8_weight_for_dynamic(torch.randn(48, 96))
    monkeypatch.setattr(D, "get_config", lambda *a, **kw: SCALED_MM)  # the prequant op's table entry
    ran = []
    real = D._run_scaled_mm
    monkeypatch.setattr(D, "_run_scaled_mm", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    out = D.linear_prequant("int8_dyn", xq, xs, qw, ws, None, torch.bfloat16)
    assert ran
    assert rel_err(out, torch.ops.fxquant.int8_dynamic_linear_prequant(xq, xs, qw, ws, None, torch.bfloat16)) <= 1e-2


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("cfg", [GEMV, GEMM, GEMM_SWAP], ids=["gemv", "gemm", "swap"])
def test_int4_k_equals_group_and_symmetric(group, cfg):
    check("int4_wo", cfg, M=2, N=24, K=group, group=group, symmetric=True)
    check("int4_wo", cfg, M=2, N=24, K=group, group=group, symmetric=False, seed=1)


@pytest.mark.parametrize("cfg", [GEMM, GEMV], ids=["gemm", "gemv"])
def test_int4_tile_spans_groups(cfg):
    # BK (64 / 128) wider than the group (32): per-group scales inside one tile.
    check("int4_wo", KC("gemm", bm=16, bn=16, bk=128, warps=4, stages=2) if cfg.kind == "gemm"
          else KC("gemv", bn=4, bk=128), M=2, N=20, K=160, group=32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dtypes(scheme, dtype):
    check(scheme, GEMM_SWAP, M=2, N=24, K=64, dtype=dtype)
    check(scheme, GEMV, M=1, N=24, K=64, dtype=dtype, bias=False)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_3d_noncontiguous_and_empty(scheme):
    check(scheme, GEMM, M=3, N=24, K=64, x3d=True)
    check(scheme, GEMV, M=3, N=24, K=64, noncontig=True)
    check(scheme, GEMM_SPLIT, M=5, N=24, K=64, noncontig=True, bias=False)
    w = torch.randn(24, 64)
    packed = pack(scheme, w, 32)
    x = torch.randn(0, 64)
    out = D.linear(scheme, x, *packed, None, 32 if scheme == "int4_wo" else 0)
    assert out.shape == (0, 24)


@pytest.mark.parametrize("M", [1, 8, 17, 64])
def test_default_dispatch(M):
    # No cfg: the launcher picks from M (the path the CUDA op takes).
    for scheme in SCHEMES:
        check(scheme, None, M=M, N=40, K=128)


@pytest.mark.parametrize("fp8,per_row", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("K", [48, 17000])  # one-pass and two-pass rows
def test_act_quant_bit_exact(fp8, per_row, K):
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(3, K, generator=g) * 3).to(torch.bfloat16)
    x[1, 5] = 0.5  # exact .5 after scaling is possible; keep a zero row too
    x[2] = 0
    q, s = AQ.quantize_activations(x, fp8=fp8, per_row=per_row)
    if fp8:
        rq, rs = nq.quantize_fp8(x, per_row)
        assert torch.equal(q.float(), rq.float())
    else:
        rq, rs = nq.quantize_int8_per_token(x)
        assert torch.equal(q, rq)
    assert torch.equal(s, rs.reshape(-1))


def test_fp8_needs_sm89():
    class Dev:
        type = "cuda"
        index = 99
    D._DEV_CACHE[99] = ("a100", 108, (8, 0))
    with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
        D.check_fp8_supported(Dev())


def test_config_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    D._tables.pop("cache", None)
    cfg = KC("gemm", bm=32, bn=64, bk=128, split_k=2, swap=True)
    D.save_tuned("cpu", {D.config_key("int8_wo", torch.bfloat16, 40, 96, 0, 20): cfg})
    assert D.get_config("int8_wo", 20, 40, 96, 0, torch.bfloat16, torch.device("cpu")) == cfg
    assert D.get_config("int8_wo", 70, 40, 96, 0, torch.bfloat16, torch.device("cpu")) != cfg
    D._tables.pop("cache", None)


def test_missing_m_bucket_takes_its_nearest_measured_neighbour():
    """Where a table has no bucket for an M (the shipped one once lacked fp8 weight-only M = 2048),
    the M must not fall to the untuned default (for weight-only schemes, a fused GEMM measured ~0.6x
    of bf16 at 2048) but take the nearest measured bucket."""
    h100 = D._table("shipped")["h100"]
    table = {D.bucket_key("fp8_wo", 0, b): {"kind": "gemm", "bm": b} for b in (512, 1024, 4096, 8192)}
    assert D._nearest_bucket(table, "fp8_wo", 0, 2048)["bm"] == 4096  # 1024 and 4096 tie: the larger
    assert D._nearest_bucket(table, "fp8_wo", 0, 600)["bm"] == 1024  # bucket 1024 itself
    assert D._nearest_bucket(table, "fp8_wo", 0, 100)["bm"] == 512
    # The weight-only schemes have measured M = 2048 buckets (the CUTLASS GEMMs, sessions 8-9 and 13),
    # with dequantize + cuBLAS (what the nearest bucket gave before) as the fallback where the library
    # is missing; int8 dynamic too (session 11), with the Triton GEMM as its fallback
    for scheme, group, fallback in (("int4_wo", 128, "deq"), ("int8_wo", 0, "deq"), ("fp8_wo", 0, "deq"),
                                    ("int8_dyn", 0, "gemm")):
        entry = h100[D.bucket_key(scheme, group, 2048)]
        assert entry["kind"] == "cutlass" and entry["fallback"]["kind"] == fallback
    # A "cxx" entry never serves an M outside the C++ kernels' range, nor the reverse.
    table = {D.bucket_key("int4_wo", 128, 32): {"kind": "cxx"}, D.bucket_key("int4_wo", 128, 256): {"kind": "gemm"}}
    assert D._nearest_bucket(table, "int4_wo", 128, 64)["kind"] == "gemm"
    assert D._nearest_bucket(table, "int4_wo", 128, 16)["kind"] == "cxx"
    assert D._nearest_bucket({D.bucket_key("int4_wo", 128, 32): {"kind": "cxx"}}, "int4_wo", 128, 64) is None
    assert D._nearest_bucket(h100, "int4_wo", 64, 2048) is None  # no entries for that group at all


def test_scaled_mm_entry_gives_its_fallback_where_it_cannot_run(monkeypatch):
    # A table entry of kind scaled_mm serves bf16; fp16 per-row (which _scaled_mm cannot write)
    # gets the Triton config the tuner stored beside it, not the untuned default.
    tri = KC("gemm", bm=64, bn=128, bk=128, warps=4, stages=4)
    entry = {**SCALED_MM.to_json(), "fallback": tri.to_json()}
    monkeypatch.setitem(D._tables, "cache", {})
    monkeypatch.setitem(D._tables, "shipped", {"cpu": {D.bucket_key("fp8_dyn_row", 0, 256): entry}})
    cpu = torch.device("cpu")
    assert D.get_config("fp8_dyn_row", 200, 4096, 4096, 0, torch.bfloat16, cpu) == SCALED_MM
    assert D.get_config("fp8_dyn_row", 200, 4096, 4096, 0, torch.float16, cpu, allow_scaled_mm=False) == tri
    assert D.get_config("fp8_dyn_tensor", 200, 4096, 4096, 0, torch.float16, cpu, allow_scaled_mm=False) == tri
    seen = []
    monkeypatch.setattr(D, "_run_gemm", lambda *a, **k: seen.append(a[6]))
    D.linear("fp8_dyn_row", torch.randn(200, 4096).half(), torch.zeros(4096, 4096, dtype=torch.float8_e4m3fn),
             torch.ones(4096), None)
    assert seen == [tri]


def test_untuned_default_is_dequantize_then_cublas_for_weight_only_at_large_m():
    assert D.default_config("int8_wo", 512, 4096, 4096, 0).kind == "deq"
    assert D.default_config("int4_wo", 2048, 4096, 4096, 128).kind == "deq"
    assert D.default_config("int8_dyn", 2048, 4096, 4096, 0).kind == "gemm"
    assert D.default_config("int8_wo", 128, 4096, 4096, 0).kind == "gemm"


def _record_deq_chunks(monkeypatch) -> list:
    calls = []
    real = D._dequantize_into
    monkeypatch.setattr(D, "_dequantize_into",
                        lambda *a, **k: calls.append((k["n0"], k["rows"])) or real(*a, **k))
    return calls


@pytest.mark.parametrize("scheme", ["int8_wo", "int4_wo", "fp8_wo"])
def test_dequant_then_gemm_in_row_chunks(scheme, monkeypatch):
    """A weight above DEQ_CHUNK_ELEMS is dequantized and multiplied in row chunks (bounded
    temporary memory); the result is the same as in one piece, including the last short chunk,
    and each chunk reads the whole weight's scales in place (int4's [K / g, N, 2] included)."""
    monkeypatch.delenv("FXQUANT_DEQ_ROWS", raising=False)
    monkeypatch.setattr(D, "DEQ_CHUNK_ELEMS", 64 * 96)
    calls = _record_deq_chunks(monkeypatch)
    check(scheme, DEQ, M=5, N=200, K=96)
    assert calls == [(0, 64), (64, 64), (128, 64), (192, 8)]


@pytest.mark.parametrize("value, want", [("128", [(0, 128), (128, 72)]), ("64", [(0, 64), (64, 64), (128, 64), (192, 8)]),
                                         ("256", [(0, 200)]), ("100", [(0, 200)]), ("0", [(0, 200)]), ("x", [(0, 200)])])
def test_dequant_rows_override(value, want, monkeypatch):
    """FXQUANT_DEQ_ROWS (a positive multiple of 64) sets the chunk; anything else keeps one pass."""
    monkeypatch.setenv("FXQUANT_DEQ_ROWS", value)
    calls = _record_deq_chunks(monkeypatch)
    check("int4_wo", DEQ, M=5, N=200, K=96)
    assert calls == want


def test_dequant_rows_override_keeps_the_memory_bound(monkeypatch):
    """A FXQUANT_DEQ_ROWS above DEQ_CHUNK_ELEMS's chunk does not make a huge weight one piece."""
    monkeypatch.setattr(D, "DEQ_CHUNK_ELEMS", 64 * 96)
    monkeypatch.setenv("FXQUANT_DEQ_ROWS", "128")
    assert D._deq_rows(200, 96) == 64
    monkeypatch.setenv("FXQUANT_DEQ_ROWS", "64")
    assert D._deq_rows(60, 96) == 60  # a small weight: still one pass


def test_dequant_chunks_take_a_row_bias(monkeypatch):
    """A [1, N] bias (broadcast like [N]) is sliced per chunk along N, not along its first dimension."""
    monkeypatch.setenv("FXQUANT_DEQ_ROWS", "64")
    g = torch.Generator().manual_seed(9)
    w = torch.randn(200, 96, generator=g)
    qw, s = pack("int8_wo", w, 0)
    x = torch.randn(5, 96, generator=g).bfloat16()
    b = torch.randn(200, generator=g).bfloat16()
    flat = D.linear("int8_wo", x, qw, s, b, 0, DEQ)
    torch.testing.assert_close(D.linear("int8_wo", x, qw, s, b.reshape(1, -1), 0, DEQ), flat, rtol=0, atol=0)
    assert rel_err(flat, REF["int8_wo"](x, (qw, s), b, 0).float()) <= 1e-2


@pytest.mark.parametrize("value, want", [("32,64,4", (32, 64, 4)), ("128,256,8", (128, 256, 8)),
                                         ("48,64,4", (16, 64, 4)), ("32,512,4", (16, 64, 4)), ("32,64", (16, 64, 4)),
                                         ("32,64,32", (16, 64, 4))])
def test_dequant_tile_override(value, want, monkeypatch):
    """FXQUANT_DEQ_TILE="bn,bk,warps" takes powers of two in the kernel's range; anything else is ignored."""
    monkeypatch.setenv("FXQUANT_DEQ_TILE", value)
    assert D._deq_tile(DEQ) == want


def test_fp8_accumulation_is_promoted_every_tile_by_default(monkeypatch):
    # Hopper's fp8 MMA accumulates with reduced precision and Triton never promotes on sm_90
    # by default: measured 1.8-3.6 % relative error at K = 4096, 17 % at K = 14336 (session 6).
    monkeypatch.delenv("FXQUANT_FP8_ACC", raising=False)
    assert D._fp8_acc(128) == 128
    for value, want in (("fast", 0), ("0", 0), (" Fast ", 0), ("tile", 64), ("TILE", 64), ("", 64),
                        ("32", 32), ("512", 64), ("8", 32)):
        monkeypatch.setenv("FXQUANT_FP8_ACC", value)
        assert D._fp8_acc(64) == want, value
    monkeypatch.setattr(D, "_fp8_acc_warned", False)
    monkeypatch.setenv("FXQUANT_FP8_ACC", "precise")
    with pytest.warns(RuntimeWarning, match="FXQUANT_FP8_ACC='precise'"):
        assert D._fp8_acc(64) == 64


def test_shipped_conditional_entries_carry_a_triton_fallback():
    # fp16 per-row fp8 cannot take torch._scaled_mm: it must get the tuner's best Triton config.
    table = D._load(D._SHIPPED_PATH)
    entries = [(key, e) for t in table.values() for key, e in t.items() if e.get("kind") in D.CONDITIONAL_KINDS]
    assert any(e["kind"] == "scaled_mm" for _, e in entries)
    for key, e in entries:
        assert e["fallback"]["kind"] in ("gemv", "gemm", "deq"), key


def test_prequant_op_autotunes_like_the_whole_op(monkeypatch, tmp_path):
    # FXQUANT_AUTOTUNE=1 used to skip the prequant ops (the default path of compiled int8/fp8
    # dynamic models); they now tune the whole op on their activations dequantized.
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(D._tables, "cache", {})
    monkeypatch.setattr(D, "_autotune_now", lambda t: True)
    seen = []
    monkeypatch.setattr(D, "_maybe_autotune", lambda scheme, x2, *a: seen.append((scheme, x2)) or a[-1])
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    qw, ws = nq.quantize_int8_weight_for_dynamic(w)
    x = torch.randn(3, 64, generator=g).bfloat16()
    xq, xs = nq.quantize_int8_per_token(x)
    out = D.linear_prequant("int8_dyn", xq, xs, qw, ws, None, torch.bfloat16)
    assert len(seen) == 1 and seen[0][0] == "int8_dyn"
    x_f = seen[0][1]
    assert x_f.dtype == torch.bfloat16 and x_f.shape == (3, 64)
    assert torch.allclose(x_f.float(), x.float(), rtol=0.02, atol=0.02)  # x, up to int8 rounding
    assert rel_err(out, torch.ops.fxquant.int8_dynamic_linear_prequant(xq, xs, qw, ws, None, torch.bfloat16)) <= 1e-2
    # Once the cache holds the key, no second tuning.
    D._tables["cache"] = {"cpu": {D.config_key("int8_dyn", torch.bfloat16, 24, 64, 0, 3): GEMV.to_json()}}
    D.linear_prequant("int8_dyn", xq, xs, qw, ws, None, torch.bfloat16)
    assert len(seen) == 1


# --------------------------------------------------------------------------- TMA loads
GEMM_TMA = KC("gemm", bm=16, bn=32, bk=32, warps=4, stages=2, tma=True)
GEMM_TMA_SWAP_SPLIT = KC("gemm", bm=16, bn=16, bk=32, warps=4, stages=2, split_k=2, swap=True, tma=True)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("cfg", [GEMM_TMA, GEMM_TMA_SWAP_SPLIT], ids=["plain", "swap_splitk"])
def test_tma_gemm(scheme, cfg, monkeypatch):
    # Tails in M and N: the copy engine's out-of-range rows must read as zero, and be masked on store.
    taken = []
    real = D._tma_descriptors
    monkeypatch.setattr(D, "_tma_descriptors", lambda *a: taken.append(real(*a)) or taken[-1])
    check(scheme, cfg, M=21, N=40, K=96)
    assert taken and all(d is not None for d in taken), "the TMA path was not taken"


@pytest.mark.parametrize("scheme", ["int8_wo", "int4_wo", "int8_dyn"])
def test_tma_config_falls_back_to_pointer_loads(scheme, monkeypatch):
    # Where the copy engine cannot take the tensors (x transposed; rows not 16-byte multiples),
    # a tma config runs with pointer loads and gives the same answer. (A dynamic scheme's
    # quantized x is contiguous whatever x was, so only the row length stops it there.)
    taken = []
    real = D._tma_descriptors
    monkeypatch.setattr(D, "_tma_descriptors", lambda *a: taken.append(real(*a)) or taken[-1])
    if scheme != "int8_dyn":
        check(scheme, GEMM_TMA, M=5, N=40, K=96, noncontig=True)
    check(scheme, GEMM_TMA, M=5, N=24, K=40, group=8)
    if scheme != "int8_dyn":  # fp32 activations: bf16-tuned tiles would overflow shared memory
        check(scheme, GEMM_TMA, M=5, N=40, K=96, dtype=torch.float32)
    assert taken and all(d is None for d in taken)


@pytest.mark.parametrize("scheme", ["int8_wo", "int4_wo", "fp8_wo"])
@pytest.mark.parametrize("m", [128, 256, 512, 1024])
def test_weight_only_candidates_avoid_the_miscompiled_wide_swap(scheme, m):
    # Triton 3.6 on H100 gave wrong results for swapped weight-only tiles with a 256-wide x tile
    # (a register A operand at wgmma N = 256); the tuner must never offer them.
    cands = D.candidate_configs(scheme, m, 128 if scheme == "int4_wo" else 0)
    assert not [c for c in cands if c.kind == "gemm" and c.swap and c.bm > 128]


def test_tma_candidates_from_m_64():
    for m in (16, 32):
        assert not [c for c in D.candidate_configs("int8_dyn", m, 0) if c.tma]
    for m in (64, 512, 4096):
        cands = D.candidate_configs("int8_dyn", m, 0)
        tma = [c for c in cands if c.tma]
        assert tma and all(c.kind == "gemm" for c in tma)
        assert {dataclasses.replace(c, tma=False) for c in tma} <= set(cands)


def test_autotune_rejects_a_config_with_wrong_output(monkeypatch):
    # A miscompiled config can be the fastest; the tuner checks outputs before it times anything.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=g)
    qw, s = nq.quantize_int8_per_channel(w)
    x = torch.randn(5, 96, generator=g).bfloat16()
    bad = KC("gemm", bm=16, bn=32, bk=32, warps=4, stages=2, swap=True)
    real = D.linear

    def linear(scheme, x2, *a):
        out = real(scheme, x2, *a)
        return out * 1.5 if a[-1] == bad else out

    monkeypatch.setattr(D, "linear", linear)
    monkeypatch.setattr(D, "time_config", lambda fn, reps=20: (fn(), 1.0 if fn else 0)[1])
    best, results = D.autotune("int8_wo", x, qw, s, None, 0, candidates=[bad, GEMM, GEMV])
    assert results[repr(bad)].startswith("wrong: relative error")
    assert best == GEMM and results[repr(GEMM)] == 1.0


@pytest.mark.parametrize("scheme", ["int8_wo", "int4_wo", "fp8_wo"])
@pytest.mark.parametrize("m", [16, 128, 512])
def test_weight_only_candidates_have_no_swapped_two_warpgroup_tiles(scheme, m):
    # The swapped int4 tile over 8 warps raced on the H100 (different outputs, some inf, on
    # identical calls): neither the tuner nor the shipped table may offer that family.
    cands = D.candidate_configs(scheme, m, 128 if scheme == "int4_wo" else 0)
    assert not [c for c in cands if c.kind == "gemm" and c.swap and c.warps >= 8]
    table = D._load(D._SHIPPED_PATH)
    for dev, entries in table.items():
        for key, e in entries.items():
            if key.split("|")[0] in D.WEIGHT_ONLY:
                for c in (e, e.get("fallback") or {}):
                    assert not (c.get("kind") == "gemm" and c.get("swap") and c.get("warps", 4) >= 8), (dev, key)


def test_int_mm_needs_a_per_row_weight_scale():
    # The scale epilogue reads one weight scale per output column: a per-tensor ([1]) int8 weight
    # scale must not take it (it read past the scale and gave NaN); the Triton GEMM serves it.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 96, generator=g)
    qw, ws = nq.quantize_int8_weight_for_dynamic(w)
    ws1 = ws.abs().max().reshape(1)
    assert not D.scaled_mm_fits("int8_dyn", 48, 96, torch.bfloat16, 1, M=37)
    x = torch.randn(37, 96, generator=g).bfloat16()
    out = D.linear("int8_dyn", x, qw, ws1, None, 0, SCALED_MM)
    assert rel_err(out, torch.ops.fxquant.int8_dynamic_linear(x, qw, ws1, None)) <= 1e-2


@pytest.mark.parametrize("cfg", [KC("gemm", bm=256, bn=64, bk=64, warps=4, swap=True),
                                 KC("gemm", bm=128, bn=128, bk=64, warps=8, stages=4, swap=True, tma=True)])
def test_known_bad_weight_only_tiles_never_run(cfg):
    # An autotune cache written before these families were dropped may still name them.
    got = D._runnable(cfg, "int4_wo", 256, 4096, 4096, 128, False)
    assert got != cfg and not (got.kind == "gemm" and got.swap and (got.bm > 128 or got.warps >= 8))
    assert D._runnable(cfg, "int8_dyn", 256, 4096, 4096, 0, False) == cfg  # 8-bit MMA tiles are fine


@pytest.mark.parametrize("scheme", ["int8_wo", "int4_wo", "int8_dyn", "fp8_dyn_tensor"])
def test_reference_linear_in_row_chunks(scheme, monkeypatch):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(40, 96, generator=g)
    qw, s = pack(scheme, w, 32)
    x = torch.randn(5, 96, generator=g).bfloat16()
    b = torch.randn(40, generator=g)
    whole = D.reference_linear(scheme, x, qw, s, b, 32)
    monkeypatch.setattr(D, "DEQ_CHUNK_ELEMS", 7 * 96)  # 7 rows per chunk: a ragged last chunk
    torch.testing.assert_close(D.reference_linear(scheme, x, qw, s, b, 32), whole, rtol=1e-5, atol=1e-5)
    assert rel_err(whole, REF[scheme](x, (qw, s), b.bfloat16(), 32).float()) <= 1e-2


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("I", [40, 3000, 17000])  # one-pass and two-pass rows
def test_swiglu_quant_matches_numerics(fp8, dtype, I):
    g = torch.Generator().manual_seed(I)
    gu = (torch.randn(4, 2 * I, generator=g) * 3).to(dtype)
    gate, up = gu[:, :I], gu[:, I:]  # the horizontal fusion's split: strided row views
    gate[3] = 0  # a zero row: scale is tiny, q is 0
    q, s = AQ.quantize_swiglu(gate, up, fp8)
    rq, rs = nq.quantize_swiglu_per_token(gate, up, fp8)
    # The interpreter computes exp and the division exactly as the CPU reference does (the GPU
    # test allows the hardware's last-bit differences): bit for bit here, fast math or not.
    assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs.reshape(-1))
    assert torch.equal(q[3].float(), torch.zeros(I))
    qf, sf = AQ.quantize_swiglu(gate, up, fp8, fast=True)
    assert torch.equal(qf.float(), rq.float()) and torch.equal(sf, s)
