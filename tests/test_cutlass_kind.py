"""The CUTLASS int4 GEMM kind ("cutlass", lowering/cuda/cutlass.py + csrc_cutlass/) on a machine
without it: its scale/zero arithmetic, where it applies, the table's fallbacks, and the build's
errors. The kernel itself runs in tests/gpu/test_gpu_cutlass.py."""
import subprocess
import sys

import pytest
import torch

from fxquant import numerics as nq
from fxquant.lowering.cuda import build, cutlass


@pytest.mark.parametrize("symmetric", [False, True])
def test_scales_and_zeros_give_fxquants_weights(symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 256, generator=g)
    q, sz = nq.quantize_int4_groupwise(w, 64, symmetric)
    sz = sz.to(torch.bfloat16)
    s, z = cutlass.scales_and_zeros(sz)
    assert s.shape == z.shape == (4, 40) and s.is_contiguous() and z.is_contiguous()
    # CUTLASS: unsigned q * scale + zero (one bf16 rounding, as its FMA); fxquant: (q - 8) * scale + zero
    qq = q.reshape(40, 4, 64).permute(1, 0, 2).float()
    theirs = (qq * s.float()[..., None] + z.float()[..., None]).to(torch.bfloat16)
    ours = nq.dequantize_int4(nq.pack_int4(q), sz, 64, torch.bfloat16).reshape(40, 4, 64).permute(1, 0, 2)
    if symmetric:  # zero 0: zero - 8 * scale is exact
        assert torch.equal(theirs, ours)
    else:  # zero - 8 * scale rounds to bf16: about half the weights move by one bf16 step
        err = (theirs.float() - ours.float()).abs()
        assert float(err.max()) <= 4 * float(ours.float().abs().max()) * 2 ** -8
        rel = float((theirs.float() - ours.float()).norm() / ours.float().norm())
        # zero' is the group's smallest weight, larger than a typical one: its rounding costs about
        # 4x bf16's own rounding of the weights (measured 4.4e-3 here); int4's own error is ~10 %.
        assert 0 < rel < 6e-3


def test_fits_only_on_hopper_cuda_bf16():
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    qw = torch.zeros(64, 128, dtype=torch.uint8)
    sz = torch.zeros(2, 64, 2, dtype=torch.bfloat16)
    assert not cutlass.fits("int4_wo", x, qw, sz, None, 128, 128, 256)  # CPU tensors
    assert not cutlass.fits("int4_wo", x, qw[:0], sz[:, :0], None, 128, 128, 256)  # N == 0
    assert set(cutlass.VARIANTS) == {(128, 256, 1, 0), (64, 128, 1, 0), (128, 128, 1, 0), (128, 256, 0, 0),
                                     (128, 128, 1, 4), (64, 256, 1, 4), (128, 128, 0, 0),
                                     (128, 64, 0, 0), (128, 32, 0, 0), (128, 16, 0, 0),
                                     (256, 64, 0, 0), (256, 32, 0, 0), (256, 128, 0, 0)}
    assert sorted(cutlass.VARIANTS.values()) == list(range(13))  # the library's variant numbers


