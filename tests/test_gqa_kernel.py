"""fxquant::gqa_attention and its split-KV Triton kernel (backend option `gqa_kernel`, on by default
with `fold_gqa`): the kernel under TRITON_INTERPRET=1 against an fp64 reference on every mask
form, split count and awkward length; the op's checks and opcheck; the pass putting the op where a
model repeats its K/V heads, at any batch; an HF Llama through the backend."""
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton")

import fxquant  # noqa: E402
import fxquant.lowering  # noqa: E402,F401
from fxquant.lowering.attention import sdpa_folded  # noqa: E402
from fxquant.numerics import sqnr  # noqa: E402
from helpers import attention_reference, interpreted_kernels, repeat_kv  # noqa: E402
from fxquant.passes.gqa_attention import fold_gqa_attention  # noqa: E402


K = interpreted_kernels(["common", "attention"], "attention.gqa_decode_kernel")[-1]


def _mask(kind, b, h, lq, lk, gen):
    if kind is None:
        return None
    if kind == "float":
        return torch.randn(1, 1, lq, lk, generator=gen)
    if kind in ("float_inf", "float_min"):  # additive masks as HF writes them: 0 where allowed
        m = torch.zeros(b, 1, lq, lk)
        m[torch.rand(b, 1, lq, lk, generator=gen) > 0.5] = float("-inf") if kind == "float_inf" \
            else torch.finfo(torch.float32).min
        m[..., 0] = 0.0
        return m
    shape = {"bool": (b, 1, lq, lk), "per_head": (1, h, lq, lk), "rows": (b, 1, 1, lk)}[kind]
    m = torch.rand(shape, generator=gen) > 0.5
    m[..., 0] = True  # no fully masked row (the reference gives NaN there)
    return m


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), hkv=st.integers(1, 3), g=st.integers(1, 4), lq=st.integers(1, 4),
       lk=st.integers(1, 90), d=st.sampled_from([16, 32]), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       mask_kind=st.sampled_from([None, "bool", "per_head", "rows", "float", "float_inf", "float_min"]),
       mask_fp32=st.booleans(), splits=st.sampled_from([None, 1, 2, 3]), block_n=st.sampled_from([16, 32, 64]),
       seed=st.integers(0, 2**16))
def test_kernel_matches_reference(b, hkv, g, lq, lk, d, dtype, mask_kind, mask_fp32, splits, block_n, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, hkv * g, d, generator=gen).to(dtype).transpose(1, 2)  # HF's strided q
    k, v = (torch.randn(b, hkv, lk, d, generator=gen).to(dtype) for _ in range(2))
    mask = _mask(mask_kind, b, hkv * g, lq, lk, gen)
    if mask is not None and mask.is_floating_point() and not mask_fp32:  # else a float32 mask with 16-bit q
        mask = mask.to(dtype)
    scale = 1 / math.sqrt(d)
    assert K.fits(q, k, v, mask)
    out = K.gqa_decode_attention(q, k, v, mask, scale, splits=splits, block_n=block_n)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    ref = attention_reference(q, k, v, mask, scale)
    # the interpreter keeps p in fp32; only q, k, v and the output are rounded to 16 bits
    assert sqnr(ref, out) > (40 if dtype == torch.bfloat16 else 55)


def test_masked_tiles_are_not_read_and_empty_rows_are_zero():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 2, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 100, 16, generator=gen).bfloat16() for _ in range(2))
    k[:, :, 48:], v[:, :, 48:] = float("nan"), float("nan")  # tiles 48.. are masked out entirely
    mask = torch.zeros(1, 1, 2, 100, dtype=torch.bool)
    mask[0, 0, 0, :33] = True  # row 1: nothing allowed
    out = K.gqa_decode_attention(q, k, v, mask, 0.25, splits=3, block_n=16)
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()
    ref = attention_reference(q[:, :, :1], k[:, :, :33], v[:, :, :33], None, 0.25)
    assert sqnr(ref, out[:, :, :1]) > 40


@pytest.mark.parametrize("g,lq,splits", [(4, 17, None), (8, 20, 1), (2, 40, 2)])
def test_more_than_64_query_rows(g, lq, splits):
    """G x Lq > 64 rows: blocks of 64 rows, each its own program (speculative verification)."""
    gen = torch.Generator().manual_seed(lq)
    q = torch.randn(1, 2 * g, lq, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 70, 16, generator=gen).bfloat16() for _ in range(2))
    mask = torch.arange(70)[None, :] < (50 + torch.arange(lq))[:, None]
    mask = mask[None, None]
    assert K.fits(q, k, v, mask)
    out = K.gqa_decode_attention(q, k, v, mask, 0.25, splits=splits, block_n=32)
    assert sqnr(attention_reference(q, k, v, mask, 0.25), out) > 40


