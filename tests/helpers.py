"""Small models shared by the graph and backend tests; packing per kernel scheme for the kernel tests."""
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxquant import numerics as nq

def static_libstdcxx_gxx(tmp_path: Path) -> Path | None:
    """A g++ that finds only libstdc++.a when it links (-B puts a folder holding just the
    archive first), as the GPU machines' /opt/gcc/bin/g++ does; None where there is no archive.
    Named g++: Inductor picks its flags by the compiler's name."""
    gxx = shutil.which("g++")
    if gxx is None:
        return None
    archive = subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(archive):
        return None
    (tmp_path / "static_only").mkdir()
    (tmp_path / "static_only" / "libstdc++.a").symlink_to(archive)
    fake = tmp_path / "bin" / "g++"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nexec {shlex.quote(gxx)} -B{shlex.quote(str(tmp_path / "static_only"))}/ "$@"\n')
    fake.chmod(0o755)
    return fake


def libstdcxx_linkage(so: str) -> tuple[bool, bool]:
    """(the shared library lists libstdc++.so.6 as NEEDED, it defines libstdc++'s locale code)."""
    needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
    defined = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    return "libstdc++.so.6" in needed, " T _ZNKSt6locale2id5_M_idEv" in defined


def build_cpp_loader(tmp_path: Path, cuda: bool = False) -> Path:
    """tests/cpp/load_package.cpp compiled against this torch's libtorch, into tmp_path.
    Linked with the shared libstdc++ by file name, as fxquant's own libraries are (a g++ that
    finds only libstdc++.a would put a second copy of it beside libtorch's); with `cuda`,
    libtorch_cuda kept as a dependency (it registers AOTI's CUDA runner; the program calls
    none of its symbols, and --as-needed would drop it)."""
    from torch.utils.cpp_extension import TORCH_LIB_PATH, include_paths

    from fxquant.lowering.cuda.build import LDFLAGS
    exe = tmp_path / "load_package"
    src = Path(__file__).parent / "cpp" / "load_package.cpp"
    subprocess.run([shutil.which("g++"), "-std=c++20", "-O1", "-w", str(src), "-o", str(exe),
                    *(f"-I{p}" for p in include_paths()), f"-L{TORCH_LIB_PATH}", f"-Wl,-rpath,{TORCH_LIB_PATH}",
                    "-ltorch", "-ltorch_cpu", "-lc10", "-ldl", *LDFLAGS,
                    *(["-Wl,--no-as-needed", "-ltorch_cuda", "-Wl,--as-needed"] if cuda else [])],
                   check=True, capture_output=True, text=True, timeout=300)
    return exe


def run_cpp_loader(exe: Path, package: str, library: str | None, device: str, dtype: str,
                   inputs: list, tmp_path: Path) -> list:
    """The C++ loader on float32 CPU `inputs` (B x S x D each) in a process without PYTHONPATH;
    its outputs as float32 CPU tensors. Raises RuntimeError("rc N: stderr") if it fails."""
    args = []
    for i, x in enumerate(inputs):
        f = tmp_path / f"cpp_in{i}.bin"
        f.write_bytes(bytes(x.contiguous().float().view(torch.uint8).flatten().tolist()))
        args += [str(f), *map(str, x.shape)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(exe), package, library or "-", device, dtype, *args], env=env, capture_output=True,
                          text=True, errors="replace", timeout=600)
    if proc.returncode != 0 or "RAN_OK" not in proc.stdout:
        raise RuntimeError(f"rc {proc.returncode}: {proc.stderr[-3000:]}")
    outs = []
    for i, x in enumerate(inputs):
        raw = bytearray((tmp_path / f"cpp_in{i}.bin.out").read_bytes())
        outs.append(torch.frombuffer(raw, dtype=torch.float32).view(x.shape[0], x.shape[1], -1))
    return outs


# Start of a script run in a fresh interpreter where importing fxquant is an ImportError (an
# exported package must load without it); it imports sys and torch.
NO_FXQUANT_PREAMBLE = """import sys

class NoFxquant:
    def find_spec(self, name, path=None, target=None):
        if name == "fxquant" or name.startswith("fxquant."):
            raise ImportError("fxquant must not be needed to load an exported package")

sys.meta_path.insert(0, NoFxquant())
import torch
"""


class Block(nn.Module):
    """Attention-like block: q/k/v linears, an activation x activation matmul, an MLP."""

    def __init__(self, d: int = 64, hidden: int = 128):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
        x = x + att @ v
        return x + self.down(F.gelu(self.up(x)))


