#!/usr/bin/env python3
"""Median µs per linear layer: bf16 cuBLAS F.linear vs every fxquant scheme, over M and N x K.

Timing: each measurement captures one CUDA graph that calls the layer once on each of several
weight copies (together >> the 50 MB L2, so weights stream from HBM as in a real model; M >= 512
uses 2 copies: compute-bound), and times graph replays with CUDA events; µs = median replay time
/ copies. For each (shape, M), bf16 and all schemes are replayed round-robin over several rounds
after a warm-up, so clock/power drift affects them alike. Every measured output
is checked against a torch reference of numerics.py's arithmetic (fp32) in the same run.

  python benchmarks/linear.py --out DIR                 # measure, print table, write JSON + PNG
  python benchmarks/linear.py --tune --out DIR          # autotune every (scheme, shape, M) first
  python benchmarks/linear.py --warm-only --shard 3/12  # compile only (run shards in parallel)
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxquant.lowering  # noqa: E402,F401  (registers the ops and their CUDA kernels)
from fxquant import configs as fc  # noqa: E402
from fxquant import numerics as nq  # noqa: E402
from fxquant.lowering.triton import dispatch as D  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192]
# name -> (dispatch scheme, packing config)
SCHEMES = {
    "w4a16_g128": ("int4_wo", fc.Int4WeightOnly(group_size=128)),
    "w8a16": ("int8_wo", fc.Int8WeightOnly()),
    "w8a8_int8": ("int8_dyn", fc.Int8DynamicActivationInt8Weight()),
    "fp8_row": ("fp8_dyn_row", fc.Float8DynamicActivationFloat8Weight("row")),
    "fp8_tensor": ("fp8_dyn_tensor", fc.Float8DynamicActivationFloat8Weight("tensor")),
    "fp8_wo": ("fp8_wo", fc.Float8WeightOnly()),
}
ROTATE_BYTES = 512e6  # weight bytes cycled through per graph replay (~10x L2)
TOL = 1e-2


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- timing
def capture(fns) -> torch.cuda.CUDAGraph:
    """One graph calling every fn once (fns[i] uses weight copy i); fns[0] is warmed first."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fns[0]()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g


