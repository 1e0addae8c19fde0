"""The `fold_gqa` pass: grouped-query attention at few query rows reads the K/V cache as it is
instead of a copy with every head repeated G times. Outputs equal the unfolded graph's; the graph
has no repeat left; look-alikes and ineligible calls stay as they were."""
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.passes import gqa_attention
from fxquant.passes.gqa_attention import MAX_QUERY_ROWS, fold_gqa_attention


@pytest.fixture(autouse=True)
def fold_small_batches(request, monkeypatch):
    """These tests use a few heads and rows; the batch-size rule has its own test below."""
    if "real_batch_rule" not in request.node.name:
        monkeypatch.setattr(gqa_attention, "MIN_KV_HEADS_IN_BATCH", 1)


def _hf_repeat(x, g):  # transformers' repeat_kv
    b, h, L, d = x.shape
    return x[:, :, None, :, :].expand(b, h, g, L, d).reshape(b, h * g, L, d)


def _unsqueeze_repeat(x, g):
    b, h, L, d = x.shape
    return x.unsqueeze(2).expand(b, h, g, L, d).reshape(b, h * g, L, d)


def _interleave(x, g):  # gpt-fast
    return x.repeat_interleave(g, dim=1)


FORMS = {"hf": _hf_repeat, "unsqueeze": _unsqueeze_repeat, "interleave": _interleave}


