"""fxquant.export: AOTInductor packages that load and run in a fresh process without fxquant,
with dynamic batch and sequence dims, compute what the compiled model computes, and stay small
(the packed weights are not folded back into float constants)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

import fxquant
from fxquant.export import decompose_fxquant_ops
from fxquant.lowering import decompose
from helpers import (NO_FXQUANT_PREAMBLE, Tiny, build_cpp_loader, libstdcxx_linkage, run_cpp_loader,
                     static_libstdcxx_gxx)

D, H = 1024, 2048  # two linears, 16.8 MB of float32 weights: they dominate the package
FLOAT_BYTES = 2 * D * H * 4
SCHEMES = [  # (config, SQNR floor of the package's output vs the float model, in dB)
    (fxquant.Int8WeightOnly(), 40.0),
    (fxquant.Int4WeightOnly(group_size=32), 18.0),
    (fxquant.Int8DynamicActivationInt8Weight(), 30.0),
    (fxquant.Float8DynamicActivationFloat8Weight(), 22.0),
    (fxquant.Float8WeightOnly(), 25.0),
]

# Runs in a fresh interpreter; any attempt to import fxquant there is an ImportError. Loads
# every package given and runs it on its inputs (one process for all: starting torch is slow).
LOADER = NO_FXQUANT_PREAMBLE + textwrap.dedent("""

    jobs, out = torch.load(sys.argv[1], weights_only=True), sys.argv[2]
    results = {}
    for key, (pkg, inputs) in jobs.items():
        model = torch._inductor.aoti_load_package(pkg)
        with torch.no_grad():
            results[key] = [model(x) for x in inputs]
    assert not any(m == "fxquant" or m.startswith("fxquant.") for m in sys.modules), "fxquant got imported"
    torch.save(results, out)
    print("LOADED_OK")
""")


def load_in_fresh_process(jobs: dict, tmp_path) -> dict:
    """{key: (package path, [inputs])} -> {key: [outputs]}, computed in a fresh interpreter."""
    inp, out = tmp_path / "jobs.pt", tmp_path / "outputs.pt"
    torch.save(jobs, inp)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOADER, str(inp), str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode < 0:
        pytest.fail(f"loading the packages killed the process with {signal.Signals(-proc.returncode).name}:\n"
                    f"{proc.stderr[-3000:]}")
    assert proc.returncode == 0 and "LOADED_OK" in proc.stdout, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def package_mentions_fxquant_ops(path: str) -> list[str]:
    """Names of the package's text files that call an fxquant op (they would need fxquant)."""
    hits = []
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.endswith((".cpp", ".json", ".h", ".txt", ".py")):
                text = z.read(name).decode("utf-8", "replace")
                if "fxquant::" in text or "torch.ops.fxquant" in text:
                    hits.append(name)
    return hits


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)).eval()


INPUTS = [torch.randn(2, 8, D), torch.randn(5, 3, D)]  # batch and sequence both change


@pytest.fixture(scope="module")
def packages(mlp, tmp_path_factory):
    """Every scheme exported once, then all loaded in one fresh process:
    {scheme: (path, export seconds, outputs)} or {scheme: exception} where export failed."""
    tmp = tmp_path_factory.mktemp("packages")
    dims = ({0: Dim("batch", min=1, max=64), 1: Dim("seq", min=1, max=512)},)
    built: dict = {}
    for cfg, _ in SCHEMES:
        t0 = time.perf_counter()
        try:
            path = fxquant.export(mlp, (torch.randn(3, 8, D),), cfg, tmp / f"{cfg.scheme}.pt2", dynamic_shapes=dims)
        except Exception as exc:  # reported by that scheme's test
            built[cfg.scheme] = exc
            continue
        built[cfg.scheme] = (path, time.perf_counter() - t0)
    ok = {k: v for k, v in built.items() if not isinstance(v, Exception)}
    outs = load_in_fresh_process({k: (v[0], INPUTS) for k, v in ok.items()}, tmp) if ok else {}
    return {k: v if isinstance(v, Exception) else (*v, outs[k]) for k, v in built.items()}


