"""The backend's contract: accuracy floors, equality with dequantized weights, recompiles,
memory release, and clear errors on bad input."""
import copy
import functools
import gc
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import fxquant
from fxquant import numerics as nq
from helpers import Block, Tiny

FLOORS = [  # (config, SQNR floor in dB vs the float model), from the foundation issue
    (fxquant.Int8WeightOnly(), 40.0),
    (fxquant.Int8DynamicActivationInt8Weight(), 35.0),
    (fxquant.Int4WeightOnly(group_size=128), 18.0),
    (fxquant.Float8DynamicActivationFloat8Weight(granularity="row"), 25.0),
    (fxquant.Float8DynamicActivationFloat8Weight(granularity="tensor"), 20.0),
    (fxquant.Float8WeightOnly(), 25.0),
]


def _mlp(d=256, hidden=512, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)).to(dtype)


def _run(model, cfg, x, **kwargs):
    torch._dynamo.reset()
    be = fxquant.backend(cfg)
    with torch.no_grad():
        out = torch.compile(model, backend=be, **kwargs)(x)
    return be, out


@pytest.mark.parametrize("cfg,floor", FLOORS, ids=lambda v: getattr(v, "scheme", str(v)))
def test_sqnr_floor_gaussian(cfg, floor):
    model, x = _mlp(), torch.randn(4, 16, 256)
    _, out = _run(model, cfg, x)
    with torch.no_grad():
        assert fxquant.sqnr(model(x), out) >= floor


@pytest.mark.parametrize("cfg", [fxquant.Int8WeightOnly(), fxquant.Int4WeightOnly(group_size=64),
                                 fxquant.Float8WeightOnly()], ids=lambda c: c.scheme)
def test_equals_float_graph_on_dequantized_weights(cfg):
    model, x = _mlp(), torch.randn(3, 256)
    _, out = _run(model, cfg, x)
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for lin in (deq[0], deq[2]):
            (q, s), static = cfg.pack(lin.weight)
            if cfg.scheme == "int8_weight_only":
                lin.weight.copy_(nq.dequantize_int8_per_channel(q, s, torch.float32))
            elif cfg.scheme == "int4_weight_only":
                lin.weight.copy_(nq.dequantize_int4(q, s, static[0], torch.float32))
            else:
                lin.weight.copy_(nq.dequantize_fp8_weight(q, s, torch.float32))
        torch.testing.assert_close(out, deq(x), rtol=1e-5, atol=1e-5)


