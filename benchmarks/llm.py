#!/usr/bin/env python3
"""End-to-end LLM benchmark: greedy decoding of a Llama-3-8B-shaped HF model (random weights).

For each scheme (bf16 eager, bf16 Inductor, fxquant schemes, torchao when installed) it builds
`transformers.LlamaForCausalLM` from a Llama-3-8B `LlamaConfig` directly on the device (seeded,
bf16, nothing downloaded), compiles it once with `torch.compile(..., mode=--mode)` and measures:

- decode tokens/s per batch size: batch x (new_tokens - 1) / time of the decode steps that follow
  the prefill of a --prompt-token prompt (median of --repeats runs);
- prefill tokens/s: one --prefill-token prompt at batch 1 (median of --repeats);
- compile s: wall time of the warm-up calls during which Dynamo compiled a frame;
- peak / steady GPU memory (max_memory_allocated over compile + runs / memory_allocated after
  warm-up; both include the KV caches); speedup over bf16-inductor in the same run;
- frames compiled during the timed runs (must be 0: warm-up uses exactly the timed lengths);
- token match: the first min(32, new_tokens) greedy tokens at batch 1 against an eager reference
  on the same quantized weights: every quantized linear runs its op's plain-ATen decomposition
  (fxquant.lowering.decompose: numerics' dequantize + F.linear for weight-only schemes, plus the
  activation quantization for dynamic ones). On a mismatch it reports the position and the
  reference's top-2 logit gap there, so a reader can tell kernel rounding from a bug. Then the
  same steps again, fed the reference's tokens (teacher forcing, `token_match_forced`): every
  step sees the reference's inputs, so all 32 are compared, and each step whose argmax differs is
  listed with the reference's top-2 gap in ulps. Disagreements only at gaps of a few ulps are
  rounding; one at a wide gap is a wrong result. The forced steps' logits are also compared with the
  reference's (SQNR, dB), next to what quantizing itself moved: the unquantized model's prompt
  logits against the reference's. (Dynamic activation schemes: a last-bit difference before the
  activation is quantized can move a value by a whole quantization step, so their disagreements may
  come at wider gaps than weight-only ones': S21's measurements are consistent with that; it was not
  tested further.) A random-weight model has many near-ties (even
  Inductor bf16 differs from eager bf16 within a few tokens), which greedy matching alone cannot
  tell from a bug.

The decode loop is our own (gpt-fast style) over a `transformers.StaticCache`, not `generate`,
so what is timed is explicit. All logits are of the last position only (`logits_to_keep=1`).

  python benchmarks/llm.py --schemes bf16-inductor,int4 --batches 1 --out out/llm
  python benchmarks/llm.py --layers 8 --repeats 1               # quicker: 8 of the 32 layers
  python benchmarks/llm.py --tiny --device cpu                  # a 2-layer float32 model (tests)
  python benchmarks/llm.py --schemes bf16-inductor,int4,int4+embed  # the Triton kernels in the graph
  python benchmarks/llm.py --schemes bf16-inductor,bf16-inductor+gqa,int4,int4+sdpafold,int4+nofold --batches 1,32
      # the grouped-query attention kernel (backend options fold_gqa, gqa_kernel) alone, and int4 with
      # the fold on SDPA instead (+sdpafold) or neither (+nofold); bf16-inductor+fold: the SDPA fold alone

Writes llm.json (after every scheme, so a run cut short keeps what finished), llm.png and
llm_forced.png (the teacher-forced check: the reference's top-2 gap per step, disagreements in
red) to --out, and prints a table. bf16-* are the unquantized baselines (float32 with --tiny).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxquant  # noqa: E402
from fxquant.lowering.decompose import fxquant_decompositions  # noqa: E402
from fxquant.numerics import sqnr  # noqa: E402

FXQUANT_SCHEMES: dict[str, Callable[[], fxquant.QuantConfig]] = {
    "int4": lambda: fxquant.Int4WeightOnly(group_size=128, layout="rows"),  # the row-major layout, as before S28
    "int4mma": lambda: fxquant.Int4WeightOnly(group_size=128, layout="mma"),
    "int4auto": lambda: fxquant.Int4WeightOnly(group_size=128),  # the default: "mma" where its kernels run
    "int8wo": lambda: fxquant.Int8WeightOnly(),
    "int8dyn": lambda: fxquant.Int8DynamicActivationInt8Weight(),
    "fp8row": lambda: fxquant.Float8DynamicActivationFloat8Weight(granularity="row"),
    "fp8wo": lambda: fxquant.Float8WeightOnly(),
}
BASELINES = ("bf16-eager", "bf16-inductor")
TORCHAO_SCHEMES = ("torchao-int4", "torchao-int8wo")
ALL_SCHEMES = BASELINES + tuple(FXQUANT_SCHEMES) + TORCHAO_SCHEMES
EMBED = "+embed"  # "<fxquant scheme>+embed": the backend's embed_kernels=True (Triton kernels in Inductor's graph)
NOFOLD = "+nofold"  # "<fxquant scheme>+nofold": the backend's fold_gqa=False (repeated K/V copied, as Inductor does)
SDPA_FOLD = "+sdpafold"  # "<fxquant scheme>+sdpafold": gqa_kernel=False (the fold on SDPA, not fxquant's kernel)
FOLD = "bf16-inductor+fold"  # Inductor bf16 with fxquant's grouped-query attention fold alone (SDPA), no quantization
GQA = "bf16-inductor+gqa"  # Inductor bf16 with fxquant's grouped-query attention kernel alone, no quantization
FLAGS = {EMBED: {"embed_kernels": True}, NOFOLD: {"fold_gqa": False}, SDPA_FOLD: {"gqa_kernel": False}}


def split_scheme(name: str) -> tuple[str, dict[str, Any]]:
    """"int4+embed+nofold" -> ("int4", {"embed_kernels": True, "fold_gqa": False})."""
    base, options = name, {}
    for flag, opts in FLAGS.items():
        if flag in base:
            base = base.replace(flag, "")
            options.update(opts)
    return base, options


def known_scheme(name: str) -> bool:
    base, options = split_scheme(name)
    return name in ALL_SCHEMES or name in (FOLD, GQA) or (base in FXQUANT_SCHEMES and bool(options))
CHECK_TOKENS = 32  # greedy tokens compared with the reference
WARMUP_ROUNDS = 2  # round 1 compiles, round 2 records CUDA graphs (reduce-overhead) off the clock
# `cache_position` was dropped from HF forward signatures in 5.x; pass it only where it exists.
_TAKES_CACHE_POSITION = "cache_position" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters


def log(*a: Any) -> None:
    print(*a, flush=True)


# --------------------------------------------------------------------------- model
def llama_config(tiny: bool, layers: int | None) -> transformers.LlamaConfig:
    """Llama-3-8B shapes (or a tiny model for tests); `layers` overrides the depth."""
    if tiny:
        shape = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
    else:
        shape = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return transformers.LlamaConfig(**shape, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                    tie_word_embeddings=False, attn_implementation="sdpa")


def build_model(cfg: transformers.LlamaConfig, device: torch.device, dtype: torch.dtype,
                seed: int) -> transformers.LlamaForCausalLM:
    """Random weights made on `device` in `dtype` (no float32 copy of 8B parameters on the way)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_cache(cfg: transformers.LlamaConfig, batch: int, max_len: int, dtype: torch.dtype,
               device: torch.device) -> transformers.StaticCache:
    cache = transformers.StaticCache(config=cfg, max_cache_len=max_len)
    # Allocated now, outside the compiled region, so the tensors get static addresses (CUDA graphs).
    cache.early_initialization(batch_size=batch, num_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                               dtype=dtype, device=device)
    return cache


