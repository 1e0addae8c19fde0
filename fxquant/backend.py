"""The `fxquant` torch.compile backend.

Dynamo hands us a torch-level graph whose parameters are inputs. We let Inductor lower it to
an ATen inference graph (AOT autograd + decompositions) and run fxquant's pass as Inductor's
`joint_custom_pre_pass`, before Inductor's own passes: at that point each placeholder is
one of Dynamo's example inputs, so the real parameters can be quantized and packed once, at
compile time, and embedded as constants. Inductor compiles the rest of the graph as usual.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .configs import Int8WeightOnly, QuantConfig
from .passes import quantize as qpass
from .passes.constants import PlaceholderConstants, dynamo_source_to_fqn
from .passes.embed_triton import embed_triton_kernels
from .passes.gqa_attention import fold_gqa_attention
from .passes.act_quant import inductor_patches as act_quant_patches
from .passes.act_quant import split_activation_quant
from .passes.horizontal import fuse_siblings
from .passes.inline_cpu import inline_cpu_float32
from .passes.rewrite import LayerFilter, RewriteContext, graph_fake_mode
from .report import LinearRecord, format_report

OPTIONS = ("config", "skip", "filter", "release_weights", "verbose", "inductor", "prepacked", "mode",
           "fuse_siblings", "fuse_act_quant", "embed_kernels", "templates", "fold_gqa", "gqa_kernel")


class Backend:
    """A torch.compile backend that quantizes every eligible linear of the captured graphs.

    `report` lists every linear seen (the latest compile's record per layer name).
    `prepacked` (fxquant.load / fxquant.quantize_weights) supplies packed weights by name, so
    those layers are not quantized again; its config is the backend's config.
    """

    def __init__(self, config: QuantConfig | None = None, *, skip: Sequence[str] = (),
                 filter: LayerFilter | None = None, release_weights: bool = False,  # noqa: A002
                 verbose: bool = False, inductor: dict[str, Any] | None = None, prepacked: Any = None,
                 mode: str | None = None, fuse_siblings: bool = True, fuse_act_quant: bool = True,
                 embed_kernels: bool = False, templates: bool | str = False, fold_gqa: bool = True,
                 gqa_kernel: bool = True):
        config = _prepacked_config(config, prepacked)
        config = Int8WeightOnly() if config is None else config
        if not isinstance(config, QuantConfig):
            raise TypeError(f"fxquant: config must be an fxquant config (e.g. fxquant.Int8WeightOnly()), "
                            f"got {type(config).__name__}")
        if isinstance(skip, str):
            skip = (skip,)
        if filter is not None and not callable(filter):
            raise TypeError("fxquant: options['filter'] must be a callable (name, (out, in)) -> bool")
        self.config = config
        self.skip = tuple(skip)
        self.filter = filter
        self.release_weights = bool(release_weights)
        self.verbose = bool(verbose)
        self.prepacked = prepacked
        self.inductor = dict(inductor or {})  # extra Inductor config patches
        if mode is not None:
            from torch._inductor import list_mode_options
            try:
                list_mode_options(mode)  # fail here rather than at the first call
            except RuntimeError as e:
                raise ValueError(f"fxquant: options['mode']: {e}") from None
        # torch.compile refuses mode= together with options=, so options={"mode": ...} is the way
        # to ask for "reduce-overhead" (CUDA graphs) with the string backend "fxquant".
        self.mode = mode
        self.fuse_siblings = bool(fuse_siblings)  # Q/K/V, gate/up: one op over concatenated weights
        self.fuse_act_quant = bool(fuse_act_quant)  # per-token activation quant fused into x's producer
        # CUDA linears as their Triton kernels in Inductor's code (passes/embed_triton.py) rather
        # than calls of the ops' run-time dispatcher (which also has CUTLASS / C++ / cuBLAS kernels).
        self.embed_kernels = bool(embed_kernels)
        # GEMM ops as an Inductor template where M is static (lowering/templates.py): True picks
        # it or the op by Inductor's benchmark at compile time, "always" takes it without one.
        if templates not in (False, True, "always"):
            raise ValueError(f"fxquant: options['templates'] must be False, True or 'always', got {templates!r}")
        self.templates = templates
        # Grouped-query attention at few query rows without the repeated K/V copy (passes/gqa_attention.py).
        if not isinstance(fold_gqa, bool):
            raise TypeError(f"fxquant: options['fold_gqa'] must be True or False, got {fold_gqa!r}")
        if not isinstance(gqa_kernel, bool):
            raise TypeError(f"fxquant: options['gqa_kernel'] must be True or False, got {gqa_kernel!r}")
        self.fold_gqa = fold_gqa
        self.gqa_kernel = gqa_kernel  # with fold_gqa: fxquant::gqa_attention rather than a folded SDPA
        self.gqa_folds: list[int] = []  # attentions folded, per captured graph
        self._records: dict[str, LinearRecord] = {}
        self._report: list[LinearRecord] = []  # live list, updated in place after each compile
        self._pack_cache: dict = {}
        self._warned: set[str] = set()
        self.compiled_graphs: list[collections.Counter] = []  # op counts of each rewritten graph

    def reset(self) -> None:
        """torch._dynamo.reset() (torch.compiler.reset()) calls this. It drops Inductor's own
        references to compiled graph modules (which hold their packed constants) and, on CUDA,
        the CUDA-graph trees of "reduce-overhead" graphs (Inductor's own backend does the same;
        torch versions that do not reset the trees themselves would otherwise keep them alive).
        The pack cache stays: a live model recompiled after the reset reuses its packed weights
        (with release_weights its originals are gone); a dead model's entries leave it by
        themselves (weakref callbacks)."""
        _forget_inductor_constants()
        if _cuda_available():
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees
            reset_cudagraph_trees()

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "Backend":
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"fxquant: unknown option(s) {unknown}; allowed: {list(OPTIONS)}")
        return cls(options.pop("config", None), **options)

    @property
    def report(self) -> list[LinearRecord]:
        """Every linear seen, the latest compile's record per layer name (a live list)."""
        return self._report

    def format_report(self) -> str:
        return format_report(self.report)

    # ---------------------------------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, mode: str | None = None,
                 options: dict[str, Any] | None = None) -> Callable:
        """Dynamo calls this per captured graph. `mode` ("reduce-overhead", "max-autotune", ...)
        and `options` (Inductor config) come from `torch.compile(..., backend=self, mode=, options=)`."""
        mode = mode or self.mode
        grad = torch.is_grad_enabled()
        if grad:
            self._warn_once("grad", "fxquant is inference-only: the graph is compiled under no_grad, its "
                            "weights are treated as constants and its outputs do not require grad.")
        if self.fold_gqa:
            self.gqa_folds.append(fold_gqa_attention(gm, kernel=self.gqa_kernel))
            if self.verbose and self.gqa_folds[-1]:
                how = "on fxquant's kernel" if self.gqa_kernel else "folded"
                print(f"fxquant: {self.gqa_folds[-1]} grouped-query attention(s) {how} (no repeated K/V copy)")
        pristine = _copy_graph(gm)  # Inductor may edit gm; another set of weights compiles this copy
        compiled, read = self._compile(gm, example_inputs, mode, options)
        if read:
            compiled = _PerWeights(self, pristine, mode, options, read, example_inputs, compiled)
        if not grad:
            return compiled

        @functools.wraps(compiled)
        def run_no_grad(*args):
            with torch.no_grad():
                return compiled(*args)
        return run_no_grad

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: list, mode: str | None,
                 options: dict[str, Any] | None) -> tuple[Callable, list[int]]:
        """Inductor's compile_fx with fxquant's pass; also returns the indices of the inputs whose
        values were baked into the graph as constants."""
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        names = [_placeholder_name(n) for n in gm.graph.find_nodes(op="placeholder")]
        state: dict[str, Any] = {}
        joint_pass = _QuantizeJointPass(self, example_inputs, names, state)
        exact = act_quant_patches(self.config) if self.fuse_act_quant else {}
        patches = {**(list_mode_options(mode) if mode else {}), **exact, **self.inductor, **(options or {}),
                   "joint_custom_pre_pass": joint_pass, "fx_graph_cache": False,
                   "cpp.enable_concat_linear": False}
        from torch._inductor.virtualized import V

        from .inductor_choices import FxquantChoices
        with torch.no_grad(), torch._inductor.config.patch(patches), \
                torch._functorch.config.patch(enable_autograd_cache=False), \
                V.set_choices_handler(FxquantChoices()), _templates(self.templates):
            compiled = compile_fx(gm, example_inputs)

        if "restore_fake" in state:
            state["restore_fake"].allow_non_fake_inputs = False
        records = state.get("records", [])
        for r in records:
            self._records[r.name] = r
        self._report[:] = self._records.values()
        if state.get("packed_here"):
            self._warn_once("packed_here", f"fxquant: prepacked weights given, but {len(state['packed_here'])} "
                            f"layer(s) were not in them and were quantized at compile time: "
                            f"{state['packed_here'][:5]}")
        if not any(r.status == "quantized" for r in records):
            self._warn_once("none", "fxquant: no eligible linear layer with a constant weight in the "
                            "captured graph; it runs unquantized.")
        if self.verbose and records:
            print(format_report(records))
        if self.release_weights:
            for t in state.get("release", []):
                # Same shape/strides (Dynamo's guards still pass), no memory behind it.
                t.untyped_storage().resize_(0)
        read = sorted(state.get("read", ())) if any(r.status == "quantized" for r in records) else []
        return compiled, read

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=3)


