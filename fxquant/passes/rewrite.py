"""The replacement shared by every pattern in fxquant/patterns/: find the constant weight
behind a matmul operand, decide whether the layer is eligible, pack it once and emit one
`torch.ops.fxquant.*` node."""
from __future__ import annotations

import contextlib
import weakref
import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..configs import QuantConfig
from ..numerics import FLOAT_DTYPES
from ..report import LinearRecord
from .constants import module_path_from_stack


def drop_when_dead(cache: dict, key) -> Callable[[weakref.ref], None]:
    """A weakref callback that removes cache[key] when its tensor dies, so a backend that
    outlives a model does not keep the model's packed weights."""
    def drop(_ref: weakref.ref) -> None:
        cache.pop(key, None)
    return drop

aten = torch.ops.aten
LayerFilter = Callable[[str, tuple], bool]


@dataclass
class WeightRef:
    node: fx.Node            # the constant node (get_attr / placeholder)
    base: torch.Tensor       # the stored tensor
    transposed: bool         # stored as [K, N] (HF Conv1D, x @ w) rather than [N, K]
    dtype: torch.dtype       # dtype the graph computes in (after autocast-style casts)

    def logical(self) -> torch.Tensor:
        """The weight as [N, K] in the compute dtype."""
        w = self.base.t() if self.transposed else self.base
        return w.to(self.dtype)

    @property
    def shape_nk(self) -> tuple[int, int]:
        n, k = self.base.shape if not self.transposed else self.base.shape[::-1]
        return int(n), int(k)