class ReferenceLinear(torch.nn.Module):
    """An eager linear on fxquant's packed weight: the op's plain-ATen decomposition."""

    def __init__(self, fn: Callable, tensors: tuple[torch.Tensor, ...], static: tuple,
                 bias: torch.Tensor | None):
        super().__init__()
        self.fn, self.tensors, self.static, self.bias = fn, tensors, static, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.tensors, self.bias, *self.static)


def to_reference(model: torch.nn.Module, qw: fxquant.QuantizedWeights) -> int:
    """Swap every linear packed in `qw` for a ReferenceLinear (its float weight is dropped).
    Returns how many were swapped."""
    decomps = fxquant_decompositions()
    swapped = 0
    for name in qw:
        packed, fn = qw[name], decomps[qw.config_of(name).op]  # per weight: int4 "auto" picks a layout each
        for fqn in (name, *packed.aliases):
            parent_name, _, child = fqn.removesuffix(".weight").rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            setattr(parent, child, ReferenceLinear(fn, packed.tensors, packed.static, old.bias))
            swapped += 1
    return swapped


# --------------------------------------------------------------------------- decoding
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_step(model: Callable, ids: torch.Tensor, start: int,
                 cache: transformers.StaticCache) -> torch.Tensor:
    """One forward of `ids` [B, T] at positions start..start+T-1; logits of the last one [B, V]."""
    pos = torch.arange(start, start + ids.shape[1], device=ids.device)  # on device: no copy, no sync
    kwargs: dict[str, Any] = dict(position_ids=pos[None], past_key_values=cache, use_cache=True,
                                  logits_to_keep=1)
    if _TAKES_CACHE_POSITION:
        kwargs["cache_position"] = pos
    torch.compiler.cudagraph_mark_step_begin()  # we never keep a previous step's outputs alive
    return model(ids, **kwargs).logits[:, -1]