class _QuantizeJointPass(CustomGraphPass):
    def __init__(self, backend: Backend, example_inputs, names, state: dict):
        self.backend, self.example_inputs, self.names, self.state = backend, example_inputs, names, state

    def __call__(self, graph: torch.fx.Graph) -> None:
        b = self.backend
        constants = PlaceholderConstants(graph.owning_module, self.example_inputs, self.names)
        ctx = RewriteContext(b.config, constants, skip=b.skip, layer_filter=b.filter, pack_cache=b._pack_cache,
                             prepacked=b.prepacked,
                             portable=b.embed_kernels or bool(b.templates))  # Triton code in the graph
        self.state["records"] = qpass.run(graph, ctx)
        self.state["packed_here"] = ctx.packed_here
        self.state["release"] = qpass.unused_weights(graph, ctx)
        self.state["read"] = constants.read
        if b.fuse_siblings:
            fuse_siblings(graph, ctx)
        if not b.embed_kernels:
            qpass.prepare_kernels(graph)  # e.g. CUTLASS's int4 arrays, for the weights the graph now uses
        b.compiled_graphs.append(collections.Counter(
            str(n.target) for n in graph.nodes if n.op in ("call_function", "get_attr")
            and (n.op == "call_function" or n.target.startswith("_fxquant_"))))
        fake = graph_fake_mode(graph)
        if fake is not None and ctx.quantized_weights:
            inline_cpu_float32(graph, fake)  # lowering, after the rewrite is recorded
        if b.fuse_act_quant and ctx.quantized_weights:
            split_activation_quant(graph)
        if b.embed_kernels and fake is not None and ctx.quantized_weights:
            embed_triton_kernels(graph, fake)
        if fake is not None and ctx.quantized_weights and not fake.allow_non_fake_inputs:
            # Inductor re-propagates fake values through the graph; our packed weights are real
            # get_attr constants, which this compile's fake mode must accept.
            fake.allow_non_fake_inputs = True
            self.state["restore_fake"] = fake

    def uuid(self) -> str:
        b = self.backend
        return (f"fxquant:{b.config.describe()}:{b.skip}:{b.fuse_siblings}:{b.fuse_act_quant}:{b.embed_kernels}:"
                f"{b.templates}:{b.fold_gqa}:{b.gqa_kernel}")


