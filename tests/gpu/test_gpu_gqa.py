"""The grouped-query attention fold (backend option `fold_gqa`) on CUDA: SDPA picks its own kernel
for the folded shapes (with a mask: not flash), and the outputs equal the unfolded attention's in
bf16, including cache lengths that are not a multiple of 8 (the mask is padded by SDPA itself) and
under CUDA graphs. Skipped without a GPU."""
import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant.numerics import sqnr
from fxquant.passes import gqa_attention
from fxquant.passes.gqa_attention import fold_gqa_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fold_small_batches(monkeypatch):
    """Numerics at every batch size, including those the pass leaves unfolded by default."""
    monkeypatch.setattr(gqa_attention, "MIN_KV_HEADS_IN_BATCH", 1)


def _repeat(x, g):  # transformers' repeat_kv
    b, h, L, d = x.shape
    return x[:, :, None, :, :].expand(b, h, g, L, d).reshape(b, h * g, L, d)


def attn(q, k, v, mask, g):
    return F.scaled_dot_product_attention(q, _repeat(k, g), _repeat(v, g), attn_mask=mask)


def _folding_inductor(folds):
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        folds.append(fold_gqa_attention(gm))
        return compile_fx(gm, example_inputs)
    return backend


@pytest.mark.parametrize("b,hkv,g,lq,lk", [(1, 8, 4, 1, 384), (32, 8, 4, 1, 384), (4, 8, 4, 1, 131),
                                           (2, 2, 8, 4, 77), (3, 4, 2, 16, 256)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_fold_equals_unfolded_bf16(b, hkv, g, lq, lk, mask_kind):
    torch.manual_seed(0)
    dev, dt, d = "cuda", torch.bfloat16, 128
    q = torch.randn(b, hkv * g, lq, d, device=dev, dtype=dt)
    k, v = (torch.randn(b, hkv, lk, d, device=dev, dtype=dt) for _ in range(2))
    mask = None
    if mask_kind == "bool":  # a static cache's mask: the first `filled` positions
        filled = torch.randint(1, lk + 1, (b,), device=dev)
        mask = (torch.arange(lk, device=dev)[None, :] < filled[:, None])[:, None, None, :].expand(b, 1, lq, lk)
    elif mask_kind == "float":
        mask = torch.randn(1, 1, lq, lk, device=dev, dtype=dt)
    ref = attn(q.float(), k.float(), v.float(), mask.float() if mask_kind == "float" else mask, g)
    eager = attn(q, k, v, mask, g)
    folds = []
    torch._dynamo.reset()
    out = torch.compile(attn, backend=_folding_inductor(folds), dynamic=False)(q, k, v, mask, g)
    assert folds == [1]
    # The fold changes which tile a row sits in, not its math: as close to fp32 as bf16 eager is.
    assert sqnr(ref, out.float()) > min(sqnr(ref, eager.float()) - 3.0, 40.0)
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)


def test_hf_llama_decode_cuda_graphs():
    """A small HF Llama with GQA and a static cache, int8 weight-only, mode reduce-overhead: the
    decode graph folds every layer and its logits match the same backend with the fold off."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation="sdpa")
    dev = torch.device("cuda")
    ids = torch.randint(0, 512, (4, 12), device=dev, generator=torch.Generator(dev).manual_seed(1))
    logits, folds = {}, {}
    for fold in (False, True):
        torch.manual_seed(0)
        with torch.device(dev):
            model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        cache = transformers.StaticCache(config=cfg, max_cache_len=40)
        cache.early_initialization(batch_size=4, num_heads=2, head_dim=32, dtype=torch.bfloat16, device=dev)
        be = fxquant.backend(fxquant.Int8WeightOnly(), fold_gqa=fold, mode="reduce-overhead")
        torch._dynamo.reset()
        m = torch.compile(model, backend=be)
        out = []
        with torch.inference_mode():
            pos = torch.arange(12, device=dev)
            torch.compiler.cudagraph_mark_step_begin()
            out.append(m(ids, position_ids=pos[None], past_key_values=cache, use_cache=True).logits[:, -1].clone())
            for i in range(6):
                pos = torch.arange(12 + i, 13 + i, device=dev)
                torch.compiler.cudagraph_mark_step_begin()
                out.append(m(ids[:, i:i + 1], position_ids=pos[None], past_key_values=cache,
                             use_cache=True).logits[:, -1].clone())
        logits[fold], folds[fold] = torch.stack(out).float(), list(be.gqa_folds)
    assert folds[False] == [] and folds[True][-1] == cfg.num_hidden_layers
    assert sqnr(logits[False], logits[True]) > 35.0
