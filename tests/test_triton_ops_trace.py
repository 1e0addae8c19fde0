"""The graphs that torch.export and the backend's embed_kernels build from the triton_ops, on CPU.

No GPU is needed to *trace* them: Triton's frontend lowers each kernel to TTIR (which torch reads
to learn which arguments a kernel writes) for a target we name, sm_90. So a fresh process without
TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones) installs a stand-in
driver that names that target and looks configs up in the shipped H100 table. Checked: no
fxquant op is left; every kernel writes only buffers allocated in the graph (a packed weight
written would be a wrong mutation analysis, and torch.export refuses it); the exported program
keeps the batch and sequence ranges asked for (no guard narrowed them); the launches per linear
are one per M range of the H100 table. The same for the backend's embed pass, followed by
Inductor's reinplacing (no copy of any buffer). Running the kernels needs a GPU:
tests/gpu/test_gpu_triton_ops.py and test_gpu_export.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

# What both scripts need first: a stand-in driver that names an sm_90 target (TTIR generation
# asks nothing else of it), and a record of what torch's reading of each launch reports.
PRELUDE = textwrap.dedent(r"""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    class StandInDriver:  # only what TTIR generation asks of a driver
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(StandInDriver())

    import logging
    import torch._higher_order_ops.triton_kernel_wrap as twk
    analysis_failures = []  # torch assumes every input written when its TTIR analysis fails
    class Failures(logging.Handler):
        def emit(self, record):
            analysis_failures.append(str(record.exc_info[1] if record.exc_info else record.getMessage())[-300:])
    logging.getLogger(twk.__name__).addHandler(Failures(logging.WARNING))
    constexpr_args = set()  # tl.constexpr objects given to a launch: Inductor's code would hold their repr
    def note_constexpr_args(graph):
        for n in graph.nodes:
            if "triton_kernel_wrapper" in str(n.target):
                args = {**n.kwargs["kwargs"], **twk.kernel_side_table.get_constant_args(n.kwargs["constant_args_idx"])}
                constexpr_args.update(k for k, v in args.items() if isinstance(v, triton.language.constexpr))
""")

SCRIPT = PRELUDE + textwrap.dedent(r"""
    import json, os, sys
    import fxquant
    from fxquant.lowering.triton import dispatch as D, triton_ops as T
    D._device_info = lambda device: ("h100", 132, (9, 0))  # the shipped H100 table
    T._check_device = lambda t, op: None  # CPU example tensors: traced only, never launched
    sys.modules["fxquant.export"]._on_cuda = lambda node: True  # (fxquant.export is the function)
    from torch.export import Dim

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.SiLU(),
                                torch.nn.Linear(1024, 384)).to(torch.bfloat16)
    x = torch.randn(3, 8, 512, dtype=torch.bfloat16)
    dims = ({0: Dim("batch", min=1, max=64), 1: Dim("seq", min=1, max=512)},)
    configs = {"int8_wo": fxquant.Int8WeightOnly(), "int4_wo": fxquant.Int4WeightOnly(group_size=128),
               "int8_dyn": fxquant.Int8DynamicActivationInt8Weight(),
               "fp8_dyn_row": fxquant.Float8DynamicActivationFloat8Weight("row"),
               "fp8_dyn_tensor": fxquant.Float8DynamicActivationFloat8Weight("tensor"),
               "fp8_wo": fxquant.Float8WeightOnly()}
    result = {}
    for scheme, cfg in configs.items():
        ep = fxquant.export_program(model, (x,), cfg, dims, ops="triton")
        note_constexpr_args(ep.graph)
        inputs = {s.arg.name for s in ep.graph_signature.input_specs}
        nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
        hops = [n for n in nodes if "triton_kernel_wrapper" in str(n.target)]
        written_inputs = sorted({n.kwargs["kwargs"][a].name for n in hops for a in n.kwargs["tensors_to_clone"]
                                 if n.kwargs["kwargs"][a].name in inputs})
        ranges = [(T.m_ranges(scheme, n, k, 128 if scheme == "int4_wo" else 0, torch.bfloat16,
                              torch.device("cpu"))) for n, k in ((1024, 512), (384, 1024))]
        result[scheme] = {
            "fxquant_ops": [str(n.target) for n in nodes if "fxquant" in str(n.target)],
            "launches": len(hops), "ranges": sum(len(r) for r in ranges),
            "deqgemm": sum(x.cfg.kind == "deqgemm" for r in ranges for x in r),  # two launches each
            "zeros": sum(n.target in (torch.ops.aten.zeros.default, torch.ops.aten.full.default) for n in nodes),
            "written_inputs": written_inputs,
            "range_constraints": sorted(f"{v.lower}..{v.upper}" for v in ep.range_constraints.values()),
        }
    result["analysis_failures"] = analysis_failures
    result["constexpr_args"] = sorted(constexpr_args)
    print("RESULT" + json.dumps(result))