def _prepacked_config(config: QuantConfig | None, prepacked: Any) -> QuantConfig | None:
    """The config to use with `prepacked` weights: theirs; a different explicit one is an error, unless
    theirs is one of its choices (Int4WeightOnly() given, a file saved with layout="rows")."""
    if prepacked is None:
        return config
    from .persist import QuantizedWeights
    if not isinstance(prepacked, QuantizedWeights):
        raise TypeError(f"fxquant: prepacked must be fxquant.QuantizedWeights (from fxquant.load or "
                        f"fxquant.quantize_weights), got {type(prepacked).__name__}")
    if config is not None and not (isinstance(config, QuantConfig) and config.accepts(prepacked.config)):
        shown = config.describe() if isinstance(config, QuantConfig) else repr(config)
        raise ValueError(f"fxquant: the prepacked weights were quantized with {prepacked.config.describe()} "
                         f"but the config given is {shown}; pass the same config, or none")
    return prepacked.config


def _placeholder_name(node: torch.fx.Node) -> str | None:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        return None
    name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", None)
    return dynamo_source_to_fqn(str(name)) if name else None


_BY_OPTIONS: dict[int, tuple[object, Backend]] = {}


def registered_backend(gm: torch.fx.GraphModule, example_inputs: list, mode: str | None = None,
                       options: dict | None = None):
    """Entry point for `torch.compile(model, backend="fxquant", mode=..., options={...})`."""
    key = id(options)
    hit = _BY_OPTIONS.get(key)
    if hit is None or hit[0] is not options:
        # Keep `options` alive so its id names this backend (its pack cache survives recompiles).
        hit = (options, Backend.from_options(options))
        _BY_OPTIONS[key] = hit
    return hit[1](gm, example_inputs, mode=mode)