def generate(model: Callable, cache: transformers.StaticCache, prompt: torch.Tensor, new_tokens: int,
             keep_logits: int = 0, forced: torch.Tensor | None = None) -> dict[str, Any]:
    """Greedy decoding: prefill `prompt` [B, P], then new_tokens - 1 single-token steps.
    Returns tokens [B, new_tokens], prefill_s, decode_s, and with keep_logits=n the float32
    logits of row 0 at the first n steps (untimed runs only: it copies them every step).
    forced [B, new_tokens]: feed these tokens instead of the argmax (teacher forcing; `tokens`
    still holds the argmax of each step)."""
    device = prompt.device
    cache.reset()
    tokens = torch.empty(prompt.shape[0], new_tokens, dtype=torch.long, device=device)
    kept = []
    sync(device)
    t0 = time.perf_counter()
    t1 = t0
    tok = prompt
    for i in range(new_tokens):
        # Step 0 is the prefill; then one token per step, at the position after the previous one.
        logits = forward_step(model, tok, 0 if i == 0 else prompt.shape[1] + i - 1, cache)
        tok = logits.argmax(-1)[:, None]
        tokens[:, i] = tok[:, 0]
        if forced is not None:
            tok = forced[:, i:i + 1]
        if i < keep_logits:
            kept.append(logits[0].float().cpu())
        if i == 0:
            sync(device)
            t1 = time.perf_counter()
    sync(device)
    t2 = time.perf_counter()
    out = {"tokens": tokens.cpu(), "prefill_s": t1 - t0, "decode_s": t2 - t1}
    if keep_logits:
        out["logits"] = torch.stack(kept)
    return out


def prefill(model: Callable, cache: transformers.StaticCache, prompt: torch.Tensor) -> float:
    """Seconds for one prefill of `prompt` (and the argmax of its next token)."""
    cache.reset()
    sync(prompt.device)
    t0 = time.perf_counter()
    forward_step(model, prompt, 0, cache).argmax(-1)
    sync(prompt.device)
    return time.perf_counter() - t0


def compiled_frames() -> int:
    """Frames Dynamo has compiled so far in this process."""
    return torch._dynamo.utils.counters["frames"]["ok"]


class CompileClock:
    """Wraps the model during warm-up: sums the wall time of the calls that compiled a frame."""

    def __init__(self, model: Callable, device: torch.device):
        self.model, self.device = model, device
        self.seconds, self.frames = 0.0, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        before = compiled_frames()
        sync(self.device)
        t0 = time.perf_counter()
        out = self.model(*args, **kwargs)
        if compiled_frames() > before:
            sync(self.device)
            self.seconds += time.perf_counter() - t0
            self.frames += compiled_frames() - before
        return out


