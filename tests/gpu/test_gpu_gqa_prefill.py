"""The prefill attention kernel (fxquant/lowering/triton/attention_prefill.py) on CUDA against an
fp64 reference, as close as SDPA's own bf16 kernel gets: the benchmark's prefill shapes, awkward
lengths, every mask form and block shape, and key tiles outside a query block's range never read.
Skipped without a GPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from fxquant.lowering.triton import attention_prefill as P
from fxquant.numerics import sqnr
from helpers import attention_reference, repeat_kv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _causal(b, lq, lk, dev):  # a static cache's prefill mask: query i sees keys up to lk - lq + i
    return (torch.arange(lk, device=dev)[None, :] <= (lk - lq) + torch.arange(lq, device=dev)[:, None])[
        None, None].expand(b, 1, lq, lk)


def _mask(kind, b, h, lq, lk, dev):
    if kind == "none":
        return None
    if kind == "causal":
        return _causal(b, lq, lk, dev)
    if kind == "float_min":
        return torch.where(_causal(b, lq, lk, dev), 0.0, torch.finfo(torch.float32).min)
    m = torch.rand(b, h, lq, lk, device=dev) > 0.5  # per_head
    m[..., 0] = True
    return m


@pytest.mark.parametrize("b,hkv,g,lq,lk", [(1, 8, 4, 2048, 2064), (4, 8, 4, 512, 640), (2, 2, 8, 77, 100),
                                           (3, 4, 2, 130, 130), (1, 1, 16, 65, 1000)])
@pytest.mark.parametrize("mask_kind", ["causal", "float_min", "per_head", "none"])
@pytest.mark.parametrize("blocks", [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)])
def test_prefill_matches_reference(b, hkv, g, lq, lk, mask_kind, blocks):
    torch.manual_seed(0)
    dev, dt, d = "cuda", torch.bfloat16, 128
    q = torch.randn(b, lq, hkv * g, d, device=dev, dtype=dt).transpose(1, 2)  # HF's strided q
    k, v = (torch.randn(b, hkv, lk, d, device=dev, dtype=dt) for _ in range(2))
    mask = _mask(mask_kind, b, hkv * g, lq, lk, dev)
    scale = 1 / math.sqrt(d)
    bm, bn, warps, stages = blocks
    out = P.prefill_attention(q, k, v, mask, scale, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
    assert out.shape == q.shape and out.dtype == dt and out.is_contiguous()
    ref = attention_reference(q, k, v, mask, scale)
    sm = mask.to(dt) if mask is not None and mask.dtype != torch.bool else mask
    sdpa = F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=sm, scale=scale)
    floor = min(sqnr(ref, sdpa), 40.0) - 1.0  # as close as SDPA's bf16 kernel, or 39 dB
    assert sqnr(ref, out) > floor


def test_prefill_fp16_and_head_dim_64():
    torch.manual_seed(1)
    dev, dt = "cuda", torch.float16
    q = torch.randn(2, 32, 300, 64, device=dev, dtype=dt)
    k, v = (torch.randn(2, 8, 320, 64, device=dev, dtype=dt) for _ in range(2))
    mask = _causal(2, 300, 320, dev)
    out = P.prefill_attention(q, k, v, mask, 0.125)
    assert sqnr(attention_reference(q, k, v, mask, 0.125), out) > 40


def test_tiles_outside_the_allowed_range_are_not_read():
    """Causal prefill of 256 queries over 512 keys, 128-row blocks and 64-key tiles, keys 384+ allowed
    to nobody: NaN in those K/V rows must not reach the output."""
    torch.manual_seed(2)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, 32, 256, 128, device=dev, dtype=dt)
    k, v = (torch.randn(1, 8, 512, 128, device=dev, dtype=dt) for _ in range(2))
    mask = _causal(1, 256, 512, dev).clone()
    mask[..., 384:] = False
    kn, vn = k.clone(), v.clone()
    kn[:, :, 384:], vn[:, :, 384:] = float("nan"), float("nan")
    out = P.prefill_attention(q, kn, vn, mask, 0.1, block_m=128, block_n=64, num_warps=8)
    assert torch.isfinite(out).all()
    assert sqnr(attention_reference(q, k, v, mask, 0.1), out) > 40


def test_fully_masked_rows_are_zero():
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, 4, 100, 128, device=dev, dtype=dt)
    k, v = (torch.randn(1, 1, 100, 128, device=dev, dtype=dt) for _ in range(2))
    mask = torch.ones(1, 1, 100, 100, dtype=torch.bool, device=dev)
    mask[:, :, 10:20] = False
    out = P.prefill_attention(q, k, v, mask, 0.1)
    assert (out[:, :, 10:20] == 0).all() and torch.isfinite(out).all()
    keep = torch.ones(100, dtype=torch.bool)
    keep[10:20] = False
    assert sqnr(attention_reference(q, k, v, mask, 0.1)[:, :, keep], out[:, :, keep]) > 40


@pytest.mark.parametrize("mask_kind", ["causal", "float_min", "none"])
def test_op_takes_the_prefill_kernel_with_a_mask(mask_kind, monkeypatch):
    """fxquant::gqa_attention beyond 64 query positions: the prefill kernel where a mask is given
    (its gain is the tiles it skips), SDPA on repeated K/V without one; both match the reference."""
    from fxquant.lowering import attention as op_mod
    used = []
    real_pre, real_sdpa = P.prefill_attention, op_mod.sdpa_repeated
    monkeypatch.setattr(P, "prefill_attention", lambda *a, **kw: used.append("prefill") or real_pre(*a, **kw))
    monkeypatch.setattr(op_mod, "sdpa_repeated", lambda *a: used.append("sdpa_repeated") or real_sdpa(*a))
    torch.manual_seed(3)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, 300, 32, 128, device=dev, dtype=dt).transpose(1, 2)
    k, v = (torch.randn(1, 8, 320, 128, device=dev, dtype=dt) for _ in range(2))
    mask = _mask(mask_kind, 1, 32, 300, 320, dev)
    out = torch.ops.fxquant.gqa_attention(q, k, v, mask, None)
    assert used == (["sdpa_repeated"] if mask is None else ["prefill"])
    assert sqnr(attention_reference(q, k, v, mask, 1 / math.sqrt(128)), out) > 38
