"""The C++ op library (lowering/cuda/csrc) on CPU: it builds, its schemas equal the Python ops',
its CPU kernels compute what the Python ops compute, and bad input gets a clear error.
CI has no GPU: the CUDA kernels are tested in tests/gpu/test_gpu_cxx.py on the GPU machine."""
import subprocess
import sys
import time

import pytest
import torch

import fxquant  # noqa: F401  (registers the Python ops)
from fxquant import numerics as nq
from fxquant.configs import (Float8DynamicActivationFloat8Weight, Int4WeightOnly,
                             Int8DynamicActivationInt8Weight, Int8WeightOnly)
from fxquant.lowering import cuda as cxx
from helpers import static_libstdcxx_gxx

PAIRS = {"cxx_int4_weight_only_linear": "int4_weight_only_linear",
         "cxx_int4_mma_weight_only_linear": "int4_mma_weight_only_linear",
         "cxx_int8_weight_only_linear": "int8_weight_only_linear",
         "cxx_int8_dynamic_linear": "int8_dynamic_linear",
         "cxx_float8_dynamic_linear": "float8_dynamic_linear",
         "cxx_int8_dynamic_linear_prequant": "int8_dynamic_linear_prequant",
         "cxx_float8_dynamic_linear_prequant": "float8_dynamic_linear_prequant"}


@pytest.fixture(scope="module", autouse=True)
def library():
    t0 = time.perf_counter()
    path = cxx.load()  # a failure to build is a test failure: CI machines have a C++ compiler
    print(f"C++ op library {path} ready in {time.perf_counter() - t0:.1f} s")
    return path