def time_graphs(graphs: dict, rounds: int = 5, round_s: float = 0.01, warm_s: float = 0.05) -> dict:
    """graphs: key -> (graph, calls per replay). Replays them round-robin (so a clock or power
    drift hits every key alike, and the GPU never idles between them) after a warm-up that
    brings the clocks up. Returns key -> median µs per call."""
    est = {}
    for key, (g, _) in graphs.items():
        g.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        est[key] = max(time.perf_counter() - t0, 1e-6)
    t_end = time.perf_counter() + warm_s
    while time.perf_counter() < t_end:
        for g, _ in graphs.values():
            g.replay()
        torch.cuda.synchronize()
    events = {key: [] for key in graphs}
    for _ in range(rounds):
        for key, (g, _) in graphs.items():
            for _ in range(int(min(50, max(1, round_s / est[key])))):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                events[key].append((a, b))
    torch.cuda.synchronize()
    out = {}
    for key, evs in events.items():
        t = sorted(a.elapsed_time(b) for a, b in evs)
        out[key] = t[len(t) // 2] * 1e3 / graphs[key][1]
    return out


def ceilings() -> dict:
    """This run's ceilings: bf16 8192^3 matmul TFLOP/s and device-to-device copy TB/s."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.empty(2 ** 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    r = {}
    for name, fn, work in (("bf16_mm_tflops", lambda: a @ b, 2 * 8192 ** 3 / 1e12),
                           ("copy_tbps", lambda: dst.copy_(src), 2 * 2 ** 30 / 1e12)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(10)]
        for x, y in ev:
            x.record()
            fn()
            y.record()
        torch.cuda.synchronize()
        t = sorted(x.elapsed_time(y) for x, y in ev)[5] / 1e3
        r[name] = round(work / t, 1 if name.startswith("bf16") else 3)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return r


def n_copies(layer_copies: int, m: int) -> int:
    # Large M is compute-bound and re-reads each weight tile from L2 anyway: 2 copies suffice.
    return layer_copies if m < 512 else min(2, layer_copies)


# --------------------------------------------------------------------------- layers
class Layer:
    """One (shape, scheme): packed weight copies, the op call, and the fp32 reference."""

    def __init__(self, name: str, n: int, k: int, seed: int = 0, copies: int | None = None):
        self.name, self.n, self.k = name, n, k
        g = torch.Generator(device="cuda").manual_seed(seed)
        w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.float32).mul_(0.02)
        w = w.to(torch.bfloat16)
        if name == "bf16":
            packed, self.static, self.scheme, self.group = (w,), (), None, 0
        else:
            self.scheme, cfg = SCHEMES[name]
            packed, self.static = cfg.pack(w)
            self.op = cfg.op
            self.group = self.static[0] if self.scheme == "int4_wo" else 0
        self.bytes = sum(t.numel() * t.element_size() for t in packed)
        c = copies or max(2, min(64, math.ceil(ROTATE_BYTES / self.bytes)))
        self.copies = [packed] + [tuple(t.clone() for t in packed) for _ in range(c - 1)]
        self.w_ref = w if name == "bf16" else None

    def fn(self, x, i: int, cfg: D.KernelConfig | None = None):
        p = self.copies[i]
        if self.scheme is None:
            return lambda: F.linear(x, p[0])
        if cfg is not None:
            return lambda: D.linear(self.scheme, x, p[0], p[1], None, self.group, cfg)
        return lambda: self.op(x, *p, None, *self.static)

    def reference(self, x):
        p = self.copies[0]
        s = self.scheme
        if s is None:
            return F.linear(x.float(), p[0].float())
        if s == "int8_wo":
            return F.linear(x.float(), nq.dequantize_int8_per_channel(p[0], p[1], x.dtype).float())
        if s == "int4_wo":
            return F.linear(x.float(), nq.dequantize_int4(p[0], p[1], self.group, x.dtype).float())
        if s == "fp8_wo":
            return F.linear(x.float(), nq.dequantize_fp8_weight(p[0], p[1], x.dtype).float())
        if s == "int8_dyn":
            xq, xs = nq.quantize_int8_per_token(x)
        else:
            xq, xs = nq.quantize_fp8(x, s == "fp8_dyn_row")
        return (xq.float() @ p[0].float().t()) * xs * p[1].float().reshape(1, -1)


def rel_err(out, ref) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- phases
def units(args):
    """(scheme name, M) pairs; each pair loops over the shapes (sharding unit for --warm-only)."""
    us = [(s, m) for s in args.schemes for m in args.ms]
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        us = [u for j, u in enumerate(us) if j % n == i]
    return us


def warm(args):
    """Compile every kernel variant the tune/measure phases will use (no timing)."""
    layers: dict = {}
    for name, m in units(args):
        for n, k in args.shapes:
            key = (name, n, k)
            if key not in layers:
                layers[key] = Layer(name, n, k, copies=1)
            L = layers[key]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cands = D.candidate_configs(L.scheme, m, L.group) if args.tune else []
            for cfg in cands + [None]:
                try:
                    L.fn(x, 0, cfg)()
                except Exception as e:  # reported again (and counted) by the tune phase
                    log(f"warm {name} {n}x{k} M={m} {cfg}: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.synchronize()
    log("warm done")


def tune(args, out_dir: Path) -> dict:
    """Time every candidate per (scheme, shape, M); best per shape + best per M-bucket overall."""
    dev = D._device_info(torch.device("cuda"))[0]
    exact: dict = {}
    per_bucket: dict = {}  # (scheme, group, m) -> {cfg: [time / best time per shape]}
    log_rows = []
    t_end = time.time() + args.tune_budget
    for name in args.schemes:
        if name == "fp8_tensor":  # same kernels as fp8_row: dispatch falls back to its configs
            continue
        for n, k in args.shapes:
            L = Layer(name, n, k)
            for m in args.ms:
                if time.time() > t_end:
                    log(f"tune budget spent: {name} {n}x{k} M={m} keeps its default config")
                    continue
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                nc = n_copies(len(L.copies), m)
                graphs = {}
                for cfg in D.candidate_configs(L.scheme, m, L.group):
                    try:
                        graphs[cfg] = (capture([L.fn(x, i, cfg) for i in range(nc)]), nc)
                    except Exception as e:
                        log(f"tune {name} {n}x{k} M={m} {cfg}: {type(e).__name__}: {str(e)[:200]}")
                res = time_graphs(graphs, rounds=2, round_s=0.003, warm_s=0.02) if graphs else {}
                del graphs
                if not res:
                    continue
                best = min(res, key=res.get)
                exact[D.config_key(L.scheme, torch.bfloat16, n, k, L.group, m)] = best
                b = per_bucket.setdefault((L.scheme, L.group, m), {})
                for cfg, t in res.items():
                    b.setdefault(cfg, []).append(t / res[best])
                log_rows.append({"scheme": name, "N": n, "K": k, "M": m,
                                 "times_us": {repr(c): t for c, t in res.items()}, "best": repr(best)})
                log(f"tune {name:11s} {n:5d}x{k:<5d} M={m:<5d} best {res[best]:8.1f} us  {best}")
            del L
            torch.cuda.empty_cache()
    generic = {}
    for (scheme, group, m), d in per_bucket.items():
        full = {c: v for c, v in d.items() if len(v) == max(len(v) for v in d.values())}
        best = min(full, key=lambda c: sum(math.log(t) for t in full[c]))
        generic[D.bucket_key(scheme, group, m)] = best
    D.save_tuned(dev, {**exact, **generic})
    shipped = {dev: {key: c.to_json() for key, c in sorted({**exact, **generic}.items())}}
    (out_dir / "tuned_configs.json").write_text(json.dumps(shipped, indent=1, sort_keys=True))
    (out_dir / "tune_log.json").write_text(json.dumps(log_rows))
    return shipped


def measure(args, save=lambda rows: None) -> list[dict]:
    """Per shape and M: bf16 and every scheme captured, then timed round-robin together."""
    rows = []
    names = ["bf16"] + list(args.schemes)
    for n, k in args.shapes:
        layers = {name: Layer(name, n, k) for name in names}
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            graphs, recs = {}, {}
            for name, L in layers.items():
                nc = n_copies(len(L.copies), m)
                row = {"N": n, "K": k, "M": m, "scheme": name, "copies": nc, "weight_bytes": L.bytes}
                try:
                    out = L.fn(x, 0)()
                    row["rel_err"] = rel_err(out, L.reference(x))
                    row["ok"] = row["rel_err"] <= TOL
                    del out
                    graphs[name] = (capture([L.fn(x, i) for i in range(nc)]), nc)
                    if L.scheme is not None:
                        row["config"] = repr(D.get_config(L.scheme, m, n, k, L.group, x.dtype, x.device))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    row["ok"] = False
                recs[name] = row
            times = time_graphs(graphs, rounds=args.rounds, round_s=args.budget / max(1, args.rounds))
            del graphs
            for name, row in recs.items():
                if name in times:
                    row["us"] = times[name]
                if "us" in row and "us" in recs["bf16"]:
                    row["speedup"] = recs["bf16"]["us"] / row["us"]
                    row["TBps"] = layers[name].bytes / row["us"] / 1e6
                    row["TFLOPs"] = 2 * m * n * k / row["us"] / 1e6
                rows.append(row)
                log(f"{n:5d}x{k:<5d} {name:11s} M={m:<5d} "
                    + (f"{row['us']:9.1f} us  x{row.get('speedup', float('nan')):5.2f}  "
                       f"err {row['rel_err']:.1e}" if "us" in row else row.get("error", "")))
        del layers
        torch.cuda.empty_cache()
        save(rows)  # partial results survive a timeout
    return rows


def table(rows, schemes, shapes, ms) -> str:
    """Speedup vs bf16 per scheme and M (columns: shapes)."""
    idx = {(r["scheme"], r["N"], r["K"], r["M"]): r for r in rows}
    head = f"{'scheme':11s} {'M':>5s} | " + " | ".join(f"{n}x{k:>5}" for n, k in shapes)
    lines = [head, "-" * len(head)]
    for name in ["bf16"] + list(schemes):
        for m in ms:
            cells = []
            for n, k in shapes:
                r = idx.get((name, n, k, m), {})
                if "us" not in r:
                    cells.append(f"{'n/a':>10s}")
                elif name == "bf16":
                    cells.append(f"{r['us']:8.1f}us")
                else:
                    flag = "" if r.get("ok") else "!"
                    cells.append(f"{r.get('speedup', float('nan')):9.2f}x{flag}"[:10].rjust(10))
            lines.append(f"{name:11s} {m:5d} | " + " | ".join(cells))
    return "\n".join(lines)


def plot(rows, schemes, shapes, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), sharey=True)
    axes = axes if len(shapes) > 1 else [axes]
    for ax, (n, k) in zip(axes, shapes):
        for name in schemes:
            pts = sorted((r["M"], r["speedup"]) for r in rows
                         if r["scheme"] == name and r["N"] == n and r["K"] == k and "speedup" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"N x K = {n} x {k}")
        ax.set_xlabel("M (tokens)")
    axes[0].set_ylabel("speedup vs bf16 cuBLAS")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--budget", type=float, default=0.05, help="seconds of replays per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds per (shape, M)")
    ap.add_argument("--tune", action="store_true", help="autotune (and cache) before measuring")
    ap.add_argument("--tune-budget", type=float, default=200.0, help="seconds of tuning at most")
    ap.add_argument("--warm-only", action="store_true", help="compile only (with --tune: candidates too)")
    ap.add_argument("--shard", default="", help="i/n: this process's share of --warm-only work")
    args = ap.parse_args(argv)
    args.schemes = [s for s in args.schemes.split(",") if s]
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.ms = [int(m) for m in args.ms.split(",")]
    if args.warm_only:
        warm(args)
        return 0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton
    p = torch.cuda.get_device_properties(0)
    meta = {"device": p.name, "sms": p.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "date": datetime.date.today().isoformat(), "rotate_bytes": ROTATE_BYTES,
            "method": "CUDA-graph replay over rotated weight copies, median of replays"}
    meta["ceilings_before"] = ceilings()
    log(json.dumps(meta))
    log(f"ceilings before: {meta['ceilings_before']}")
    t0 = time.time()
    if args.tune:
        tune(args, out_dir)
        log(f"tuning took {time.time() - t0:.0f} s")
    t1 = time.time()

    def save(rows):
        (out_dir / "linear.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    rows = measure(args, save)
    meta["measure_s"] = round(time.time() - t1, 1)
    meta["ceilings_after"] = ceilings()
    log(f"ceilings after: {meta['ceilings_after']}")
    save(rows)
    plot(rows, args.schemes, args.shapes, out_dir / "linear.png")
    txt = table(rows, args.schemes, args.shapes, args.ms)
    (out_dir / "linear_table.txt").write_text(txt + "\n")
    bad = [r for r in rows if not r.get("ok")]
    log(txt)
    log(f"{len(rows)} measurements, {len(bad)} failed or out of tolerance ({TOL}); "
        f"measure phase {meta['measure_s']} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
