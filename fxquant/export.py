"""AOTInductor packages of quantized models that load without fxquant.

    fxquant.export(model, (x,), fxquant.Int4WeightOnly(), "model.pt2",
                   dynamic_shapes=({0: torch.export.Dim("batch")},))
    # any process, fxquant not installed:
    m = torch._inductor.aoti_load_package("model.pt2"); y = m(x)

Pipeline: torch.export -> fxquant.quantize_exported (packs weights, one fxquant op per linear)
-> each fxquant op decomposed into plain ATen ops (lowering/decompose.py) -> AOTInductor.

With `ops="cxx"`, int8 / int4 weight-only linears stay single ops of fxquant's C++ library
(`fxquant::cxx_*`, lowering/cuda/: on a GPU the CUDA GEMV at decode sizes) instead of ATen code;
the package then needs that library loaded before it is loaded (Python:
`torch.ops.load_library(fxquant.lowering.cuda.library_path())`; C++: dlopen the same file).
With `ops="triton"`, every linear on a CUDA input becomes fxquant's Triton kernels (traced from
their `torch.library.triton_op`, lowering/triton/triton_ops.py), compiled into the package by
AOTInductor: the package needs neither fxquant nor its library, and M is chosen among the
kernels inside the package at run time. (Int4WeightOnly(layout="mma") has no Triton twin: its linears
get the ATen decomposition, which dequantizes the weight per call. The default layout="auto" packs
"rows" for export.)
The packed tensors are the package's constants; their dequantization is code in the package that
runs per call (Inductor does not fold it into float constants: AOTI's runtime constant folding is
off by default, and the package-size test guards it).
"""
from __future__ import annotations

import hashlib
import inspect
import os
import re
import shlex
import shutil
import sys
from typing import Any, Sequence

import torch
from torch.export import ExportedProgram

from .configs import QuantConfig
from .export_pass import quantize_exported
from .lowering.cuda.build import LDFLAGS as SHARED_LIBSTDCXX
from .lowering.decompose import fxquant_decompositions
from .passes.rewrite import LayerFilter


EXPORT_OPS = ("aten", "cxx", "triton")


def _cxx_targets() -> dict:
    """Python op -> the C++ library's op with the same schema (weight-only schemes only)."""
    from .lowering import cuda as cxx
    from .lowering import ops
    try:
        cxx.load()
    except cxx.CxxUnavailable as e:
        raise RuntimeError(f"fxquant.export(ops='cxx'): the C++ op library is unavailable: {e}") from None
    lib = torch.ops.fxquant
    return {ops.int4_weight_only_linear._opoverload: lib.cxx_int4_weight_only_linear.default,
            ops.int4_mma_weight_only_linear._opoverload: lib.cxx_int4_mma_weight_only_linear.default,
            ops.int8_weight_only_linear._opoverload: lib.cxx_int8_weight_only_linear.default}


