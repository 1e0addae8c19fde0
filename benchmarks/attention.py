"""Decode attention of one Llama-3-8B layer (32 query heads, 8 K/V heads, head dim 128) on a static
cache: HF's form compiled by Inductor (repeat_kv, then SDPA with the mask), the SDPA fold
(fold_gqa with gqa_kernel=False) and fxquant::gqa_attention's Triton kernel (the default).

Each variant runs over enough copies of the cache (> 256 MB in all) that they do not sit in L2,
inside one CUDA graph (`triton.testing.do_bench_cudagraph`, median); the time per copy is one
layer's attention. Every output is checked against an fp32 reference first.

  python benchmarks/attention.py --batches 1,8,32 --caches 384,2304 --out out/attention
  python benchmarks/attention.py --batches 1 --caches 2064 --qlen 2048 --filled 1.0   # prefill: the op
      # takes its prefill kernel (fxquant/lowering/triton/attention_prefill.py); --prefill-configs: tilings
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fxquant.lowering  # noqa: E402,F401  (registers torch.ops.fxquant.gqa_attention)
from fxquant.lowering.attention import repeat_kv, sdpa_folded  # noqa: E402


def reference(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    s = q.float() @ repeat_kv(k, g).float().transpose(-1, -2) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ repeat_kv(v, g).float()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--caches", default="384,2304", help="cache lengths")
    p.add_argument("--filled", type=float, default=2 / 3, help="fraction of the cache the mask allows")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--qlen", type=int, default=1)
    p.add_argument("--configs", default="0:32:4:0:1,0:128:4:0:1,0:64:4:0:2,0:64:4:0:0.5",
                   help="kernel alternatives, rows:keys:warps:stages:split factor (0: the default)")
    p.add_argument("--prefill-configs", default="128:64:8:3,128:128:8:2,64:64:4:3,128:64:4:3",
                   help="with --qlen > 64: the prefill kernel's block_m:block_n:warps:stages (0: default)")
    p.add_argument("--out", default="out/attention")
    args = p.parse_args(argv)
    import triton
    import triton.testing

    dev, dt = torch.device("cuda"), torch.bfloat16
    H, HKV, D, LQ = args.heads, args.kv_heads, args.dim, args.qlen
    G, scale = H // HKV, 1 / math.sqrt(args.dim)
    hf = torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, repeat_kv(k, G), repeat_kv(v, G),
                                                                         attn_mask=m, scale=scale))
    variants = {
        "hf (Inductor)": hf,
        "sdpa fold": lambda q, k, v, m: sdpa_folded(q, k, v, m, scale),
        "fxquant kernel": lambda q, k, v, m: torch.ops.fxquant.gqa_attention(q, k, v, m, scale),
    }
    from fxquant.lowering.triton import attention as kernels
    for cfg in filter(None, args.configs.split(",")):  # kernel alternatives: rows:keys:warps:stages:split factor
        br, bn, warps, stages, mult = cfg.split(":")
        br, bn, warps = int(br) or None, int(bn), int(warps)
        stages = int(stages) or None

        def alt(q, k, v, m, br=br, bn=bn, warps=warps, stages=stages, mult=float(mult)):
            return kernels.gqa_decode_attention(q, k, v, m, scale, block_n=bn, block_r=br, num_warps=warps,
                                                num_stages=stages, split_factor=mult)
        variants[f"kernel {cfg}"] = alt
    if args.qlen > 64 and args.prefill_configs:  # prefill kernel tilings (attention_prefill.py)
        from fxquant.lowering.triton import attention_prefill
        for cfg in args.prefill_configs.split(","):
            bm, bn, warps, stages = (int(x) for x in cfg.split(":"))

            def pre(q, k, v, m, bm=bm, bn=bn, warps=warps, stages=stages):
                return attention_prefill.prefill_attention(q, k, v, m, scale, block_m=bm, block_n=bn,
                                                           num_warps=warps, num_stages=stages or None)
            variants[f"prefill {cfg}"] = pre
    rows = []
    for lk in (int(c) for c in args.caches.split(",")):
        for b in (int(x) for x in args.batches.split(",")):
            gen = torch.Generator(device=dev).manual_seed(b * 7919 + lk)
            per_copy = 2 * b * HKV * lk * D * 2
            copies = max(2, min(64, math.ceil(256e6 / per_copy)))
            q = torch.randn(b, LQ, H, D, device=dev, dtype=dt, generator=gen).transpose(1, 2)  # HF's layout
            caches = [(torch.randn(b, HKV, lk, D, device=dev, dtype=dt, generator=gen),
                       torch.randn(b, HKV, lk, D, device=dev, dtype=dt, generator=gen)) for _ in range(copies)]
            filled = max(1, int(lk * args.filled))
            pos = torch.arange(lk, device=dev)
            mask = (pos[None, :] < filled - LQ + 1 + torch.arange(LQ, device=dev)[:, None])[None, None].expand(
                b, 1, LQ, lk).contiguous()
            ref = reference(q, *caches[0], mask, scale)
            row = {"batch": b, "cache": lk, "filled": filled, "copies": copies, "kv_mb_per_layer": per_copy / 1e6}
            for name, fn in variants.items():
                try:
                    out = fn(q, *caches[0], mask)
                except Exception as exc:  # e.g. a tile config past the shared memory: the others still run
                    row[name] = {"us": float("nan"), "rel_err": float("nan"), "tb_s_filled": float("nan"),
                                 "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
                    print(f"{name}: {row[name]['error']}", flush=True)
                    continue
                err = float((out.float() - ref).norm() / ref.norm())
                ms = triton.testing.do_bench_cudagraph(lambda: [fn(q, k, v, mask) for k, v in caches])
                row[name] = {"us": ms * 1e3 / copies, "rel_err": err}
                # bytes of the allowed K/V (what a kernel that skips masked tiles must read)
                row[name]["tb_s_filled"] = 2 * b * HKV * filled * D * 2 / (ms * 1e-3 / copies) / 1e12
            rows.append(row)
            print(f"B={b:3d} cache={lk:5d} filled={filled:5d}: " + "  ".join(
                f"{n} {row[n]['us']:7.1f} us (err {row[n]['rel_err']:.1e})" for n in variants), flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "heads": H, "kv_heads": HKV, "dim": D, "qlen": LQ}
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("\nus per layer (speedup over hf):")
    for r in rows:
        base = r["hf (Inductor)"]["us"]
        print(f"  B={r['batch']:3d} cache={r['cache']:5d}: " + " | ".join(
            f"{n} {r[n]['us']:.1f} ({base / r[n]['us']:.2f}x)" for n in variants))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
