"""Quantized weights that outlive a process: quantize once, save, and compile later without
quantizing again.

    qw = fxquant.quantize_weights(model, fxquant.Int4WeightOnly())   # packs every nn.Linear / Conv1D
    fxquant.save(qw, "model.fxq.safetensors")
    ...
    qw = fxquant.load("model.fxq.safetensors")
    qm = torch.compile(model, backend=fxquant.backend(prepacked=qw))  # config.pack is never called

File format: one safetensors file (never pickle). Tensors are named `<weight fqn>#<i>`; the
metadata holds the format name and version, the config as JSON, one JSON record per weight
(its tensors, static op args, logical [N, K] shape, layout, compute dtype, tied aliases, the
sha256 of each tensor's bytes and, where the config left a choice to each weight (Int4WeightOnly's
layout="auto"), the weight's own config), and a sha256 digest of all of that metadata. `load` checks
everything before it returns, so a bad file raises `FormatError` and yields nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from .configs import ALL_CONFIGS, Int8WeightOnly, QuantConfig
from .passes.rewrite import LayerFilter, RewriteContext, WeightRef
from .report import LinearRecord, format_report

FORMAT = "fxquant.quantized_weights"
FORMAT_VERSION = 1
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16)}


class FormatError(ValueError):
    """A quantized-weights file that is not one, is of another version, or is damaged."""


@dataclass(frozen=True)
class PackedWeight:
    """One weight as its op consumes it: `config.pack(w)` of the [N, K] weight `w`."""
    tensors: tuple[torch.Tensor, ...]
    static: tuple                 # the op's static args (e.g. group_size)
    shape_nk: tuple[int, int]     # logical [N, K] of the float weight
    transposed: bool              # the float weight is stored [K, N] (HF Conv1D)
    dtype: torch.dtype            # the compute dtype the packing was made for
    aliases: tuple[str, ...] = ()  # other names of the same (tied) parameter
    config: QuantConfig | None = None  # this weight's config.for_weight, where it differs from the set's

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class QuantizedWeights(Mapping[str, PackedWeight]):
    """Packed weights by parameter fqn (e.g. `layers.0.q_proj.weight`), plus their config."""

    def __init__(self, config: QuantConfig, entries: Mapping[str, PackedWeight],
                 report: Sequence[LinearRecord] = ()):
        self.config = config
        self._entries = dict(entries)
        self._by_alias = {a: name for name, e in self._entries.items() for a in (name, *e.aliases)}
        self.report = list(report)

    def __getitem__(self, name: str) -> PackedWeight:
        return self._entries[self._by_alias.get(name, name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._by_alias

    def __repr__(self) -> str:
        return f"QuantizedWeights({self.config.describe()}, {len(self)} weights, {self.nbytes / 1e6:.2f}MB)"

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def config_of(self, name: str) -> QuantConfig:
        """The config weight `name` was packed with (its `op` consumes the tensors): the set's, or
        the weight's own where the set's left a choice ("auto") to each weight."""
        e = self[name]
        if e.config is None and _leaves_choice(self.config, e):
            raise ValueError(f"fxquant: prepacked weight {name!r} has no config of its own, but "
                             f"{self.config.describe()} leaves a choice to each weight; its bytes cannot be read")
        return e.config or self.config

    def lookup(self, name: str | None, ref: WeightRef, layer: str):
        """(packed tensors on the weight's device, static args) for the graph weight `name`,
        or None when this set has no such weight. A weight that is here but does not fit the
        graph's use of it (shape, layout, dtype) is an error, not a silent re-quantization."""
        if name is None or name not in self:
            return None
        e = self[name]
        want = (ref.shape_nk, ref.transposed, ref.dtype)
        have = (e.shape_nk, e.transposed, e.dtype)
        if want != have:
            def fmt(v):
                return f"[N, K]={list(v[0])}, {'[K, N]' if v[1] else '[N, K]'} storage, {v[2]}"
            raise ValueError(f"fxquant: prepacked weight {name!r} (layer {layer!r}) was packed for "
                             f"{fmt(have)} but the graph uses {fmt(want)}; re-run fxquant.quantize_weights "
                             f"on this model")
        device = ref.base.device
        cfg = self.config_of(name)
        note = "" if e.config is None else _choice_note(self.config, e.config)
        return tuple(t.to(device) for t in e.tensors), e.static, cfg, note


# --------------------------------------------------------------------------- quantize
def quantize_weights(model: nn.Module, config: QuantConfig | None = None, *, skip: Sequence[str] = (),
                     filter: LayerFilter | None = None, verbose: bool = False) -> QuantizedWeights:  # noqa: A002
    """Pack the weight of every eligible `nn.Linear` (and HF `Conv1D`) of `model`, as the backend
    would. Layer names, `skip` globs, `filter` and eligibility are the backend's. Linears that
    reach their weight another way (`F.linear(x, self.w)`) are not seen here; a compile with
    `prepacked=` packs those itself (with a warning)."""
    config = Int8WeightOnly() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"fxquant: config must be an fxquant config, got {type(config).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    ctx = RewriteContext(config, None, skip=skip, layer_filter=filter)
    names: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    entries: dict[str, PackedWeight] = {}
    records: list[LinearRecord] = []
    first_layer: dict[int, str] = {}
    for layer, mod in model.named_modules():
        w, transposed = _linear_weight(mod)
        if w is None:
            continue
        ref = WeightRef(None, w, transposed, w.dtype)
        n, k = ref.shape_nk
        nbytes = w.numel() * w.element_size()
        if id(w) in first_layer:  # tied: the backend packs it once too
            records.append(LinearRecord(layer, k, n, config.scheme, 0, 0, "quantized",
                                        f"tied weight: shares the packing of {first_layer[id(w)]!r}"))
            continue
        reason = ctx._skip_reason(layer, n, k, ref)
        if reason is not None:
            records.append(LinearRecord(layer, k, n, config.scheme, nbytes, nbytes, "skipped", reason))
            continue
        tensors, static, cfg, note = ctx._pack(ref, layer)
        pnames = names.get(id(w), [f"{layer}.weight"])
        e = PackedWeight(tuple(t.detach() for t in tensors), tuple(static), (n, k), transposed, w.dtype,
                         tuple(pnames[1:]), None if cfg == config else cfg)
        entries[pnames[0]] = e
        first_layer[id(w)] = layer
        records.append(LinearRecord(layer, k, n, config.scheme, nbytes, e.nbytes, "quantized", note))
    if verbose:
        print(format_report(records))
    return QuantizedWeights(config, entries, records)


def _linear_weight(mod: nn.Module) -> tuple[torch.Tensor | None, bool]:
    if isinstance(mod, nn.Linear):
        return mod.weight, False
    # HF transformers' Conv1D (GPT-2): weight [K, N], y = addmm(bias, x, weight).
    if type(mod).__name__ == "Conv1D" and isinstance(getattr(mod, "weight", None), torch.Tensor) \
            and mod.weight.dim() == 2 and hasattr(mod, "nf"):
        return mod.weight, True
    return None, False


# --------------------------------------------------------------------------- save
def save(obj: QuantizedWeights, path: str | os.PathLike) -> str:
    """Write `obj` to a safetensors file at `path` (atomically: a crash leaves no partial file)."""
    from safetensors.torch import save_file

    if not isinstance(obj, QuantizedWeights):
        raise TypeError(f"fxquant.save: expected QuantizedWeights (from fxquant.quantize_weights or "
                        f"fxquant.load), got {type(obj).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    for name, e in obj._entries.items():
        keys = [f"{name}#{i}" for i in range(len(e.tensors))]
        for key, t in zip(keys, e.tensors):
            tensors[key] = t.detach().to("cpu").contiguous()
        records[name] = {"tensors": keys, "static": list(e.static), "shape_nk": list(e.shape_nk),
                         "transposed": e.transposed, "dtype": str(e.dtype).removeprefix("torch."),
                         "aliases": list(e.aliases), "sha256": [_sha256(tensors[k]) for k in keys]}
        if e.config is not None:
            records[name]["config"] = config_to_json(e.config)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": config_to_json(obj.config),
            "entries": json.dumps(records)}  # model order
    meta["digest"] = _digest(meta)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# --------------------------------------------------------------------------- load
def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> QuantizedWeights:
    """Read a file written by `fxquant.save`. Raises `FormatError` (naming the file and what is
    wrong) for another format or version, a truncated file, invalid metadata, a missing or extra
    tensor, or a tensor whose bytes do not match their checksum."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error type for a damaged header or body
        raise FormatError(f"fxquant.load: {path!r} is not a readable safetensors file "
                          f"(truncated or damaged?): {exc}") from None
    if meta.get("format") != FORMAT:
        raise FormatError(f"fxquant.load: {path!r} is not an fxquant quantized-weights file "
                          f"(metadata format={meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise FormatError(f"fxquant.load: {path!r} has format version {meta.get('format_version')!r}; this "
                          f"fxquant reads version {FORMAT_VERSION}. Re-create it with fxquant.quantize_weights "
                          f"+ fxquant.save")
    if meta.get("digest") != _digest(meta):
        raise FormatError(f"fxquant.load: {path!r}: the metadata does not match its digest (edited or damaged)")
    config = config_from_json(meta.get("config", ""), path)
    try:
        records = json.loads(meta["entries"])
        if not isinstance(records, dict):
            raise TypeError("entries is not a JSON object")
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"fxquant.load: {path!r}: invalid 'entries' metadata: {exc}") from None

    entries: dict[str, PackedWeight] = {}
    used: set[str] = set()
    for name, r in records.items():
        try:
            keys, sums = list(r["tensors"]), list(r["sha256"])
            own = config_from_json(r["config"], path) if "config" in r else None
            e = PackedWeight(tuple(tensors[k] for k in keys if k in tensors), tuple(r["static"]),
                             (int(r["shape_nk"][0]), int(r["shape_nk"][1])), bool(r["transposed"]),
                             _DTYPES[r["dtype"]], tuple(r["aliases"]), own)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise FormatError(f"fxquant.load: {path!r}: invalid record for weight {name!r}: {exc!r}") from None
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise FormatError(f"fxquant.load: {path!r}: weight {name!r} is missing tensor(s) {missing}")
        for k, t, s in zip(keys, e.tensors, sums):
            if _sha256(t) != s:
                raise FormatError(f"fxquant.load: {path!r}: tensor {k!r} does not match its checksum "
                                  f"(the file was modified or damaged)")
        if own is None and _leaves_choice(config, e):
            raise FormatError(f"fxquant.load: {path!r}: weight {name!r} stores no config of its own, but "
                              f"{config.describe()} leaves a choice to each weight (damaged or hand-made file)")
        if own is not None and _leaves_choice(own, e):
            raise FormatError(f"fxquant.load: {path!r}: weight {name!r} stores {own.describe()}, a choice left "
                              f"open; a weight's own config must be settled")
        if own is not None and not config.accepts(own):
            raise FormatError(f"fxquant.load: {path!r}: weight {name!r} has config {own.describe()}, which is "
                              f"not a choice {config.describe()} leaves open")
        _check_layout(e.config or config, name, e, path)
        used.update(keys)
        entries[name] = e
    extra = sorted(set(tensors) - used)
    if extra:
        raise FormatError(f"fxquant.load: {path!r}: tensors {extra[:5]} belong to no weight record")
    if torch.device(device).type != "cpu":
        entries = {n: dataclasses.replace(e, tensors=tuple(t.to(device) for t in e.tensors))
                   for n, e in entries.items()}
    return QuantizedWeights(config, entries)


def _check_layout(config: QuantConfig, name: str, e: PackedWeight, path: str) -> None:
    """The stored tensors must be what `config.pack` makes for this shape (checked on meta tensors)."""
    n, k = e.shape_nk
    if config.check(n, k, e.dtype) is not None:
        raise FormatError(f"fxquant.load: {path!r}: weight {name!r} [N, K]=[{n}, {k}] cannot use "
                          f"{config.describe()}")
    tensors, static = config.pack(torch.empty(n, k, dtype=e.dtype, device="meta"))
    want = [(tuple(t.shape), t.dtype) for t in tensors]
    have = [(tuple(t.shape), t.dtype) for t in e.tensors]
    if want != have or tuple(static) != e.static:
        raise FormatError(f"fxquant.load: {path!r}: weight {name!r} holds {have} with static args {e.static}, "
                          f"but {config.describe()} packs [N, K]=[{n}, {k}] as {want} with {tuple(static)}")


def _differing(a: QuantConfig, b: QuantConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def _leaves_choice(config: QuantConfig, e: PackedWeight) -> bool:
    """`config` leaves something to be chosen per weight (settled by config.for_weight)."""
    return config.for_weight(*e.shape_nk, e.dtype, torch.device("cpu"))[0] != config


def _choice_note(config: QuantConfig, own: QuantConfig) -> str:
    return ", ".join(f"{f}={getattr(own, f)!r}" for f in _differing(config, own)) + " (auto, prepacked)"


# --------------------------------------------------------------------------- config JSON
def config_to_json(config: QuantConfig) -> str:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return json.dumps({"scheme": config.scheme, "class": type(config).__name__, "fields": fields},
                      sort_keys=True)


def config_from_json(text: str, path: str = "<string>") -> QuantConfig:
    by_scheme = {c.scheme: c for c in ALL_CONFIGS}
    try:
        d = json.loads(text)
        cls = by_scheme[d["scheme"]]
        if d.get("class") != cls.__name__:
            raise ValueError(f"class {d.get('class')!r} does not match scheme {d['scheme']!r}")
        return cls(**{**cls.saved_defaults, **d["fields"]})
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"fxquant.load: {path!r}: invalid config metadata {text[:200]!r}: {exc!r}") from None


# --------------------------------------------------------------------------- checksums
def _sha256(t: torch.Tensor) -> str:
    b = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(b.numpy().data).hexdigest()


def _digest(meta: Mapping[str, str]) -> str:
    body = json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()