def test_a_cutlass_entry_gives_its_fallback_where_it_cannot_run(monkeypatch):
    from fxquant.lowering.triton import dispatch as D
    table = D._table("shipped")
    entries = [(key, e) for t in table.values() for key, e in t.items() if e.get("kind") == "cutlass"]
    assert entries, "the shipped table names no CUTLASS kernel"
    for key, e in entries:
        if key.startswith("int8_dyn|"):
            assert (e["bn"], e["bm"], e["split_k"], e["warps"], e.get("cluster", 1)) in cutlass.I8_VARIANTS, key
            assert e["fallback"]["kind"] == "gemm", key
            continue
        assert key.split("|")[0] in ("int4_wo", "int4_mma", "int8_wo", "fp8_wo") and (e["bn"], e["bm"], e["split_k"], e["warps"]) in cutlass.VARIANTS, key
        assert e["fallback"]["kind"] in ("gemm", "deq"), key
    monkeypatch.setattr(D, "_device_info", lambda device: ("h100", 132, (9, 0)))
    monkeypatch.setattr(D, "_table", lambda which: table if which == "shipped" else {})
    cuda = torch.device("cuda")
    got = D.get_config("int4_wo", 1024, 28672, 4096, 128, torch.bfloat16, cuda)
    assert got.kind == "cutlass" and (got.bn, got.bm) == (128, 256)
    fb = D.get_config("int4_wo", 1024, 28672, 4096, 128, torch.bfloat16, cuda, allow_cutlass=False)
    assert fb.kind == "deq"
    # M = 4096 stays dequantize + cuBLAS (measured faster there)
    assert D.get_config("int4_wo", 4096, 28672, 4096, 128, torch.bfloat16, cuda).kind == "deq"
    # int8 weight-only: CUTLASS from M = 1024 on every shape (also shapes the table does not name)
    for n, k in ((4096, 4096), (28672, 4096), (5120, 8192)):
        got = D.get_config("int8_wo", 2048, n, k, 0, torch.bfloat16, cuda)
        assert got.kind == "cutlass" and (got.bn, got.bm) == (128, 256), (n, k)
        assert D.get_config("int8_wo", 2048, n, k, 0, torch.bfloat16, cuda, allow_cutlass=False).kind == "deq"
    # fp8 weight-only: CUTLASS at M = 65-4096 on these shapes (also one the table does not name);
    # without it, the Triton GEMM or dequantize + cuBLAS the table had before
    for n, k in ((4096, 4096), (28672, 4096), (5120, 8192)):
        for m in (100, 200, 512, 1000, 2048, 4096):
            assert D.get_config("fp8_wo", m, n, k, 0, torch.bfloat16, cuda).kind == "cutlass", (n, k, m)
            assert D.get_config("fp8_wo", m, n, k, 0, torch.bfloat16, cuda, allow_cutlass=False).kind in ("gemm", "deq")
    # int8 dynamic: CUTLASS from M = 65 (a 64 x 128 ping-pong tile), 2-CTA clusters of 256 x 128 from M = 1025
    for n, k in ((4096, 4096), (28672, 4096), (5120, 8192)):
        assert D.get_config("int8_dyn", 64, n, k, 0, torch.bfloat16, cuda).kind == "gemm", (n, k)
        small = D.get_config("int8_dyn", 100, n, k, 0, torch.bfloat16, cuda)
        assert small.kind == "cutlass" and (small.bm, small.bn, small.warps, small.cluster) == (64, 128, 4, 1)
        big = D.get_config("int8_dyn", 2048, n, k, 0, torch.bfloat16, cuda)
        assert big.kind == "cutlass" and (big.bm, big.bn, big.warps, big.cluster) == (256, 128, 0, 2), (n, k)
        assert D.get_config("int8_dyn", 2048, n, k, 0, torch.bfloat16, cuda, allow_cutlass=False).kind == "gemm"


def test_dispatcher_runs_the_fallback_on_cpu_tensors(monkeypatch):
    # A "cutlass" config on tensors it cannot take (here: CPU, under the Triton interpreter in a
    # subprocess) runs the entry's fallback and gives the reference result.
    code = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch, fxquant.lowering\n"
        "from fxquant import numerics as nq\n"
        "from fxquant.lowering.triton import dispatch as D\n"
        "w = torch.randn(64, 256) / 16; q, sz = nq.quantize_int4_groupwise(w, 128)\n"
        "qw, sz = nq.pack_int4(q), sz.to(torch.bfloat16)\n"
        "x = torch.randn(5, 256).bfloat16()\n"
        "cfg = D.KernelConfig('cutlass', bn=128, bk=64, bm=256, warps=0)\n"
        "got = D.linear('int4_wo', x, qw, sz, None, 128, cfg)\n"
        "ref = torch.ops.fxquant.int4_weight_only_linear(x, qw, sz, None, 128)\n"
        "print(float((got.float() - ref.float()).norm() / ref.float().norm()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-2


