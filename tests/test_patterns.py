"""Graph tests: which nodes the passes rewrite, and which they must leave alone."""
import pytest
import torch
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import make_fx

import fxquant
from helpers import Block, Forms, Tiny, fxquant_ops


def _compile(model, cfg, *args, **options):
    torch._dynamo.reset()
    be = fxquant.backend(cfg, **options)
    with torch.no_grad():
        out = torch.compile(model, backend=be)(*args)
    return be, out


def test_every_form_is_one_fxquant_node():
    model, x = Forms(), torch.randn(2, 5, 64)
    be, out = _compile(model, fxquant.Int8WeightOnly(), x)
    (ops,) = be.compiled_graphs
    assert fxquant_ops(ops) == 5
    assert ops["aten.mm.default"] == 0 and ops["aten.addmm.default"] == 0
    assert [r.status for r in be.report] == ["quantized"] * 5
    with torch.no_grad():
        assert fxquant.sqnr(model(x), out) > 35


def test_attention_matmuls_and_embedding_untouched():
    model = Tiny()
    ids = torch.randint(0, 96, (2, 7))
    be, _ = _compile(model, fxquant.Int8WeightOnly(), ids)
    (ops,) = be.compiled_graphs
    # 2 blocks x 5 linears + lm_head = 11 layers; q and v (both with bias) share one op per block
    # (horizontal fusion), k has no bias: 9 ops. q@k^T and att@v stay bmm; the embedding stays.
    assert fxquant_ops(ops) == 9
    assert ops["aten.split_with_sizes.default"] == 2
    assert sum(r.status == "quantized" for r in be.report) == 11
    assert ops["aten.bmm.default"] == 4
    assert ops["aten.embedding.default"] == 1
    names = {r.name for r in be.report}
    assert {"blocks.0.q", "blocks.1.down", "lm_head"} <= names


def test_tied_weight_packed_once():
    class TwoSites(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64, bias=False)
            self.b = nn.Linear(64, 64, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model, x = TwoSites(), torch.randn(3, 64)
    be, out = _compile(model, fxquant.Int4WeightOnly(group_size=32), x)
    (ops,) = be.compiled_graphs
    assert fxquant_ops(ops) == 2
    packed_attrs = [k for k in ops if k.startswith("_fxquant_")]
    assert len(packed_attrs) == 2  # one qweight + one scales_zeros, shared by both sites
    a, b = be.report
    assert a.status == b.status == "quantized"
    assert b.bytes_after == 0 and "tied" in b.reason
    with torch.no_grad():
        assert fxquant.sqnr(model(x), out) > 15


def test_skip_globs_and_filter_leave_layers_bit_identical():
    model, x = Block(), torch.randn(2, 4, 64)
    be, out = _compile(model, fxquant.Int8WeightOnly(), x, skip=["q", "k", "v", "up"],
                       filter=lambda name, shape: name != "down")
    (ops,) = be.compiled_graphs
    assert fxquant_ops(ops) == 0
    reasons = {r.name: r.reason for r in be.report}
    assert reasons["q"] == "name matches skip pattern 'q'" and reasons["down"] == "excluded by filter"
    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(model, backend="inductor")(x)
    assert torch.equal(out, ref)


def test_ineligible_shape_skipped_with_reason():
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32))
    be, _ = _compile(model, fxquant.Int4WeightOnly(group_size=64), torch.randn(2, 48))
    first, second = be.report
    assert first.status == "skipped" and "in_features=48 is not a multiple of group_size=64" in first.reason
    assert second.status == "quantized"


def test_no_graph_break_added():
    model, x = Tiny(), torch.randint(0, 96, (2, 7))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    be, _ = _compile(model, fxquant.Int8WeightOnly(), x)
    assert len(be.compiled_graphs) == explained.graph_count == 1


def test_quantize_graph_on_make_fx_graph():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(4, 64)
    gm = make_fx(model)(x)
    gm = fxquant.quantize_graph(gm, fxquant.Int8WeightOnly())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fxquant.int8_weight_only_linear.default) == 2
    assert torch.ops.aten.addmm.default not in targets
    assert [r.status for r in gm.fxquant_report] == ["quantized", "quantized"]
    with torch.no_grad():
        assert fxquant.sqnr(model(x), gm(x)) > 38


@pytest.mark.parametrize("dynamic", [False, True])
def test_quantize_exported(dynamic):
    model = Block().eval()
    x = torch.randn(2, 5, 64)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    ep = torch.export.export(model, (x,), dynamic_shapes=shapes)
    q = fxquant.quantize_exported(ep, fxquant.Int8DynamicActivationInt8Weight())
    targets = [n.target for n in q.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fxquant.int8_dynamic_linear.default) == 5
    assert not any(k.endswith("weight") for k in q.state_dict)  # float weights dropped
    with torch.no_grad():
        assert fxquant.sqnr(model(x), q.module()(x)) > 30
        if dynamic:
            assert q.module()(torch.randn(7, 5, 64)).shape == (7, 5, 64)


def test_quantize_exported_save_load_roundtrip(tmp_path):
    model = Block().eval()
    x = torch.randn(2, 5, 64)
    q = fxquant.quantize_exported(torch.export.export(model, (x,)), fxquant.Int4WeightOnly(group_size=32))
    torch.export.save(q, tmp_path / "q.pt2")
    loaded = torch.export.load(tmp_path / "q.pt2")
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), q.module()(x))