class Tiny(nn.Module):
    """Embedding -> repeated blocks -> lm_head tied to the embedding."""

    def __init__(self, vocab: int = 96, d: int = 64, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


class Forms(nn.Module):
    """Every graph form of a linear with a constant weight, on a 3-D input."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.w_flin = nn.Parameter(torch.randn(d, d) / 8)
        self.w_t = nn.Parameter(torch.randn(d, d) / 8)
        self.w_mm = nn.Parameter(torch.randn(d, d) / 8)
        self.w_kn = nn.Parameter(torch.randn(d, d) / 8)  # HF Conv1D stores [K, N]
        self.b_kn = nn.Parameter(torch.randn(d) / 8)

    def forward(self, x):
        x = self.lin(x)                                   # nn.Linear with bias
        x = F.linear(x, self.w_flin)                      # F.linear without bias
        x = x @ self.w_t.T                                # x @ w.T
        x = torch.matmul(x, self.w_mm.t())                # torch.matmul
        flat = x.reshape(-1, x.shape[-1])
        y = torch.addmm(self.b_kn, flat, self.w_kn)       # Conv1D
        return y.reshape(x.shape)


def fxquant_ops(counter) -> int:
    return sum(v for k, v in counter.items() if k.startswith("fxquant."))


def plain_then_cudagraphs(model, xs, cfg, between=None, rounds: int = 3):
    """Compile model dynamically with fxquant's backend, without CUDA graphs, and run xs (want);
    then again with mode reduce-overhead and run xs `rounds` times (warm-up, record, replay...).
    between() runs after the first compile. Returns (want, got rounds, unique graphs of the second
    compile, Inductor's cudagraph skips)."""
    import fxquant
    from torch._dynamo.utils import counters
    with torch.no_grad():
        torch._dynamo.reset()
        plain = torch.compile(model, backend=fxquant.backend(cfg), dynamic=True)
        want = [plain(x).clone() for x in xs]
        if between is not None:
            between()
        torch._dynamo.reset()
        counters.clear()
        f = torch.compile(model, backend="fxquant", options={"config": cfg, "mode": "reduce-overhead"},
                          dynamic=True)
        got = [[f(x).clone() for x in xs] for _ in range(rounds)]
        frames = counters["stats"]["unique_graphs"]
        skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    return want, got, frames, skips


def pack_weight(scheme: str, w: torch.Tensor, group: int = 0, symmetric: bool = False):
    """w [N, K] float -> the packed tensors of the op of dispatch scheme `scheme`."""
    if scheme == "int8_wo":
        return nq.quantize_int8_per_channel(w)
    if scheme in ("int4_wo", "int4_mma"):
        q, sz = nq.quantize_int4_groupwise(w, group, symmetric)
        return (nq.pack_int4_mma(q) if scheme == "int4_mma" else nq.pack_int4(q)), sz
    if scheme == "int8_dyn":
        return nq.quantize_int8_weight_for_dynamic(w)
    if scheme == "fp8_dyn_tensor":
        return nq.quantize_fp8_weight(w, per_row=False)
    return nq.quantize_fp8_weight(w, per_row=True)  # fp8_dyn_row, fp8_wo


def scheme_op(scheme: str, group: int = 0) -> tuple[str, tuple]:
    """(name of the torch.ops.fxquant op of dispatch scheme `scheme`, its static args after bias)."""
    return {"int8_wo": ("int8_weight_only_linear", ()), "int4_wo": ("int4_weight_only_linear", (group,)),
            "int4_mma": ("int4_mma_weight_only_linear", (group,)),
            "fp8_wo": ("float8_weight_only_linear", ()), "int8_dyn": ("int8_dynamic_linear", ()),
            "fp8_dyn_row": ("float8_dynamic_linear", (True,)),
            "fp8_dyn_tensor": ("float8_dynamic_linear", (False,))}[scheme]


def repeat_kv(x: torch.Tensor, g: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, L, D] -> [B, Hkv * g, L, D]."""
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, g, n, d).reshape(b, h * g, n, d)


def attention_reference(q, k, v, mask, scale):
    """Grouped-query attention in float64 (k, v with H / G heads; mask bool: True attends, float: added)."""
    g = q.shape[1] // k.shape[1]
    s = q.double() @ repeat_kv(k, g).double().transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, -1) @ repeat_kv(v, g).double()


def compile_for_sm90(script: str, timeout: int = 900) -> dict:
    """Run `script` (it compiles Triton kernels for sm_90 with triton.compile, which needs no GPU,
    and prints a JSON object last) in a subprocess without TRITON_INTERPRET, which the test session
    sets and the kernel modules read at import. Skips where Triton has no NVIDIA backend."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Triton's NVIDIA backend is not installed: {e}")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interpreted_kernels(names: list[str], probe: str) -> list:
    """The modules fxquant.lowering.triton.<name> (in dependency order) with their kernels under
    TRITON_INTERPRET=1: imported, or all re-imported in order when something imported them before
    the test module set it (the kernels read it when they are defined). probe, "module.kernel": a
    kernel that must then be the interpreter's."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction
    mods = [importlib.import_module(f"fxquant.lowering.triton.{n}") for n in names]
    mod, kernel = probe.split(".")
    if not isinstance(getattr(mods[names.index(mod)], kernel), InterpretedFunction):
        mods = [importlib.reload(m) for m in mods]
    return mods
