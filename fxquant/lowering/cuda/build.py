"""Just-in-time build of csrc/ with torch.utils.cpp_extension, cached across processes.

The library is built once per (sources, torch version, CUDA arch) into
$FXQUANT_CACHE_DIR/cxx/<hash> (default ~/.cache/fxquant/cxx/<hash>); later processes load the
cached .so in well under a second. cpp_extension serializes concurrent builders with a lock file
in that folder. FXQUANT_CXX=0 disables the library (the Triton kernels are used).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from .. import ops
from ..cache import cache_root

ABI_VERSION = 4  # must equal fxquant::abi_version() in csrc/ops.cpp (2: the dynamic-activation ops; 3: pdl;
# 4: the int4 MMA-fragment layout op)
SRC = Path(__file__).with_name("csrc")
CUTLASS_SRC = Path(__file__).with_name("csrc_cutlass")
# One lock per library: the CUTLASS build (minutes) must not hold up the C++ library's loads.
_state: dict = {"path": None, "error": None, "lock": threading.Lock()}
_cutlass_state: dict = {"path": None, "error": None, "lock": threading.Lock()}


class CxxUnavailable(RuntimeError):
    """The C++/CUDA op library cannot be built or loaded here; the message says why."""


def _cuda_arch() -> str | None:
    """"9.0"-style arch of the current GPU, or None where CUDA kernels are not built."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _check_tools(arch: str | None) -> None:
    from torch.utils import cpp_extension as ext
    try:
        ext.verify_ninja_availability()
    except RuntimeError:
        raise CxxUnavailable("ninja is not installed (pip install ninja)") from None
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise CxxUnavailable(f"no C++ compiler: {cxx!r} is not on PATH (set CXX)")
    if arch is not None:
        home = ext.CUDA_HOME
        if home is None or not (Path(home) / "bin" / "nvcc").exists():
            raise CxxUnavailable(f"no CUDA compiler: nvcc not found (CUDA_HOME={home})")


def _register_fakes() -> None:
    @torch.library.register_fake("fxquant::cxx_int4_mma_weight_only_linear")
    def _(x, qweight, scales_zeros, bias, group_size):
        ops._check_int4_mma(x, qweight, group_size)
        return ops._out_like(x, qweight)

    @torch.library.register_fake("fxquant::cxx_int4_weight_only_linear")
    def _(x, qweight, scales_zeros, bias, group_size):
        ops._check_k(x, qweight.shape[1] * 2, "cxx_int4_weight_only_linear")
        return ops._out_like(x, qweight)

    @torch.library.register_fake("fxquant::cxx_int8_weight_only_linear")
    def _(x, qweight, scales, bias):
        ops._check_k(x, qweight.shape[1], "cxx_int8_weight_only_linear")
        return ops._out_like(x, qweight)

    @torch.library.register_fake("fxquant::cxx_int8_dynamic_linear")
    def _(x, qweight, w_scales, bias):
        ops._check_k(x, qweight.shape[1], "cxx_int8_dynamic_linear")
        return ops._out_like(x, qweight)

    @torch.library.register_fake("fxquant::cxx_float8_dynamic_linear")
    def _(x, qweight, w_scales, bias, per_row):
        ops._check_k(x, qweight.shape[1], "cxx_float8_dynamic_linear")
        return ops._out_like(x, qweight)

    for name, q_dtype in (("cxx_int8_dynamic_linear_prequant", torch.int8),
                          ("cxx_float8_dynamic_linear_prequant", torch.float8_e4m3fn)):
        def fake(xq, x_scales, qweight, w_scales, bias, out_dtype, pdl=False, name=name, q_dtype=q_dtype):
            ops._check_prequant(xq, x_scales, qweight, out_dtype, name, q_dtype)
            return xq.new_empty((*xq.shape[:-1], qweight.shape[0]), dtype=out_dtype)
        torch.library.register_fake(f"fxquant::{name}")(fake)


def load(verbose: bool = False) -> Path:
    """Builds (first use) and loads the library into this process; returns the .so's path.
    With a CUDA GPU present the CUDA kernels are built too (for that GPU's arch only).
    Raises CxxUnavailable with the reason when it cannot; the failure is remembered."""
    return _load_once(_state, _load, "C++/CUDA op library", verbose)


def _load_once(state: dict, loader, what: str, verbose: bool) -> Path:
    with state["lock"]:
        if state["path"] is not None:
            return state["path"]
        if state["error"] is not None:
            raise CxxUnavailable(state["error"])
        try:
            state["path"] = loader(verbose)
        except CxxUnavailable as e:
            state["error"] = str(e)
            raise
        except Exception as e:  # a compiler error: keep its last lines, they name the problem
            tail = "\n".join(str(e).strip().splitlines()[-15:])
            state["error"] = f"building the {what} failed: {type(e).__name__}: {tail}"
            raise CxxUnavailable(state["error"]) from e
        return state["path"]


