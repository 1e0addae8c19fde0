"""The prefill attention kernel (fxquant/lowering/triton/attention_prefill.py) under
TRITON_INTERPRET=1 against an fp64 reference: mask forms, block shapes, awkward lengths, and key
tiles outside each query block's allowed range never read."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fxquant.lowering  # noqa: E402,F401
from fxquant.numerics import sqnr  # noqa: E402
from helpers import attention_reference, interpreted_kernels  # noqa: E402


P = interpreted_kernels(["common", "attention", "attention_prefill"],
                        "attention_prefill.prefill_attention_kernel")[-1]


def _causal(b, lq, lk):  # a static cache's prefill mask: query i sees keys up to lk - lq + i
    return (torch.arange(lk)[None, :] <= (lk - lq) + torch.arange(lq)[:, None])[None, None].expand(b, 1, lq, lk)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.integers(1, 3), lq=st.integers(1, 40),
       extra=st.integers(0, 30), kind=st.sampled_from(["causal", "float_min", "per_head", None]),
       block=st.sampled_from([(16, 16), (32, 16), (16, 32)]), seed=st.integers(0, 2**16))
def test_prefill_matches_reference(b, hkv, g, lq, extra, kind, block, seed):
    gen = torch.Generator().manual_seed(seed)
    lk = lq + extra
    q = torch.randn(b, lq, hkv * g, 16, generator=gen).bfloat16().transpose(1, 2)
    k, v = (torch.randn(b, hkv, lk, 16, generator=gen).bfloat16() for _ in range(2))
    if kind == "causal":
        mask = _causal(b, lq, lk)
    elif kind == "float_min":
        mask = torch.where(_causal(1, lq, lk), 0.0, torch.finfo(torch.float32).min)
    elif kind == "per_head":
        mask = torch.rand(1, hkv * g, lq, lk, generator=gen) > 0.5
        mask[..., 0] = True
    else:
        mask = None
    out = P.prefill_attention(q, k, v, mask, 0.25, block_m=block[0], block_n=block[1], num_warps=4)
    assert out.shape == q.shape and out.is_contiguous()
    assert sqnr(attention_reference(q, k, v, mask, 0.25), out) > 40


def test_tiles_outside_the_allowed_range_are_not_read():
    """Causal prefill of 32 queries over 64 keys with 16-key tiles: query block 0 (rows 0-15) may see
    keys up to 47, so tile 3 (keys 48-63) must not be read for it; NaN there changes nothing."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 32, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, 1, 64, 16, generator=gen).bfloat16() for _ in range(2))
    mask = _causal(1, 32, 64).clone()
    mask[..., 48:] = False  # the last key tile allowed for nobody
    kn, vn = k.clone(), v.clone()
    kn[:, :, 48:], vn[:, :, 48:] = float("nan"), float("nan")
    out = P.prefill_attention(q, kn, vn, mask, 0.25, block_m=16, block_n=16, num_warps=4)
    assert torch.isfinite(out).all()
    assert sqnr(attention_reference(q, k, v, mask, 0.25), out) > 40


@triton.jit
def _bounds_probe(flags_ptr, out_ptr, KT, KT_POW2: tl.constexpr):
    """Stores what the attention kernel derives from each row of flags (its own helper)."""
    r = tl.program_id(0)
    first, last, lo, hi = P._tile_bounds(flags_ptr + r * KT, KT, KT_POW2)
    tl.store(out_ptr + r * 4, first)
    tl.store(out_ptr + r * 4 + 1, last)
    tl.store(out_ptr + r * 4 + 2, lo)
    tl.store(out_ptr + r * 4 + 3, hi)