def test_build_needs_hopper_and_the_headers(tmp_path, monkeypatch):
    import threading
    fresh = lambda: {"path": None, "error": None, "lock": threading.Lock()}  # noqa: E731
    monkeypatch.setattr(build, "_cutlass_state", fresh())
    monkeypatch.delenv("FXQUANT_CUTLASS", raising=False)
    monkeypatch.delenv("FXQUANT_CXX", raising=False)
    monkeypatch.setattr(build, "_cuda_arch", lambda: None)
    with pytest.raises(build.CxxUnavailable, match=r"Hopper \(sm_90\) only; this is no CUDA GPU"):
        build.load_cutlass()
    assert not build.cutlass_available()  # the failure is remembered
    monkeypatch.setenv("FXQUANT_CUTLASS_DIR", str(tmp_path))
    import importlib.util
    if importlib.util.find_spec("cutlass_library") is None:
        with pytest.raises(build.CxxUnavailable, match="pip install nvidia-cutlass"):
            build.cutlass_include_dir()
    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    (tmp_path / "include" / "cutlass" / "cutlass.h").write_text("")
    assert build.cutlass_include_dir() == tmp_path / "include"
    monkeypatch.setattr(build, "_cutlass_state", fresh())
    monkeypatch.setenv("FXQUANT_CUTLASS", "0")
    with pytest.raises(build.CxxUnavailable, match="FXQUANT_CUTLASS=0"):
        build.load_cutlass()



def test_int8_fits_only_on_hopper_cuda_bf16():
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    qw = torch.zeros(64, 256, dtype=torch.int8)
    s = torch.ones(64, dtype=torch.bfloat16)
    assert not cutlass.fits("int8_wo", x, qw, s, None, 0, 128, 256)  # CPU tensors
    assert not cutlass.fits("fp8_wo", x, qw, s, None, 0, 128, 256)  # CPU tensors, and not an e4m3 weight


def test_the_backend_prepares_the_weights_its_graph_uses(monkeypatch):
    """The backend runs the ops' registered preparation hooks (the CUTLASS int4 arrays on a Hopper
    GPU) once per distinct packed weight of its final graph: a tied weight once, and sibling
    linears' fused weight rather than the members it replaced."""
    import fxquant
    from fxquant.lowering import ops
    seen = []
    hook = lambda qw, sz, bias, group: seen.append((tuple(qw.shape), tuple(sz.shape), bias is None, group))  # noqa: E731
    monkeypatch.setitem(ops._PREPARE, "fxquant::int4_weight_only_linear", [hook])

    class Siblings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(256, 64), torch.nn.Linear(256, 128)
            self.tied = torch.nn.Linear(192, 256, bias=False)

        def forward(self, x):
            h = torch.cat([self.q(x), self.k(x)], -1)
            return self.tied(torch.relu(self.tied(torch.relu(h))[..., :192]))
    torch.manual_seed(0)
    model = Siblings().to(torch.bfloat16).eval()  # bf16 on CPU: the ops stay nodes (float32 inlines them)
    torch._dynamo.reset()
    f = torch.compile(model, backend=fxquant.backend(fxquant.Int4WeightOnly(group_size=64)))
    with torch.no_grad():
        f(torch.randn(3, 256, dtype=torch.bfloat16))
    torch._dynamo.reset()
    # q + k fused: [192, 128] bytes, scales [4, 192, 2], their biases concatenated; the tied one once
    assert sorted(seen) == [((192, 128), (4, 192, 2), False, 64), ((256, 96), (3, 256, 2), True, 64)]


def test_prepare_int4_leaves_cpu_weights_alone():
    q, sz = nq.quantize_int4_groupwise(torch.randn(64, 256), 128)
    sz = sz.to(torch.bfloat16)
    cutlass.prepare_int4(nq.pack_int4(q), sz, 128)
    assert id(sz) not in cutlass._prepared