def _load(verbose: bool) -> Path:
    if os.environ.get("FXQUANT_CXX", "1") == "0":
        raise CxxUnavailable("disabled by FXQUANT_CXX=0")
    arch = _cuda_arch()
    if arch is not None and tuple(int(v) for v in arch.split(".")) < (8, 0):
        raise CxxUnavailable(f"its CUDA kernels need compute capability >= 8.0 (bf16 tensor-core MMA, "
                             f"L2 load hints); this GPU is sm_{arch.replace('.', '')}")
    sources = ["ops.cpp"] + (["gemv.cu", "int4_mma_layout.cu", "int8_mma.cu", "dynamic_mma.cu", "dynamic_mma_int8.cu",
                                 "dynamic_mma_fp8.cu"] if arch else [])
    h = hashlib.sha256()
    for f in sorted(SRC.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    h.update(f"{torch.__version__}|{arch}|{sys.version_info[:2]}|{sources}|{LDFLAGS}".encode())  # what gets built
    tag = h.hexdigest()[:16]
    name = f"fxquant_cxx_{tag}"
    build_dir = cache_root() / "cxx" / tag
    so = build_dir / f"{name}.so"
    if so.exists() and not (build_dir / "lock").exists():  # built: load it (no compiler or ninja needed)
        try:
            torch.ops.load_library(str(so))
        except OSError as e:
            raise CxxUnavailable(f"cannot load the cached library {so}: {e}; delete {build_dir} to rebuild") from e
        return _finish_load(so)
    _check_tools(arch)
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"fxquant: building the C++{'/CUDA' if arch else ''} op library (first use, about a "
          f"minute; cached in {build_dir})", file=sys.stderr, flush=True)
    from torch.utils import cpp_extension as ext
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # this GPU only: one arch compiles fastest
    try:
        ext.load(name=name, sources=[str(SRC / s) for s in sources], build_directory=str(build_dir),
                 extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], extra_ldflags=list(LDFLAGS), with_cuda=bool(arch),
                 is_python_module=False, verbose=verbose)
    finally:
        if arch:
            if old is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old
    return _finish_load(so)


def _finish_load(so: Path) -> Path:
    got = torch.ops.fxquant.cxx_abi_version()
    if got != ABI_VERSION:
        raise CxxUnavailable(f"{so} has ABI version {got}, this fxquant expects {ABI_VERSION}")
    _register_fakes()
    return so


def available() -> bool:
    """True when the library is loaded or loads now (building it on first use)."""
    try:
        load()
        return True
    except CxxUnavailable:
        return False


def unavailable_reason() -> str | None:
    return _state["error"]


def library_path() -> Path | None:
    """The loaded .so (what a C++ program passes to dlopen / torch::load_library), or None."""
    return _state["path"]


# --------------------------------------------------------------------------- the CUTLASS library
def cutlass_include_dir() -> Path:
    """CUTLASS's headers: $FXQUANT_CUTLASS_DIR (a CUTLASS checkout or its include/ parent), else
    the `nvidia-cutlass` package (pip install fxquant[cuda]). Raises CxxUnavailable if neither."""
    roots = []
    if os.environ.get("FXQUANT_CUTLASS_DIR"):
        roots.append(Path(os.environ["FXQUANT_CUTLASS_DIR"]))
    import importlib.util
    spec = importlib.util.find_spec("cutlass_library")  # located, not imported (its Python side needs more)
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).parent / "source")
    for r in roots:
        if (r / "include" / "cutlass" / "cutlass.h").exists():
            return r / "include"
    raise CxxUnavailable("the CUTLASS headers are not installed (pip install nvidia-cutlass, or set "
                         "FXQUANT_CUTLASS_DIR to a CUTLASS checkout)")


def load_cutlass(verbose: bool = False) -> Path:
    """Builds (first use) and loads the CUTLASS GEMM library (int4 / int8 / fp8 weight-only and int8 dynamic; Hopper,
    sm_90, only); returns its path. Raises CxxUnavailable with the reason when it cannot; the failure is remembered.
    Its sources (csrc_cutlass/*.cu) compile in parallel in two to four minutes; cached like the main library."""
    return _load_once(_cutlass_state, _load_cutlass, "CUTLASS op library", verbose)


# The shared libstdc++, named by file: a g++ that finds only libstdc++.a (seen: /opt/gcc/bin/g++ on
# the GPU machines) links a private copy of the locale machinery into the library, and any
# C++ exception message that streams a number then dies with SIGSEGV (facet ids that disagree
# with the process's locale; BENCHMARKS.md S22). A plain -lstdc++ would find that archive too.
# fxquant.export's link wrapper uses the same flags.
LDFLAGS = ("-l:libstdc++.so.6",) if sys.platform == "linux" else ()