def decompose_fxquant_ops(ep: ExportedProgram, ops: str = "aten") -> ExportedProgram:
    """`ep` with every Python `torch.ops.fxquant.*` node replaced by its ATen decomposition, or
    (ops="cxx") by the C++ library's op of the same schema where one exists, or (ops="triton") by
    fxquant's Triton kernels (lowering/triton/triton_ops.py), which AOTInductor then compiles into
    the package: it loads without fxquant and runs quantized GEMMs on a CUDA GPU."""
    if ops not in EXPORT_OPS:
        raise ValueError(f"fxquant.export: ops must be one of {EXPORT_OPS}, got {ops!r}")
    if ops == "triton":
        from .lowering.triton.triton_ops import triton_target
        calls = [(n, triton_target(n.target)) for n in ep.graph.nodes
                 if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
        linears = [(n, t) for n, t in calls if t is not None]
        on_cuda = [(n, t) for n, t in linears if _on_cuda(n)]
        if linears and not on_cuda:
            raise ValueError("fxquant.export(ops='triton'): the Triton kernels run on CUDA tensors; export "
                             "the model with CUDA weights and example inputs, or use ops='aten' for the CPU")
        for n, target in on_cuda:  # CPU linears (if any) get the ATen decomposition below
            n.target = target
        ep.graph_module.recompile()
        table = torch.export.default_decompositions()
        table.update(fxquant_decompositions())  # fxquant ops on CPU inputs, if any
        kw = ({"decompose_custom_triton_ops": True}  # torch >= 2.6 leaves triton_ops whole by default
              if "decompose_custom_triton_ops" in inspect.signature(ep.run_decompositions).parameters else {})
        return _no_fxquant_ops_left(ep.run_decompositions(table, **kw))
    if ops == "cxx":
        swap = _cxx_targets()
        for n in ep.graph.nodes:
            if n.op == "call_function" and n.target in swap:
                n.target = swap[n.target]
        ep.graph_module.recompile()
    table = torch.export.default_decompositions()
    table.update(fxquant_decompositions())
    return _no_fxquant_ops_left(ep.run_decompositions(table))


def _on_cuda(node: torch.fx.Node) -> bool:
    return bool(getattr(node.args[0].meta.get("val"), "is_cuda", False))


def _no_fxquant_ops_left(out: ExportedProgram) -> ExportedProgram:
    left = sorted({str(n.target) for n in out.graph.nodes
                   if n.op == "call_function" and getattr(n.target, "namespace", None) == "fxquant"
                   and not n.target.name().startswith("fxquant::cxx_")})
    if left:  # a new op without a decomposition: the package would need fxquant to load
        raise RuntimeError(f"fxquant.export: no ATen decomposition for {left}; add one in "
                           f"fxquant/lowering/decompose.py")
    return out


def export_program(model: torch.nn.Module, example_inputs: Sequence[Any], config: QuantConfig | None = None,
                   dynamic_shapes: Any = None, *, example_kwargs: dict[str, Any] | None = None,
                   skip: Sequence[str] = (), filter: LayerFilter | None = None,  # noqa: A002
                   verbose: bool = False, prepacked: Any = None, strict: bool = False,
                   ops: str = "aten") -> ExportedProgram:
    """The quantized ExportedProgram that `export` hands to AOTInductor: free of fxquant's
    Python ops (ops="aten"), or calling only its C++ library's ops (ops="cxx"), or with its Triton
    kernels as graph nodes (ops="triton"; see the module doc).

    Its `.fxquant_report` lists every linear. `prepacked` (fxquant.load) skips quantization."""
    ep = torch.export.export(model, tuple(example_inputs), kwargs=example_kwargs,
                             dynamic_shapes=dynamic_shapes, strict=strict)
    qep = quantize_exported(ep, config, skip=skip, filter=filter, verbose=verbose, prepacked=prepacked)
    out = decompose_fxquant_ops(qep, ops)
    out.fxquant_report = qep.fxquant_report
    return out


def export(model: torch.nn.Module, example_inputs: Sequence[Any], config: QuantConfig | None,
           path: str | os.PathLike, dynamic_shapes: Any = None, *,
           inductor_configs: dict[str, Any] | None = None, link_wrapper: bool = True,
           **options: Any) -> str:
    """Quantize `model` and compile it into an AOTInductor package at `path` (a `.pt2` file).

    `dynamic_shapes` is torch.export's (e.g. `({0: Dim("batch"), 1: Dim("seq")},)`). `options`:
    `skip`, `filter`, `verbose`, `prepacked`, `example_kwargs`, `strict`, `ops` (see
    `export_program`). `link_wrapper` links the package's library against the shared
    libstdc++, with `-Wl,-Bsymbolic` (see `link_wrapper_cxx`; skipped if `inductor_configs`
    names `cpp.cxx`). Load the package with `torch._inductor.aoti_load_package(path)`; with
    the default ops="aten" that needs torch only, with ops="cxx" fxquant's C++ library loaded first."""
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"fxquant.export: the package path must end in '.pt2', got {path!r}")
    program = export_program(model, example_inputs, config, dynamic_shapes, **options)
    configs = dict(inductor_configs or {})
    if link_wrapper and "cpp.cxx" not in configs:
        cxx = link_wrapper_cxx()
        if cxx is not None:
            configs["cpp.cxx"] = cxx
    return torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)


def link_wrapper_cxx() -> str | None:
    """A compiler wrapper that, when linking a shared library, adds `-l:libstdc++.so.6` (the
    shared libstdc++, by file name) and `-Wl,-Bsymbolic`; None where that does not apply (not
    Linux, compiler not gcc/clang, or not found).

    Why: a package's library must share the process's libstdc++. A g++ that links libstdc++
    statically (seen: /opt/gcc/bin/g++ on the GPU machines, gcc 13.3, whose library path holds
    only libstdc++.a) puts a private copy of the locale machinery in the library; its facet ids
    disagree with the process's locale, and the std::regex in AOTInductor's model constructor
    (parse_device_str) dies with SIGSEGV in aoti_load_package, for any model. `-lstdc++` would
    find the same archive; naming the .so.6 file binds the shared one, which libtorch already
    loaded. -Bsymbolic (an earlier, insufficient attempt) stays: the fix was tested with it, not
    without. If no libstdc++.so.6 is on the linker's path the link fails; pass
    `link_wrapper=False` to `export` then. The wrapper's path is named by its content, so
    processes wrapping different compilers never overwrite each other's."""
    if sys.platform != "linux":
        return None
    cxx = torch._inductor.config.cpp.cxx
    cxx = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c][-1:]
    real = shutil.which(cxx[0]) if cxx else None
    if real is None:
        return None
    base = os.path.basename(real)
    kind = "clang++" if "clang" in base else "g++" if re.search(r"(gcc|g\+\+)", base) else None
    if kind is None:
        return None
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    script = ("#!/bin/sh\n"
              f'case " $* " in *" -shared "*) exec {shlex.quote(real)} "$@" {" ".join(SHARED_LIBSTDCXX)} -Wl,-Bsymbolic ;; '
              f'*) exec {shlex.quote(real)} "$@" ;; esac\n')
    digest = hashlib.sha256(script.encode()).hexdigest()[:16]
    # The file is named g++ / clang++: Inductor picks its flags by the compiler's name.
    wrapper = os.path.join(cache_dir(), "fxquant", f"link-{digest}", kind)
    if not os.path.exists(wrapper):
        os.makedirs(os.path.dirname(wrapper), exist_ok=True)
        tmp = f"{wrapper}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(script)
        os.chmod(tmp, 0o755)
        os.replace(tmp, wrapper)
    return wrapper