def test_bf16_model_int8_weight_only_uses_aten_kernel_path():
    model, x = _mlp(dtype=torch.bfloat16), torch.randn(2, 256, dtype=torch.bfloat16)
    _, out = _run(model, fxquant.Int8WeightOnly(), x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        assert fxquant.sqnr(model(x), out) > 30  # bf16 activations bound it, not int8


@pytest.mark.parametrize("shapes", [[(2, 5), (3, 5), (4, 5), (7, 5)],    # batch only
                                    [(2, 5), (2, 6), (2, 9), (2, 33)]],  # sequence only
                         ids=["batch", "seq"])
def test_batch_or_sequence_change_recompiles_at_most_once(shapes):
    torch._dynamo.reset()
    be = fxquant.backend(fxquant.Int8WeightOnly())
    f = torch.compile(Block(), backend=be)
    with torch.no_grad():
        for b, s in shapes:
            f(torch.randn(b, s, 64))
    assert len(be.compiled_graphs) == 2  # static first, then one automatic-dynamic compile


def test_recompiles_match_dynamos_own_count():
    from torch._dynamo.testing import CompileCounter

    shapes = [(2, 5), (3, 5), (4, 9), (1, 17), (6, 3), (5, 8)]
    model = Block()
    torch._dynamo.reset()
    counter = CompileCounter()
    be = fxquant.backend(fxquant.Int8WeightOnly())
    with torch.no_grad():
        for backend in (counter, be):
            torch._dynamo.reset()
            f = torch.compile(model, backend=backend)
            for b, s in shapes:
                f(torch.randn(b, s, 64))
    assert len(be.compiled_graphs) == counter.frame_count


def test_dynamic_true_compiles_exactly_once():
    torch._dynamo.reset()
    be = fxquant.backend(fxquant.Int4WeightOnly(group_size=32))
    f = torch.compile(Block(), backend=be, dynamic=True)
    with torch.no_grad():
        for b, s in [(2, 5), (3, 7), (8, 2)]:  # sizes 0/1 are specialized by Dynamo itself
            assert f(torch.randn(b, s, 64)).shape == (b, s, 64)
    assert len(be.compiled_graphs) == 1


def test_string_backend_with_options():
    torch._dynamo.reset()
    model, x = _mlp(), torch.randn(2, 256)
    opts = {"config": fxquant.Int8DynamicActivationInt8Weight(), "skip": ["2"]}
    with torch.no_grad():
        out = torch.compile(model, backend="fxquant", options=opts)(x)
        assert fxquant.sqnr(model(x), out) > 35


def test_embed_kernels_leaves_cpu_graphs_to_the_cpu_ops():
    """embed_kernels swaps only linears on CUDA inputs for their Triton kernels: a CPU compile
    keeps its fxquant ops and gives the same output as without the option."""
    from torch._inductor.utils import run_and_get_code
    model, x = _mlp(dtype=torch.bfloat16), torch.randn(2, 256, dtype=torch.bfloat16)
    outs = []
    for embed in (False, True):
        torch._dynamo.reset()
        be = fxquant.backend(fxquant.Int8WeightOnly(), embed_kernels=embed)
        with torch.no_grad():
            out, code = run_and_get_code(torch.compile(model, backend=be), x)
        outs.append(out)
        assert be.embed_kernels is embed
        assert "\n".join(code).count("= torch.ops.fxquant.int8_weight_only_linear.default(") == 2
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_fxquant_compile_report_and_verbose(capsys):
    torch._dynamo.reset()
    model = _mlp()
    qm = fxquant.compile(model, fxquant.Int4WeightOnly(), verbose=True)
    with torch.no_grad():
        qm(torch.randn(2, 256))
    names = [(r.name, r.status) for r in qm.fxquant_report]
    assert names == [("0", "quantized"), ("2", "quantized")]
    r = qm.fxquant_report[0]
    assert (r.in_features, r.out_features, r.bytes_before) == (256, 512, 256 * 512 * 4)
    assert r.bytes_after == 256 * 512 // 2 + (256 // 128) * 512 * 2 * 4
    printed = capsys.readouterr().out
    assert "2/2 linears quantized" in printed and "int4_weight_only" in printed


def _through_args(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        return fn(*args, **kwargs)
    return inner


class _WrappedForward(nn.Module):
    """forward behind a decorator that takes *args, as transformers 5.24 wraps LlamaForCausalLM.forward:
    Dynamo then reaches the weights from L['args'][0], not L['self']."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))

    @_through_args
    def forward(self, x):
        return self.body(x)


def test_report_names_layers_by_module_path_through_a_wrapped_forward():
    torch._dynamo.reset()
    model = _WrappedForward()
    be = fxquant.backend(fxquant.Int8WeightOnly())
    with torch.no_grad():
        torch.compile(model, backend=be)(torch.randn(2, 256))
    assert sorted(r.name for r in be.report) == ["body.0", "body.2"]


def test_grad_enabled_warns_once_and_runs_under_no_grad():
    torch._dynamo.reset()
    model, x = _mlp(), torch.randn(2, 256)
    f = torch.compile(model, backend=fxquant.backend(fxquant.Int8WeightOnly()))
    with pytest.warns(UserWarning, match="inference-only"):
        out = f(x)
    assert not out.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(x)


def test_no_eligible_linear_warns_and_runs_unquantized():
    torch._dynamo.reset()
    emb = nn.Embedding(10, 8)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), pytest.warns(UserWarning, match="no eligible linear"):
        out = torch.compile(emb, backend=fxquant.backend())(ids)
    assert torch.equal(out, emb(ids))


def test_nan_weight_is_a_compile_error_naming_the_layer():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[3, 7] = float("nan")
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match=r"weight of layer '2' contains NaN or Inf"):
        torch.compile(model, backend=fxquant.backend())(torch.randn(2, 256))


def test_float64_weight_is_a_clear_error():
    model = _mlp().double()
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match=r"layer '[02]' has a torch.float64 weight"):
        torch.compile(model, backend=fxquant.backend())(torch.randn(2, 256, dtype=torch.float64))


@pytest.mark.parametrize("make,match", [
    (lambda: fxquant.Int4WeightOnly(group_size=48), r"Int4WeightOnly.group_size=48 is invalid; allowed values: 32, 64, 128, 256"),
    (lambda: fxquant.Float8DynamicActivationFloat8Weight(granularity="col"), r"granularity='col' is invalid"),
    (lambda: fxquant.backend("int8"), r"config must be an fxquant config"),
    (lambda: fxquant.Backend.from_options({"confg": None}), r"unknown option\(s\) \['confg'\]"),
])
def test_bad_options_raise(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


_RELEASE_SCRIPT = textwrap.dedent("""
    import gc, sys, torch, torch.nn as nn, fxquant
    release = sys.argv[1] == "1"
    model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(16)])  # 1 GiB fp32
    x = torch.randn(2, 4096)
    qm = fxquant.compile(model, fxquant.Int4WeightOnly(), release_weights=release)
    with torch.no_grad():
        qm(x); qm(torch.randn(5, 4096)); qm(torch.randn(7, 4096))
    gc.collect()
    print("RSS", int(open('/proc/self/statm').read().split()[1]) * 4096)
    print("RELEASED", model[0].weight.untyped_storage().nbytes() == 0)
    try:
        model(x)
        print("EAGER ok")
    except RuntimeError:
        print("EAGER fails")
