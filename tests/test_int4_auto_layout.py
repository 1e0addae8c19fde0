"""Int4WeightOnly(layout="auto"), the default: each weight's layout chosen at pack time (config.for_weight),
"mma" where its fast kernels run and the weight fits, "rows" otherwise, with the reason in the report; kept
per weight through quantize_weights / save / load. The CPU has no such kernels, so the tests that need the
"mma" choice pretend it has them (the GPU side: tests/gpu/test_gpu_int4_mma.py)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant import persist
from fxquant.lowering import cuda as fxcuda

AUTO = fxquant.Int4WeightOnly(group_size=64)
MMA_OP = str(torch.ops.fxquant.int4_mma_weight_only_linear.default)
ROWS_OP = str(torch.ops.fxquant.int4_weight_only_linear.default)


@pytest.fixture
def kernels_here(monkeypatch):
    """As if this machine ran the MMA layout's kernels (an sm_90 GPU with both libraries loaded)."""
    monkeypatch.setattr(fxcuda, "int4_mma_layout_unfit", lambda device, dtype: None)


def _model():
    torch.manual_seed(0)
    # [64, 128] fits "mma"; [40, 64] does not (N % 16); [8, 40] is skipped (K % group_size)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 8)).eval()


def test_auto_on_this_cpu_packs_rows_and_says_why():
    assert fxquant.Int4WeightOnly().layout == "auto"
    cfg, note = AUTO.for_weight(4096, 4096, torch.bfloat16, torch.device("cpu"))
    assert cfg == fxquant.Int4WeightOnly(group_size=64, layout="rows")
    assert note == "layout='rows' (auto: cpu device: the layout's fast kernels are CUDA (sm_90) only)"
    assert fxcuda.int4_mma_layout_unfit(torch.device("cpu"), torch.bfloat16).startswith("cpu device")
    be = fxquant.backend(AUTO)
    with torch.no_grad():
        torch.compile(_model(), backend=be)(torch.randn(3, 128))
    assert [c[ROWS_OP] for c in be.compiled_graphs] == [2] and [c[MMA_OP] for c in be.compiled_graphs] == [0]
    assert [r.reason for r in be.report][0].startswith("layout='rows' (auto: cpu device")
    # an explicit layout is no choice: no note
    assert fxquant.Int4WeightOnly(layout="rows").for_weight(64, 64, torch.float32, torch.device("cpu"))[1] == ""


def test_auto_reasons_that_do_not_depend_on_the_machine(kernels_here):
    cpu = torch.device("cpu")
    assert AUTO.for_weight(48, 128, torch.bfloat16, cpu)[0].layout == "mma"
    assert AUTO.for_weight(48, 128, torch.bfloat16, cpu)[1] == "layout='mma' (auto)"
    cfg, note = AUTO.for_weight(40, 128, torch.bfloat16, cpu)
    assert cfg.layout == "rows" and note == "layout='rows' (auto: [N, K]=[40, 128] does not fit 'mma')"
    cfg, note = fxquant.Int4WeightOnly(group_size=32).for_weight(48, 128, torch.bfloat16, cpu)
    assert cfg.layout == "rows" and note == "layout='rows' (auto: group_size=32 does not fit 'mma')"
    cfg, note = AUTO.for_weight(48, 128, torch.bfloat16, cpu, portable=True)
    assert cfg.layout == "rows" and "export, embed_kernels, templates" in note


def test_compile_picks_per_weight_and_matches_the_explicit_layouts(kernels_here):
    model, x = _model(), torch.randn(2, 5, 128)
    be = fxquant.backend(AUTO, fuse_siblings=False)
    with torch.no_grad():
        got = torch.compile(model, backend=be)(x)
        torch._dynamo.reset()
        want = torch.compile(model, backend=fxquant.backend(fxquant.Int4WeightOnly(group_size=64, layout="rows")))(x)
    assert [(c[MMA_OP], c[ROWS_OP]) for c in be.compiled_graphs] == [(1, 1)]
    assert [r.reason for r in be.report] == ["layout='mma' (auto)",
                                             "layout='rows' (auto: [N, K]=[40, 64] does not fit 'mma')",
                                             "in_features=40 is not a multiple of group_size=64"]
    assert torch.equal(got, want)  # same quantization, other byte order: the same float math on the CPU


def test_export_and_embedded_kernels_pack_rows(kernels_here):
    from fxquant.export import export_program
    model, x = _model(), torch.randn(2, 128)
    ep = export_program(model, (x,), AUTO, ops="aten")
    assert all(r.reason.startswith("layout='rows' (auto:") for r in ep.fxquant_report if r.status == "quantized")
    assert "export" in ep.fxquant_report[0].reason
    for opts in ({"embed_kernels": True}, {"templates": True}):
        torch._dynamo.reset()
        be = fxquant.backend(AUTO, **opts)
        with torch.no_grad():
            torch.compile(model, backend=be)(x)
        assert [c[MMA_OP] for c in be.compiled_graphs] == [0], opts