def top2_gap(logits: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """The top-1 - top-2 gap of one row of logits, and that gap in ulps of `dtype` at |top-1|
    (toward zero a power of two's step is half, so the ulp is taken at the magnitude)."""
    top2 = logits.topk(2).values
    top1 = top2[0].abs().to(dtype)
    ulp = float(torch.nextafter(top1, torch.tensor(float("inf"), dtype=dtype)).float() - top1.float())
    gap = float(top2[0] - top2[1])
    return gap, gap / ulp


def token_match(tokens: torch.Tensor, logits: torch.Tensor, ref: dict[str, Any],
                dtype: torch.dtype) -> dict[str, Any]:
    """Compare greedy tokens [n] (and the row-0 logits [n, V] of the same run) with the
    reference's, up to the first mismatch: after it the inputs differ. At a mismatch, the
    reference's top-1 - top-2 logit gap says how close the call was, also in ulps of the
    model's `dtype` at that logit (bf16 logits of a random model are often 1 ulp apart)."""
    n = ref["tokens"].shape[1]
    diff = (tokens[:n] != ref["tokens"][0]).nonzero()
    pos = int(diff[0]) if len(diff) else n
    upto = min(pos + 1, n)  # logits at the mismatching step are still from identical inputs
    res: dict[str, Any] = {"matched": pos, "checked": n,
                           "max_abs_logit_diff": float((logits[:upto] - ref["logits"][:upto]).abs().max()),
                           "ref_logit_scale": float(ref["logits"].abs().max())}
    if pos == n:
        res["text"] = f"match {n}/{n}"
    else:
        res["first_mismatch"] = pos
        res["ref_top2_gap"], res["ref_top2_gap_ulps"] = top2_gap(ref["logits"][pos], dtype)
        res["text"] = (f"mismatch at {pos}/{n} (ref top-2 gap {res['ref_top2_gap']:.3g} = "
                       f"{res['ref_top2_gap_ulps']:.3g} {str(dtype).removeprefix('torch.')} ulp)")
    if not ref.get("same_weights", True):
        res["text"] += " [reference built from different weights!]"
    return res


def forced_agreement(forced_tokens: torch.Tensor, ref: dict[str, Any], dtype: torch.dtype,
                     forced_logits: torch.Tensor | None = None) -> dict[str, Any]:
    """Teacher forcing: the scheme fed the reference's own tokens, so both saw the same inputs at
    every step and only their numerics differ. Per step, does its argmax [n] agree with the
    reference's, and how close (top-2 gap, in ulps of `dtype`) was the reference's call wherever it
    does not? A disagreement at a wide gap means a wrong result, not rounding.
    With the scheme's logits [n, V]: their SQNR against the reference's at every step; with the
    unquantized model's step-0 logits in ref (`unquantized_logits0`), the quantization's own SQNR
    there, the scale a kernel's deviation is to be read against."""
    n = ref["tokens"].shape[1]
    every = [top2_gap(ref["logits"][i], dtype)[1] for i in range(n)]  # the reference's gap per step, ulps
    off = (forced_tokens[:n] != ref["tokens"][0]).nonzero().flatten().tolist()
    gaps = [every[i] for i in off]
    res: dict[str, Any] = {"agree": n - len(gaps), "checked": n, "gap_ulps_at_disagreements": gaps,
                           "gap_ulps_every_step": every, "disagree_steps": off}
    res["text"] = f"forced {n - len(gaps)}/{n}"
    if gaps:  # how many steps were as close a call as the widest disagreement: the near-ties
        near = sum(g <= max(gaps) for g in every)
        res["text"] += (f" (ref gaps {', '.join(f'{g:.3g}' for g in gaps)} ulp; {near}/{n} steps within "
                        f"{max(gaps):.3g} ulp)")
    if forced_logits is not None:
        db = [sqnr(ref["logits"][i], forced_logits[i]) for i in range(n)]
        res["logit_sqnr_db"] = [d if math.isfinite(d) else None for d in db]  # None: identical (strict JSON)
        res["text"] += f"; logits vs ref min {min(db):.1f} dB"
        if "unquantized_logits0" in ref:
            res["quantization_sqnr_db_step0"] = q0 = sqnr(ref["unquantized_logits0"], ref["logits"][0])
            res["text"] += f" (step 0 {db[0]:.1f}; the quantization itself {q0:.1f})"
    return res


def weights_fingerprint(model: torch.nn.Module) -> list[float]:
    """Per-parameter float64 sums: tells whether two seeded builds made the same weights."""
    return [float(torch.sum(p.detach(), dtype=torch.float64)) for p in model.parameters()]


# --------------------------------------------------------------------------- one scheme
class Unavailable(Exception):
    """The scheme's library is not installed here."""


def inductor_with_gqa_fold(gm: torch.fx.GraphModule, example_inputs: list, mode: str | None = None,
                           options: dict | None = None, kernel: bool = False) -> Callable:
    """Inductor, after fxquant's grouped-query attention rewrite (no quantization): shows how much of
    a scheme's speedup the rewrite alone gives. kernel: fxquant::gqa_attention (the backend's
    default) rather than the fold on SDPA."""
    from fxquant.passes.gqa_attention import fold_gqa_attention
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    fold_gqa_attention(gm, kernel=kernel)
    return compile_fx(gm, example_inputs, config_patches={**(list_mode_options(mode) if mode else {}),
                                                          **(options or {})})


def inductor_with_gqa_kernel(gm: torch.fx.GraphModule, example_inputs: list, mode: str | None = None,
                             options: dict | None = None) -> Callable:
    return inductor_with_gqa_fold(gm, example_inputs, mode, options, kernel=True)


def prepare(name: str, args: argparse.Namespace, cfg: transformers.LlamaConfig, dtype: torch.dtype,
            ref_prompt: torch.Tensor, n_check: int) -> tuple[Callable, dict | None, dict]:
    """The model to time for scheme `name` (compiled unless bf16-eager), the eager reference
    run to compare its tokens with (None: no reference), and notes for the JSON."""
    device = torch.device(args.device)
    compile_kw: dict[str, Any] = dict(mode=args.mode, dynamic=args.dynamic)
    notes: dict[str, Any] = {}

    def reference(model: Callable) -> dict:
        with torch.inference_mode():
            cache = make_cache(cfg, 1, ref_prompt.shape[1] + n_check, dtype, device)
            return generate(model, cache, ref_prompt, n_check, keep_logits=n_check)

    base, flags = split_scheme(name)
    if base in FXQUANT_SCHEMES:
        config = FXQUANT_SCHEMES[base]()
        # The reference: fxquant.quantize_weights packs what the backend packs (config.pack of
        # the same seeded weights), run eagerly through the ops' plain-ATen decompositions.
        ref_model = build_model(cfg, device, dtype, args.seed)
        fingerprint = weights_fingerprint(ref_model)
        with torch.inference_mode():  # the unquantized model's prompt logits: what quantizing moved
            # the reference's cache length: a cache exactly as long as the prompt makes HF drop the
            # mask for is_causal, another SDPA kernel, whose rounding would count as quantization
            cache = make_cache(cfg, 1, ref_prompt.shape[1] + n_check, dtype, device)
            unquantized0 = forward_step(ref_model, ref_prompt, 0, cache)[0].float().cpu()
            del cache
        qw = fxquant.quantize_weights(ref_model, config)
        notes["linears_quantized"] = to_reference(ref_model, qw)
        notes["weight_gib_packed"] = qw.nbytes / 2**30
        del qw
        ref = reference(ref_model)
        ref["unquantized_logits0"] = unquantized0
        del ref_model
        free(device)
        reset_peak(device)  # the reference's memory is not the scheme's
        model = build_model(cfg, device, dtype, args.seed)
        ref["same_weights"] = weights_fingerprint(model) == fingerprint
        be = fxquant.backend(config, release_weights=True, **flags)
        # torch.compile passes mode= on to a callable backend; fxquant.Backend applies its Inductor options.
        compiled = torch.compile(model, backend=be, **compile_kw)
        notes["config"] = config.describe()
        notes["fxquant_report"] = be.report  # filled in place when it compiles
        return compiled, ref, notes
    if name in TORCHAO_SCHEMES:
        try:
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
        except Exception as exc:  # noqa: BLE001  (any failure to import means: not usable here)
            raise Unavailable(f"torchao: {type(exc).__name__}: {exc}") from None
    model = build_model(cfg, device, dtype, args.seed)
    if name == "bf16-eager":
        return model, None, notes
    if name == "bf16-inductor":
        return torch.compile(model, **compile_kw), reference(model), notes  # reference: the same model, eager
    if name in (FOLD, GQA):
        return torch.compile(model, backend=inductor_with_gqa_fold if name == FOLD else inductor_with_gqa_kernel,
                             dynamic=args.dynamic, **({"mode": args.mode} if args.mode else {})), reference(model), notes
    if name in TORCHAO_SCHEMES:
        ao_cfg = (Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
                  if name == "torchao-int4" else Int8WeightOnlyConfig())
        quantize_(model, ao_cfg)
        notes["config"] = repr(ao_cfg)
        return torch.compile(model, **compile_kw), None, notes
    raise ValueError(f"unknown scheme {name!r}")


def run_scheme(name: str, args: argparse.Namespace, cfg: transformers.LlamaConfig, dtype: torch.dtype,
               prompts: torch.Tensor, long_prompt: torch.Tensor | None) -> dict[str, Any]:
    """Build, compile (in warm-up), time and check one scheme. Raises on failure."""
    device = torch.device(args.device)
    n_check = min(CHECK_TOKENS, args.new_tokens)
    b0 = args.batches[0]
    res: dict[str, Any] = {"scheme": name, "status": "ok"}
    reset_peak(device)
    t_build = time.perf_counter()
    model, ref, notes = prepare(name, args, cfg, dtype, prompts[:1], n_check)
    res["setup_s"] = time.perf_counter() - t_build
    log(f"[{name}] set up in {res['setup_s']:.1f} s"
        + (f"; reference tokens {ref['tokens'][0].tolist()}" if ref else ""))

    caches = {b: make_cache(cfg, b, args.prompt + args.new_tokens, dtype, device) for b in args.batches}
    long_cache = make_cache(cfg, 1, args.prefill, dtype, device) if long_prompt is not None else None
    res["kv_cache_gib"] = sum(t.numel() * t.element_size() for c in [*caches.values(), long_cache] if c is not None
                              for layer in c.layers for t in (layer.keys, layer.values)) / 2**30
    graph_breaks0 = sum(torch._dynamo.utils.counters["graph_break"].values())
    with torch.inference_mode():
        # Warm-up: exactly the timed calls (another batch or cache size would compile again).
        clock = CompileClock(model, device)
        t0 = time.perf_counter()
        first = None
        for rnd in range(WARMUP_ROUNDS):
            for b in args.batches:
                keep = n_check if (rnd, b) == (0, b0) else 0
                run = generate(clock, caches[b], prompts[:b], args.new_tokens, keep_logits=keep)
                first = run if keep else first
                if keep and ref is not None:  # the same steps again, fed the reference's tokens
                    forced = torch.zeros(b, args.new_tokens, dtype=torch.long, device=device)
                    forced[:, :n_check] = ref["tokens"][0].to(device)
                    forced_run = generate(clock, caches[b], prompts[:b], args.new_tokens, keep_logits=n_check,
                                          forced=forced)
            if long_cache is not None:
                prefill(clock, long_cache, long_prompt)
        res["compile_s"] = clock.seconds
        res["frames_compiled_warmup"] = clock.frames
        res["warmup_s"] = time.perf_counter() - t0
        res["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values()) - graph_breaks0
        log(f"[{name}] warm-up {res['warmup_s']:.1f} s: {clock.frames} frame(s) compiled in {clock.seconds:.1f} s")
        if device.type == "cuda":
            res["steady_mem_gib"] = torch.cuda.memory_allocated(device) / 2**30

        frames0 = compiled_frames()
        decode: dict[int, list[float]] = {b: [] for b in args.batches}
        prefill_s: list[float] = []
        last: dict[int, dict] = {}
        for _ in range(args.repeats):
            for b in args.batches:  # round-robin, so drift hits every batch size alike
                last[b] = generate(model, caches[b], prompts[:b], args.new_tokens)
                decode[b].append(last[b]["decode_s"])
            if long_cache is not None:
                prefill_s.append(prefill(model, long_cache, long_prompt))
        res["frames_compiled_timed"] = compiled_frames() - frames0

    steps = args.new_tokens - 1
    res["decode_tok_s"] = {str(b): b * steps / statistics.median(v) if steps else None for b, v in decode.items()}
    res["decode_s_runs"] = {str(b): v for b, v in decode.items()}
    if prefill_s:
        res["prefill_tok_s"] = args.prefill / statistics.median(prefill_s)
        res["prefill_s_runs"] = prefill_s
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    # The warm-up run (which kept its logits) and the timed runs must agree token for token.
    res["deterministic"] = bool(torch.equal(first["tokens"], last[b0]["tokens"]))
    if ref is not None:
        res["token_match"] = token_match(first["tokens"][0], first["logits"], ref, dtype)
        res["token_match_forced"] = forced_agreement(forced_run["tokens"][0], ref, dtype, forced_run["logits"])
        res["token_match"]["text"] += "; " + res["token_match_forced"]["text"]
    res["tokens_row0"] = first["tokens"][0, :n_check].tolist()
    report = notes.pop("fxquant_report", None)
    if report is not None:
        notes["linears_compiled_quantized"] = sum(r.status == "quantized" for r in report)
        notes["linears_compiled_skipped"] = {r.name: r.reason for r in report if r.status != "quantized"}
    res.update(notes)
    # each run's tok/s beside the median: a slow first run (seen at b1, S10) shows in the log
    tok = ", ".join(f"b{b} {v:.1f} (runs {'/'.join(f'{int(b) * steps / t:.0f}' for t in decode[int(b)])})"
                    for b, v in res["decode_tok_s"].items() if v)
    log(f"[{name}] decode tok/s: {tok}; prefill {res.get('prefill_tok_s', 0):.0f} tok/s; "
        f"frames compiled while timed: {res['frames_compiled_timed']}; "
        f"{res.get('token_match', {}).get('text', 'no reference')}")
    return res


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    """Drop compiled graphs, CUDA graph pools and cached blocks before the next scheme."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- output
def add_speedups(results: list[dict]) -> None:
    base = next((r for r in results if r["scheme"] == "bf16-inductor" and r["status"] == "ok"), None)
    for r in results:
        if base is None or r["status"] != "ok":
            continue
        r["speedup_vs_bf16_inductor"] = {b: (v / base["decode_tok_s"][b] if v and base["decode_tok_s"].get(b)
                                             else None) for b, v in r["decode_tok_s"].items()}


def write_json(path: Path, meta: dict, results: list[dict]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    os.replace(tmp, path)  # a run killed mid-write keeps the previous file


def table(results: list[dict], batches: list[int]) -> str:
    head = (["scheme", "compile s"] + [f"b{b} tok/s" for b in batches] + ["prefill tok/s", "mem GiB peak/steady",
            f"vs bf16-inductor b{batches[0]}", "token match"])
    rows = [head]
    for r in results:
        if r["status"] != "ok":
            rows.append([r["scheme"], r["status"] + ": " + r.get("error", "")[:100]])
            continue
        mem = (f"{r['peak_mem_gib']:.1f}/{r['steady_mem_gib']:.1f}" if "peak_mem_gib" in r else "-")
        sp = r.get("speedup_vs_bf16_inductor", {}).get(str(batches[0]))
        rows.append([r["scheme"], f"{r['compile_s']:.1f}"]
                    + [f"{r['decode_tok_s'][str(b)]:.1f}" if r["decode_tok_s"].get(str(b)) else "-" for b in batches]
                    + [f"{r['prefill_tok_s']:.0f}" if "prefill_tok_s" in r else "-", mem,
                       f"{sp:.2f}x" if sp else "-", r.get("token_match", {}).get("text", "-")])
    widths = [max(len(row[i]) for row in rows if i < len(row) and len(row) == len(head)) for i in range(len(head))]
    lines = []
    for row in rows:
        if len(row) == len(head):
            lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
        else:
            lines.append(" | ".join(row))
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (logged) where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401  (plt.matplotlib.ticker below)
    except ImportError:
        log("matplotlib is not installed: no plot")
        return None
    return plt


def plot(results: list[dict], batches: list[int], path: Path, title: str) -> None:
    plt = _pyplot()
    if plt is None:
        return
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return
    # Speedup over bf16-inductor on linear axes from 0 (bars on a log axis exaggerate small
    # differences); tokens/s are written on the bars. Without that baseline: tokens/s.
    base = next((r for r in ok if r["scheme"] == "bf16-inductor"), None)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(ok)

    def rel(value, ref):
        return value / ref if base is not None and value and ref else (value if base is None else 0)

    for i, r in enumerate(ok):
        tok = [r["decode_tok_s"].get(str(b)) or 0 for b in batches]
        vals = [rel(t, base["decode_tok_s"].get(str(b)) if base else None) for t, b in zip(tok, batches)]
        bars = axes[0].bar([j + i * width for j in range(len(batches))], vals, width, label=r["scheme"])
        for bar, t in zip(bars, tok):
            if t:
                axes[0].annotate(f"{t:,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                 ha="center", va="bottom", fontsize=7)
    axes[0].set_xticks([j + width * (len(ok) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    axes[0].set_ylabel("decode speedup over bf16-inductor (tokens/s on bars)" if base else "decode tokens/s")
    if base:
        axes[0].axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    axes[0].legend(fontsize=8)
    pre = [r.get("prefill_tok_s", 0) or 0 for r in ok]
    base_pre = base.get("prefill_tok_s") if base else None
    if not any(pre):
        axes[1].axis("off")
        axes[1].text(0.5, 0.5, "prefill not measured", ha="center", va="center", transform=axes[1].transAxes)
        pre = []
    if pre:
        bars = axes[1].bar(range(len(ok)), [rel(v, base_pre) for v in pre], color=[f"C{i}" for i in range(len(ok))])
        for bar, v in zip(bars, pre):
            if v:
                axes[1].annotate(f"{v:,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                 ha="center", va="bottom", fontsize=7)
        axes[1].set_xticks(range(len(ok)), [r["scheme"] for r in ok], rotation=45, ha="right", fontsize=8)
        axes[1].set_ylabel("prefill speedup (tokens/s on bars)" if base_pre else "prefill tokens/s (batch 1)")
        if base_pre:
            axes[1].axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_forced(results: list[dict], path: Path, title: str) -> bool:
    """The teacher-forced check as a picture: per scheme, the reference's top-2 logit gap at every
    step (ulps, symmetric log axis), red where the scheme's argmax disagreed. Disagreements only
    at the lowest bars are rounding at near-ties; a red bar well above the rest would be a wrong
    result. Returns whether a plot was written (False: no forced check in `results`)."""
    rows = [r for r in results if r.get("status") == "ok" and "disagree_steps" in r.get("token_match_forced", {})]
    if not rows:
        return False
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.7 * len(rows) + 0.8), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        f = r["token_match_forced"]
        gaps = f["gap_ulps_every_step"]
        n = len(gaps)
        disagree = set(f["disagree_steps"])
        ax.bar(range(n), gaps, color=["tab:red" if i in disagree else "tab:grey" for i in range(n)])
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylabel("ulps", fontsize=8)
        label = f"{r['scheme']}: forced {f['agree']}/{f['checked']}"
        if f.get("logit_sqnr_db"):
            finite = [d for d in f["logit_sqnr_db"] if d is not None]
            label += f", logits vs ref min {min(finite):.1f} dB" if finite else ", logits identical"
        if f.get("quantization_sqnr_db_step0") is not None:
            label += f" (quantization itself {f['quantization_sqnr_db_step0']:.1f} dB)"
        ax.set_title(label, fontsize=9, loc="left")
    axes[-1, 0].xaxis.set_major_locator(plt.matplotlib.ticker.MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("decode step (0: the prompt's prefill); red: the scheme's argmax differs from the reference's")
    fig.suptitle(title + "\nreference's top-1 minus top-2 logit, in ulps of the model dtype", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schemes", default=",".join(ALL_SCHEMES),
                   help=f"comma list from {', '.join(ALL_SCHEMES)}, {FOLD}, {GQA}; an fxquant scheme + '{EMBED}' "
                        f"compiles with embed_kernels=True, + '{NOFOLD}' with fold_gqa=False, + '{SDPA_FOLD}' "
                        f"with gqa_kernel=False")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32, or 2 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny float32 model (hidden 64, vocab 256) for tests")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per decode run")
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    p.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the prefill measurement (0: skip)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode")
    p.add_argument("--dynamic", default="none", choices=("none", "true", "false"),
                   help="torch.compile dynamic= (none: Dynamo's automatic dynamic shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/llm", help="folder for llm.json and llm.png")
    args = p.parse_args(argv)
    args.schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in args.schemes if not known_scheme(s)]
    if unknown:
        p.error(f"unknown scheme(s) {unknown}; choose from {', '.join(ALL_SCHEMES)}, {FOLD}, {GQA}, or an fxquant "
                f"scheme with {' / '.join(FLAGS)}")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dynamic = {"none": None, "true": True, "false": False}[args.dynamic]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.new_tokens < 1 or args.prompt < 1 or args.repeats < 1 or min(args.batches) < 1:
        p.error("--prompt, --new-tokens, --repeats and --batches must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = llama_config(args.tiny, args.layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # More graphs than Dynamo's default limit of 8 is fine here; running eager past it silently is not.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.fail_on_recompile_limit_hit = True

    gen = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode():  # like the decode steps' tokens: a differing dispatch key set recompiles
        prompts = torch.randint(cfg.vocab_size, (max(args.batches), args.prompt), generator=gen).to(device)
        long_prompt = (torch.randint(cfg.vocab_size, (1, args.prefill), generator=gen).to(device)
                       if args.prefill else None)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:],
            "args": {k: v for k, v in vars(args).items()}, "torch": torch.__version__,
            "transformers": transformers.__version__, "fxquant": fxquant.__version__,
            "python": platform.python_version(), "dtype": str(dtype),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else f"CPU ({os.cpu_count()} threads)"),
            "model": {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                   "num_attention_heads", "num_key_value_heads", "vocab_size")}}
    log(f"llm benchmark: {meta['model']} {dtype} on {meta['device_name']}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; schemes {args.schemes}")

    results: list[dict] = []
    for name in args.schemes:
        t0 = time.perf_counter()
        try:
            res = run_scheme(name, args, cfg, dtype, prompts, long_prompt)
        except Unavailable as exc:
            res = {"scheme": name, "status": "unavailable", "error": str(exc)}
        except Exception as exc:  # one scheme failing must not stop the others
            res = {"scheme": name, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-4000:]}
        res["scheme_s"] = time.perf_counter() - t0
        if res["status"] != "ok":
            log(f"[{name}] {res['status']}: {res['error']}\n{res.get('traceback', '')[-1500:]}")
        free(device)
        results.append(res)
        add_speedups(results)
        write_json(out / "llm.json", meta, results)

    text = table(results, args.batches)
    log("\n" + text)
    (out / "llm_table.txt").write_text(text + "\n")
    model_desc = (f"{meta['model']['num_hidden_layers']}-layer {'tiny Llama' if args.tiny else 'Llama-3-8B shapes'}, "
                  f"{dtype}, {meta['device_name']}")
    plot(results, args.batches, out / "llm.png",
         f"{model_desc}, prompt {args.prompt} + {args.new_tokens} new tokens, mode={args.mode}")
    plot_forced(results, out / "llm_forced.png", f"{model_desc}: teacher-forced check, batch 1")
    log(f"wrote {out / 'llm.json'}")
    return results


if __name__ == "__main__":
    main()