def _packed(cfg, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    packed, static = cfg.pack(w)
    return packed, static, g


@pytest.mark.parametrize("cxx_name,py_name", PAIRS.items())
def test_schema_equals_python_op(cxx_name, py_name):
    ours = str(getattr(torch.ops.fxquant, cxx_name).default._schema)
    theirs = str(getattr(torch.ops.fxquant, py_name).default._schema)
    if cxx_name.endswith("_prequant"):  # plus a trailing, defaulted switch (dispatch.py sets it)
        assert ", bool pdl=False)" in ours, ours
        ours = ours.replace(", bool pdl=False)", ")")
    assert ours.replace(f"fxquant::{cxx_name}", f"fxquant::{py_name}") == theirs


CASES = [("int4_g32", Int4WeightOnly(group_size=32)), ("int4_g128_sym", Int4WeightOnly(group_size=128, symmetric=True)),
         ("int8", Int8WeightOnly())]


@pytest.mark.parametrize("name,cfg", CASES)
@pytest.mark.parametrize("x_shape", [(5, 256), (2, 9, 256), (0, 256), (1, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_kernel_equals_python_op_float32(name, cfg, x_shape, bias):
    """float32: the same ATen arithmetic in the same order as lowering/cpu.py: bit-identical."""
    packed, static, g = _packed(cfg, 40, 256, torch.float32)
    x = torch.randn(*x_shape, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    want = cfg.op(x, *packed, b, *static)
    got = getattr(torch.ops.fxquant, "cxx_" + cfg.op._name.split("::")[-1])(x, *packed, b, *static)
    assert got.shape == want.shape == (*x_shape[:-1], 40) and got.dtype == x.dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("name,cfg", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_half_matches_reference(name, cfg, dtype):
    packed, static, g = _packed(cfg, 24, 128, dtype)
    x = torch.randn(3, 128, generator=g).to(dtype)
    got = getattr(torch.ops.fxquant, "cxx_" + cfg.op._name.split("::")[-1])(x, *packed, None, *static)
    if isinstance(cfg, Int4WeightOnly):
        w = nq.dequantize_int4(packed[0], packed[1], static[0], torch.float32)
    else:
        w = nq.dequantize_int8_per_channel(*packed, torch.float32)
    ref = x.float() @ w.t()
    assert got.dtype == dtype
    assert nq.sqnr(ref, got.float()) > (38 if dtype == torch.bfloat16 else 50)


@pytest.mark.parametrize("x_shape", [(5, 256), (2, 9, 256), (0, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mma_layout_cpu_kernel_equals_python_op(x_shape, dtype):
    """The ATen unpacking of the MMA-fragment layout (ops.cpp) is numerics.unpack_int4_mma's."""
    cfg = Int4WeightOnly(group_size=64, layout="mma")
    packed, static, g = _packed(cfg, 48, 256, dtype)
    x = torch.randn(*x_shape, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    got = torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x, *packed, b, *static)
    assert torch.equal(got, cfg.op(x, *packed, b, *static))
    torch.library.opcheck(torch.ops.fxquant.cxx_int4_mma_weight_only_linear.default, (x, *packed, b, *static))
    with pytest.raises(RuntimeError, match="MMA-fragment layout needs N % 16 == 0, K % 64 == 0 and a power-of-two"):
        torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x, packed[0], torch.zeros(8, 48, 2, dtype=dtype), b, 32)


def test_opcheck():
    for cfg in (Int4WeightOnly(group_size=64), Int8WeightOnly()):
        packed, static, g = _packed(cfg, 16, 128, torch.bfloat16)
        op = getattr(torch.ops.fxquant, "cxx_" + cfg.op._name.split("::")[-1])
        for b in (None, torch.randn(16, generator=g).bfloat16()):
            torch.library.opcheck(op, (torch.randn(3, 128, generator=g).bfloat16(), *packed, b, *static))


def test_fake_kernel_symbolic_m():
    packed, static, _ = _packed(Int4WeightOnly(group_size=64), 16, 128, torch.float32)

    def f(x, q, sz):
        return torch.ops.fxquant.cxx_int4_weight_only_linear(x, q, sz, None, *static)

    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(f, tracing_mode="symbolic")(torch.randn(7, 128), *packed)
    out = next(n for n in gm.graph.nodes if n.target == torch.ops.fxquant.cxx_int4_weight_only_linear.default)
    assert str(out.meta["val"].shape[0]).startswith("s")  # M stays symbolic
    assert out.meta["val"].shape[1] == 16


def test_bad_inputs_are_clear_errors():
    packed, static, g = _packed(Int4WeightOnly(group_size=64), 16, 128, torch.float32)
    op4 = torch.ops.fxquant.cxx_int4_weight_only_linear
    with pytest.raises(RuntimeError, match="x has K=96 but the weight has K=128"):
        op4(torch.randn(2, 96), *packed, None, *static)
    with pytest.raises(RuntimeError, match=r"scales_zeros must have shape \[2, 16, 2\]"):
        op4(torch.randn(2, 128), packed[0], packed[1][:, :8], None, *static)
    with pytest.raises(RuntimeError, match="not a multiple of group_size=48"):
        op4(torch.randn(2, 128), *packed, None, 48)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[16\]"):
        op4(torch.randn(2, 128), *packed, torch.zeros(15), *static)
    with pytest.raises(RuntimeError, match="x must be float32/float16/bfloat16"):
        op4(torch.randn(2, 128).double(), *packed, None, *static)
    q8, s8 = Int8WeightOnly().pack(torch.randn(16, 128))[0]
    with pytest.raises(RuntimeError, match="qweight must be int8"):
        torch.ops.fxquant.cxx_int8_weight_only_linear(torch.randn(2, 128), q8.view(torch.uint8), s8, None)


def test_cached_build_loads_fast_in_a_fresh_process(library):
    """The second process reuses the built library (no compiler run)."""
    code = ("import time, torch; t0 = time.perf_counter(); from fxquant.lowering import cuda as c; "
            "p = c.load(); print(p, time.perf_counter() - t0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    path, secs = r.stdout.split()
    assert path == str(library)
    assert float(secs) < 10, f"loading the cached library took {secs} s"
    assert "building" not in r.stderr


def test_disabled_by_env():
    code = "from fxquant.lowering import cuda as c; print(c.available(), c.unavailable_reason())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "FXQUANT_CXX": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False disabled by FXQUANT_CXX=0"


def test_cached_library_loads_without_build_tools(library):
    """Once built, loading needs neither ninja nor a compiler."""
    code = ("import torch.utils.cpp_extension as e\n"
            "def no(*a, **k): raise RuntimeError('ninja is gone')\n"
            "e.verify_ninja_availability = no\n"
            "e._write_ninja_file_and_build_library = no\n"
            "from fxquant.lowering import cuda as c\n"
            "print(c.load())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "CXX": "/nonexistent/c++"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(library)


def test_gpus_below_sm80_get_a_clear_reason():
    code = ("from fxquant.lowering.cuda import build as b\n"
            "b._cuda_arch = lambda: '7.5'\n"
            "print(b.available(), b.unavailable_reason())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ("False its CUDA kernels need compute capability >= 8.0 "
                                "(bf16 tensor-core MMA, L2 load hints); this GPU is sm_75")


def test_shipped_cxx_entries_carry_a_triton_fallback(monkeypatch):
    """Every table entry that names the C++ kernel keeps the best Triton config, and
    get_config(allow_cxx=False) returns it (what runs where the library can't be built)."""
    from fxquant.lowering.triton import dispatch as D
    table = D._table("shipped")
    entries = [(dev, key, e) for dev, t in table.items() for key, e in t.items() if e.get("kind") == "cxx"]
    assert entries, "the shipped table names no C++ kernel"
    for dev, key, e in entries:
        assert e["fallback"]["kind"] in ("gemv", "gemm", "deq"), key
        D.KernelConfig.from_json(e["fallback"])  # a valid config
    monkeypatch.setattr(D, "_device_info", lambda device: ("h100", 132, (9, 0)))
    monkeypatch.setattr(D, "_table", lambda which: table if which == "shipped" else {})
    cuda = torch.device("cuda")
    assert D.get_config("int4_wo", 1, 28672, 4096, 128, torch.bfloat16, cuda).kind == "cxx"
    fb = D.get_config("int4_wo", 1, 28672, 4096, 128, torch.bfloat16, cuda, allow_cxx=False)
    assert fb == D.KernelConfig.from_json(table["h100"]["int4_wo|bfloat16|28672x4096|g128|m1"]["fallback"])
    # a shape without an exact entry: the bucket's entry, and its fallback
    assert D.get_config("int4_wo", 2, 1000, 2048, 128, torch.float16, cuda).kind == "cxx"
    assert D.get_config("int4_wo", 2, 1000, 2048, 128, torch.float16, cuda, allow_cxx=False).kind != "cxx"
    assert D.get_config("int8_wo", 1, 1000, 2048, 0, torch.bfloat16, cuda, allow_cxx=False).kind != "cxx"


DYNAMIC = [("int8", Int8DynamicActivationInt8Weight()), ("fp8_row", Float8DynamicActivationFloat8Weight("row")),
           ("fp8_tensor", Float8DynamicActivationFloat8Weight("tensor"))]


@pytest.mark.parametrize("name,cfg", DYNAMIC)
@pytest.mark.parametrize("x_shape", [(5, 192), (2, 9, 192), (0, 192), (1, 192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_cpu_kernel_equals_python_op(name, cfg, x_shape, dtype):
    """The dynamic ops' ATen path (the CPU kernel, and the CUDA kernels' fallback): the quantization
    and the scaled product of lowering/cpu.py in the same order, so bit-identical."""
    packed, static, g = _packed(cfg, 40, 192, torch.float32)
    x = (torch.randn(*x_shape, generator=g) * 3).to(dtype)
    for b in (None, torch.randn(40, generator=g)):
        want = cfg.op(x, *packed, b, *static)
        got = getattr(torch.ops.fxquant, "cxx_" + cfg.op._name.split("::")[-1])(x, *packed, b, *static)
        assert got.shape == want.shape == (*x_shape[:-1], 40) and got.dtype == dtype
        assert torch.equal(got, want)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prequant_cpu_kernel_equals_python_op(fp8, out_dtype):
    cfg = Float8DynamicActivationFloat8Weight("row") if fp8 else Int8DynamicActivationInt8Weight()
    (qweight, w_scales), _, g = _packed(cfg, 24, 128, torch.float32)
    x = torch.randn(2, 3, 128, generator=g)
    xq, xs = nq.quantize_fp8(x.reshape(6, 128), True) if fp8 else nq.quantize_int8_per_token(x.reshape(6, 128))
    xq, xs = xq.reshape(2, 3, 128), xs.reshape(2, 3, 1)
    name = ("float8" if fp8 else "int8") + "_dynamic_linear_prequant"
    for b in (None, torch.randn(24, generator=g).bfloat16()):
        want = getattr(torch.ops.fxquant, name)(xq, xs, qweight, w_scales, b, out_dtype)
        got = getattr(torch.ops.fxquant, "cxx_" + name)(xq, xs, qweight, w_scales, b, out_dtype)
        assert got.shape == (2, 3, 24) and got.dtype == out_dtype
        assert torch.equal(got, want)


def test_dynamic_opcheck():
    for _, cfg in DYNAMIC:
        packed, static, g = _packed(cfg, 16, 128, torch.float32)
        op = getattr(torch.ops.fxquant, "cxx_" + cfg.op._name.split("::")[-1])
        # opcheck's schema test compares inputs with ops that have no CPU float8 kernel
        utils = ("test_faketensor", "test_aot_dispatch_dynamic") if packed[0].dtype != torch.int8 else None
        for b in (None, torch.randn(16, generator=g).bfloat16()):
            torch.library.opcheck(op, (torch.randn(3, 128, generator=g).bfloat16(), *packed, b, *static),
                                  **({"test_utils": utils} if utils else {}))
    (qweight, w_scales), _, g = _packed(DYNAMIC[0][1], 16, 128, torch.float32)
    xq, xs = nq.quantize_int8_per_token(torch.randn(5, 128, generator=g))
    torch.library.opcheck(torch.ops.fxquant.cxx_int8_dynamic_linear_prequant,
                          (xq, xs, qweight, w_scales, None, torch.bfloat16))


def test_dynamic_bad_inputs_are_clear_errors():
    (q8, s8), _, g = _packed(Int8DynamicActivationInt8Weight(), 16, 128, torch.float32)
    op = torch.ops.fxquant.cxx_int8_dynamic_linear
    with pytest.raises(RuntimeError, match="x has K=96 but the weight has K=128"):
        op(torch.randn(2, 96), q8, s8, None)
    with pytest.raises(RuntimeError, match=r"w_scales must be float32 \[16\] or \[1\], got BFloat16 \[16\]"):
        op(torch.randn(2, 128), q8, s8.bfloat16(), None)
    with pytest.raises(RuntimeError, match="qweight must be int8"):
        op(torch.randn(2, 128), q8.view(torch.uint8), s8, None)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[16\]"):
        op(torch.randn(2, 128), q8, s8, torch.zeros(15))
    xq, xs = nq.quantize_int8_per_token(torch.randn(5, 128, generator=g))
    pre = torch.ops.fxquant.cxx_int8_dynamic_linear_prequant
    with pytest.raises(RuntimeError, match=r"x_scales must be float32 \[\.\.\., 1\] with one scale per token"):
        pre(xq, xs[:4], q8, s8, None, torch.bfloat16)
    with pytest.raises(RuntimeError, match="xq and qweight must be int8"):
        pre(xq.float(), xs, q8, s8, None, torch.bfloat16)
    with pytest.raises(RuntimeError, match="out_dtype must be float32/float16/bfloat16"):
        pre(xq, xs, q8, s8, None, torch.int32)


BUILD_AND_LINKAGE = """
from fxquant.lowering.cuda import build
from helpers import libstdcxx_linkage
print("NEEDED %s LOCALE_CODE %s" % libstdcxx_linkage(str(build.load())))
"""


def test_library_links_the_shared_libstdcxx(tmp_path):
    """Built by a g++ whose library path holds only libstdc++.a (the GPU machines' /opt/gcc,
    stood in for by -B here), the library still uses the process's shared libstdc++: a private
    copy made any C++ error message that streams a number die with SIGSEGV there (S11, S22)."""
    import os
    fake = static_libstdcxx_gxx(tmp_path)
    if fake is None:
        pytest.skip("no libstdc++.a beside this g++")
    tests_dir = os.path.dirname(os.path.abspath(__file__))  # for helpers in the child
    env = dict(os.environ, CXX=str(fake), FXQUANT_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", BUILD_AND_LINKAGE], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NEEDED True LOCALE_CODE False" in proc.stdout, proc.stdout