@pytest.mark.parametrize("cfg,floor", SCHEMES, ids=lambda v: getattr(v, "scheme", ""))
def test_package_runs_without_fxquant_and_matches_compiled_model(cfg, floor, mlp, packages):
    got = packages[cfg.scheme]
    if isinstance(got, Exception):
        raise got
    path, t_export, outs = got
    torch._dynamo.reset()
    compiled = torch.compile(mlp, backend=fxquant.backend(cfg), dynamic=True)
    with torch.no_grad():
        for x, y in zip(INPUTS, outs):
            ref = compiled(x)
            assert y.shape == ref.shape and y.dtype == ref.dtype
            # Same ops on the same packed weights; Inductor fuses the bias into the GEMM (addmm)
            # in the package, so weight-only schemes may differ in the last bit or two.
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
            assert fxquant.sqnr(mlp(x), y) >= floor

    size = os.path.getsize(path)
    packed = fxquant.quantize_weights(mlp, cfg).nbytes
    print(f"\n{cfg.describe()}: export {t_export:.1f}s, package {size / 1e6:.2f}MB "
          f"(packed weights {packed / 1e6:.2f}MB, float weights {FLOAT_BYTES / 1e6:.2f}MB)")
    # Dequantized float constants would add >= 8 MB; the generated code is ~2 MB.
    assert size < packed + 3_500_000, (size, packed)
    assert size < FLOAT_BYTES / (3 if cfg.scheme == "int4_weight_only" else 2)
    assert package_mentions_fxquant_ops(path) == []


def test_export_program_is_fxquant_free_and_equals_the_ops():
    """The program AOTInductor receives, run eagerly: no fxquant op left, same output as the
    quantized (undecomposed) program, for a model with attention, repeated blocks and a tied head."""
    torch.manual_seed(0)
    model, ids = Tiny().eval(), torch.randint(0, 96, (2, 7))
    cfg = fxquant.Int4WeightOnly(group_size=32)
    dims = ({0: Dim("batch"), 1: Dim("seq")},)
    quantized = fxquant.quantize_exported(torch.export.export(model, (ids,), dynamic_shapes=dims), cfg)
    assert sum(r.status == "quantized" for r in quantized.fxquant_report) == 11
    prog = decompose_fxquant_ops(quantized)  # what fxquant.export_program returns
    assert not [n for n in prog.graph.nodes if n.op == "call_function" and "fxquant" in str(n.target)]
    for shape in [(2, 7), (3, 5)]:
        x = torch.randint(0, 96, shape)
        assert torch.equal(prog.module()(x), quantized.module()(x))
    # The packed tensors, not float weights, are the program's constants: the only float
    # matrix left is the embedding (tied to lm_head, whose packed copy is separate).
    tensors = list(prog.state_dict.values()) + list(prog.constants.values())
    assert {tuple(t.shape) for t in tensors if t.dtype == torch.float32 and t.dim() == 2} == {(96, 64)}


CASES = [(cfg, dtype) for cfg in (fxquant.Int8WeightOnly(), fxquant.Int4WeightOnly(group_size=32),
                                  fxquant.Int4WeightOnly(group_size=64, symmetric=True),
                                  fxquant.Int8DynamicActivationInt8Weight(),
                                  fxquant.Float8DynamicActivationFloat8Weight(granularity="row"),
                                  fxquant.Float8DynamicActivationFloat8Weight(granularity="tensor"),
                                  fxquant.Float8WeightOnly())
         for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("cfg,dtype", CASES, ids=lambda v: v.describe() if hasattr(v, "describe") else str(v))
@pytest.mark.parametrize("m", [3, 40])
def test_decomposition_computes_the_cpu_kernel(cfg, dtype, m):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 128, dtype=dtype), torch.randn(96, dtype=dtype), torch.randn(2, m, 128, dtype=dtype)
    packed, static = cfg.pack(w)
    fn = decompose.fxquant_decompositions()[cfg.op]
    for bias in (b, None):
        want = cfg.op(x, *packed, bias, *static)
        got = fn(x, *packed, bias, *static)
        assert got.dtype == want.dtype and got.shape == want.shape
        if cfg.scheme == "int8_weight_only" and dtype == torch.bfloat16 and 2 * m <= 16:
            # The op uses ATen's _weight_int8pack_mm at small M in half precision; the
            # decomposition always takes the op's dequantize + GEMM path: bf16 rounding apart.
            assert fxquant.sqnr(want.float(), got.float()) > 40
        else:
            assert torch.equal(got, want)