""")


def _release_run(flag: str) -> dict:
    import pathlib
    root = pathlib.Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", _RELEASE_SCRIPT, flag], capture_output=True, text=True,
                         timeout=300, cwd=str(root))
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)


def test_release_weights_frees_memory_and_eager_use_fails_loudly():
    kept, released = _release_run("0"), _release_run("1")
    freed_mib = (int(kept["RSS"]) - int(released["RSS"])) / 2**20
    assert freed_mib > 700, (kept, released)  # 1 GiB of float weights leave (compile noise: ~100 MiB)
    assert released["RELEASED"] == "True" and kept["RELEASED"] == "False"
    assert released["EAGER"] == "fails" and kept["EAGER"] == "ok"


def test_default_keeps_eager_model_usable():
    model, x = Tiny(), torch.randint(0, 96, (2, 5))
    _run(model, fxquant.Int8WeightOnly(), x)
    with torch.no_grad():
        assert model(x).shape == (2, 5, 96)
    gc.collect()


def test_mode_and_inductor_options_pass_through():
    torch._dynamo.reset()
    model, x = _mlp(), torch.randn(2, 256)
    be = fxquant.backend(fxquant.Int8WeightOnly(), inductor={"max_autotune": False})
    with torch.no_grad():
        out = torch.compile(model, backend=be, mode="max-autotune-no-cudagraphs")(x)
        torch._dynamo.reset()
        # torch.compile takes mode or options, not both: with a mode the default config applies.
        out2 = torch.compile(model, backend="fxquant", mode="reduce-overhead")(x)
    assert torch.equal(out, out2)
    assert len(be.compiled_graphs) == 1


def test_mode_option_with_string_backend_reaches_inductor(monkeypatch):
    import torch._inductor.compile_fx as cfx
    seen = []
    real = cfx.compile_fx

    def spy(*a, **k):
        seen.append((torch._inductor.config.max_autotune, torch._inductor.config.triton.cudagraphs))
        return real(*a, **k)
    monkeypatch.setattr(cfx, "compile_fx", spy)
    torch._dynamo.reset()
    model, x = _mlp(), torch.randn(2, 256)
    opts = {"config": fxquant.Int4WeightOnly(), "mode": "max-autotune-no-cudagraphs"}
    with torch.no_grad():
        torch.compile(model, backend="fxquant", options=opts)(x)
    assert seen == [(True, False)]
    with pytest.raises(ValueError, match=r"fxquant: options\['mode'\]: Unrecognized mode=fast"):
        fxquant.Backend.from_options({"mode": "fast"})


def test_recompile_after_in_place_weight_change_repacks():
    model, x = _mlp(), torch.randn(2, 256)
    torch._dynamo.reset()
    be = fxquant.backend(fxquant.Int8WeightOnly())
    with torch.no_grad():
        before = torch.compile(model, backend=be)(x)
        model[2].weight.mul_(2)
        torch._dynamo.reset()
        after = torch.compile(model, backend=be)(x)
        assert fxquant.sqnr(model(x), after) > 40
    assert not torch.allclose(before, after)


def test_model_made_under_inference_mode_compiles_and_repacks_after_a_change():
    # Inference tensors keep no version counter: the pack cache must not ask them for one.
    with torch.inference_mode():
        model, x = _mlp(), torch.randn(2, 256)
        torch._dynamo.reset()
        be = fxquant.backend(fxquant.Int8WeightOnly())
        before = torch.compile(model, backend=be)(x)
        assert fxquant.sqnr(model(x), before) > 40
        model[2].weight.mul_(2)
        torch._dynamo.reset()
        after = torch.compile(model, backend=be)(x)
        assert fxquant.sqnr(model(x), after) > 40
    assert not torch.allclose(before, after)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return torch.relu(self.lin(x))


def test_regional_compilation_quantizes_each_instance():
    # Dynamo reuses one cache entry for identical blocks with other parameters; each block must
    # still compute with its own packed weights (a shared graph once silently used block 0's).
    torch._dynamo.reset()
    torch.manual_seed(0)
    blocks = nn.ModuleList([_Block() for _ in range(3)])
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = [b(x) for b in blocks]
    be = fxquant.backend(fxquant.Int8WeightOnly())
    for b in blocks:
        b.compile(backend=be, dynamic=False)
    with torch.no_grad(), pytest.warns(UserWarning, match="compiled and quantized again for each set of weights"):
        out = [b(x) for b in blocks]
        again = [b(x) for b in blocks]
    for r, o, a in zip(ref, out, again):
        assert fxquant.sqnr(r, o) >= 38 and torch.equal(o, a)
    assert len(be.compiled_graphs) == 3


def test_regional_compilation_with_dynamic_shapes_raises():
    torch._dynamo.reset()
    blocks = nn.ModuleList([_Block() for _ in range(2)])
    be = fxquant.backend(fxquant.Int8WeightOnly())
    for b in blocks:
        b.compile(backend=be, dynamic=True)
    with torch.no_grad():
        blocks[0](torch.randn(3, 64))
        with pytest.raises(RuntimeError, match="called with other weight tensors than it was compiled with"):
            blocks[1](torch.randn(3, 64))
