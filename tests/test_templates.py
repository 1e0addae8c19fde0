"""The `templates` backend option (lowering/templates.py), checked without a GPU: Inductor is
pointed at its Triton backend for the CPU device with an sm_90 target, and the compile stops after
code generation. What is checked is the generated code: one template kernel per linear that
imports fxquant's shared GEMM body and carries the pointwise epilogue, and no call of the op.
The kernels' numbers are checked on the GPU (tests/gpu/test_gpu_templates.py)."""
from unittest import mock

import pytest
import torch

import fxquant
from fxquant.lowering import templates as T


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(256, 128)

    def forward(self, x, r):
        return torch.nn.functional.silu(self.fc(x)) + r


class _Done(Exception):
    pass


@pytest.fixture(autouse=True)
def _cpu_triton(monkeypatch):
    monkeypatch.setattr(T, "_CPU_TRITON_FOR_TESTS", True)


def _codegen(cfg, m: int, templates="always") -> str:
    """The wrapper code Inductor generates for Block under fxquant (nothing is compiled or run)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering
    import torch.utils._triton as ut
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    codes = []

    def codegen_only(self):
        wrapper, _ = self.codegen()
        codes.append(wrapper.value)
        raise _Done

    torch.manual_seed(0)
    model = Block().to(torch.bfloat16).eval()
    x = torch.randn(1, m, 256, dtype=torch.bfloat16)
    r = torch.randn(1, m, 128, dtype=torch.bfloat16)
    torch._dynamo.reset()
    ut.triton_hash_with_backend.cache_clear()
    # (no GPU here: Inductor's kernel metadata asks Triton for the active backend)
    with inductor_config.patch(cpu_backend="triton"), \
            mock.patch.object(ut, "triton_backend", lambda: make_backend(GPUTarget("cuda", 90, 32))), \
            mock.patch.object(GraphLowering, "compile_to_module", codegen_only):
        with pytest.raises(Exception) as e:
            torch.compile(model, backend="fxquant", options={"config": cfg, "templates": templates})(x, r)
    ut.triton_hash_with_backend.cache_clear()
    assert codes, f"no code generated: {e.value!r}"
    return codes[-1]


@pytest.mark.parametrize("cfg,op", [
    (fxquant.Int8WeightOnly(), "int8_weight_only_linear"),
    (fxquant.Int4WeightOnly(group_size=64), "int4_weight_only_linear"),
    (fxquant.Int8DynamicActivationInt8Weight(), "int8_dynamic_linear_prequant"),
], ids=lambda v: v if isinstance(v, str) else v.describe())
def test_the_linear_becomes_a_template_with_the_epilogue_fused(cfg, op):
    code = _codegen(cfg, m=128)
    kernels = [line for line in code.splitlines() if "= async_compile.triton(" in line]
    tem = [k for k in kernels if "triton_tem_fused" in k]
    assert len(tem) == 1, kernels
    assert "silu" in tem[0] and "add" in tem[0], tem[0]  # SiLU and the residual add in its epilogue
    assert "from fxquant.lowering.triton.gemm import gemm_tiles, scale_acc, tile_of" in code
    call = code.split("def call(")[-1]
    assert f"torch.ops.fxquant.{op}.default(" not in call, "the op is still called"
    # only the activation quantization besides it (dynamic); nothing after it
    assert len(kernels) == (2 if "prequant" in op else 1), kernels


def test_small_m_keeps_the_op():
    code = _codegen(fxquant.Int8WeightOnly(), m=T.TEMPLATE_MIN_M - 1)
    assert "triton_tem" not in code
    assert "torch.ops.fxquant.int8_weight_only_linear.default(" in code.split("def call(")[-1]


def test_the_lowerings_table_is_restored_with_the_ops_fallback():
    """After the context, Inductor's own fallback for the op (with its layout constraint, as the
    implicit fallback has) is what a compile without templates finds; also after an exception."""
    from torch._inductor.lowering import lowerings, maybe_layout_constraints
    op = torch.ops.fxquant.int8_weight_only_linear.default
    with T.template_lowerings():
        inside = lowerings[op]
    after = lowerings.get(op)
    assert after is not None and after is not inside
    assert maybe_layout_constraints(op) is not None
    with pytest.raises(RuntimeError, match="boom"):
        with T.template_lowerings():
            assert lowerings[op] is not after
            raise RuntimeError("boom")
    assert lowerings.get(op) is after


def test_bad_option_value_is_refused():
    with pytest.raises(ValueError, match=r"options\['templates'\] must be False, True or 'always', got 'yes'"):
        fxquant.backend(fxquant.Int8WeightOnly(), templates="yes")


def test_compile_passes_the_backend_options_on():
    c = fxquant.compile(torch.nn.Linear(64, 64), fxquant.Int8WeightOnly(), templates="always", fuse_siblings=False)
    assert c.fxquant_backend.templates == "always" and c.fxquant_backend.fuse_siblings is False


@pytest.mark.parametrize("cfg", [fxquant.Int4WeightOnly(group_size=64), fxquant.Int8DynamicActivationInt8Weight()],
                         ids=lambda c: c.describe())
def test_the_generated_template_kernel_compiles_for_sm90(cfg, tmp_path):
    """The template kernel Inductor generated, with its epilogue, is valid Triton for an H100:
    compiled offline (Triton's bundled ptxas, no GPU) into tensor-core code."""
    import ast
    import os
    import re
    import subprocess
    import sys

    code = _codegen(cfg, m=128)
    name, src = re.search(r"(triton_tem_\w+) = async_compile.triton\('\w+', '''(.*?)''', device_str", code, re.S).groups()
    meta = re.search(r"@triton_heuristics.template\((.*?)\n\)\n", src, re.S)
    signature = ast.literal_eval(re.search(r"'signature': (\{.*?\})", meta.group(1)).group(1))
    warps = int(re.search(r"num_warps=(\d+)", meta.group(1)).group(1))
    stages = int(re.search(r"num_stages=(\d+)", meta.group(1)).group(1))
    path = tmp_path / f"{name}.py"
    path.write_text(src.replace(meta.group(0), ""))
    # a fresh process: the tests run Triton in interpreter mode, which cannot compile
    script = (
        "import importlib.util, sys, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        f"spec = importlib.util.spec_from_file_location({name!r}, {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"k = triton.compile(ASTSource(mod.{name}, signature={signature!r}, constexprs={{}}),\n"
        f"    target=GPUTarget('cuda', 90, 32), options={{'num_warps': {warps}, 'num_stages': {stages}}})\n"
        "print('MMA' if 'mma' in k.asm['ptx'] else 'NO MMA')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("MMA") and "NO MMA" not in r.stdout, r.stdout