def test_saved_choices_load_and_compile_without_packing(kernels_here, tmp_path):
    model, x = _model(), torch.randn(3, 128)
    qw = fxquant.quantize_weights(model, AUTO)
    layouts = [qw[f"{i}.weight"].config.layout for i in (0, 2)]
    assert layouts == ["mma", "rows"]
    assert [r.reason for r in qw.report][0] == "layout='mma' (auto)"
    path = fxquant.save(qw, tmp_path / "w.safetensors")
    back = fxquant.load(path)
    assert back.config == AUTO and [back[f"{i}.weight"].config.layout for i in (0, 2)] == layouts
    for name in qw:
        assert all(torch.equal(a, b) for a, b in zip(qw[name].tensors, back[name].tensors))
    torch._dynamo.reset()
    be = fxquant.backend(prepacked=back, fuse_siblings=False)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(model, backend=be)(x)
        torch._dynamo.reset()
        want = torch.compile(model, backend=fxquant.backend(AUTO, fuse_siblings=False))(x)
    assert torch.equal(got, want)
    assert [(c[MMA_OP], c[ROWS_OP]) for c in be.compiled_graphs] == [(1, 1)]
    assert not [w for w in caught if "prepacked weights given" in str(w.message)]  # nothing packed again
    assert be.report[0].reason == "layout='mma' (auto, prepacked)"