def test_finfo_min_masks_skip_tiles_like_inf():
    """A float mask with finfo.min where masked: those tiles are skipped as with -inf (NaN K/V there
    changes nothing), and the output is the reference's."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 1, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 128, 16, generator=gen).bfloat16() for _ in range(2))
    for fill in (float("-inf"), torch.finfo(torch.float32).min, torch.finfo(torch.bfloat16).min):
        mask = torch.full((1, 1, 1, 128), fill)
        mask[..., :40] = 0.0
        kn, vn = k.clone(), v.clone()
        kn[:, :, 64:], vn[:, :, 64:] = float("nan"), float("nan")
        out = K.gqa_decode_attention(q, kn, vn, mask, 0.25, splits=2, block_n=32)
        ref = attention_reference(q, k[:, :, :40], v[:, :, :40], None, 0.25)
        assert torch.isfinite(out).all() and sqnr(ref, out) > 40


def test_strided_cache_and_mask():
    """K/V as a slice of a larger cache and a mask sliced along its key dim (non-unit strides)."""
    gen = torch.Generator().manual_seed(6)
    big_k, big_v = (torch.randn(3, 2, 90, 32, generator=gen).bfloat16() for _ in range(2))
    k, v = big_k[1:, :, :70], big_v[1:, :, :70]
    q = torch.randn(2, 6, 2, 32, generator=gen).bfloat16()
    mask = (torch.rand(2, 1, 2, 100, generator=gen) > 0.4)[..., :70]
    mask[..., 0] = True
    assert K.fits(q, k, v, mask) and not k.is_contiguous() and mask.stride(-2) == 100
    out = K.gqa_decode_attention(q, k, v, mask, 0.2, splits=2, block_n=32)
    assert sqnr(attention_reference(q, k, v, mask, 0.2), out) > 40


def test_empty_cache():
    q = torch.randn(1, 2, 1, 16).bfloat16()
    kv = torch.randn(1, 1, 0, 16).bfloat16()
    assert (K.gqa_decode_attention(q, kv, kv, None, 0.25) == 0).all()  # no keys: zeros, no division by zero


def test_fits():
    q = torch.randn(1, 8, 1, 128).bfloat16()
    k = torch.randn(1, 2, 10, 128).bfloat16()
    assert K.fits(q, k, k, None) and K.fits(q, k, k, torch.ones(1, 1, 1, 10, dtype=torch.bool))
    assert not K.fits(q.float(), k.float(), k.float(), None)  # fp32: SDPA
    assert not K.fits(q[..., :96], k[..., :96], k[..., :96], None)  # head dim 96
    assert not K.fits(q, k, k, torch.ones(1, 1, 1, 10, dtype=torch.int8))


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_op_cpu_and_opcheck(mask_kind):
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 3, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen), \
        torch.randn(2, 2, 9, 8, generator=gen)
    mask = _mask(mask_kind, 2, 6, 3, 9, gen)
    out = torch.ops.fxquant.gqa_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask, 0.3).float(), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.fxquant.gqa_attention.default, (q, k, v, mask, None))


@pytest.mark.parametrize("args,match", [
    (((1, 6, 1, 8), (1, 4, 5, 8), (1, 4, 5, 8), None), "not a multiple of 4 K/V heads"),
    (((1, 4, 1, 8), (1, 2, 5, 8), (1, 2, 6, 8), None), "differ"),
    (((1, 4, 1, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 1, 1, 4)), r"does not broadcast to \(1, 4, 1, 5\)"),
    (((1, 4, 1, 8), (2, 2, 5, 8), (2, 2, 5, 8), None), "same batch and D"),
    (((4, 1, 8), (2, 5, 8), (2, 5, 8), None), r"must be \[B, heads, len, D\]"),
])
def test_op_errors(args, match):
    q, k, v, m = (None if s is None else torch.randn(s) for s in args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fxquant.gqa_attention(q, k, v, m, None)


def _capture(fn, *args, kernel=True):
    seen = {}

    def backend(gm, example_inputs):
        seen["n"] = fold_gqa_attention(gm, kernel=kernel)
        seen["graph"] = gm.graph
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args)
    return out, seen["n"], seen["graph"]


@pytest.mark.parametrize("b", [1, 4])
def test_pass_puts_the_op_on_the_cache_at_any_batch(b):
    """Batch 1 too (the SDPA fold's batch rule does not apply); no repeat or SDPA is left."""
    gen = torch.Generator().manual_seed(b)
    q = torch.randn(b, 8, 1, 16, generator=gen)
    k, v = torch.randn(b, 2, 20, 16, generator=gen), torch.randn(b, 2, 20, 16, generator=gen)
    mask = _mask("bool", b, 8, 1, 20, gen)

    def attn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask, scale=0.2)

    out, n, graph = _capture(attn, q, k, v, mask)
    assert n == 1
    calls = [x for x in graph.nodes if x.op == "call_function"]
    assert [x.target for x in calls] == [torch.ops.fxquant.gqa_attention.default]
    assert calls[0].args[1].op == "placeholder" and calls[0].args[2].op == "placeholder" and calls[0].args[4] == 0.2
    torch.testing.assert_close(out, attn(q, k, v, mask), rtol=1e-5, atol=1e-5)
    # the SDPA fold keeps its batch rule
    _, n_fold, _ = _capture(attn, q, k, v, mask, kernel=False)
    assert n_fold == (1 if b * 2 >= 16 else 0)