def test_quantize_graph_prepares_its_weights(monkeypatch):
    """fxquant.quantize_graph (no backend) runs the preparation hooks on the constants its graph uses."""
    import fxquant
    from torch.fx.experimental.proxy_tensor import make_fx
    from fxquant.lowering import ops
    seen = []
    monkeypatch.setitem(ops._PREPARE, "fxquant::int4_weight_only_linear",
                        [lambda qw, sz, bias, group: seen.append((tuple(qw.shape), bias is None, group))])
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32, bias=False))
    gm = make_fx(model)(torch.randn(4, 128))
    gm = fxquant.quantize_graph(gm, fxquant.Int4WeightOnly(group_size=64))
    assert sorted(seen) == [((32, 32), True, 64), ((64, 64), False, 64)]


def test_int8_dynamic_tiles_match_the_cuda_sources():
    # cutlass.I8_VARIANTS names each tile (bn, bm, split_k, warps) by the number the .cu switch
    # runs it under: read the switch and check both agree, tile shape and schedule included.
    import re
    src = "".join(p.read_text() for p in sorted(build.CUTLASS_SRC.glob("int8_dyn_tiles_*.cu")))
    cases = re.findall(r"case (\d+): return Config<Shape<_(\d+), _(\d+), _128>, (One|Cl2), (Coop|Ping), \w+(, StreamK)?>",
                       src)
    assert len(cases) == len(cutlass.I8_VARIANTS) == 12
    from_src = {(int(bn), int(bm), 0 if sk else 1, 4 if sched == "Ping" else 0, 2 if cl == "Cl2" else 1): int(v)
                for v, bm, bn, cl, sched, sk in cases}  # Shape is (M, N, K): M = bm (tokens), N = bn
    assert from_src == cutlass.I8_VARIANTS


def test_int8_dynamic_fits_only_on_hopper_cuda():
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    qw = torch.zeros(64, 256, dtype=torch.int8)
    s = torch.ones(64)
    assert not cutlass.fits("int8_dyn", x, qw, s, None, 0, 256, 128)  # CPU tensors
    assert not cutlass.fits_int8_dynamic(x.to(torch.int8), qw, s, None, 256, 128)


def test_int8_dynamic_fits_refuses_what_the_kernel_cannot_take(monkeypatch):
    # On a pretend Hopper GPU (CPU tensors stand in): every input rule of fits_int8_dynamic, one at a time
    monkeypatch.setattr(cutlass, "_hopper", lambda x: True)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    qw = torch.zeros(64, 256, dtype=torch.int8)
    s = torch.ones(64)
    b = torch.zeros(64, dtype=torch.bfloat16)
    tile = (256, 128, 1, 0, 2)
    assert cutlass.fits("int8_dyn", x, qw, s, b, 0, *tile)
    assert cutlass.fits_int8_dynamic(x.to(torch.int8), qw, s, None, *tile)  # prequantized x
    assert not cutlass.fits_int8_dynamic(x.half(), qw, s, b, *tile)  # fp16 output
    assert not cutlass.fits_int8_dynamic(x, qw, s, b, 256, 128, 1, 0, 4)  # no such cluster
    assert not cutlass.fits_int8_dynamic(x, qw.view(torch.uint8), s, b, *tile)  # not int8
    assert not cutlass.fits_int8_dynamic(x[:, :200], qw[:, :200], s, b, *tile)  # K % 16
    assert not cutlass.fits_int8_dynamic(x, qw[:60], s[:60], b[:60], *tile)  # N % 8
    assert not cutlass.fits_int8_dynamic(x, qw, s[:1], b, *tile)  # a per-tensor weight scale
    assert not cutlass.fits_int8_dynamic(x, qw, s.bfloat16(), b, *tile)  # scales not float32
    assert not cutlass.fits_int8_dynamic(x, qw, s, b.float(), *tile)  # bias not bf16
    assert not cutlass.fits_int8_dynamic(x, qw, s, torch.zeros(128, dtype=torch.bfloat16)[::2], *tile)  # strided bias
    assert not cutlass.fits_int8_dynamic(x, qw, s, torch.zeros(65, dtype=torch.bfloat16)[1:], *tile)  # misaligned
    assert not cutlass.fits_int8_dynamic(x, qw.t().contiguous().t(), s, b, *tile)  # weight not row-major
    assert not cutlass.fits_int8_dynamic(x[:0], qw, s, b, *tile)  # M == 0
    with pytest.raises(ValueError, match="not a weight-only scheme"):
        cutlass.linear("int8_dyn", x, qw, s, b, 0, 128, 256)


