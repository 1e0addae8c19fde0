"""Horizontal fusion of sibling linears (Q/K/V, gate/up): one fxquant op over weights
concatenated along N, then a split; same numbers as the unfused graph."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxquant


class Block(nn.Module):
    """q/k/v without bias on one input, gate/up with bias on the same input, down on another."""

    def __init__(self, gate_bias=True):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(128, 128, bias=False), nn.Linear(128, 64, bias=False), \
            nn.Linear(128, 64, bias=False)
        self.gate, self.up = nn.Linear(128, 256, bias=gate_bias), nn.Linear(128, 256)
        self.down = nn.Linear(256, 128)

    def forward(self, x):
        a = self.q(x)[..., :64] * self.k(x) + self.v(x)
        return self.down(F.silu(self.gate(x)) * self.up(x)) + a.sum(-1, keepdim=True)


CONFIGS = [fxquant.Int8WeightOnly(), fxquant.Int4WeightOnly(group_size=32),
           fxquant.Int8DynamicActivationInt8Weight(), fxquant.Float8DynamicActivationFloat8Weight("row"),
           fxquant.Float8WeightOnly()]


def _run(model, cfg, xs, **opts):
    torch._dynamo.reset()
    be = fxquant.backend(cfg, **opts)
    f = torch.compile(model, backend=be)
    with torch.no_grad():
        outs = [f(x) for x in xs]
    ops = sum(v for k, v in be.compiled_graphs[0].items() if k.startswith("fxquant."))
    return be, outs, ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_siblings_fuse_into_one_op_with_identical_outputs(cfg, dtype):
    torch.manual_seed(0)
    model = Block().to(dtype)
    xs = [torch.randn(2, 5, 128, dtype=dtype)]
    be, fused, n_fused = _run(model, cfg, xs)
    _, plain, n_plain = _run(model, cfg, xs, fuse_siblings=False)
    assert (n_fused, n_plain) == (3, 6)  # {q,k,v}, {gate,up}, down
    assert torch.equal(fused[0], plain[0])
    assert sum(r.status == "quantized" for r in be.report) == 6  # the report still lists every layer


def test_per_tensor_scales_do_not_fuse_and_bias_decides_the_groups():
    torch.manual_seed(0)
    x = [torch.randn(3, 128)]
    _, _, n = _run(Block(), fxquant.Float8DynamicActivationFloat8Weight("tensor"), x)
    assert n == 6  # one scale per weight tensor: siblings cannot share one
    be, _, n = _run(Block(gate_bias=False), fxquant.Int8WeightOnly(), x)
    assert n == 3  # gate lost its bias, so it joins q/k/v; up (with bias) stays apart
    assert be.compiled_graphs[0]["aten.split_with_sizes.default"] == 1


def test_recompile_reuses_the_fused_weights():
    torch.manual_seed(0)
    model = Block()
    be, outs, _ = _run(model, fxquant.Int8WeightOnly(), [torch.randn(3, 128), torch.randn(2, 4, 128)])
    assert len(be.compiled_graphs) == 2  # a 2-D and a 3-D input: two graphs
    fused = [v[1] for k, v in be._pack_cache.items() if k[0] == "fused"]
    assert len(fused) == 2  # {q,k,v} and {gate,up}: packed and concatenated once, shared by both
    for w, _, _ in fused:
        members = [v[1][0] for k, v in be._pack_cache.items() if k[0] != "fused"
                   and v[1][0].untyped_storage().data_ptr() == w.untyped_storage().data_ptr()]
        assert len(members) in (2, 3)  # each member's packed weight is a view of the fused one


def test_recompile_after_in_place_bias_change_uses_the_new_bias():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(3, 128)
    be = fxquant.backend(fxquant.Int8WeightOnly())
    with torch.no_grad():
        torch._dynamo.reset()
        before = torch.compile(model, backend=be)(x)
        model.up.bias.add_(5)
        torch._dynamo.reset()
        after = torch.compile(model, backend=be)(x)
        ref = model(x)
    assert not torch.equal(before, after)
    assert fxquant.sqnr(ref, after) >= 38


def test_pack_cache_lets_go_of_a_dead_models_weights():
    """The backend outlives the model: once the model is gone (and Dynamo's cache with it), its
    packed and fused weights leave the backend's pack cache. (Inductor's own caches of compiled
    modules may still hold the graph's constants; that is torch's, not fxquant's.)"""
    import gc
    torch.manual_seed(0)
    model = Block()
    be, _, _ = _run(model, fxquant.Int8WeightOnly(), [torch.randn(3, 128)])
    keys = list(be._pack_cache)
    assert sum(k[0] == "fused" for k in keys) == 2 and len(keys) == 8  # 6 linears + 2 fused
    del model
    torch._dynamo.reset()
    gc.collect()
    assert be._pack_cache == {}


def test_dynamo_reset_resets_cuda_graphs_and_keeps_live_models_working(monkeypatch):
    """torch._dynamo.reset() calls Backend.reset for callable and string backends: each resets the
    CUDA-graph trees (where CUDA exists). A live model whose weights were released recompiles
    after the reset from the kept pack cache, with the same output."""
    import sys
    B = sys.modules["fxquant.backend"]  # the module (fxquant.backend the attribute is a function)
    calls = []
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(3, 128)
    be = fxquant.backend(fxquant.Int8WeightOnly(), release_weights=True)
    opts = {"config": fxquant.Int8WeightOnly(), "release_weights": True}
    other = Block()
    with torch.no_grad():
        before = torch.compile(model, backend=be)(x)
        before_s = torch.compile(other, backend="fxquant", options=opts)(x)
    reset_by = []  # every Backend Dynamo resets (earlier tests' backends may be among them)
    real_reset = B.Backend.reset
    monkeypatch.setattr(B.Backend, "reset", lambda self: (reset_by.append(self), real_reset(self))[1])
    monkeypatch.setattr(B, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # torch's own reset: no call
    monkeypatch.setattr("torch._inductor.cudagraph_trees.reset_cudagraph_trees", lambda: calls.append(1))
    torch._dynamo.reset()
    monkeypatch.undo()
    assert any(b is be for b in reset_by) and any(b is B._BY_OPTIONS[id(opts)][1] for b in reset_by)
    assert len(calls) == len(reset_by)  # each reset the CUDA-graph trees
    with torch.no_grad():
        after = torch.compile(model, backend=be)(x)
        after_s = torch.compile(other, backend="fxquant", options=opts)(x)
    assert torch.equal(before, after) and torch.equal(before_s, after_s)


def test_dynamo_reset_lets_inductor_drop_packed_constants():
    """Inductor keeps every loaded graph module (with its constants as attributes) in a list;
    after torch._dynamo.reset() the model's packed weights are freed once the model is gone."""
    import gc
    import weakref
    torch.manual_seed(0)
    model = Block()
    be, _, _ = _run(model, fxquant.Int8WeightOnly(), [torch.randn(3, 128)])
    packed = [weakref.ref(t) for v in be._pack_cache.values() for t in torch.utils._pytree.tree_leaves(v)
              if isinstance(t, torch.Tensor)]
    assert packed and all(r() is not None for r in packed)
    del model
    torch._dynamo.reset()
    gc.collect()
    assert all(r() is None for r in packed)
