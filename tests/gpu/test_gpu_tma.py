"""TMA (tensor-descriptor) GEMM configs and every tuning candidate, on the GPU, against the CPU
reference op.

The tuner may pick any candidate it is offered, so each one must be right on this GPU: Triton 3.6
miscompiled one family (swapped weight-only tiles with a 256-wide x tile) into wrong results on
an H100, silently. Tolerances as in test_gpu_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_gpu_kernels import FP8_OK, SCHEMES, assert_close, pack  # noqa: E402

from fxquant.lowering.triton import dispatch as D  # noqa: E402

HOPPER = torch.cuda.get_device_capability() >= (9, 0)
KC = D.KernelConfig
TMA_CONFIGS = {
    "swap": KC("gemm", bm=128, bn=64, bk=128, warps=4, stages=3, swap=True, tma=True),
    "plain": KC("gemm", bm=128, bn=128, bk=64, warps=8, stages=3, tma=True),
    "swap_splitk": KC("gemm", bm=64, bn=128, bk=64, warps=4, stages=3, split_k=3, swap=True, tma=True),
}


def _reference(scheme, x, packed_cpu, bias, group):
    _, cpu_fn = packed_cpu
    return cpu_fn(x.cpu(), None if bias is None else bias.cpu())


def _skip(scheme):
    if "fp8" in scheme and not FP8_OK:
        pytest.skip("fp8 needs sm_89+")


@pytest.mark.parametrize("cfg", list(TMA_CONFIGS), ids=list(TMA_CONFIGS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_tma_configs_awkward_shapes(scheme, cfg):
    _skip(scheme)
    cfg = TMA_CONFIGS[cfg]
    taken = []
    real = D._tma_descriptors

    def spy(*a):
        taken.append(real(*a))
        return taken[-1]

    D._tma_descriptors = spy
    try:
        # (N, K): N off the tile grid; K = 33 * 128 (TMA-admissible); K = 1000 is not for the
        # 8-bit and int4 weights (rows of 1000 / 500 bytes): there the config runs pointer loads.
        for N, K, want_tma in ((1000, 4224, True), (136, 1000, False)):
            group = 128 if K % 128 == 0 else 8
            torch.manual_seed(N + K)
            w = torch.randn(N, K, dtype=torch.bfloat16)
            packed = pack(scheme, w, group)
            qw = tuple(t.cuda() for t in packed[0])
            bias = torch.randn(N, dtype=torch.bfloat16, device="cuda")
            for M in (1, 77, 300, 1025):
                taken.clear()
                x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
                b = bias if M % 2 else None
                out = D.linear(scheme, x, *qw, b, group if scheme == "int4_wo" else 0, cfg)
                ref = _reference(scheme, x, packed, b, group)
                assert_close(out, ref, torch.bfloat16, f"{scheme} {cfg} M={M} N={N} K={K}")
                assert [d is not None for d in taken] == [want_tma and HOPPER], (M, N, K)
    finally:
        D._tma_descriptors = real


@pytest.mark.parametrize("M", [64, 256, 1024])
@pytest.mark.parametrize("scheme", ["int8_wo", "int4_wo", "fp8_wo", "int8_dyn", "fp8_dyn_row"])
def test_every_tuning_candidate_is_correct(scheme, M):
    _skip(scheme)
    torch.manual_seed(M)
    N, K = 1040, 1024  # N off the 64/128 grid but a multiple of 16, as the benchmark shapes
    group = 128 if scheme == "int4_wo" else 0
    w = torch.randn(N, K, dtype=torch.bfloat16)
    packed = pack(scheme, w, 128)
    qw = tuple(t.cuda() for t in packed[0])
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    ref = _reference(scheme, x, packed, None, 128)
    cands = D.candidate_configs(scheme, M, group)
    assert len(cands) >= 4
    for cfg in cands:
        if cfg.kind in ("cxx", "scaled_mm"):
            continue  # not Triton kernels (their own tests cover them)
        out = D.linear(scheme, x, *qw, None, group, cfg)
        assert_close(out, ref, torch.bfloat16, f"{scheme} M={M} {cfg}")


def _packed_on_gpu(scheme, n, k, group):
    from fxquant import numerics as nq
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    if scheme == "int4_wo":
        q, sz = nq.quantize_int4_groupwise(w, group)
        return nq.pack_int4(q), sz
    if scheme == "int8_wo":
        return nq.quantize_int8_per_channel(w)
    if scheme == "int8_dyn":
        return nq.quantize_int8_weight_for_dynamic(w)
    return nq.quantize_fp8_weight(w, per_row=scheme != "fp8_dyn_tensor")


@pytest.mark.parametrize("scheme", ["int8_wo", "int4_wo", "int8_dyn", "fp8_dyn_row"])
def test_shipped_gemm_entries_are_deterministic_and_right(scheme):
    # Every exact-shape GEMM entry (and GEMM fallback) of this GPU's shipped table (M <= 1024),
    # 20 identical calls:
    # bitwise the same output each time (split-K sums in a fixed order; a compiler race would
    # show here) and within tolerance of numerics.py.
    _skip(scheme)
    devs = D._table_devices(torch.device("cuda"))  # what the dispatcher reads here (an H200 reads the H100's)
    table = D._load(D._SHIPPED_PATH)
    dev = next((d for d in devs if table.get(d)), None)
    entries = [(key, c) for key, e in table.get(dev, {}).items()
               if key.startswith(scheme + "|") and key.count("|") == 4 and int(key.rsplit("|m", 1)[1]) <= 1024
               for c in (e, e.get("fallback") or {}) if c.get("kind") == "gemm"]  # fallbacks too
    if not entries:
        pytest.skip(f"no shipped table for {devs}")
    packed = {}
    torch.manual_seed(0)
    for key, e in sorted(entries, key=lambda kv: kv[0]):
        _, _, nk, g, m = key.split("|")
        n, k = (int(v) for v in nk.split("x"))
        group = int(g[1:])
        if (n, k) not in packed:
            packed.clear()
            packed[(n, k)] = _packed_on_gpu(scheme, n, k, group or 128)
        qw = packed[(n, k)]
        cfg = D.KernelConfig.from_json(e)
        x = torch.randn(int(m[1:]), k, device="cuda", dtype=torch.bfloat16)
        ref = D.reference_linear(scheme, x, *qw, None, group)
        first = D.linear(scheme, x, *qw, None, group, cfg)
        err = D._rel_err(first, ref)
        assert err <= 1e-2, f"{key} {cfg}: rel err {err:.2e}"
        for i in range(20):
            assert torch.equal(D.linear(scheme, x, *qw, None, group, cfg), first), f"{key} {cfg}: call {i} differs"