def _capture(fn, *args, **kwargs):
    """Run fn through Dynamo with a backend that applies the pass; returns (output, folds, graph)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["folds"] = fold_gqa_attention(gm)
        seen["graph"] = gm.graph
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args, **kwargs)
    return out, seen["folds"], seen["graph"]


def _sdpa_nodes(graph):
    return [n for n in graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]


def _mask(kind, b, heads, lq, lk, gen):
    if kind is None:
        return None
    shape = {"bool": (b, 1, lq, lk), "float": (1, 1, lq, lk), "per_head": (b, heads, lq, lk)}[kind]
    if kind == "float":
        return torch.randn(shape, generator=gen)
    m = torch.rand(shape, generator=gen) > 0.4
    m[..., 0] = True  # no fully masked row (its softmax is undefined)
    return m


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(form=st.sampled_from(sorted(FORMS)), b=st.integers(1, 3), hkv=st.integers(1, 3), g=st.integers(1, 4),
       lq=st.integers(1, 6), lk=st.integers(1, 20), d=st.sampled_from([8, 16]),
       mask_kind=st.sampled_from([None, "bool", "float", "per_head"]), seed=st.integers(0, 2**16))
def test_fold_matches_unfolded(form, b, hkv, g, lq, lk, d, mask_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, lq, d, generator=gen)
    k, v = torch.randn(b, hkv, lk, d, generator=gen), torch.randn(b, hkv, lk, d, generator=gen)
    mask = _mask(mask_kind, b, hkv * g, lq, lk, gen)
    repeat = FORMS[form]

    def attn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, repeat(k, g), repeat(v, g), attn_mask=mask)

    ref = attn(q, k, v, mask)
    out, folds, graph = _capture(attn, q, k, v, mask)
    assert folds == (1 if g > 1 else 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if g > 1:
        (node,) = _sdpa_nodes(graph)
        # the cache tensors themselves feed the attention, and nothing else reads them
        k_in, v_in = node.args[1], node.args[2]
        assert k_in.op == "placeholder" and v_in.op == "placeholder"
        assert list(k_in.users) == [node] and list(v_in.users) == [node]
        # no repeat step is left anywhere in the graph
        assert not [n for n in graph.nodes if n.target in ("reshape", "repeat_interleave", operator.getitem)]


def test_fold_shapes_of_the_folded_call():
    """The attention runs on [B, Hkv, G*Lq, D] queries and the [B, Hkv, Lk, D] cache."""
    b, hkv, g, lq, lk, d = 2, 2, 4, 1, 12, 8
    q = torch.randn(b, hkv * g, lq, d)
    k, v = torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
    mask = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    shapes = []

    def backend(gm, example_inputs):
        fold_gqa_attention(gm)
        (node,) = _sdpa_nodes(gm.graph)
        interp = torch.fx.Interpreter(gm)
        orig = interp.run_node

        def run_node(n):
            r = orig(n)
            if n is node:
                shapes.append([tuple(interp.env[a].shape) for a in n.args])
            return r
        interp.run_node = run_node
        return lambda *a: interp.run(*a)

    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, _hf_repeat(k, g), _hf_repeat(v, g),
                                                                         attn_mask=m), backend=backend)
    fn(q, k, v, mask)
    assert shapes == [[(b, hkv, g * lq, d), (b, hkv, lk, d), (b, hkv, lk, d)]]


@pytest.mark.parametrize("case", ["causal", "dropout", "enable_gqa", "too_many_rows", "interleave_dim2",
                                  "heads_outer", "mask_broadcast_rows", "cache_written_after_repeat"])
def test_not_folded(case):
    """Calls the fold would change (or cannot express) stay as they were, with the same output."""
    torch.manual_seed(0)
    b, hkv, g, lq, lk, d = 2, 2, 2, 3, 10, 8
    if case == "too_many_rows":
        lq = lk = MAX_QUERY_ROWS + 1
    q = torch.randn(b, hkv * g, lq, d)
    k, v = torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
    mask = None

    if case == "causal":
        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, _hf_repeat(k, g), _hf_repeat(v, g), is_causal=True)
    elif case == "dropout":
        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, _hf_repeat(k, g), _hf_repeat(v, g), dropout_p=0.5)
    elif case == "enable_gqa":
        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, _hf_repeat(k, g), _hf_repeat(v, g), enable_gqa=True)
    elif case == "too_many_rows":
        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, _hf_repeat(k, g), _hf_repeat(v, g))
    elif case == "interleave_dim2":  # repeats positions, not heads
        k, v = k[:, :, :lk // 2].repeat(1, g, 1, 1), v[:, :, :lk // 2].repeat(1, g, 1, 1)

        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2))
    elif case == "heads_outer":  # head g * Hkv + kv: another pairing of query and K/V heads
        def rep(x):
            return x[:, None].expand(b, g, hkv, x.shape[2], d).reshape(b, g * hkv, x.shape[2], d)

        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, rep(k), rep(v))
    elif case == "mask_broadcast_rows":  # one mask row for every query position
        mask = torch.rand(b, 1, 1, lk) > 0.3
        mask[..., 0] = True

        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, _hf_repeat(k, g), _hf_repeat(v, g), attn_mask=mask)

    elif case == "cache_written_after_repeat":  # the repeat's copy predates the write: keep the copy
        def fn(q, k, v):
            kr, vr = _hf_repeat(k, g), _hf_repeat(v, g)
            k.mul_(0.5)
            v.add_(1.0)
            return F.scaled_dot_product_attention(q, kr, vr)

    if case == "cache_written_after_repeat":
        ref = fn(q, k.clone(), v.clone())
        out, folds, _ = _capture(fn, q, k, v)
        assert folds == 0
        torch.testing.assert_close(out, ref)
        return
    if case == "dropout":
        out, folds, _ = _capture(fn, q, k, v)
        assert folds == 0
        return
    ref = fn(q, k, v)
    out, folds, graph = _capture(fn, q, k, v)
    assert folds == 0
    torch.testing.assert_close(out, ref)


def test_hf_llama_decode_through_backend():
    """A tiny HF Llama (GQA: 4 query heads, 2 K/V heads) with a static cache through the fxquant
    backend: every decode layer folded, logits as with the option off."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    logits, folds = {}, {}
    for fold in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        cache = transformers.StaticCache(config=cfg, max_cache_len=16)
        be = fxquant.backend(fxquant.Int8WeightOnly(), fold_gqa=fold)
        torch._dynamo.reset()
        m = torch.compile(model, backend=be)
        out = []
        with torch.no_grad():
            pos = torch.arange(6)
            out.append(m(ids, position_ids=pos[None], past_key_values=cache, use_cache=True).logits[:, -1])
            for i in range(3):
                pos = torch.tensor([6 + i])
                out.append(m(ids[:, i:i + 1], position_ids=pos[None], past_key_values=cache,
                             use_cache=True).logits[:, -1])
        logits[fold], folds[fold] = torch.stack(out), list(be.gqa_folds)
    assert folds[False] == []
    assert folds[True][-1] == cfg.num_hidden_layers  # the decode graph (one query row)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)


