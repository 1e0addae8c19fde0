"""fxquant's Inductor heuristics: persistent row reductions up to FXQUANT_PERSISTENT_RNUMEL."""
import sympy
import pytest
import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint

from fxquant.inductor_choices import DEFAULT_PERSISTENT_RNUMEL, FxquantChoices


@pytest.fixture
def graph_sizevars():
    # Inductor's own rule asks V.graph.sizevars; a bare allocator stands in for a graph.
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V

    class Graph:
        sizevars = SizeVarAllocator()

    with V.set_graph_handler(Graph()):
        yield


class Features:
    def __init__(self, numel, hint=ReductionHint.INNER):
        self.reduction_numel = numel
        self.numel = sympy.Integer(2048)  # rows: only cooperative reductions look at it
        self.hint = hint

    def get_reduction_hint(self):
        return self.hint


@pytest.mark.usefixtures("graph_sizevars")
@pytest.mark.parametrize("numel,want", [(2048, True), (4096, True), (14336, False), (32768, False)])
def test_row_reductions_stay_persistent_up_to_the_limit(numel, want, monkeypatch):
    monkeypatch.delenv("FXQUANT_PERSISTENT_RNUMEL", raising=False)
    f = Features(sympy.Integer(numel))
    assert FxquantChoices.should_use_persistent_reduction(f, False) is want
    # Inductor's own rule stops at 1024 elements: the reason for this class.
    assert InductorChoices.should_use_persistent_reduction(f, False) is False


@pytest.mark.usefixtures("graph_sizevars")
def test_limit_from_the_environment(monkeypatch):
    f = Features(sympy.Integer(4096))
    monkeypatch.setenv("FXQUANT_PERSISTENT_RNUMEL", "0")
    assert FxquantChoices.should_use_persistent_reduction(f, False) is False
    monkeypatch.setenv("FXQUANT_PERSISTENT_RNUMEL", "2048")
    assert FxquantChoices.should_use_persistent_reduction(f, False) is False
    monkeypatch.setenv("FXQUANT_PERSISTENT_RNUMEL", "16384")
    assert FxquantChoices.should_use_persistent_reduction(Features(sympy.Integer(14336)), False) is True
    monkeypatch.setenv("FXQUANT_PERSISTENT_RNUMEL", "lots")
    with pytest.raises(ValueError, match="FXQUANT_PERSISTENT_RNUMEL='lots'"):
        FxquantChoices.should_use_persistent_reduction(f, False)


@pytest.mark.usefixtures("graph_sizevars")
def test_other_reductions_keep_inductors_rule(monkeypatch):
    monkeypatch.delenv("FXQUANT_PERSISTENT_RNUMEL", raising=False)
    assert DEFAULT_PERSISTENT_RNUMEL == 4096  # 16384 measured slower: the 14336-wide row spills
    # Column (OUTER) reductions, symbolic row lengths and cooperative reductions are untouched.
    assert FxquantChoices.should_use_persistent_reduction(Features(sympy.Integer(4096), ReductionHint.OUTER), False) \
        is InductorChoices.should_use_persistent_reduction(Features(sympy.Integer(4096), ReductionHint.OUTER), False)
    assert FxquantChoices.should_use_persistent_reduction(Features(sympy.Symbol("s0", positive=True, integer=True)),
                                                          False) is False
    assert FxquantChoices.should_use_persistent_reduction(Features(sympy.Integer(4096)), True) is False


def test_backend_compiles_with_the_handler_installed(monkeypatch):
    # Inductor compiles fxquant's graphs with FxquantChoices installed, and only those.
    import torch._inductor.compile_fx as cfx
    from torch._inductor.virtualized import V
    import fxquant
    seen = []
    real = cfx.compile_fx

    def spy(*a, **kw):
        seen.append(type(V.choices))
        return real(*a, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    torch._dynamo.reset()
    out = torch.compile(m, backend="fxquant", options={"config": fxquant.Int8WeightOnly()})(torch.randn(3, 64))
    assert out.shape == (3, 64)
    assert seen == [FxquantChoices]
    assert type(V.choices) is not FxquantChoices