CUTLASS_ABI_VERSION = 7  # csrc_cutlass's cutlass_abi_version(): 2 added the int8 op, 3 int8 dynamic, 4 fp8, 5 int4 mma layout,
# 6 the 128 x 128 stream-K tile, 7 the 128 x 64 / 32 / 16 and 256 x 64 / 32 / 128 stream-K tiles, stream-K options
_CUTLASS_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG")


def _load_cutlass(verbose: bool) -> Path:
    if os.environ.get("FXQUANT_CXX", "1") == "0" or os.environ.get("FXQUANT_CUTLASS", "1") == "0":
        raise CxxUnavailable("disabled by FXQUANT_CXX=0 or FXQUANT_CUTLASS=0")
    arch = _cuda_arch()
    if arch != "9.0":
        raise CxxUnavailable(f"the CUTLASS GEMMs are built for Hopper (sm_90) only; this is "
                             f"{'no CUDA GPU' if arch is None else 'sm_' + arch.replace('.', '')}")
    include = cutlass_include_dir()
    h = hashlib.sha256()
    for f in sorted(CUTLASS_SRC.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    h.update(f"{torch.__version__}|{arch}|{sys.version_info[:2]}|{include}|{_CUTLASS_FLAGS}|{LDFLAGS}".encode())
    h.update((include / "cutlass" / "version.h").read_bytes() if (include / "cutlass" / "version.h").exists() else b"")
    tag = h.hexdigest()[:16]
    name = f"fxquant_cutlass_{tag}"
    build_dir = cache_root() / "cxx" / f"cutlass_{tag}"
    so = build_dir / f"{name}.so"
    if not (so.exists() and not (build_dir / "lock").exists()):
        _check_tools(arch)
        build_dir.mkdir(parents=True, exist_ok=True)
        print(f"fxquant: building the CUTLASS GEMM library (first use, about two minutes; cached in "
              f"{build_dir})", file=sys.stderr, flush=True)
        from torch.utils import cpp_extension as ext
        old = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"  # wgmma and setmaxnreg need the arch-specific target
        try:
            ext.load(name=name, sources=[str(p) for p in sorted(CUTLASS_SRC.glob("*.cu"))],
                     build_directory=str(build_dir),
                     extra_include_paths=[str(include), str(include.parent / "tools" / "util" / "include")],
                     extra_cflags=["-O3"], extra_cuda_cflags=list(_CUTLASS_FLAGS), extra_ldflags=list(LDFLAGS),
                     with_cuda=True, is_python_module=False, verbose=verbose)
        finally:
            if old is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old
    try:
        torch.ops.load_library(str(so))
    except OSError as e:
        raise CxxUnavailable(f"cannot load {so}: {e}; delete {build_dir} to rebuild") from e
    if torch.ops.fxquant.cutlass_abi_version() != CUTLASS_ABI_VERSION:
        raise CxxUnavailable(f"{so} has another ABI version; delete {build_dir} to rebuild")

    @torch.library.register_fake("fxquant::cutlass_int4_weight_only_linear")
    def _(x, qweight, scales, zeros, bias, group_size, variant):
        ops._check_k(x, qweight.shape[1] * 2, "cutlass_int4_weight_only_linear")
        return ops._out_like(x, qweight)

    @torch.library.register_fake("fxquant::cutlass_int4_mma_weight_only_linear")
    def _(x, qweight, scales, zeros, bias, group_size, variant):
        ops._check_k(x, qweight.shape[1] * 2, "cutlass_int4_mma_weight_only_linear")
        return ops._out_like(x, qweight)

    @torch.library.register_fake("fxquant::cutlass_int8_weight_only_linear")
    def _(x, qweight, scales, bias, variant):
        ops._check_k(x, qweight.shape[1], "cutlass_int8_weight_only_linear")
        return ops._out_like(x, qweight)

    @torch.library.register_fake("fxquant::cutlass_float8_weight_only_linear")
    def _(x, qweight, w_scales, bias, variant):
        ops._check_k(x, qweight.shape[1], "cutlass_float8_weight_only_linear")
        return ops._out_like(x, qweight)

    @torch.library.register_fake("fxquant::cutlass_int8_dynamic_linear")
    def _(xq, x_scales, qweight, w_scales, bias, variant):
        ops._check_k(xq, qweight.shape[1], "cutlass_int8_dynamic_linear")
        return xq.new_empty((xq.shape[0], qweight.shape[0]), dtype=torch.bfloat16)
    return so


def cutlass_available() -> bool:
    try:
        load_cutlass()
        return True
    except CxxUnavailable:
        return False