@pytest.mark.parametrize("scheme,qdtype,sdtype", [("int8_wo", torch.int8, torch.bfloat16),
                                                   ("fp8_wo", torch.float8_e4m3fn, torch.float32)])
def test_row_scaled_fits_refuses_what_the_kernel_cannot_take(monkeypatch, scheme, qdtype, sdtype):
    # On a pretend Hopper GPU (CPU tensors stand in): every input rule of fits_row_scaled, one at a time
    monkeypatch.setattr(cutlass, "_hopper", lambda x: True)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    qw = torch.zeros(64, 256, dtype=qdtype)
    s = torch.ones(64, dtype=sdtype)
    b = torch.zeros(64, dtype=torch.bfloat16)
    other = torch.float32 if sdtype == torch.bfloat16 else torch.bfloat16
    for tile in cutlass.VARIANTS:
        assert cutlass.fits(scheme, x, qw, s, b, 0, *tile)
    assert cutlass.fits(scheme, x, qw, s, None, 0, 128, 256)
    assert not cutlass.fits(scheme, x, qw, s, b, 0, 96, 256)  # no such tile
    assert not cutlass.fits(scheme, x, qw, s, b, 0, 128, 256, 1, 0, 2)  # no clusters here
    assert not cutlass.fits(scheme, x.half(), qw, s, b.half(), 0, 128, 256)  # fp16
    assert not cutlass.fits(scheme, x, qw.view(torch.uint8), s, b, 0, 128, 256)  # another weight dtype
    assert not cutlass.fits(scheme, x[:, :96], qw[:, :96].contiguous(), s, b, 0, 128, 256)  # K % 64
    assert not cutlass.fits(scheme, x, qw[:60], s[:60], b[:60], 0, 128, 256)  # N % 8
    assert not cutlass.fits(scheme, x, qw, s[:1], b, 0, 128, 256)  # a per-tensor scale: Triton's
    assert not cutlass.fits(scheme, x, qw, s.to(other), b, 0, 128, 256)  # scales of the other dtype
    assert not cutlass.fits(scheme, x, qw, torch.ones(128, dtype=sdtype)[::2], b, 0, 128, 256)  # strided scales
    assert not cutlass.fits(scheme, x, qw, s, b.float(), 0, 128, 256)  # bias not bf16
    assert not cutlass.fits(scheme, x, qw, s, torch.zeros(128, dtype=torch.bfloat16)[::2], 0, 128, 256)
    assert not cutlass.fits(scheme, x, qw, s, b[:32], 0, 128, 256)  # a bias of the wrong length
    assert not cutlass.fits(scheme, x, qw.t().contiguous().t(), s, b, 0, 128, 256)  # weight not row-major
    assert not cutlass.fits(scheme, x.view(-1)[1:1 + 3 * 256].view(3, 256), qw, s, b, 0, 128, 256)  # misaligned x
    assert not cutlass.fits(scheme, x[:0], qw, s, b, 0, 128, 256)  # M == 0


def test_weight_only_tiles_match_the_cuda_sources():
    # cutlass.VARIANTS names each weight-only tile (bn, bm, split_k, warps) by the number that
    # mixed_input_gemm.cuh's switch runs it under: read the switch and its aliases, check both agree.
    import re
    src = re.sub(r"\s+", " ", (build.CUTLASS_SRC / "mixed_input_gemm.cuh").read_text())
    # (warps 0 is the tile's default schedule: ping-pong for 64 x 128, which has no cooperative form)
    tiles = {alias: (int(bn), int(bm), 0 if streamk else 1, 4 if sched == "Ping" and (bn, bm) != ("64", "128") else 0)
             for alias, bn, bm, sched, streamk in re.findall(
                 r"using (\w+) = Config<Q, Md, Shape<_(\d+), _(\d+), _64>, One, (Coop|Ping), \w+"
                 r"(, cutlass::gemm::StreamKScheduler)?>", src)}
    cases = re.findall(r"case (\d+): return f\((\w+)<Q, Md>", src)
    assert len(cases) == len(cutlass.VARIANTS) == len(tiles) == 13
    assert {tiles[alias]: int(v) for v, alias in cases} == cutlass.VARIANTS
    shift = re.search(r"constexpr int kSchedShift = (\d+);", src)
    assert shift and int(shift.group(1)) == cutlass.SCHED_SHIFT and max(cutlass.VARIANTS.values()) < 1 << cutlass.SCHED_SHIFT