""")


# The backend's embed pass (passes/embed_triton.py) on a graph with a symbolic M and fake CUDA
# tensors, then Inductor's own reinplacing and decomposition of the functional launches.
EMBED_SCRIPT = PRELUDE + textwrap.dedent(r"""
    import json
    import fxquant.lowering
    from fxquant.lowering.triton import dispatch as D, triton_ops as T
    from fxquant.passes.embed_triton import embed_triton_kernels
    D._device_info = lambda device: ("h100", 132, (9, 0))
    from torch._dynamo.source import ConstantSource
    from torch._inductor.fx_passes.post_grad import decompose_triton_kernel_wrapper_functional
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
    from torch._inductor.fx_utils import FakeTensorUpdater
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings
    from torch._inductor.virtualized import V
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    for scheme, group in (("int8_wo", 0), ("int4_wo", 128), ("fp8_wo", 0)):  # a dequantize-then-GEMM range
        D._table("shipped")["h100"][D.TRITON_ONLY + D.bucket_key(scheme, group, 8192)] = D.KernelConfig(
            "deqgemm", bm=128, bn=256, bk=64, warps=8).to_json()
    decomps = select_decomp_table()  # Inductor refuses an op it has a decomposition but no lowering for
    N, K = 1000, 1024
    f8, bf = torch.float8_e4m3fn, torch.bfloat16
    CASES = {  # op -> (scheme, packed tensors (dtype, shape), static args, prequant)
        "int8_weight_only_linear": ("int8_wo", [(torch.int8, (N, K)), (bf, (N,))], (), False),
        "int4_weight_only_linear": ("int4_wo", [(torch.uint8, (N, K // 2)), (bf, (K // 128, N, 2))], (128,), False),
        "float8_weight_only_linear": ("fp8_wo", [(f8, (N, K)), (torch.float32, (N,))], (), False),
        "int8_dynamic_linear": ("int8_dyn", [(torch.int8, (N, K)), (torch.float32, (N,))], (), False),
        "float8_dynamic_linear": ("fp8_dyn_tensor", [(f8, (N, K)), (torch.float32, (1,))], (False,), False),
        "int8_dynamic_linear_prequant": ("int8_dyn", [(torch.int8, (N, K)), (torch.float32, (N,))], (bf,), True),
        "float8_dynamic_linear_prequant": ("fp8_dyn_row", [(f8, (N, K)), (torch.float32, (N,))], (bf,), True),
    }
    result = {}
    for name, (scheme, packed, static, pre) in CASES.items():
        mode = FakeTensorMode(shape_env=ShapeEnv())
        with mode:
            se = mode.shape_env
            m = se.create_symintnode(se.create_symbol(37, ConstantSource("m")), hint=37)
            ts = [torch.empty((m, K), dtype=packed[0][0] if pre else bf, device="cuda")]
            if pre:
                ts.append(torch.empty((m, 1), dtype=torch.float32, device="cuda"))
            ts += [torch.empty(shape, dtype=dt, device="cuda") for dt, shape in packed]
            ts.append(torch.empty(N, dtype=bf, device="cuda"))  # bias
        op = getattr(torch.ops.fxquant, name)
        gm = make_fx(lambda *a: op(*a, *static).relu(), tracing_mode="real")(*ts)
        embedded = embed_triton_kernels(gm.graph, mode)
        with V.set_fake_mode(mode):
            reinplace_inplaceable_ops(FakeTensorUpdater(gm), gm.graph)
            decompose_triton_kernel_wrapper_functional(gm.graph)
        note_constexpr_args(gm.graph)
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        ranges = T.m_ranges(scheme, N, K, 128 if scheme == "int4_wo" else 0, bf, torch.device("cuda"))
        result[name] = {"embedded": embedded, "launches": targets.count("triton_kernel_wrapper_mutation"),
                        "zeros": targets.count("aten.zeros.default") + targets.count("aten.full.default"),
                        "ranges": len(ranges), "fxquant": [t for t in targets if "fxquant" in t],
                        "deqgemm": sum(x.cfg.kind == "deqgemm" for x in ranges),
                        "copies": [t for t in targets if "clone" in t or "copy" in t],
                        "guards": [str(g.expr) for g in mode.shape_env.guards],
                        "decomposable": sorted({str(n.target) for n in gm.graph.nodes
                                                 if n.target in decomps and n.target not in lowerings})}
    mode = FakeTensorMode(shape_env=ShapeEnv())  # the gated MLP's fused activation quantization
    with mode:
        se = mode.shape_env
        m = se.create_symintnode(se.create_symbol(37, ConstantSource("m")), hint=37)
        gate, up = (torch.empty((m, 2048), dtype=bf, device="cuda") for _ in range(2))
    gm = make_fx(lambda g, u: [t.relu() if t.is_floating_point() else t
                              for t in torch.ops.fxquant.swiglu_quantize(g, u, True)], tracing_mode="real")(gate, up)
    embedded = embed_triton_kernels(gm.graph, mode)
    gm.graph.lint()
    note_constexpr_args(gm.graph)
    with V.set_fake_mode(mode):
        reinplace_inplaceable_ops(FakeTensorUpdater(gm), gm.graph)
        decompose_triton_kernel_wrapper_functional(gm.graph)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    result["swiglu_quantize"] = {"embedded": embedded, "launches": targets.count("triton_kernel_wrapper_mutation"),
                                 "ranges": 1, "fxquant": [t for t in targets if "fxquant" in t],
                                 "copies": [t for t in targets if "clone" in t or "copy" in t],
                                 "guards": [str(g.expr) for g in mode.shape_env.guards]}
    result["analysis_failures"] = analysis_failures
    result["constexpr_args"] = sorted(constexpr_args)
    print("RESULT" + json.dumps(result))
""")


def _run(script: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, r.stderr[-4000:]
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def traced():
    return _run(SCRIPT)


@pytest.fixture(scope="module")
def embedded():
    return _run(EMBED_SCRIPT)


@pytest.mark.parametrize("op", ["int8_weight_only_linear", "int4_weight_only_linear", "float8_weight_only_linear",
                                "int8_dynamic_linear", "float8_dynamic_linear", "int8_dynamic_linear_prequant",
                                "float8_dynamic_linear_prequant", "swiglu_quantize"])
def test_embed_pass_graph(embedded, op):
    """One launch per M range of the H100 table (plus the activation quantization: one pass, two
    for a per-tensor scale), all writing into buffers of their own (Inductor's reinplacing leaves
    no copy), no fxquant op left, and no guard on the symbolic M."""
    r = embedded[op]
    quant = {"int8_dynamic_linear": 1, "float8_dynamic_linear": 2}.get(op, 0)
    assert r["embedded"] == 1 and r["fxquant"] == [] and r["copies"] == [] and r["guards"] == []
    assert r.get("decomposable", []) == []  # e.g. aten.zeros: "both a fallback and a decomp" (torch 2.11)
    assert r["launches"] == r["ranges"] + r.get("deqgemm", 0) + quant
    assert (r.get("deqgemm", 0) >= 1) == (op in ("int8_weight_only_linear", "int4_weight_only_linear",
                                                 "float8_weight_only_linear"))  # weight-only large M
    assert r["ranges"] >= 4 or op == "swiglu_quantize"  # one kernel for every M
    assert r.get("zeros", 0) <= 1 + (op == "float8_dynamic_linear")  # one split-K counter buffer (+ amax)


SCHEMES = ["int8_wo", "int4_wo", "int8_dyn", "fp8_dyn_row", "fp8_dyn_tensor", "fp8_wo"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_export_triton_graph(traced, scheme):
    r = traced[scheme]
    assert r["fxquant_ops"] == []
    quant = {"int8_dyn": 1, "fp8_dyn_row": 1, "fp8_dyn_tensor": 2}.get(scheme, 0)  # activation passes
    assert r["launches"] == r["ranges"] + r["deqgemm"] + 2 * quant  # one per M range (deqgemm: two)
    assert r["ranges"] >= 2 * 4  # the H100 table: GEMV, small-M and large-M GEMMs at least
    assert r["written_inputs"] == []  # no packed weight, scale, bias or input is written
    # zeroed buffers: at most one split-K counter buffer per linear, plus fp8 per-tensor's amax
    assert r["zeros"] <= 2 * (1 + (scheme == "fp8_dyn_tensor"))
    assert r["range_constraints"] == ["1..512", "1..64"]


@pytest.mark.parametrize("fixture", ["traced", "embedded"])
def test_kernel_write_analysis_succeeds(fixture, request):
    """torch reads each launch's TTIR to learn what it writes; if that fails it assumes every
    input is written, and torch.export refuses the packed weights as mutated constants."""
    assert request.getfixturevalue(fixture)["analysis_failures"] == []


@pytest.mark.parametrize("fixture", ["traced", "embedded"])
def test_launches_pass_plain_values_for_constexprs(fixture, request):
    """Inductor and AOTInductor write each constant launch argument's repr into their code:
    a tl.constexpr object there reads `constexpr[0]`, a NameError (torch 2.11, session 15)."""
    assert request.getfixturevalue(fixture)["constexpr_args"] == []


def test_kernels_use_no_method_of_a_scalar_argument():
    """torch 2.11 (the GPU machine) lowers a launch to TTIR with every scalar argument as a
    constexpr, a Python int: `M.to(tl.int64)` then fails there (seen in session 15: export refused,
    "Constant ... is mutated"). tl.cast(M, ...) works either way."""
    import ast
    import glob
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fxquant", "lowering")
    found = []
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        for fn in ast.walk(ast.parse(open(path).read())):
            if not (isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list)
                    and any(a.arg.endswith("_ptr") for a in fn.args.args)):  # kernels; helpers take tensors
                continue
            constexpr = {a.arg for a in fn.args.args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)}
            scalars = {a.arg for a in fn.args.args if not a.arg.endswith(("_ptr", "_desc")) and a.arg not in constexpr}
            found += [f"{os.path.basename(path)}:{n.lineno} {fn.name}: {n.value.id}.{n.attr}" for n in ast.walk(fn)
                      if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in scalars
                      and n.attr == "to"]
    assert found == []