def test_option_validation_and_passthrough():
    assert fxquant.backend(fxquant.Int8WeightOnly()).fold_gqa is True
    assert fxquant.Backend.from_options({"fold_gqa": False}).fold_gqa is False
    compiled = fxquant.compile(torch.nn.Linear(8, 8), fxquant.Int8WeightOnly(), fold_gqa=False)
    assert compiled.fxquant_backend.fold_gqa is False
    with pytest.raises(TypeError, match="fold_gqa.*must be True or False"):
        fxquant.Backend.from_options({"fold_gqa": "false"})


def test_dynamic_batch_one_graph():
    """Dynamo's automatic dynamic batch (decode: one query row): the first graph is static, the
    recompile makes the batch symbolic (heads stay numbers); both fold, and the second serves every
    later batch size."""
    g, hkv, lk, d = 4, 2, 24, 8
    folds = []

    def backend(gm, example_inputs):
        folds.append(fold_gqa_attention(gm))
        return gm.forward

    def attn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, _hf_repeat(k, g), _hf_repeat(v, g), attn_mask=mask)

    torch._dynamo.reset()
    fn = torch.compile(attn, backend=backend)
    for b in (2, 3, 5, 7):
        q = torch.randn(b, hkv * g, 1, d)
        k, v = torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
        mask = torch.rand(b, 1, 1, lk) > 0.3
        mask[..., 0] = True
        torch.testing.assert_close(fn(q, k, v, mask), attn(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert folds == [1, 1]


def test_real_batch_rule():
    """A static batch with too few K/V heads in all (B * Hkv) stays unfolded; a symbolic batch folds."""
    g, hkv, lk, d = 4, 8, 16, 8
    folds = []

    def backend(gm, example_inputs):
        folds.append(fold_gqa_attention(gm))
        return gm.forward

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, _hf_repeat(k, g), _hf_repeat(v, g))

    torch._dynamo.reset()
    fn = torch.compile(attn, backend=backend)
    small = gqa_attention.MIN_KV_HEADS_IN_BATCH // hkv - 1  # one batch row short
    big = gqa_attention.MIN_KV_HEADS_IN_BATCH // hkv
    for b in (small, big, big + 1):
        q, k, v = torch.randn(b, hkv * g, 1, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
        torch.testing.assert_close(fn(q, k, v), attn(q, k, v), rtol=1e-5, atol=1e-5)
    # static batch `small`: not folded; then the automatic-dynamic batch: folded
    assert folds == [0, 1]
    q, k, v = torch.randn(big, hkv * g, 1, d), torch.randn(big, hkv, lk, d), torch.randn(big, hkv, lk, d)
    _, static_folds, _ = _capture(attn, q, k, v)
    assert static_folds == 1  # a static batch at the threshold folds


class _ConfigGQA(torch.nn.Module):
    """Attention with HF's repeat_kv, head counts from the module (a model's config)."""

    def __init__(self, hkv, g, d):
        super().__init__()
        self.hkv, self.g, self.d = hkv, g, d

    def forward(self, q, k, v, mask):
        def rep(x):
            b, _, L, _ = x.shape
            return x[:, :, None, :, :].expand(b, self.hkv, self.g, L, self.d).reshape(b, self.hkv * self.g, L, self.d)
        return F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask)


def test_dynamic_true_folds_fixed_dims():
    """dynamic=True: dims that tracing fixed to a number (the head counts, from the module as a
    model's config gives them) count as numbers; batch and cache length stay symbolic."""
    g, hkv, d = 4, 2, 8
    folds = []

    def backend(gm, example_inputs):
        folds.append(fold_gqa_attention(gm))
        return gm.forward

    attn = _ConfigGQA(hkv, g, d)
    torch._dynamo.reset()
    fn = torch.compile(attn, backend=backend, dynamic=True)
    for b, lk in ((3, 24), (5, 40)):
        q = torch.randn(b, hkv * g, 1, d)
        k, v = torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
        mask = torch.rand(b, 1, 1, lk) > 0.3
        mask[..., 0] = True
        torch.testing.assert_close(fn(q, k, v, mask), attn(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert folds == [1]