@pytest.mark.parametrize("value, want", [("", 0), ("1,auto", 0), ("2,auto", 1), ("8,auto", 3), ("1,rows", 4),
                                         ("4, tokens", 2 | 8), ("3,rows", 0), ("2,up", 0), ("2", 0), ("x,y,z", 0),
                                         ("1,auto,any", 16), ("2,rows,det,4", 1 | 4 | 2 << 5),
                                         ("1,auto,any,128", 16 | 7 << 5), ("1,auto,det,3", 0), ("1,auto,maybe", 0),
                                         ("1,auto,det,2,2", 0)])
def test_scheduler_order_override(value, want, monkeypatch):
    """FXQUANT_CUTLASS_SCHED="SWIZZLE,RASTER[,REDUCTION[,SPLITS]]" -> the bits mixed_input_gemm.cuh reads
    above the tile (log2 swizzle, raster 0 auto / 1 rows / 2 tokens, 1 for "any" reduction order, log2
    split-K count); anything malformed is the default."""
    monkeypatch.setenv("FXQUANT_CUTLASS_SCHED", value)
    assert cutlass._sched() == want


def test_epilogue_bias_is_an_aligned_vector():
    """The CUTLASS epilogues read the bias as [N] with 16-byte vector loads: views that are not
    aligned or contiguous are copied; the rest pass as they are (no copy per call)."""
    store = torch.randn(129, dtype=torch.bfloat16)
    assert cutlass._epilogue_bias(None) is None
    whole = store[:128]
    assert whole.data_ptr() % 16 == 0 and cutlass._epilogue_bias(whole).data_ptr() == whole.data_ptr()
    assert cutlass._epilogue_bias(whole.reshape(1, 128)).shape == (128,)
    for view in (store[1:129], store[::2][:64]):
        b = cutlass._epilogue_bias(view)
        assert b.is_contiguous() and b.data_ptr() % 16 == 0 and torch.equal(b, view)


def test_int4_fits_needs_one_bias_per_row():
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    qw = torch.zeros(64, 128, dtype=torch.uint8)
    sz = torch.zeros(2, 64, 2, dtype=torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cutlass, "_hopper", lambda x: True)
        assert cutlass.fits("int4_wo", x, qw, sz, torch.zeros(64, dtype=torch.bfloat16), 128, 128, 256)
        assert not cutlass.fits("int4_wo", x, qw, sz, torch.zeros(1, dtype=torch.bfloat16), 128, 128, 256)
        assert not cutlass.fits("int4_wo", x, qw, sz, torch.zeros(64), 128, 128, 256)  # float32


def test_scheduler_order_reaches_the_op(monkeypatch):
    """cutlass.linear puts FXQUANT_CUTLASS_SCHED's bits above the tile in the variant the op gets
    (the GPU test only shows that the order leaves the output's bits alone)."""
    import types
    seen = []
    fake = types.SimpleNamespace(ops=types.SimpleNamespace(fxquant=types.SimpleNamespace(
        cutlass_int8_weight_only_linear=lambda x, q, s, b, variant: seen.append(variant))))
    monkeypatch.setattr(cutlass, "torch", fake)
    tile = cutlass.VARIANTS[(128, 256, 0, 0)]  # stream-K
    for value, sched in (("", 0), ("4,tokens", 2 | 2 << 2), ("8,rows", 3 | 1 << 2)):
        monkeypatch.setenv("FXQUANT_CUTLASS_SCHED", value)
        cutlass.linear("int8_wo", None, None, None, None, 0, 128, 256, 0, 0)
        assert seen[-1] == tile | sched << cutlass.SCHED_SHIFT