def _edited(tmp_path, top=None, **own):
    """A saved "auto" set whose config (`top`) or records' own configs (`own`: weight -> config or None) were
    edited, the digest fixed: only the checks on configs can refuse it."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = fxquant.save(fxquant.quantize_weights(_model(), AUTO), tmp_path / "w.safetensors")
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    entries = json.loads(meta["entries"])
    for name, cfg in own.items():
        entries[name.replace("_", ".")].pop("config")
        if cfg is not None:
            entries[name.replace("_", ".")]["config"] = persist.config_to_json(cfg)
    meta["entries"] = json.dumps(entries)
    if top is not None:
        meta["config"] = persist.config_to_json(top)
    meta["digest"] = persist._digest(meta)
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    return tmp_path / "bad.safetensors"


def test_a_saved_choice_the_config_does_not_leave_open_is_refused(kernels_here, tmp_path):
    bad = _edited(tmp_path, **{"0_weight": fxquant.Int4WeightOnly(group_size=128, layout="mma")})
    with pytest.raises(fxquant.FormatError, match=r"weight '0.weight' has config int4_weight_only\(group_size=128.*"
                                                  r"not a choice int4_weight_only\(group_size=64.*'auto'\) "
                                                  r"leaves open"):
        fxquant.load(bad)
    # an "mma" record under a set that said "rows": not a choice that set left open
    bad = _edited(tmp_path, top=fxquant.Int4WeightOnly(group_size=64, layout="rows"))
    with pytest.raises(fxquant.FormatError, match=r"weight '0.weight' has config .*layout='mma'.*not a choice"):
        fxquant.load(bad)
    bad = _edited(tmp_path, **{"0_weight": fxquant.Int8WeightOnly()})  # another scheme
    with pytest.raises(fxquant.FormatError, match=r"has config int8_weight_only, which is not a choice"):
        fxquant.load(bad)


def test_an_unsettled_saved_choice_is_refused(kernels_here, tmp_path):
    """A record whose own config is still "auto", or an "auto" set's record with none (its bytes could be
    either layout: same shapes), is refused rather than read as row-major."""
    bad = _edited(tmp_path, **{"0_weight": AUTO})
    with pytest.raises(fxquant.FormatError, match=r"weight '0.weight' stores int4_weight_only\(.*'auto'\), a choice "
                                                  r"left open"):
        fxquant.load(bad)
    bad = _edited(tmp_path, **{"0_weight": None})
    with pytest.raises(fxquant.FormatError, match=r"weight '0.weight' stores no config of its own, but "
                                                  r"int4_weight_only\(.*'auto'\) leaves a choice to each weight"):
        fxquant.load(bad)
    # the same set built in memory: refused at its first use
    import dataclasses
    qw = fxquant.quantize_weights(_model(), AUTO)
    hand = persist.QuantizedWeights(AUTO, {n: dataclasses.replace(qw[n], config=None) for n in qw})
    with pytest.raises(ValueError, match=r"prepacked weight '0.weight' has no config of its own"):
        hand.config_of("0.weight")
    with pytest.raises(Exception, match=r"has no config of its own"), torch.no_grad():  # (Dynamo wraps it)
        torch.compile(_model(), backend=fxquant.backend(prepacked=hand))(torch.randn(2, 128))


def test_a_config_that_leaves_the_saved_choice_open_is_accepted_with_prepacked(tmp_path):
    """Int4WeightOnly() (layout "auto") given with a set saved as layout="rows" (e.g. before the field
    existed): the set's config is used; a config the set's does not settle is still an error."""
    rows = fxquant.Int4WeightOnly(group_size=64, layout="rows")
    qw = fxquant.quantize_weights(_model(), rows)
    assert fxquant.backend(AUTO, prepacked=qw).config == rows
    with pytest.raises(ValueError, match=r"quantized with int4_weight_only\(group_size=64.*'rows'\) but the config "
                                         r"given is int4_weight_only\(group_size=128"):
        fxquant.backend(fxquant.Int4WeightOnly(group_size=128), prepacked=qw)
    assert AUTO.accepts(rows) and not rows.accepts(AUTO) and not AUTO.accepts(fxquant.Int8WeightOnly())


def test_prepacked_mma_weights_in_an_export_are_kept_and_noted(kernels_here):
    """Weights packed "mma" on a Hopper GPU and exported: the stored bytes are used as they are (correct; the
    export's kernels dequantize them per call), and the report says this target would have packed "rows"."""
    from fxquant.export import export_program
    model, x = _model(), torch.randn(2, 128)
    qw = fxquant.quantize_weights(model, AUTO)
    ep = export_program(model, (x,), prepacked=qw)
    note = ep.fxquant_report[0].reason
    assert note.startswith("layout='mma' (auto, prepacked); packed for another target (this one would pack "
                           "int4_weight_only(group_size=64, symmetric=False, layout='rows'))"), note
    with torch.no_grad():
        want = torch.compile(model, backend=fxquant.backend(prepacked=qw))(x)
    assert fxquant.sqnr(want, ep.module()(x)) >= 60


def test_files_from_before_the_layout_field_read_as_rows():
    old = '{"class": "Int4WeightOnly", "fields": {"group_size": 64, "symmetric": false}, "scheme": "int4_weight_only"}'
    assert persist.config_from_json(old) == fxquant.Int4WeightOnly(group_size=64, layout="rows")


def test_reference_model_uses_each_weights_own_op(kernels_here):
    """benchmarks/llm.py's eager reference swaps each linear for its op's ATen decomposition: with "auto" the op
    is the weight's own (config_of), not the set's config's (which would read "mma" bytes as row-major)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import llm
    model, x = _model(), torch.randn(3, 128)
    qw = fxquant.quantize_weights(model, AUTO)
    assert qw.config_of("0.weight").op is torch.ops.fxquant.int4_mma_weight_only_linear.default
    assert qw.config_of("2.weight").op is torch.ops.fxquant.int4_weight_only_linear.default
    with torch.no_grad():
        want = torch.compile(model, backend=fxquant.backend(prepacked=qw))(x)
        assert llm.to_reference(model, qw) == 2
        got = model(x)
    assert fxquant.sqnr(want, got) >= 60  # same dequantized weights; a wrong layout gives noise (< 0 dB)


def test_why_the_layout_would_not_be_fast(monkeypatch):
    """int4_mma_layout_unfit's reasons on a (pretend) CUDA device: another arch, another dtype, a library that
    does not build (its first line only: the report has one cell per layer), and None when all is there."""
    from fxquant.lowering.cuda import build
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert fxcuda.int4_mma_layout_unfit(cuda, torch.bfloat16) == \
        "sm_80 GPU: the layout's large-M GEMM is CUTLASS for sm_90a"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fxcuda.int4_mma_layout_unfit(cuda, torch.float16) == \
        "float16 activations: the layout's CUTLASS GEMM takes bfloat16"
    monkeypatch.setattr(fxcuda, "available", lambda: False)
    failed = "building the C++/CUDA op library failed: boom\nnvcc: x\ny"
    monkeypatch.setattr(fxcuda, "unavailable_reason", lambda: failed)
    assert fxcuda.int4_mma_layout_unfit(cuda, torch.bfloat16) == \
        "the C++ library is unavailable (building the C++/CUDA op library failed: boom)"
    monkeypatch.setattr(fxcuda, "available", lambda: True)
    monkeypatch.setattr(build, "cutlass_available", lambda: False)
    monkeypatch.setitem(build._cutlass_state, "error", "no CUTLASS headers: pip install nvidia-cutlass")
    assert fxcuda.int4_mma_layout_unfit(cuda, torch.bfloat16) == \
        "the CUTLASS library is unavailable (no CUTLASS headers: pip install nvidia-cutlass)"
    monkeypatch.setattr(build, "cutlass_available", lambda: True)
    assert fxcuda.int4_mma_layout_unfit(cuda, torch.bfloat16) is None
    cfg, note = AUTO.for_weight(64, 128, torch.bfloat16, cuda)
    assert cfg.layout == "mma" and note == "layout='mma' (auto)"
