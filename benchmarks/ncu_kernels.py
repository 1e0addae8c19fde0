"""Hardware counters of every kernel one linear launches (any linear.py row), under Nsight Compute.

Runs each (row, shape, M) once between cudaProfilerStart / Stop, after a warm-up outside that range,
with one marker kernel (`torch.cuda._sleep`, "spin_kernel") before each point, so the profile can be
cut back into points whatever number of kernels an op launches (activation quantization + GEMM,
split-K reduce, ...):

  ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
      --section LaunchStats -o prof python benchmarks/ncu_kernels.py --rows w8a8_int8,bf16 --ms 1,16 > points.txt
  ncu --import prof.ncu-rep --csv --page details > prof.csv
  python benchmarks/ncu_kernels.py --parse prof.csv --points points.txt [--plot kernels.png]

Rows are linear.py's names: a scheme (what the dispatcher picks), "<scheme>@<variant>", or bf16.
ncu flushes the caches before each profiled launch by default, so the weight comes from HBM as in
the rotated-copy benchmark. The table gives, per point, each kernel's time and counters, the
op's total, the weight bytes per total time, and for M >= 256 the op's TFLOP/s (2 M N K / total).
The plot stacks each op's kernel times by kind (GEMM, activation quantization, dequantization,
split-K memset / reduce) as a fraction of bf16's time: where a target is missed, it shows which
kernel the time goes to.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

MARKER = "spin_kernel"
POINT = re.compile(r"^point (\d+): (\S+) (\d+)x(\d+) M=(\d+) weight_bytes=(\d+)$")
METRICS = {  # ncu "details" metric name -> column
    "Duration": "us", "DRAM Throughput": "dram%", "Compute (SM) Throughput": "sm%",
    "Registers Per Thread": "regs", "Achieved Occupancy": "occ%", "Grid Size": "grid",
}
TIME_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
              "second": 1e6, "s": 1e6}


def run(argv) -> int:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import linear  # noqa: E402  (the benchmark's Layer: packed weight + the op call, as measured there)

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="w4a16_g128,w8a16,w8a8_int8,fp8_row,bf16")
    ap.add_argument("--ms", default="1,16,32")
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="stop profiling points after this many seconds (the rest are not launched)")
    args = ap.parse_args(argv)
    points = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        layers = [linear.make_layer(r, n, k, copies=1) for r in args.rows.split(",")]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for layer in layers:
                fn = layer.fn(x, 0)
                fn()  # warm-up outside the profiled range (compile, library load, cuBLAS handle)
                points.append((layer.name, n, k, m, layer.bytes, fn))
    torch.cuda.synchronize()
    for i, (name, n, k, m, nbytes, _) in enumerate(points):
        print(f"point {i}: {name} {n}x{k} M={m} weight_bytes={nbytes}", flush=True)
    torch.cuda.profiler.start()
    t0, done = time.monotonic(), 0
    for *_, fn in points:
        if time.monotonic() - t0 > args.budget_s:
            break
        torch.cuda._sleep(1000)
        fn()
        torch.cuda.synchronize()  # (under ncu each launch is replayed before the next: the clock sees it)
        done += 1
    torch.cuda.profiler.stop()
    print(f"profiled {done} of {len(points)} points in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


def _number(value: str) -> float:
    try:
        return float(value.replace(",", ""))
    except ValueError:  # "n/a" and the like
        return float("nan")


def read_kernels(csv_path: Path) -> list[dict]:
    """One dict per profiled kernel, in launch order, from `ncu --csv --page details`."""
    lines = [line for line in csv_path.read_text().splitlines() if line.startswith('"')]
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(lines):
        kid = row["ID"]
        kern = kernels.setdefault(kid, {"name": row["Kernel Name"]})
        col = METRICS.get(row["Metric Name"])
        if col is None:
            continue
        if col == "us":
            kern[col] = _number(row["Metric Value"]) * TIME_UNITS.get(row["Metric Unit"], float("nan"))
        elif col == "grid":
            kern[col] = row["Metric Value"]
        else:
            kern[col] = _number(row["Metric Value"])
    return [kernels[k] for k in sorted(kernels, key=int)]


def read_points(points_path: Path) -> list[tuple]:
    out = []
    for line in points_path.read_text().splitlines():
        hit = POINT.match(line.strip())
        if hit:
            i, name, n, k, m, nbytes = hit.groups()
            out.append((name, int(n), int(k), int(m), int(nbytes)))
    return out


def split_points(kernels: list[dict], points: list[tuple]) -> list[list[dict]]:
    groups: list[list[dict]] = []
    for kern in kernels:
        if MARKER in kern["name"]:
            groups.append([])
        elif groups:
            groups[-1].append(kern)
    if len(groups) > len(points):
        raise SystemExit(f"{len(groups)} marker kernels in the profile but {len(points)} points listed")
    if len(groups) < len(points):  # a --budget-s run, or one cut short: the first points only
        print(f"ncu_kernels: {len(groups)} of {len(points)} points were profiled; the table has those",
              file=sys.stderr)
        del points[len(groups):]
    return groups


def report(kernels: list[dict], points: list[tuple]) -> str:
    groups = split_points(kernels, points)
    bf16_us = {(n, k, m): sum(kern.get("us", 0.0) for kern in g)
               for (name, n, k, m, _), g in zip(points, groups) if name == "bf16"}
    out = ["| row | N x K | M | kernel | us | DRAM % | SM % | regs | occupancy % | grid |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    totals = ["| row | N x K | M | kernels | total us | weight TB/s | TFLOP/s | bf16 us / total us |",
              "|---|---|---|---|---|---|---|---|"]
    for (name, n, k, m, nbytes), group in zip(points, groups):
        for kern in group:
            out.append(f"| {name} | {n}x{k} | {m} | {kern['name'][:48]} | {kern.get('us', float('nan')):.2f} | "
                       f"{kern.get('dram%', float('nan')):.1f} | {kern.get('sm%', float('nan')):.1f} | "
                       f"{kern.get('regs', float('nan')):.0f} | {kern.get('occ%', float('nan')):.1f} | "
                       f"{kern.get('grid', '')} |")
        total = sum(kern.get("us", 0.0) for kern in group)
        tflops = f"{2 * m * n * k / total / 1e6:.0f}" if m >= 256 and total else ""
        ref = bf16_us.get((n, k, m))
        ratio = f"{ref / total:.2f}" if ref and total and name != "bf16" else ""
        totals.append(f"| {name} | {n}x{k} | {m} | {len(group)} | {total:.2f} | "
                      f"{nbytes / total / 1e6 if total else float('nan'):.2f} | {tflops} | {ratio} |")
    return "\n".join(out) + "\n\n" + "\n".join(totals)


CATEGORIES = (  # (label, substrings of the kernel name), first match wins; the rest is "GEMM / other"
    ("activation quantization", ("act_quant", "swiglu_quant")),
    ("weight dequantization", ("dequant_kernel",)),
    ("split-K counter memset", ("FillFunctor", "memset")),  # torch.zeros of the arrival counters
    ("split-K reduce", ("splitKreduce",)),
)
COLORS = {"GEMM / other": "#4c72b0", "activation quantization": "#dd8452", "weight dequantization": "#55a868",
          "split-K counter memset": "#c44e52", "split-K reduce": "#8172b3"}


# Issue 3's speedup targets over bf16: (M = 1, M = 16, M = 4096, every other M), drawn as ticks at 1 / target.
TARGETS = {"w4a16_g128": (3.0, 2.5, 0.9, 0.9), "w8a16": (1.8, 1.6, 0.9, 0.9),
           "w8a8_int8": (1.8, 1.6, 1.5, 1.0), "fp8_row": (1.8, 1.6, 1.5, 1.0)}


def target(row: str, m: int) -> float | None:
    t = TARGETS.get(row)
    return None if t is None else t[{1: 0, 16: 1, 4096: 2}.get(m, 3)]


def category(kernel_name: str) -> str:
    return next((label for label, keys in CATEGORIES if any(k in kernel_name for k in keys)), "GEMM / other")


def plot(kernels: list[dict], points: list[tuple], path: Path) -> bool:
    """One panel per shape: for each M and row, its kernels' times stacked by category, as a
    fraction of bf16's time at the same (shape, M) (1.0 = as slow as bf16; a 2x speedup = 0.5)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    groups = split_points(kernels, points)
    if not groups:
        print("no profiled point: no plot", file=sys.stderr)
        return False
    bf16 = {(n, k, m): sum(kern.get("us", 0.0) for kern in g)
            for (name, n, k, m, _), g in zip(points, groups) if name == "bf16"}
    shapes = list(dict.fromkeys((n, k) for _, n, k, _, _ in points))
    rows = [r for r in dict.fromkeys(p[0] for p in points) if r != "bf16"]
    ms = sorted({p[3] for p in points})
    fig, axes = plt.subplots(len(shapes), 1, figsize=(max(8, 0.5 * len(ms) * len(rows)), 3.2 * len(shapes)),
                             squeeze=False)
    width = 0.8 / max(1, len(rows))
    for ax, (n, k) in zip(axes[:, 0], shapes):
        for (name, pn, pk, m, _), group in zip(points, groups):
            if (pn, pk) != (n, k) or name == "bf16" or not bf16.get((n, k, m)):
                continue
            x = ms.index(m) + (rows.index(name) - (len(rows) - 1) / 2) * width
            by_cat = defaultdict(float)
            for kern in group:
                by_cat[category(kern["name"])] += kern.get("us", 0.0) / bf16[(n, k, m)]
            bottom = 0.0
            for label in COLORS:
                if by_cat[label]:
                    ax.bar(x, by_cat[label], width * 0.9, bottom=bottom, color=COLORS[label])
                    bottom += by_cat[label]
            ax.text(x, bottom, name.split("_")[0], rotation=90, ha="center", va="bottom", fontsize=6)
            if target(name, m):  # a bar above its tick misses the target
                ax.hlines(1 / target(name, m), x - width / 2, x + width / 2, color="black", linewidth=1.5)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(ms)), [f"M={m}" for m in ms])
        ax.set_ylabel("time / bf16 time")
        ax.set_title(f"N x K = {n}x{k}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    handles.append(plt.Line2D([0], [0], color="black", linewidth=1.5))
    fig.legend(handles, [*COLORS, "issue 3 target (1 / speedup)"], loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


DRAM_PCT = "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"  # the raw page's name on the H100 (ncu 2025)
DRAM_PCT_OLD = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def read_raw(csv_path: Path) -> list[dict]:
    """One dict (metric name -> value string, "_units" -> metric name -> unit) per profiled kernel,
    from `ncu --csv --page raw` (a header row of metric names, a row of units, a row per kernel)."""
    lines = [line for line in csv_path.read_text().splitlines() if line.startswith('"')]
    rows = list(csv.reader(lines))
    units = dict(zip(rows[0], rows[1]))
    return [dict(zip(rows[0], r), _units=units) for r in rows[2:]]


def stall_table(raw: list[dict], points: list[tuple], top: int = 6) -> str:
    """Per point and kernel: time, DRAM %, issue-active %, warps active %, instructions, and the
    `top` largest stall reasons (warps stalled per issued instruction; WarpStateStats section)."""
    kernels = [{"name": r.get("Kernel Name", "?"), "raw": r} for r in raw]
    groups = split_points(kernels, points)
    out = ["| point | kernel | us | dram % | issue active % | warps active % | warp instr | top stalls "
           "(warps per issued instruction) |", "|---|---|---|---|---|---|---|---|"]
    for (name, n, k, m, _), group in zip(points, groups):
        for kern in group:
            r = kern["raw"]
            stalls = sorted(((STALL.match(key).group(1), _number(v)) for key, v in r.items() if STALL.match(key)),
                            key=lambda kv: -kv[1] if kv[1] == kv[1] else 0.0)
            us = _number(r.get("gpu__time_duration.sum", "nan")) * TIME_UNITS.get(
                r["_units"].get("gpu__time_duration.sum", ""), float("nan"))
            out.append(f"| {name} {n}x{k} M={m} | {kern['name'][:40]} | {us:.2f} "
                       f"| {_number(r.get(DRAM_PCT, r.get(DRAM_PCT_OLD, 'nan'))):.0f} "
                       f"| {_number(r.get('smsp__issue_active.avg.pct_of_peak_sustained_active', 'nan')):.0f} "
                       f"| {_number(r.get('sm__warps_active.avg.pct_of_peak_sustained_active', 'nan')):.0f} "
                       f"| {_number(r.get('smsp__inst_executed.sum', 'nan')):.0f} | "
                       + ", ".join(f"{reason} {v:.2f}" for reason, v in stalls[:top]) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--stalls" in argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--stalls", type=Path, required=True, help="ncu --csv --page raw output")
        ap.add_argument("--points", type=Path, required=True, help="this script's stdout from the profiled run")
        args = ap.parse_args(argv)
        print(stall_table(read_raw(args.stalls), read_points(args.points)))
        return 0
    if "--parse" in argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--parse", type=Path, required=True, help="ncu --csv --page details output")
        ap.add_argument("--points", type=Path, required=True, help="this script's stdout from the profiled run")
        ap.add_argument("--plot", type=Path, help="also a PNG: each op's kernel time by kind, relative to bf16")
        args = ap.parse_args(argv)
        kernels, points = read_kernels(args.parse), read_points(args.points)
        print(report(kernels, points))
        if args.plot and plot(kernels, points, args.plot):
            print(f"wrote {args.plot}")
        return 0
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