class RewriteContext:
    """State of one pass over one graph; the pattern handlers read it via `active()`."""

    def __init__(self, config: QuantConfig, constants, *, skip: Sequence[str] = (),
                 layer_filter: LayerFilter | None = None, pack_cache: dict | None = None,
                 prepacked=None, portable: bool = False):
        self.config = config
        self.portable = portable  # config.for_weight's: packings whose fast kernels are Triton / ATen
        # fxquant.persist.QuantizedWeights: weights packed earlier, looked up by weight name.
        self.prepacked = prepacked
        self.packed_here: list[str] = []  # layers packed by this pass although `prepacked` was given
        self.constants = constants
        self.skip = tuple(skip)
        self.layer_filter = layer_filter
        self.records: dict[fx.Node, LinearRecord] = {}
        self.pack_cache = {} if pack_cache is None else pack_cache
        self.graph_nodes: dict[tuple, list[fx.Node]] = {}
        self.packed_bytes: dict[tuple, int] = {}
        self.record_keys: dict[fx.Node, tuple] = {}  # quantized node -> packed weight key
        self.quantized_weights: dict[int, tuple[torch.Tensor, fx.Node]] = {}

    # -- weights ---------------------------------------------------------------------------
    def resolve(self, node: object, transposed: bool) -> WeightRef | None:
        """Follow casts and 2-D transposes from a matmul operand to a constant tensor."""
        dtype = None
        while isinstance(node, fx.Node):
            t = self.constants.tensor(node)
            if t is not None:
                if t.dim() != 2:
                    return None
                return WeightRef(node, t, transposed, dtype or t.dtype)
            if node.op != "call_function":
                return None
            if _is_transpose(node):
                transposed = not transposed
            elif node.target is torch.ops.prims.convert_element_type.default:
                dtype = dtype or node.args[1]
            elif node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype"}:
                dtype = dtype or node.kwargs.get("dtype")
            else:
                return None
            node = node.args[0]
        return None

    def weight_of(self, kwargs: dict) -> WeightRef | None:
        if "w_nk" in kwargs:  # aten.linear: already [N, K]
            return self.resolve(kwargs["w_nk"], transposed=False)
        # mm/addmm second operand is [K, N]: a constant seen through one transpose is [N, K].
        return self.resolve(kwargs["w"], transposed=True)

    def layer_name(self, node: fx.Node, ref: WeightRef) -> str:
        path = module_path_from_stack(node)
        if path:
            return path
        wname = self.constants.weight_name(ref.node) or ref.node.name
        return wname[: -len(".weight")] if wname.endswith(".weight") else wname

    # -- eligibility -----------------------------------------------------------------------
    def check(self, node: fx.Node, ref: WeightRef) -> bool:
        name = self.layer_name(node, ref)
        n, k = ref.shape_nk
        reason = self._skip_reason(name, n, k, ref)
        if reason is not None:
            self.records[node] = LinearRecord(name, k, n, self.config.scheme, _nbytes(ref.base), _nbytes(ref.base),
                                              "skipped", reason)
            return False
        return True

    def _skip_reason(self, name: str, n: int, k: int, ref: WeightRef) -> str | None:
        for pat in self.skip:
            if fnmatch.fnmatchcase(name, pat):
                return f"name matches skip pattern {pat!r}"
        if self.layer_filter is not None and not self.layer_filter(name, (n, k)):
            return "excluded by filter"
        if ref.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fxquant: layer {name!r} has a {ref.dtype} weight; only float32, float16 and "
                            f"bfloat16 weights can be quantized (convert the model, or skip the layer with "
                            f"options['skip'])")
        return self.config.check(n, k, ref.dtype)

    # -- rewrite ---------------------------------------------------------------------------
    def packed_nodes(self, graph: fx.Graph, ref: WeightRef, name: str) -> tuple[list[fx.Node], tuple, QuantConfig, str]:
        """Constant nodes of the packed weight, the op's static args, the weight's own config
        (config.for_weight's) and the note on its choice; packs on first sight and reuses the
        nodes for a tied weight."""
        key = self._key(ref)
        if key in self.graph_nodes:
            return (self.graph_nodes[key], *self.pack_cache[key][2:])
        cached = self.pack_cache.get(key)
        if cached is None or cached[0]() is not ref.base:
            found = None
            if self.prepacked is not None:
                with unset_fake_temporarily():  # may copy to the weight's device: real tensors
                    found = self.prepacked.lookup(self.constants.weight_name(ref.node), ref, name)
                if found is None:
                    self.packed_here.append(name)
            packed, static, cfg, note = found if found is not None else self._pack(ref, name)
            if found is not None and self.portable and cfg != (want := self.weight_config(ref)[0]):
                # e.g. int4 "mma" bytes chosen on a Hopper GPU, now in an export: correct, not fast
                note = f"{note}; packed for another target (this one would pack {want.describe()})"
            cached = (weakref.ref(ref.base, drop_when_dead(self.pack_cache, key)), packed, static, cfg, note)
            self.packed_bytes[key] = sum(_nbytes(t) for t in packed)
            self.pack_cache[key] = cached
        _, packed, static, cfg, note = cached
        self.packed_bytes[key] = sum(_nbytes(t) for t in packed)
        nodes = [self.constants.add(graph, t, f"{name}_{i}") for i, t in enumerate(packed)]
        fake = graph_fake_mode(graph)
        for node, t in zip(nodes, packed):
            if fake is not None:
                node.meta["val"] = fake.from_tensor(t, static_shapes=True)
        self.graph_nodes[key] = nodes
        self.quantized_weights[id(ref.base)] = (ref.base, ref.node)
        return nodes, static, cfg, note

    def _key(self, ref: WeightRef) -> tuple:
        # _version moves on in-place writes, so a recompile after changing a weight repacks it;
        # `portable` changes what an "auto" config packs.
        return (id(ref.base), _weight_version(ref.base), ref.transposed, ref.dtype, self.portable)

    def weight_config(self, ref: WeightRef) -> tuple[QuantConfig, str]:
        """The config this weight is packed with (config.for_weight) and the note on the choice."""
        n, k = ref.shape_nk
        return self.config.for_weight(n, k, ref.dtype, ref.base.device, self.portable)

    def _pack(self, ref: WeightRef, name: str) -> tuple[tuple[torch.Tensor, ...], tuple, QuantConfig, str]:
        cfg, note = self.weight_config(ref)
        with unset_fake_temporarily(), torch.no_grad():
            if ref.base.untyped_storage().nbytes() == 0 and ref.base.numel() > 0:
                raise RuntimeError(f"fxquant: the weight of {name!r} was released (release_weights=True) and "
                                   f"cannot be quantized again; recompiling needs the original weights")
            w = ref.logical().detach()
            if not torch.isfinite(w).all():
                raise ValueError(f"fxquant: the weight of layer {name!r} contains NaN or Inf; refusing to "
                                 f"quantize it (fix the checkpoint, or skip the layer with options['skip'])")
            return (*cfg.pack(w), cfg, note)

    def replace(self, match, x: fx.Node, bias: object, ref: WeightRef) -> None:
        node = match.output_node()
        graph = node.graph
        name = self.layer_name(node, ref)
        n, k = ref.shape_nk
        packed, static, cfg, note = self.packed_nodes(graph, ref, name)
        bias_arg = bias if _is_vector_bias(bias, n) else None
        with graph.inserting_before(node):
            new = graph.call_function(cfg.op, (x, *packed, bias_arg, *static))
            out = new
            if bias is not None and bias_arg is None:
                out = graph.call_function(aten.add.Tensor, (new, bias))
        new.meta.update({k_: v for k_, v in node.meta.items() if k_ in ("nn_module_stack", "stack_trace")})
        _set_fake_val(new)
        if out is not new:
            _set_fake_val(out)
        node.replace_all_uses_with(out)
        match.erase_nodes()
        self.records[new] = LinearRecord(name, k, n, self.config.scheme, _nbytes(ref.base),
                                         self.packed_bytes[self._key(ref)], "quantized", note)
        self.record_keys[new] = self._key(ref)

    def ordered_records(self, graph: fx.Graph) -> list[LinearRecord]:
        """Records in graph order; a tied weight's bytes count at its first user only."""
        order = {n: i for i, n in enumerate(graph.nodes)}
        ordered = sorted(self.records.items(), key=lambda kv: order.get(kv[0], -1))
        first_user: dict[tuple, str] = {}
        for node, rec in ordered:
            key = self.record_keys.get(node)
            if key is None:
                continue
            if key in first_user:
                rec.bytes_before = rec.bytes_after = 0
                rec.reason = f"tied weight: shares the packing of {first_user[key]!r}"
            else:
                first_user[key] = rec.name
        return [rec for _, rec in ordered]