def _forget_inductor_constants() -> None:
    """Inductor keeps every compiled graph module it loads, with the graph's constant tensors set
    as module attributes, for the life of the process: in PyCodeCache's list (which only serves
    to purge source files) and in sys.modules. fxquant's packed weights are such constants, so
    after a reset those two alone would keep every packed weight ever compiled. Modules holding
    tensors are dropped from both; a compiled graph still in use keeps its own module alive."""
    import sys
    try:
        from torch._inductor.codecache import PyCodeCache
    except ImportError:
        return

    def holds_tensors(mod) -> bool:
        return any(isinstance(v, torch.Tensor) for v in vars(mod).values())

    mods = getattr(PyCodeCache, "modules", None)
    if isinstance(mods, list):
        mods[:] = [m for m in mods if not holds_tensors(m)]
    prefix = "torch._inductor.runtime.compile_tasks."
    for name in [n for n, m in list(sys.modules.items()) if n.startswith(prefix) and m is not None
                 and holds_tensors(m)]:
        del sys.modules[name]


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _reset_registered() -> None:
    """torch._dynamo.reset() for the string backend "fxquant": every options dict's backend (kept,
    with its pack cache, for models that live on)."""
    for _, backend in _BY_OPTIONS.values():
        backend.reset()


registered_backend.reset = _reset_registered  # type: ignore[attr-defined]


def _copy_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    import copy
    return torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))


class _PerWeights:
    """The compiled graph embeds packed copies of the parameters it was compiled with, but Dynamo
    does not guard on which parameter tensors a call passes: regional compilation (`block.compile()`
    on each of N identical layers) and two models of one class reuse one Dynamo cache entry with
    other parameters. This dispatches on the identity of the baked inputs and compiles (and
    quantizes) once more for each new set of weights, instead of silently computing with the
    first set. A variant is dropped when one of its tensors is freed."""

    def __init__(self, backend: Backend, gm: torch.fx.GraphModule, mode, options, read: list[int],
                 example_inputs: list, compiled: Callable):
        self.backend, self.gm, self.mode, self.options, self.read = backend, gm, mode, options, read
        self.variants: list[tuple[list, Callable]] = []
        self._add(example_inputs, compiled)

    def _add(self, args, compiled: Callable) -> None:
        entry: list = [None, compiled]

        def dead(_ref, variants=self.variants):  # drop the variant and its compiled graph
            if entry in variants:
                variants.remove(entry)
        entry[0] = [weakref.ref(args[i], dead) for i in self.read]
        self.variants.append(entry)

    def __call__(self, *args):
        for refs, fn in self.variants:
            if all(args[i] is r() for i, r in zip(self.read, refs)):
                return fn(*args)
        n = len(self.variants) + 1
        if _has_symbolic_inputs(self.gm):
            # Compiling again outside Dynamo's trace would lose the symbolic shapes.
            raise RuntimeError(
                "fxquant: this compiled graph is being called with other weight tensors than it was "
                "compiled with (regional compilation such as `layer.compile()` on several identical "
                "layers, or a second model of the same class), and it has dynamic shapes. Its packed "
                "weights belong to the first set. Compile the whole model once (torch.compile(model, "
                "backend=...)) or compile with dynamic=False.")
        self.backend._warn_once("variants", "fxquant: a compiled graph was called with other weight tensors "
                                "than it was compiled with (regional compilation, or another model of the "
                                "same class): it is compiled and quantized again for each set of weights.")
        if n > 64:
            raise RuntimeError(f"fxquant: one graph has been called with {n} different sets of weights; "
                               f"refusing to compile it again (each variant holds packed weights)")
        with torch.no_grad():
            compiled, _ = self.backend._compile(_copy_graph(self.gm), list(args), self.mode, self.options)
        self._add(args, compiled)
        return compiled(*args)


def _has_symbolic_inputs(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(val, torch.SymInt) or (
                isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape)):
            return True
    return False


def _templates(mode: bool | str):
    if not mode:
        return contextlib.nullcontext()
    from .lowering.templates import template_lowerings
    return template_lowerings(always=mode == "always")