def _bounds(mask, lq, lk, bm, bn):
    """[first, last, whole_lo, whole_hi] per query block, as the attention kernel derives them from
    the mask tile flags (whole_lo == whole_hi: no whole run)."""
    qb, kt = -(-lq // bm), -(-lk // bn)
    kind = P.MASK_BOOL if mask.dtype == torch.bool else P.MASK_FLOAT
    rows = mask.shape[0] * mask.shape[1] * qb
    flags = torch.empty(rows * kt, dtype=torch.int8)
    P.mask_tiles_kernel[(mask.shape[0] * mask.shape[1], qb, kt)](
        mask, flags, *mask.stride(), mask.shape[1], lq, lk, qb, kt, MASK=kind, BLOCK_M=bm, BLOCK_N=bn)
    out = torch.empty(rows * 4, dtype=torch.int32)
    _bounds_probe[(rows,)](flags, out, kt, triton.next_power_of_2(kt))
    out = out.view(-1, 4).tolist()
    return [out[i * qb:(i + 1) * qb] for i in range(mask.shape[0] * mask.shape[1])]


def test_bounds_of_a_causal_cache_mask():
    """64 queries over 80 keys, 16 x 16 tiles: query block j sees keys up to 16j + 31, so tiles
    0..j are whole (no mask needed), tile j + 1 is the diagonal, nothing after it."""
    mask = _causal(1, 64, 80).contiguous()
    assert _bounds(mask, 64, 80, 16, 16) == [[[0, j + 1, 0, j + 1] for j in range(4)]]
    # as a float mask: the same; with a bias on the allowed entries nothing is whole
    fmask = torch.where(mask, 0.0, float("-inf"))
    assert _bounds(fmask, 64, 80, 16, 16) == [[[0, j + 1, 0, j + 1] for j in range(4)]]
    # (no whole run: whole_lo == whole_hi, past the last allowed tile)
    assert _bounds(torch.where(mask, 0.5, float("-inf")), 64, 80, 16, 16) == [[[0, j + 1, j + 2, j + 2] for j in range(4)]]


def test_bounds_of_a_window_with_a_hole():
    """One query block of 16 rows: keys 0-15 masked, 16-63 allowed but for key 40, keys 64+ masked;
    a 70-key cache, so the last tile (keys 64-69) is partial. First run of whole tiles: tile 1 only."""
    mask = torch.zeros(1, 1, 16, 70, dtype=torch.bool)
    mask[..., 16:64] = True
    mask[..., 40] = False
    assert _bounds(mask, 16, 70, 16, 16) == [[[1, 3, 1, 2]]]
    mask[..., 40] = True
    mask[..., 64:] = True  # the partial tile is never whole: its bounds checks are needed
    assert _bounds(mask, 16, 70, 16, 16) == [[[1, 4, 1, 4]]]


def test_window_mask_output():
    """A sliding window (keys q-20..q): masked tiles before and after a whole run, against fp64."""
    gen = torch.Generator().manual_seed(5)
    lq = lk = 96
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    mask = ((j <= i) & (j > i - 40))[None, None]
    q = torch.randn(1, 2, lq, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, 1, lk, 16, generator=gen).bfloat16() for _ in range(2))
    out = P.prefill_attention(q, k, v, mask, 0.25, block_m=16, block_n=16, num_warps=4)
    assert sqnr(attention_reference(q, k, v, mask, 0.25), out) > 40


def test_empty_cache_gives_zeros():
    q = torch.randn(1, 4, 70, 16).bfloat16()
    k = v = torch.empty(1, 2, 0, 16).bfloat16()
    out = P.prefill_attention(q, k, v, torch.ones(1, 1, 70, 0, dtype=torch.bool), 0.25)
    assert out.shape == q.shape and (out == 0).all()


def test_offsets_fit_in_int32():
    """The kernels index below the batch dim in int32: a mask of 2**31 entries per batch row (here
    40000 queries over a 60000-key cache, never allocated) does not fit, and the op runs SDPA."""
    q = torch.empty(1, 32, 40000, 128, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 8, 60000, 128, device="meta", dtype=torch.bfloat16)
    assert P.offsets_fit(q, k, k, None)
    assert P.offsets_fit(q, k, k, torch.empty(1, 1, 1, 60000, device="meta", dtype=torch.bool))  # one row for all
    assert not P.offsets_fit(q, k, k, torch.empty(1, 1, 40000, 60000, device="meta", dtype=torch.bool))
    assert P.offsets_fit(q[:, :, :2048], k, k, torch.empty(4, 1, 2048, 60000, device="meta", dtype=torch.bool))


def test_op_falls_back_to_sdpa_where_the_prefill_kernel_does_not_fit(monkeypatch):
    """A GPU with less shared memory than the H100 the tiling was chosen on: the compile fails with
    OutOfResources; the op warns once, gives SDPA's result, and does not try the kernel again there."""
    from triton.runtime.errors import OutOfResources

    from fxquant.lowering import attention as op_mod
    calls = []

    def too_big(*a, **kw):
        calls.append(1)
        raise OutOfResources(262144, 232448, "shared memory")
    monkeypatch.setattr(P, "prefill_attention", too_big)
    monkeypatch.setattr(op_mod, "_PREFILL_DOES_NOT_FIT", set())
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 70, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 80, 16, generator=gen).bfloat16() for _ in range(2))
    mask = _causal(1, 70, 80)
    with pytest.warns(UserWarning, match="does not fit this GPU"):
        out = op_mod._cuda(q, k, v, mask, 0.25)  # the CUDA kernel's routing, on CPU tensors
    assert sqnr(attention_reference(q, k, v, mask, 0.25), out) > 40
    out2 = op_mod._cuda(q, k, v, mask, 0.25)
    assert calls == [1] and torch.equal(out, out2)