def test_pass_puts_the_op_on_a_static_prefill():
    """A static query length beyond the SDPA fold's 64 rows (a prefill): the op takes it (its CUDA
    prefill kernel skips the mask's empty key tiles); the SDPA fold leaves it alone."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 8, 70, 16, generator=gen)
    k, v = torch.randn(1, 2, 80, 16, generator=gen), torch.randn(1, 2, 80, 16, generator=gen)
    mask = _mask("bool", 1, 8, 70, 80, gen)
    out, n, graph = _capture(_attn_g4, q, k, v, mask)
    assert n == 1
    assert [x.target for x in graph.nodes if x.op == "call_function"] == [torch.ops.fxquant.gqa_attention.default]
    torch.testing.assert_close(out, _attn_g4(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert _capture(_attn_g4, q, k, v, mask, kernel=False)[1] == 0


@pytest.mark.parametrize("b,hkv,lq,path", [(1, 2, 2, "sdpa_repeated"), (8, 2, 2, "sdpa_folded"),
                                            (4, 4, 2, "sdpa_folded"), (8, 2, 70, "sdpa_repeated")])
def test_op_sdpa_path_by_kv_heads(b, hkv, lq, path, monkeypatch):
    """Where the kernel does not run: SDPA on K/V repeated per head below 16 K/V heads in all
    (as the model wrote it) or beyond 64 query positions, on the folded heads otherwise; both give
    the reference."""
    from fxquant.lowering import attention as op_mod
    used = []
    for name in ("sdpa_repeated", "sdpa_folded"):
        real = getattr(op_mod, name)
        monkeypatch.setattr(op_mod, name, lambda *a, real=real, name=name: used.append(name) or real(*a))
    gen = torch.Generator().manual_seed(b)
    q = torch.randn(b, hkv * 3, lq, 8, generator=gen)
    k, v = torch.randn(b, hkv, 11, 8, generator=gen), torch.randn(b, hkv, 11, 8, generator=gen)
    mask = _mask("bool", b, hkv * 3, lq, 11, gen)
    out = torch.ops.fxquant.gqa_attention(q, k, v, mask, None)
    assert used == [path]
    torch.testing.assert_close(out, attention_reference(q, k, v, mask, 1 / math.sqrt(8)).float(),
                               rtol=1e-5, atol=1e-5)


def _attn_g4(q, k, v, mask):
    return F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask)


def _compile_counting(kernel: bool):
    """_attn_g4 compiled with a backend that applies the pass; returns (fn, rewrites per captured graph)."""
    counts = []

    def backend(gm, example_inputs):
        counts.append(fold_gqa_attention(gm, kernel=kernel))
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(_attn_g4, backend=backend), counts


def test_op_with_dynamic_batch_one_graph():
    """A dynamic batch (the cache's other dims fixed, as a static cache has them): one graph with
    the op serves batches 2 and 3."""
    fn, counts = _compile_counting(kernel=True)
    for b in (2, 3):
        gen = torch.Generator().manual_seed(b)
        q, k, v = torch.randn(b, 8, 1, 16, generator=gen), torch.randn(b, 2, 20, 16, generator=gen), \
            torch.randn(b, 2, 20, 16, generator=gen)
        mask = _mask("bool", b, 8, 1, 20, gen)
        for t in (q, k, v, mask):
            torch._dynamo.mark_dynamic(t, 0)
        torch.testing.assert_close(fn(q, k, v, mask), _attn_g4(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert counts == [1]  # one graph, rewritten


@pytest.mark.parametrize("kernel", [True, False])
def test_symbolic_query_length(kernel):
    """A query length that is a symbol in the graph (speculative verification under automatic dynamic
    shapes; that graph also serves prefills): the op takes it and picks its path per call; the SDPA
    fold leaves it alone. One graph serves 2, 3 and 70 query positions."""
    fn, counts = _compile_counting(kernel=kernel)
    for lq in (2, 3, 70):
        gen = torch.Generator().manual_seed(lq)
        q, k, v = torch.randn(2, 8, lq, 16, generator=gen), torch.randn(2, 2, 90, 16, generator=gen), \
            torch.randn(2, 2, 90, 16, generator=gen)
        mask = _mask("bool", 2, 8, lq, 90, gen)
        torch._dynamo.mark_dynamic(q, 2)
        torch._dynamo.mark_dynamic(mask, 2)
        torch.testing.assert_close(fn(q, k, v, mask), _attn_g4(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert counts == [1 if kernel else 0]  # one graph


def test_sdpa_folded_matches_sdpa():
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 6, 2, 8, generator=gen), torch.randn(2, 3, 7, 8, generator=gen), \
        torch.randn(2, 3, 7, 8, generator=gen)
    for kind in (None, "bool", "per_head", "rows", "float"):
        mask = _mask(kind, 2, 6, 2, 7, gen)
        ref = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask, scale=0.5)
        torch.testing.assert_close(sdpa_folded(q, k, v, mask, 0.5), ref, rtol=1e-5, atol=1e-5)


def _tiny_llama(max_positions: int):
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, attn_implementation="sdpa")


def _seeded_model_and_cache(transformers, cfg, cache_len: int):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval(), transformers.StaticCache(config=cfg, max_cache_len=cache_len)


def test_hf_llama_through_backend_and_option():
    transformers, cfg = _tiny_llama(max_positions=64)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    logits, counts = {}, {}
    for kernel in (False, True):
        model, cache = _seeded_model_and_cache(transformers, cfg, 16)
        be = fxquant.backend(fxquant.Int8WeightOnly(), fold_gqa=kernel, gqa_kernel=kernel)
        torch._dynamo.reset()
        m = torch.compile(model, backend=be)
        out = []
        with torch.no_grad():
            out.append(m(ids, position_ids=torch.arange(6)[None], past_key_values=cache, use_cache=True).logits[:, -1])
            for i in range(3):
                out.append(m(ids[:, i:i + 1], position_ids=torch.tensor([[6 + i]]), past_key_values=cache,
                             use_cache=True).logits[:, -1])
        logits[kernel], counts[kernel] = torch.stack(out), list(be.gqa_folds)
    assert counts[False] == [] and counts[True][-1] == cfg.num_hidden_layers  # batch 1 decode
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
    assert fxquant.backend(fxquant.Int8WeightOnly()).gqa_kernel is True
    assert fxquant.compile(torch.nn.Linear(8, 8), fxquant.Int8WeightOnly(), gqa_kernel=False) \
        .fxquant_backend.gqa_kernel is False
    with pytest.raises(TypeError, match="gqa_kernel.*must be True or False"):
        fxquant.Backend.from_options({"gqa_kernel": 1})


def test_hf_llama_static_prefill_through_backend():
    """A 70-token prefill into an HF static cache (past the SDPA fold's 64 rows): with gqa_kernel the
    backend puts the op in every layer of that graph too, with the logits of the unrewritten model."""
    transformers, cfg = _tiny_llama(max_positions=128)
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(2))
    logits, counts = {}, {}
    for fold in (False, True):
        model, cache = _seeded_model_and_cache(transformers, cfg, 80)
        # allocated before the call, as benchmarks/llm.py does (a cache created lazily inside the
        # first call gets no mask there: HF passes is_causal with enable_gqa, nothing to rewrite)
        cache.early_initialization(batch_size=1, num_heads=2, head_dim=16, dtype=torch.float32,
                                   device=torch.device("cpu"))
        be = fxquant.backend(fxquant.Int8WeightOnly(), fold_gqa=fold)
        torch._dynamo.reset()
        with torch.no_grad():
            logits[fold] = torch.compile(model, backend=be)(ids, position_ids=torch.arange(70)[None],
                                                            past_key_values=cache, use_cache=True).logits
        counts[fold] = list(be.gqa_folds)
    assert counts == {False: [], True: [cfg.num_hidden_layers]}
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
