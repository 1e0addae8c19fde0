#!/usr/bin/env python3
"""Where a decode (or prefill) step's GPU time goes: per-kernel time of one compiled forward.

Builds the Llama-3-8B-shaped model of benchmarks/llm.py (random weights, --layers deep), compiles
it per scheme, and for one step at batch --batch (--tokens tokens per row; 1 = decode):
- times the step under CUDA-graph replay (mode "reduce-overhead": what llm.py times);
- profiles the same step compiled without CUDA graphs and sums each kernel's GPU time per step,
  grouped as fxquant GEMM / cuBLAS GEMM / attention / Inductor-generated / other.
"step ms - kernel ms" is time the GPU spent between kernels (launch gaps, tails).

  python benchmarks/profile_step.py --schemes bf16-inductor,int4 --layers 8 --batch 1
  python benchmarks/profile_step.py --schemes int8dyn,int8dyn:nofuse --tokens 2048   # fuse_act_quant off
  python benchmarks/profile_step.py --schemes bf16-inductor,bf16-inductor+fold,int4,int4:nofold --batch 32

With --out DIR it writes profile.json (every kernel's ms per step) and profile.png (a stacked bar per
scheme: ms per step by kernel group, and the gaps).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llm  # noqa: E402  (the model and decode helpers of the end-to-end benchmark)

import fxquant  # noqa: E402

GROUPS = (  # (group, substrings of a kernel name), first match wins
    ("fxquant", ("gemv", "gemm_kernel", "int4_mma", "int8_gemv", "dequant_kernel", "act_quant",
                 "quantize_rows", "swiglu_quant")),
    ("cublas", ("nvjet", "sm90_xmma", "gemm", "cutlass", "splitKreduce")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "gqa_decode", "gqa_combine")),
    ("inductor", ("triton_",)),
)


def group_of(name: str) -> str:
    for g, keys in GROUPS:
        if any(k in name for k in keys):
            return g
    return "other"


def build(name: str, cfg, dtype, mode: str):
    device = torch.device("cuda")
    model = llm.build_model(cfg, device, dtype, seed=0)
    if name == "bf16-inductor":
        return torch.compile(model, mode=mode)
    if name == llm.FOLD:
        return torch.compile(model, backend=llm.inductor_with_gqa_fold, mode=mode)
    if name == llm.GQA:
        return torch.compile(model, backend=llm.inductor_with_gqa_kernel, mode=mode)
    scheme, _, flags = name.partition(":")  # e.g. "int8dyn:nofuse" (fuse_act_quant=False), "int4:nofold"
    known = {"nofuse": ("fuse_act_quant", False), "nofold": ("fold_gqa", False), "sdpafold": ("gqa_kernel", False)}
    options = dict(known[f] for f in flags.split(",") if f)
    be = fxquant.backend(llm.FXQUANT_SCHEMES[scheme](), release_weights=True, **options)
    return torch.compile(model, backend=be, mode=mode)


class Stepper:
    """Steps at successive positions of a static cache as long as llm.py's (prompt + 256); the
    cache restarts (outside any timing) before it would overflow."""

    def __init__(self, model, cfg, dtype, batch: int, tokens: int, prompt: int):
        device = torch.device("cuda")
        self.model, self.tokens, self.prompt = model, tokens, prompt
        self.max_len = max(prompt + 256, tokens)
        self.cache = llm.make_cache(cfg, batch, self.max_len, dtype, device)
        self.ids = torch.randint(0, cfg.vocab_size, (batch, tokens), device=device)
        self.restart()

    def restart(self) -> None:
        self.cache.reset()
        self.pos = 0 if self.tokens > 1 else self.prompt

    def room(self, steps: int) -> None:
        if self.tokens > 1 or self.pos + steps > self.max_len:
            self.restart()

    def __call__(self):
        if self.tokens > 1:
            self.restart()  # a prefill always starts at position 0 (cache.reset is one small kernel)
        out = llm.forward_step(self.model, self.ids, self.pos, self.cache)
        self.pos += self.tokens
        return out


def measure(name: str, args, cfg, dtype) -> dict:
    out = {}
    with torch.inference_mode():
        # 1) step time under CUDA graphs
        model = build(name, cfg, dtype, "reduce-overhead")
        step = Stepper(model, cfg, dtype, args.batch, args.tokens, args.prompt)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            step.room(args.steps)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / args.steps)
        out["step_ms_graphs"] = statistics.median(times) * 1e3
        del model, step
        llm.free(torch.device("cuda"))

        # 2) per-kernel GPU time, compiled without CUDA graphs
        model = build(name, cfg, dtype, "default")
        step = Stepper(model, cfg, dtype, args.batch, args.tokens, args.prompt)
        for _ in range(3):
            step()
        step.room(args.steps + args.profiled)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        out["step_ms_nographs"] = (time.perf_counter() - t0) / args.steps * 1e3
        acts = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.profiled):
                step()
            torch.cuda.synchronize()
        del model, step
        llm.free(torch.device("cuda"))
    per_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            k = per_kernel[e.name]
            k[0] += e.device_time / args.profiled / 1e3  # ms per step
            k[1] += 1 / args.profiled
    out["kernels"] = sorted(((n, t, c) for n, (t, c) in per_kernel.items()), key=lambda r: -r[1])
    out["groups"] = collections.Counter()
    out["group_counts"] = collections.Counter()
    for n, t, c in out["kernels"]:
        out["groups"][group_of(n)] += t
        out["group_counts"][group_of(n)] += c
    out["kernel_ms"] = sum(t for _, t, _ in out["kernels"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default="bf16-inductor,int4")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=1, help="tokens per row in the step (1: decode)")
    p.add_argument("--prompt", type=int, default=128, help="cache positions already filled (decode)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profiled", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=None, help="folder for profile.json and profile.png")
    args = p.parse_args()
    dtype = torch.bfloat16
    cfg = llm.llama_config(False, args.layers)
    rows = []
    for name in args.schemes.split(","):
        r = measure(name, args, cfg, dtype)
        rows.append((name, r))
        print(f"\n== {name}: {args.layers} layers, batch {args.batch}, {args.tokens} token(s)/row: "
              f"step {r['step_ms_graphs']:.3f} ms (CUDA graphs), {r['step_ms_nographs']:.3f} ms (no graphs), "
              f"kernels {r['kernel_ms']:.3f} ms in {sum(r['group_counts'].values()):.0f} launches")
        for g in ("fxquant", "cublas", "attention", "inductor", "other"):
            print(f"   {g:10s} {r['groups'][g]:8.3f} ms  {r['group_counts'][g]:5.0f} kernels")
        for n, t, c in r["kernels"][:args.top]:
            print(f"   {t * 1e3:9.1f} us {c:5.1f}x  {n[:110]}")
    print("\nscheme           step ms (graphs)  kernel ms  gap ms  fxquant/cublas ms  launches")
    for name, r in rows:
        gemm = r["groups"]["fxquant"] + r["groups"]["cublas"]
        print(f"{name:16s} {r['step_ms_graphs']:12.3f} {r['kernel_ms']:12.3f} "
              f"{r['step_ms_graphs'] - r['kernel_ms']:8.3f} {gemm:12.3f} {sum(r['group_counts'].values()):10.0f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
                "batch": args.batch, "tokens": args.tokens, "prompt": args.prompt}
        (out / "profile.json").write_text(json.dumps({"meta": meta, "results": {n: r for n, r in rows}}, indent=1))
        plot(rows, meta, out / "profile.png")


def plot(rows, meta, path: Path) -> None:
    """One stacked bar per scheme: GPU ms per step by kernel group, plus the gaps between kernels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = ("fxquant", "cublas", "attention", "inductor", "other")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 4.2))
    names = [n for n, _ in rows]
    bottom = [0.0] * len(rows)
    for g in parts + ("gaps",):
        vals = [max(0.0, r["step_ms_graphs"] - r["kernel_ms"]) if g == "gaps" else r["groups"][g] for _, r in rows]
        ax.bar(names, vals, bottom=bottom, label=g)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, (_, r) in enumerate(rows):
        ax.text(i, bottom[i], f"{r['step_ms_graphs']:.2f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per step (CUDA graphs)")
    what = "decode" if meta["tokens"] == 1 else f"prefill of {meta['tokens']} tokens"
    ax.set_title(f"{meta['layers']} layers, batch {meta['batch']}, {what}\n{meta['device']}, torch {meta['torch']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