def test_every_op_has_a_decomposition():
    from fxquant.lowering.ops import ACT_OPS, ALL_OPS, PREQUANT_OPS
    assert {op._opoverload for op in ALL_OPS + PREQUANT_OPS + ACT_OPS} == set(decompose.fxquant_decompositions())
    assert {cfg.op for cfg, _ in SCHEMES} <= set(decompose.fxquant_decompositions())


def test_export_rejects_a_path_that_is_not_pt2(tmp_path):
    with pytest.raises(ValueError, match=r"must end in '\.pt2'"):
        fxquant.export(nn.Linear(8, 8), (torch.randn(2, 8),), None, tmp_path / "model.zip")


# Loads fxquant's C++ op library (and nothing of fxquant's Python) before each package: what a
# deployment of an ops="cxx" package does. argv: jobs file, output file, library path.
LOADER_WITH_LIBRARY = NO_FXQUANT_PREAMBLE + textwrap.dedent("""

    jobs, out, lib = torch.load(sys.argv[1], weights_only=True), sys.argv[2], sys.argv[3]
    if lib:
        torch.ops.load_library(lib)
    results = {}
    for key, (pkg, inputs) in jobs.items():
        try:
            model = torch._inductor.aoti_load_package(pkg)
            with torch.no_grad():
                results[key] = [model(x) for x in inputs]
        except Exception as e:
            results[key] = f"{type(e).__name__}: {e}"
    assert not any(m == "fxquant" or m.startswith("fxquant.") for m in sys.modules), "fxquant got imported"
    torch.save(results, out)
    print("LOADED_OK")
""")


