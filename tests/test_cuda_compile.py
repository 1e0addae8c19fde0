"""The CUDA sources of fxquant's C++ op library (fxquant/lowering/cuda/csrc/*.cu) compile for sm_90
with nvcc, on a machine without a GPU (the CPU torch wheel lacks one generated header, stubbed here).
The GPU machine builds them just in time (lowering/cuda/build.py); this catches compile errors
before a GPU call is spent on them. Skipped where nvcc is not installed."""
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch.utils.cpp_extension as ext

CSRC = Path(__file__).resolve().parent.parent / "fxquant" / "lowering" / "cuda" / "csrc"
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """{source name: (return code, nvcc output, PTX text)} for every .cu file, compiled in parallel."""
    tmp = tmp_path_factory.mktemp("nvcc")
    stub = tmp / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    flags = [*ext.COMMON_NVCC_FLAGS, "-std=c++17", "-O3", "-arch=sm_90", "-DNDEBUG",  # as build.py's JIT build
             *(f"-I{p}" for p in ext.include_paths()), f"-I{sysconfig.get_paths()['include']}", f"-I{tmp / 'stub'}"]

    def build(src: Path):
        keep = tmp / src.stem
        keep.mkdir()
        obj = subprocess.run([NVCC, *flags, "--keep", f"--keep-dir={keep}", "-c", str(src), "-o", str(keep / "x.o")],
                             capture_output=True, text=True)
        text = "".join(p.read_text() for p in keep.glob("*.ptx"))
        return src.name, (obj.returncode, obj.stdout + obj.stderr, text)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(build, sorted(CSRC.glob("*.cu"))))


def test_every_cuda_source_compiles_for_sm90(compiled):
    assert compiled, f"no .cu files under {CSRC}"
    bad = {name: out[-3000:] for name, (rc, out, _) in compiled.items() if rc != 0}
    assert not bad, bad


def test_the_pdl_wait_reaches_the_8bit_kernels(compiled):
    """The prequant kernels' programmatic-dependent-launch variant waits (griddepcontrol.wait) before
    it reads x: compiled into an instruction, not dropped."""
    for name in ("dynamic_mma_int8.cu", "dynamic_mma_fp8.cu"):
        assert "griddepcontrol.wait" in compiled[name][2], name