# --------------------------------------------------------------------------- pattern hooks
_ACTIVE: list[RewriteContext] = []


@contextlib.contextmanager
def activate(ctx: RewriteContext) -> Iterator[RewriteContext]:
    _ACTIVE.append(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.pop()


def active() -> RewriteContext:
    if not _ACTIVE:
        raise RuntimeError("fxquant patterns run only inside fxquant.passes.quantize")
    return _ACTIVE[-1]


def is_linear_match(match) -> bool:
    """Extra check shared by the patterns: a constant weight, and the layer is eligible."""
    if not _ACTIVE:
        return False
    ctx = active()
    x = match.kwargs["x"]
    if isinstance(x, fx.Node) and ctx.constants.tensor(x) is not None:
        return False  # constant @ something: not a linear layer
    ref = ctx.weight_of(match.kwargs)
    return ref is not None and ctx.check(match.output_node(), ref)


def replace_linear(match, *, x: fx.Node, bias: object, w: fx.Node | None = None,
                   w_nk: fx.Node | None = None) -> None:
    ctx = active()
    ref = ctx.weight_of({"w": w} if w_nk is None else {"w_nk": w_nk})
    ctx.replace(match, x, bias, ref)


# --------------------------------------------------------------------------- helpers
def _is_transpose(node: fx.Node) -> bool:
    if node.target is aten.t.default:
        return True
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return False


def _weight_version(t: torch.Tensor) -> object:
    """What changes when `t` is written in place. Inference tensors (made under
    torch.inference_mode) keep no version counter: use their contents' sums instead."""
    if not t.is_inference():
        return t._version
    with unset_fake_temporarily(), torch.no_grad():
        flat = t.detach().reshape(-1)
        s1 = s2 = 0.0
        for chunk in flat.split(1 << 24):  # bounded float64 temporaries for huge weights
            c = chunk.to(torch.float64)
            s1 += float(c.sum())
            s2 += float(c.square().sum())
    return ("contents", s1, s2)


def _is_vector_bias(bias: object, n: int) -> bool:
    if not isinstance(bias, fx.Node):
        return False
    val = bias.meta.get("val")
    return val is None or (val.dim() == 1 and val.shape[0] == n)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def graph_fake_mode(graph: fx.Graph):
    """The fake mode of the graph's inputs, or None (e.g. make_fx graphs mix several modes)."""
    from torch._guards import detect_fake_mode
    vals = [n.meta["val"] for n in graph.find_nodes(op="placeholder") if isinstance(n.meta.get("val"), torch.Tensor)]
    try:
        return detect_fake_mode(vals) if vals else None
    except AssertionError:
        return None


def _set_fake_val(node: fx.Node) -> None:
    """Propagate meta['val'] through a new node when its inputs carry fake values."""
    if any(isinstance(a, fx.Node) and "val" not in a.meta for a in node.args):
        return
    fake = graph_fake_mode(node.graph)
    if fake is None:
        return
    args = [a.meta["val"] if isinstance(a, fx.Node) else a for a in node.args]
    try:
        with fake:
            node.meta["val"] = node.target(*args)
    except (AssertionError, RuntimeError):
        node.meta.pop("val", None)  # inputs from another fake mode: leave it to later propagation