def test_cxx_ops_package_loads_with_the_library_only(mlp, tmp_path):
    """ops="cxx": weight-only linears stay fxquant::cxx_* ops; the package runs in a process that
    loads fxquant's C++ library but never imports fxquant, with dynamic batch and sequence."""
    from fxquant.lowering import cuda as cxx
    lib = str(cxx.load())
    dims = ({0: Dim("batch", min=1, max=64), 1: Dim("seq", min=1, max=512)},)
    jobs, refs = {}, {}
    for cfg in (fxquant.Int8WeightOnly(), fxquant.Int4WeightOnly(group_size=64)):
        prog = fxquant.export_program(mlp, (torch.randn(3, 8, D),), cfg, dims, ops="cxx")
        targets = [str(n.target) for n in prog.graph.nodes if n.op == "call_function"]
        assert sum(t.startswith("fxquant.cxx_") for t in targets) == 2, targets
        assert not any(t.startswith("fxquant.") and not t.startswith("fxquant.cxx_") for t in targets)
        path = fxquant.export(mlp, (torch.randn(3, 8, D),), cfg, tmp_path / f"{cfg.scheme}_cxx.pt2",
                              dynamic_shapes=dims, ops="cxx")
        assert package_mentions_fxquant_ops(path), "the package should call the fxquant::cxx_* ops"
        jobs[cfg.scheme] = (path, INPUTS)
        aten = fxquant.export_program(mlp, (torch.randn(3, 8, D),), cfg, dims)  # independent reference
        with torch.no_grad():
            refs[cfg.scheme] = [aten.module()(x) for x in INPUTS]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for with_lib in (True, False):
        inp, out = tmp_path / "jobs.pt", tmp_path / f"out_{with_lib}.pt"
        torch.save(jobs, inp)
        proc = subprocess.run([sys.executable, "-c", LOADER_WITH_LIBRARY, str(inp), str(out), lib if with_lib else ""],
                              cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "LOADED_OK" in proc.stdout, proc.stderr[-3000:]
        got = torch.load(out, weights_only=True)
        for scheme, outs in got.items():
            if with_lib:
                assert not isinstance(outs, str), outs
                for y, ref in zip(outs, refs[scheme]):
                    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
            else:  # without the library the package cannot run; it must say which op is missing
                assert isinstance(outs, str) and "cxx_" in outs, outs


def test_export_triton_ops_need_cuda(mlp):
    with pytest.raises(ValueError, match=r"ops='triton'\): the Triton kernels run on CUDA tensors"):
        fxquant.export_program(mlp, (torch.randn(3, 8, D),), fxquant.Int8WeightOnly(), ops="triton")


def test_export_ops_must_be_known(mlp, tmp_path):
    with pytest.raises(ValueError, match=r"ops must be one of \('aten', 'cxx', 'triton'\), got 'cuda'"):
        fxquant.export_program(mlp, (torch.randn(3, 8, D),), fxquant.Int8WeightOnly(), ops="cuda")


def test_package_links_the_shared_libstdcxx(tmp_path):
    """A g++ whose library path holds only libstdc++.a (the GPU machines' /opt/gcc/bin/g++)
    linked a private libstdc++ into every package, and aoti_load_package died with SIGSEGV.
    Here a g++ made to find the archive first (-B) stands in for it: without fxquant's link
    wrapper the package carries libstdc++'s code, with it the package uses the shared one."""
    fake = static_libstdcxx_gxx(tmp_path)
    if fake is None:
        pytest.skip("no libstdc++.a beside this g++")
    model = nn.Sequential(nn.Linear(D, D), nn.ReLU()).eval()
    got, paths = {}, {}
    for wrap in (False, True):
        with torch._inductor.config.patch({"cpp.cxx": (None, str(fake))}):  # restored on exit
            paths[wrap] = fxquant.export(model, (torch.randn(2, D),), fxquant.Int8WeightOnly(),
                                         tmp_path / f"wrap_{wrap}.pt2", link_wrapper=wrap)
        with zipfile.ZipFile(paths[wrap]) as z:
            (name,) = [n for n in z.namelist() if n.endswith(".so")]
            got[wrap] = libstdcxx_linkage(z.extract(name, tmp_path / f"x_{wrap}"))
    assert got[False] == (False, True), "the stand-in compiler should link libstdc++ statically"
    assert got[True] == (True, False)
    # and it loads (the static one fails to load here too: std::bad_cast, seen by hand, not asserted)
    run = ("import sys, torch; m = torch._inductor.aoti_load_package(sys.argv[1]); "
           "print('SHAPE', tuple(m(torch.randn(3, int(sys.argv[2]))).shape))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", run, paths[True], str(D)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert f"SHAPE (3, {D})" in proc.stdout, proc.stderr[-2000:]


def test_cpp_program_runs_a_cxx_ops_package(mlp, tmp_path):
    """Issue 5, item 2, from C++: a program linked against libtorch only dlopens fxquant's op
    library and loads an ops="cxx" package with AOTIModelPackageLoader (tests/cpp/load_package.cpp);
    its outputs equal the ATen export's, with dynamic batch and sequence. Without the library the
    loader throws an error naming the missing op."""
    from fxquant.lowering import cuda as cxx
    lib = str(cxx.load())
    exe = build_cpp_loader(tmp_path)
    cfg = fxquant.Int4WeightOnly(group_size=64)
    dims = ({0: Dim("batch", min=1, max=64), 1: Dim("seq", min=1, max=512)},)
    path = fxquant.export(mlp, (torch.randn(3, 8, D),), cfg, tmp_path / "cxx.pt2", dynamic_shapes=dims, ops="cxx")
    aten = fxquant.export_program(mlp, (torch.randn(3, 8, D),), cfg, dims)
    outs = run_cpp_loader(exe, path, lib, "cpu", "float32", INPUTS, tmp_path)
    with torch.no_grad():
        for x, y in zip(INPUTS, outs):
            torch.testing.assert_close(y, aten.module()(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"rc 2: .*cxx_int4_weight_only_linear"):
        run_cpp_loader(exe, path, None, "cpu", "float32", INPUTS[:1], tmp_path)
