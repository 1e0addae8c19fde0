"""Launchers for the fxquant ops on CUDA: per-M kernel choice at run time, configs, autotune cache.

Every call picks its kernel from M (a Python int at run time), so one compiled graph serves
decode and prefill with no recompiles: M <= 16 may take the GEMV (Triton), or for int8/int4
weight-only the CUDA C++ kernels of lowering/cuda/ (kind "cxx"); anything may take the tensor-core GEMM
(optionally split-K), weight-only schemes may take dequantize + cuBLAS, fp8 dynamic schemes torch._scaled_mm,
int8 dynamic torch._int_mm (kind "scaled_mm"); on Hopper, int8 / int4 weight-only and int8 dynamic may take
the CUTLASS GEMMs of lowering/cuda/csrc_cutlass (kind "cutlass").
Config lookup order: on-disk autotune cache, shipped table (exact shape, then per M-bucket),
heuristic default.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from ... import numerics as nq
from ..cache import cache_root
from . import common as C
from .act_quant import quantize_activations
from .gemm import REDUCE_FIXUP, REDUCE_NONE, dequant_kernel, gemm_kernel, scale_epilogue_kernel
from .gemv import gemv_kernel

WEIGHT_ONLY = ("int8_wo", "int4_wo", "int4_mma", "fp8_wo")
INT4 = ("int4_wo", "int4_mma")  # int4_mma: the MMA-fragment layout (Int4WeightOnly(layout="mma"))
DYNAMIC = ("int8_dyn", "fp8_dyn_row", "fp8_dyn_tensor")
SCHEMES = WEIGHT_ONLY + DYNAMIC
_FP8 = ("fp8_wo", "fp8_dyn_row", "fp8_dyn_tensor")
_WKIND = {"int8_wo": C.WK_INT8, "int4_wo": C.WK_INT4, "int4_mma": C.WK_INT4_MMA, "fp8_wo": C.WK_FP8,
          "int8_dyn": C.WK_INT8_MMA, "fp8_dyn_row": C.WK_FP8_MMA, "fp8_dyn_tensor": C.WK_FP8_MMA}
_GEMV_WKIND = {"int8_dyn": C.WK_INT8, "fp8_dyn_row": C.WK_FP8, "fp8_dyn_tensor": C.WK_FP8}
GEMV_MAX_M = 16
NO_GEMV = ("int4_mma",)  # the GEMV reads row-major bytes only
CXX_SCHEMES = ("int8_wo", "int4_wo", "int4_mma") + DYNAMIC  # schemes with CUDA C++ kernels (kind "cxx")
# The C++ kernels' M range (int4: its tensor-core kernel; dynamic: the 8-bit MMA kernel, which
# quantizes x itself up to CXX_QUANT_MAX_M and beyond that takes x quantized by our Triton kernel).
CXX_MAX_M = {"int8_wo": 16, "int4_wo": 32, "int4_mma": 32, "int8_dyn": 32, "fp8_dyn_row": 32, "fp8_dyn_tensor": 32}
# Plain ops: the kernel quantizes x itself up to here (its own limit: kMaxQuantM = 4). Measured on
# the H100 (BENCHMARKS.md S12): at M = 1 that beats our Triton quantization + the kernel on x
# quantized beforehand; at M = 2 it loses, except with a per-tensor scale (two Triton passes).
CXX_QUANT_MAX_M = {"int8_dyn": 1, "fp8_dyn_row": 1, "fp8_dyn_tensor": 2}


def _cxx_quant_max_m(scheme: str) -> int:
    """CXX_QUANT_MAX_M[scheme], or FXQUANT_CXX_QUANT_MAX_M (0..4; experiments, read at every call)."""
    v = os.environ.get("FXQUANT_CXX_QUANT_MAX_M", "")
    return int(v) if v.isdigit() and int(v) <= 4 else CXX_QUANT_MAX_M[scheme]
# Kinds that run only where a condition holds (cxx_fits / scaled_mm_fits); a table entry of one
# carries the best Triton config beside it as "fallback".
CONDITIONAL_KINDS = ("cxx", "scaled_mm", "cutlass")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class KernelConfig:
    """kind: "gemv" | "gemm" | "deq" (dequantize to x's dtype, then cuBLAS; weight-only only) |
    "scaled_mm" (the vendor GEMM of a dynamic scheme: torch._scaled_mm, cuBLASLt / CUTLASS, for fp8;
    torch._int_mm, cuBLAS, plus a Triton pass for the scales, for int8 at M > 16) |
    "cxx" (the CUDA C++ kernels of lowering/cuda/, CXX_SCHEMES at M <= CXX_MAX_M only; a table entry of
    this kind carries the best Triton config as "fallback", for where the library is missing) |
    "deqgemm" (weight-only: our dequantize kernel, then our GEMM on that plain weight; all Triton,
    so the triton_op path can use it at large M where the weight-converting GEMM is slow) |
    "cutlass" (int4 / int8 / fp8 weight-only and int8 dynamic on Hopper: the CUTLASS wgmma GEMMs of
    lowering/cuda/csrc_cutlass, tile bn x bm, split_k 0 = stream-K, warps 4 = ping-pong; also carries
    a "fallback").
    gemv uses bn/bk/warps; gemm all fields (split_k 0 = pick from the grid size; tma: read x and
    the weight through Hopper TMA descriptors where the tensors allow it); deq bn/bk/warps;
    deqgemm the GEMM's bm/bn/bk/warps/stages/group_m (no split-K, no TMA);
    cxx and scaled_mm none."""
    kind: str
    bn: int
    bk: int
    warps: int = 4
    bm: int = 16
    stages: int = 3
    split_k: int = 1
    swap: bool = False
    group_m: int = 8
    tma: bool = False
    cluster: int = 1  # kind "cutlass", int8 dynamic: CTAs per cluster along M (2: the weight tile is multicast)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "KernelConfig":
        return KernelConfig(**{k: v for k, v in d.items() if k != "fallback"})


def m_bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


# --------------------------------------------------------------------------- device facts
_DEV_CACHE: dict = {}


def _device_info(device: torch.device) -> tuple[str, int, tuple[int, int]]:
    """(table key, SM count, capability); CPU tensors (the interpreter) get ("cpu", 132, (9, 0))."""
    if device.type != "cuda":
        return "cpu", 132, (9, 0)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEV_CACHE:
        p = torch.cuda.get_device_properties(idx)
        name = p.name.lower()
        key = "h200" if "h200" in name else "h100" if "h100" in name else name.replace(" ", "_")
        _DEV_CACHE[idx] = (key, p.multi_processor_count, (p.major, p.minor))
    return _DEV_CACHE[idx]


def check_fp8_supported(device: torch.device) -> None:
    cap = _device_info(device)[2]
    if cap < (8, 9):
        raise RuntimeError(f"fxquant: float8 schemes need a GPU with compute capability >= 8.9 "
                           f"(Ada/Hopper); this one is sm_{cap[0]}{cap[1]}. Use an int8 or int4 "
                           f"scheme on this GPU.")


# --------------------------------------------------------------------------- config tables
_SHIPPED_PATH = Path(__file__).with_name("configs.json")
_lock = threading.Lock()
_tables: dict[str, dict] = {}


def cache_path() -> Path:
    return cache_root() / "triton_configs.json"


def _load(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _table(which: str) -> dict:
    with _lock:
        if which not in _tables:
            _tables[which] = _load(_SHIPPED_PATH if which == "shipped" else cache_path())
        return _tables[which]


def config_key(scheme: str, dtype: torch.dtype, n: int, k: int, group: int, m: int) -> str:
    return f"{scheme}|{str(dtype).removeprefix('torch.')}|{n}x{k}|g{group}|m{m_bucket(m)}"


def bucket_key(scheme: str, group: int, m: int) -> str:
    return f"{scheme}|g{group}|m{m_bucket(m)}"


def save_tuned(device_key: str, entries: dict[str, KernelConfig]) -> Path:
    """Merge entries into the on-disk cache with an atomic replace (safe across processes)."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        data = _load(path)
        data.setdefault(device_key, {}).update({k: v.to_json() for k, v in entries.items()})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_configs_")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        _tables["cache"] = data
    return path


def default_config(scheme: str, m: int, n: int, k: int, group: int) -> KernelConfig:
    """Untuned fallback: GEMV at M == 1 (NO_GEMV schemes: the swapped GEMM), swapped split-K GEMM for
    skinny M, square tiles beyond (weight-only beyond M = 256: dequantize + cuBLAS, which allocates
    an N x K weight in x's dtype for the call)."""
    mma = scheme in DYNAMIC
    if m == 1 and scheme not in NO_GEMV:
        return KernelConfig("gemv", bn=4, bk=4096 if scheme == "int4_wo" else 2048, warps=4)
    if m <= 64:
        return KernelConfig("gemm", bm=max(16, triton.next_power_of_2(m)), bn=64, bk=128,
                            warps=4, stages=4, split_k=0, swap=True)
    if m <= 256:
        return KernelConfig("gemm", bm=64, bn=128, bk=128 if mma else 64, warps=4, stages=4, split_k=0)
    if not mma:  # weight-only, large M: dequantize + cuBLAS (the H100 table's choice at M >= 1024)
        return KernelConfig("deq", bn=64, bk=128, warps=4)
    return KernelConfig("gemm", bm=128, bn=128, bk=128, warps=8, stages=3)


def int4_mma_config(m: int, device: torch.device, allow_cxx: bool = True, allow_cutlass: bool = True) -> KernelConfig:
    """The MMA-fragment int4 layout's choice for shapes the table does not name: its C++ decode kernel
    up to M = 32, the CUTLASS GEMM on Hopper beyond (tiles as weight rows x tokens, stream-K where
    split_k is 0: 128 x 32 up to M = 32 where the C++ kernel is barred, 128 x 64 up to 64, 128 x 128
    up to 256, 128 x 256 persistent above; the tiles with the best geometric mean over the four tuned
    shapes at each M, sessions 26-27); the Triton kernels (which gather its bytes) elsewhere."""
    if allow_cxx and m <= CXX_MAX_M["int4_mma"]:
        return KernelConfig("cxx", bn=0, bk=0)
    if allow_cutlass and _device_info(device)[2] == (9, 0) and device.type == "cuda":
        bm, split_k = (32, 0) if m <= 32 else (64, 0) if m <= 64 else (128, 0) if m <= 256 else (256, 1)
        return KernelConfig("cutlass", bn=128, bk=64, bm=bm, warps=0, split_k=split_k)
    return default_config("int4_mma", max(m, 2), 0, 0, 0)


def _table_devices(device: torch.device) -> list[str]:
    """The table sections to read for device: its own, then the H100's for an H200."""
    dev = _device_info(device)[0]
    return [d for d in (dev, "h100" if dev == "h200" else None) if d]


def get_config(scheme: str, m: int, n: int, k: int, group: int, dtype: torch.dtype,
               device: torch.device, allow_cxx: bool = True, allow_scaled_mm: bool = True,
               allow_cutlass: bool = True) -> KernelConfig:
    """allow_cxx / allow_scaled_mm / allow_cutlass False: an entry of that kind gives its
    "fallback" (the best other choice the tuner saw beside it)."""
    exact = config_key(scheme, dtype, n, k, group, m)
    barred = {k for k, ok in (("cxx", allow_cxx), ("scaled_mm", allow_scaled_mm), ("cutlass", allow_cutlass))
              if not ok}

    def pick(entry: dict | None) -> dict | None:
        if entry is None or entry.get("kind") not in barred:
            return entry
        return entry.get("fallback")

    devs = _table_devices(device)
    for which in ("cache", "shipped"):
        tab = _table(which)
        for d in devs:
            if (entry := pick(tab.get(d, {}).get(exact))) is not None:
                return KernelConfig.from_json(entry)
    if scheme == "int4_mma":  # exact entries only (four tuned shapes, M >= 32): elsewhere its own rule
        return int4_mma_config(m, device, allow_cxx, allow_cutlass)
    tab = _table("shipped")
    for d in devs:
        if (entry := pick(tab.get(d, {}).get(bucket_key(scheme, group, m)))) is not None:
            return KernelConfig.from_json(entry)
    if scheme == "fp8_dyn_tensor":  # same kernels as per-row but for the activation scale
        return get_config("fp8_dyn_row", m, n, k, group, dtype, device, allow_cxx, allow_scaled_mm, allow_cutlass)
    for d in devs:  # an M-bucket the table lacks (e.g. 2048): its nearest measured neighbour
        if (entry := pick(_nearest_bucket(tab.get(d, {}), scheme, group, m))) is not None:
            return KernelConfig.from_json(entry)
    return default_config(scheme, m, n, k, group)


TRITON_ONLY = "triton|"  # key prefix: the best Triton kernel where the best overall is another kind


def triton_only_config(scheme: str, m: int, n: int, k: int, group: int, dtype: torch.dtype,
                       device: torch.device) -> KernelConfig | None:
    """The measured best Triton GEMM/GEMV (tuned with `linear.py --tune --triton-only`) for a
    point where the table's choice is not a Triton kernel, or None. Read by triton_ops.py, whose
    ops may launch only Triton kernels."""
    devs = _table_devices(device)
    keys = (TRITON_ONLY + config_key(scheme, dtype, n, k, group, m), TRITON_ONLY + bucket_key(scheme, group, m))
    for key in keys:
        for which in ("cache", "shipped"):
            for d in devs:
                if (entry := _table(which).get(d, {}).get(key)) is not None:
                    return KernelConfig.from_json(entry)
    if scheme == "fp8_dyn_tensor":
        return triton_only_config("fp8_dyn_row", m, n, k, group, dtype, device)
    return None


def _nearest_bucket(table: dict, scheme: str, group: int, m: int) -> dict | None:
    """The table's bucket entry for (scheme, group) whose M-bucket is nearest to m's (in powers of
    two; the larger one on a tie), for buckets the tuner did not measure. Never crosses the
    C++ kernels' M range (a "cxx" entry only serves M within it)."""
    mb = m_bucket(m)
    have = [b for b in M_BUCKETS if bucket_key(scheme, group, b) in table]
    if scheme in CXX_MAX_M:
        have = [b for b in have if (b <= CXX_MAX_M[scheme]) == (mb <= CXX_MAX_M[scheme])
                or table[bucket_key(scheme, group, b)].get("kind") != "cxx"]
    if not have:
        return None
    best = min(have, key=lambda b: (abs(b.bit_length() - mb.bit_length()), -b))
    return table[bucket_key(scheme, group, best)]


# --------------------------------------------------------------------------- launchers
def _fix_bk(cfg_bk: int, scheme: str, group: int, k: int, kind: str) -> int:
    bk = min(cfg_bk, max(32, triton.next_power_of_2(k)))  # no tile wider than K needs
    if scheme in INT4 and kind == "gemv":
        bk = max(bk, group)  # the GEMV's int4 tile is whole groups
    return max(bk, 32)


def _auto_split(tiles: int, k_tiles: int, sms: int) -> int:
    """Enough K-splits to give each SM ~2 tiles, never fewer than 4 K-tiles per split."""
    if tiles >= sms:
        return 1
    split = 1
    while split * 2 * tiles <= 2 * sms and k_tiles // (split * 2) >= 4:
        split *= 2
    return split


def _activations(scheme, x2, scales, pre, pdl=False):
    """(x, x scales, XS_MODE) for the kernels: dynamic schemes quantize x here, once per call,
    unless `pre` = (q, scales) quantized beforehand (linear_prequant). pdl: the kernel after the
    quantization is launched with programmatic dependent launch."""
    if scheme not in DYNAMIC:
        return x2, scales, C.SC_NONE  # scales: any valid pointer, never read
    q, xs = pre if pre is not None else quantize_activations(x2, fp8=scheme != "int8_dyn",
                                                             per_row=scheme != "fp8_dyn_tensor", pdl=pdl)
    return q, xs, C.SC_TENSOR if scheme == "fp8_dyn_tensor" else C.SC_ROW


def _weight_scale_mode(scheme, scales, n):
    return C.SC_NONE if scheme in INT4 else (C.SC_ROW if scales.numel() == n else C.SC_TENSOR)


def _pdl(scheme: str, x: torch.Tensor, pre) -> bool:
    """Programmatic dependent launch between our activation quantization and the GEMV / GEMM
    after it (it starts while the quantization runs): Hopper+, compiled (not interpreted)
    kernels, FXQUANT_PDL not 0."""
    return (scheme in DYNAMIC and pre is None and os.environ.get("FXQUANT_PDL", "1") != "0" and _pdl_capable(x))


def _pdl_capable(x: torch.Tensor) -> bool:
    """Programmatic dependent launch can run here: compiled kernels on a CUDA (not ROCm) Hopper+ GPU."""
    return x.is_cuda and not C.INTERPRETED and torch.version.hip is None and _device_info(x.device)[2] >= (9, 0)


def _cxx_pdl(x: torch.Tensor) -> bool:
    """The C++ prequant kernel after our own activation quantization is launched with programmatic
    dependent launch: it starts, and fetches its first weights, while that quantization still runs
    (which therefore triggers its dependents). FXQUANT_PDL=0 turns it off with the Triton PDL. Measured
    on an H100 at M = 16 (BENCHMARKS.md S17): w8a8 1.45 -> 1.66x over bf16 at 4096x4096, fp8 row
    1.38 -> 1.57x; 3-14 % faster on three of four Llama shapes at M = 16 and 32, within the
    call-to-call spread (+-4 %) on 28672x4096."""
    return os.environ.get("FXQUANT_PDL", "1") != "0" and _pdl_capable(x)


def _run_gemv(scheme, x2, qweight, scales, bias, group, cfg, out, pre=None, *, wrap=C.eager,
              active=1, block_m=None):
    """wrap / active / block_m: for triton_ops.py, which traces this with a symbolic M: the kernel
    wrapper (torch.library.wrap_triton), a 0/1 factor on the grid (0: the launch does nothing) and
    BLOCK_M fixed for its M range."""
    M, K = x2.shape
    N = qweight.shape[0]
    wo = scheme in WEIGHT_ONLY
    pdl = wrap is C.eager and _pdl(scheme, x2, pre)
    x2, xs, xs_mode = _activations(scheme, x2, scales, pre, pdl)
    ws_mode = _weight_scale_mode(scheme, scales, N)
    bk = _fix_bk(cfg.bk, scheme, group, K, "gemv")
    wrap(gemv_kernel)[(triton.cdiv(N, cfg.bn) * active,)](
        x2, xs, qweight, scales, bias if bias is not None else scales, out, M, N, K,
        x2.stride(0), x2.stride(1), out.stride(0),
        WKIND=_WKIND[scheme] if wo else _GEMV_WKIND[scheme], XS_MODE=xs_mode, WS_MODE=ws_mode,
        GROUP=group, HAS_BIAS=bias is not None, XK1=x2.stride(1) == 1,
        BLOCK_M=block_m or max(1, triton.next_power_of_2(M)), BLOCK_N=cfg.bn, BLOCK_K=bk, PDL=pdl,
        num_warps=cfg.warps, **({"launch_pdl": True} if pdl else {}))
    return out


def _run_gemm(scheme, x2, qweight, scales, bias, group, cfg, out, pre=None, *, wrap=C.eager,
              active=1, splitk_buffers=None):
    """wrap / active: as for _run_gemv (there cfg.split_k is set and cfg.tma off: no Python
    decision here may depend on M). splitk_buffers: (workspace, zeroed counters) given by the
    caller (triton_ops.py shares one pair between its M ranges), large enough for this launch."""
    M, K = x2.shape
    N = qweight.shape[0]
    bk = _fix_bk(cfg.bk, scheme, group, K, "gemm")
    tiles = triton.cdiv(M, cfg.bm) * triton.cdiv(N, cfg.bn)
    k_tiles = triton.cdiv(K, bk)
    split = cfg.split_k or _auto_split(tiles, k_tiles, _device_info(x2.device)[1])
    split = max(1, min(split, k_tiles))
    pdl = split == 1 and wrap is C.eager and _pdl(scheme, x2, pre)  # split-K zeroes its counters in between
    x2, xs, xs_mode = _activations(scheme, x2, scales, pre, pdl)
    ws_mode = _weight_scale_mode(scheme, scales, N)
    descs = _tma_descriptors(scheme, x2, qweight, cfg, bk)
    reduce, ws, cnt = REDUCE_NONE, out, out
    if split > 1:
        # One arrival counter per output tile, zeroed per call: a buffer kept across calls would
        # be shared between streams, and CUDA-graph trees would count it as a leaked allocation.
        reduce = REDUCE_FIXUP
        ws, cnt = splitk_buffers or splitk_buffers_for(M, N, [(cfg, split, 1)], out.device)
    wrap(gemm_kernel)[(tiles * active, split)](
        x2, qweight, scales, xs, bias if bias is not None else scales, out, ws, cnt,
        *(descs or (None, None)), M, N, K,
        x2.stride(0), x2.stride(1), out.stride(0), split,
        WKIND=_WKIND[scheme], XS_MODE=xs_mode, WS_MODE=ws_mode, GROUP=group,
        HAS_BIAS=bias is not None, REDUCE=reduce, SWAP=cfg.swap,
        IEEE=out.dtype == torch.float32 and scheme in WEIGHT_ONLY, XK1=x2.stride(1) == 1,
        BM=cfg.bm, BN=cfg.bn, BK=bk, GROUP_M=cfg.group_m,
        FP8_ACC=_fp8_acc(bk) if _WKIND[scheme] == C.WK_FP8_MMA else 0, PDL=pdl, TMA=descs is not None,
        num_warps=cfg.warps, num_stages=cfg.stages, **({"launch_pdl": True} if pdl else {}))
    return out


def splitk_buffers_for(M, N: int, launches, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 workspace, zeroed int32 arrival counters) for split-K launches [(cfg, split, 0/1
    factor)] of which at most one has a factor of 1: sized for that one (sums of size x factor),
    flat and with two spare elements, so that a symbolic M needs no guard to allocate them."""
    ws = sum(split * M * N * f for _, split, f in launches) + 2
    cnt = sum(triton.cdiv(M, cfg.bm) * triton.cdiv(N, cfg.bn) * f for cfg, _, f in launches) + 2
    return (torch.empty(ws, device=device, dtype=torch.float32),  # no fill needed
            torch.zeros(cnt, device=device, dtype=torch.int32))


def _tma_descriptors(scheme, x2, qweight, cfg, bk):
    """(x, weight) TMA descriptors for a cfg.tma GEMM, or None where TMA cannot run: not Hopper
    or later (the interpreter counts as Hopper), the int4 MMA-fragment layout (gathered bytes), ROCm,
    fp32 activations, or a stride or address the copy engine cannot take (16-byte multiples). x is
    2-D here and qweight contiguous."""
    if (not cfg.tma or scheme == "int4_mma" or torch.version.hip is not None or _device_info(x2.device)[2] < (9, 0)
            or x2.element_size() > 2):  # fp32 x: tiles tuned on bf16 overflow shared memory via TMA
        return None
    if (x2.stride(1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16
            or (qweight.shape[1] * qweight.element_size()) % 16 or qweight.data_ptr() % 16):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor
    wbk = bk // 2 if scheme == "int4_wo" else bk  # two int4 per byte
    return (TensorDescriptor(x2, list(x2.shape), list(x2.stride()), [cfg.bm, bk]),
            TensorDescriptor(qweight, list(qweight.shape), list(qweight.stride()), [cfg.bn, wbk]))


_fp8_acc_warned = False


def _fp8_acc(bk: int) -> int:
    """Elements of K the fp8 MMA may accumulate before promotion to fp32 (0: Triton's default,
    which on sm_90 never promotes). FXQUANT_FP8_ACC = "tile" (BK, the default), "fast" or "0"
    (Triton's default), or a count (clamped to 32..BK); anything else warns once and means tile."""
    global _fp8_acc_warned
    v = os.environ.get("FXQUANT_FP8_ACC", "tile").strip().lower()
    if v in ("fast", "0"):
        return 0
    if v.isdigit():
        return max(32, min(int(v), bk))
    if v not in ("tile", "") and not _fp8_acc_warned:
        _fp8_acc_warned = True
        import warnings
        warnings.warn(f"fxquant: FXQUANT_FP8_ACC={v!r} is not tile, fast or a number; using tile",
                      RuntimeWarning, stacklevel=3)
    return bk


DEQ_CHUNK_ELEMS = 1 << 27  # larger weights are dequantized in row chunks (256 MiB of bf16 each)


def _deq_rows(N: int, K: int) -> int:
    """Weight rows per dequantize + cuBLAS chunk: all of them unless the weight has more than
    DEQ_CHUNK_ELEMS elements. FXQUANT_DEQ_ROWS (a multiple of 64; experiments, read at every call)
    sets a smaller chunk; it never lifts the DEQ_CHUNK_ELEMS bound."""
    rows = N if N * K <= DEQ_CHUNK_ELEMS else max(64, DEQ_CHUNK_ELEMS // K // 64 * 64)
    v = os.environ.get("FXQUANT_DEQ_ROWS", "")
    if v.isdigit() and int(v) > 0 and int(v) % 64 == 0:
        return min(rows, int(v))
    return rows


def _deq_tile(cfg: KernelConfig) -> tuple[int, int, int]:
    """The dequantize kernel's (bn, bk, warps): cfg's, or FXQUANT_DEQ_TILE="bn,bk,warps" (experiments;
    powers of two, bn and bk 16-256, warps 1-16; anything else is ignored)."""
    v = os.environ.get("FXQUANT_DEQ_TILE", "").replace(" ", "").split(",")
    if len(v) == 3 and all(t.isdigit() and int(t) > 0 and int(t) & (int(t) - 1) == 0 for t in v):
        bn, bk, warps = (int(t) for t in v)
        if 16 <= bn <= 256 and 16 <= bk <= 256 and warps <= 16:
            return bn, bk, warps
    return cfg.bn, cfg.bk, cfg.warps


def _run_deq(scheme, x2, qweight, scales, bias, group, cfg, out):
    """Dequantize to x's dtype, then cuBLAS, in row chunks of _deq_rows. A weight of more than
    DEQ_CHUNK_ELEMS elements (an LLM's lm_head: 525M) always goes in chunks, so the call's
    temporary stays bounded rather than a full-size copy of the weight (1 GiB for that lm_head in
    bf16); one scratch buffer serves every chunk."""
    N, K = qweight.shape[0], x2.shape[1]
    rows = _deq_rows(N, K)
    bn, bk, warps = _deq_tile(cfg)
    bias = None if bias is None else bias.reshape(-1).to(out.dtype)  # [N] (or [1, N]): sliced per chunk
    scratch = torch.empty((rows, K), device=x2.device, dtype=x2.dtype)
    for n0 in range(0, N, rows):  # one pass unless chunked
        n1 = min(N, n0 + rows)
        w = _dequantize_into(scheme, qweight, scales, group, scratch, bn, bk, warps, n0=n0, rows=n1 - n0)
        w = w[:n1 - n0]
        if bias is None:
            torch.mm(x2, w.t(), out=out[:, n0:n1])
        else:  # the bias in the GEMM's epilogue, not a pass over out
            torch.addmm(bias[n0:n1], x2, w.t(), out=out[:, n0:n1])


def _run_deqgemm(scheme, x2, qweight, scales, bias, group, cfg, out, *, wrap=C.eager, active=1):
    """Kind "deqgemm": the packed weight dequantized into a scratch [N, K] in x's dtype, then the
    GEMM on it as a plain operand (the bf16 MMA pipeline, which converting in the main loop loses).
    active: triton_ops' 0/1 range factor, on both grids and the scratch size (flat: no guard)."""
    M, K = x2.shape
    N = qweight.shape[0]
    w = torch.empty(N * K * active + 2, device=x2.device, dtype=x2.dtype)  # >= 2: no size guard
    _dequantize_into(scheme, qweight, scales, group, w, wrap=wrap, active=active)
    bk = min(cfg.bk, max(32, triton.next_power_of_2(K)))
    wrap(gemm_kernel)[(triton.cdiv(M, cfg.bm) * triton.cdiv(N, cfg.bn) * active, 1)](
        x2, w, w, w, bias if bias is not None else w, out, out, out, None, None, M, N, K,
        x2.stride(0), x2.stride(1), out.stride(0), 1,
        WKIND=C.WK_PLAIN, XS_MODE=C.SC_NONE, WS_MODE=C.SC_NONE, GROUP=0, HAS_BIAS=bias is not None,
        REDUCE=REDUCE_NONE, SWAP=False, IEEE=out.dtype == torch.float32, XK1=x2.stride(1) == 1,
        BM=cfg.bm, BN=cfg.bn, BK=bk, GROUP_M=cfg.group_m, FP8_ACC=0, PDL=False, TMA=False,
        num_warps=cfg.warps, num_stages=cfg.stages)
    return out


def scaled_mm_fits(scheme: str, N: int, K: int, out_dtype: torch.dtype, w_scale_numel: int | None = None,
                   M: int | None = None) -> bool:
    """Whether the vendor GEMM of kind "scaled_mm" takes these inputs. int8 dynamic
    (torch._int_mm): M > 16 (where given), N and K multiples of 8, a per-row weight scale. fp8 dynamic
    (torch._scaled_mm): both GEMM dims of the weight multiples of 16 (its leading-dimension
    rule); a bf16 output where any scale is per row (the rowwise kernel's one output type), bf16
    or fp16 where both are per tensor. w_scale_numel: the weight's scale count (default: the
    scheme's own granularity)."""
    if scheme == "int8_dyn":  # the scale epilogue reads one weight scale per row
        return ((M is None or M > 16) and N % 8 == 0 and K % 8 == 0
                and w_scale_numel in (None, N))
    if scheme not in ("fp8_dyn_row", "fp8_dyn_tensor") or N % 16 or K % 16:
        return False
    rowwise = scheme == "fp8_dyn_row" or w_scale_numel not in (None, 1)
    return out_dtype == torch.bfloat16 or (not rowwise and out_dtype == torch.float16)


def _run_scaled_mm(scheme, x2, qweight, scales, bias, out, pre=None):
    """int8 dynamic through torch._int_mm, fp8 dynamic through torch._scaled_mm; x's per-token (or
    per-tensor) quantization as for the Triton GEMM. The scales' arithmetic and the bias land in its epilogue. A per-tensor scale
    beside a per-row one is broadcast (the rowwise kernel wants both per row)."""
    q, xs, _ = _activations(scheme, x2, scales, pre)
    if not q.is_contiguous():
        q = q.contiguous()
    M, N = q.shape[0], qweight.shape[0]
    if scheme == "int8_dyn":  # cuBLAS int8 GEMM (int32 out), then one Triton pass for the scales
        acc = torch._int_mm(q, qweight.t())
        BM, BN = 32, 128
        scale_epilogue_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            acc, xs, scales, bias if bias is not None else scales, out, M, N, HAS_BIAS=bias is not None,
            BM=BM, BN=BN, num_warps=4)
        return out
    if scheme == "fp8_dyn_row" or scales.numel() != 1:
        sa = xs.float().reshape(-1, 1).expand(M, 1).contiguous()
        sb = scales.float().reshape(1, -1).expand(1, N).contiguous()
    else:
        sa, sb = xs.float().reshape(()), scales.float().reshape(())
    b = None if bias is None else bias.to(out.dtype)
    torch._scaled_mm(q, qweight.t(), sa, sb, bias=b, out_dtype=out.dtype, out=out)
    return out


def _run_cutlass_int8_dynamic(x2, qweight, scales, bias, cfg, pre=None):
    """int8 dynamic through the CUTLASS int8 GEMM (scales and bias in its epilogue); x quantized
    here per token unless `pre` = (xq, scales) was quantized beforehand."""
    from ..cuda import cutlass
    q, xs, _ = _activations("int8_dyn", x2, scales, pre)
    return cutlass.int8_dynamic_linear(q, xs, qweight, scales, bias, cfg.bn, cfg.bm, cfg.split_k, cfg.warps,
                                       cfg.cluster)


def _run_cxx_dynamic(scheme, x, x2, qweight, scales, bias):
    """A dynamic scheme on the C++ 8-bit MMA kernel: up to CXX_QUANT_MAX_M[scheme] tokens it quantizes x
    itself (one launch); beyond, x is quantized per token by our Triton kernel first."""
    fp8 = scheme != "int8_dyn"
    if x2.shape[0] <= _cxx_quant_max_m(scheme):
        if fp8:
            return torch.ops.fxquant.cxx_float8_dynamic_linear(x, qweight, scales, bias, scheme == "fp8_dyn_row")
        return torch.ops.fxquant.cxx_int8_dynamic_linear(x, qweight, scales, bias)
    pdl = _cxx_pdl(x2)
    q, xs = quantize_activations(x2, fp8=fp8, per_row=scheme != "fp8_dyn_tensor", pdl=pdl)
    xs = xs.reshape(-1, 1).expand(x2.shape[0], 1)  # a per-tensor scale, once per token
    op = (torch.ops.fxquant.cxx_float8_dynamic_linear_prequant if fp8
          else torch.ops.fxquant.cxx_int8_dynamic_linear_prequant)
    # pdl: the kernel reads the weight before it waits. Safe because the quantization kernel right
    # before it is launched plainly (it only triggers its dependents), so everything earlier on the
    # stream, a _kernel_ready copy of the weight included, has finished when this kernel starts.
    return op(q, xs, qweight, scales, bias, x.dtype, pdl).reshape(*x.shape[:-1], qweight.shape[0])


def _dequantize_into(scheme, qweight, scales, group, w, bn=64, bk=128, warps=4, *, n0=0, rows=None,
                     wrap=C.eager, active=1):
    """The dequantize kernel writing weight rows n0 .. n0 + rows (default: all) as [rows, K]
    row-major into w (any shape with room for it); wrap / active as for _run_gemv."""
    N = qweight.shape[0]
    rows = N - n0 if rows is None else rows
    K = qweight.shape[1] * (2 if scheme in INT4 else 1)
    bk = _fix_bk(bk, scheme, group, K, "deq")
    wrap(dequant_kernel)[(triton.cdiv(rows, bn) * active, triton.cdiv(K, bk))](
        qweight, scales, w, N, K, n0, rows, WKIND=_WKIND[scheme],
        WS_MODE=_weight_scale_mode(scheme, scales, N), GROUP=group, BN=bn, BK=bk, num_warps=warps)
    return w


def _kernel_ready(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed weight contiguous and 16-byte aligned, its scales contiguous (the kernels' layout)."""
    if not qweight.is_contiguous() or qweight.data_ptr() % 16:
        qweight = qweight.contiguous() if not qweight.is_contiguous() else qweight.clone()
    return qweight, scales if scales.is_contiguous() else scales.contiguous()


def _known_bad(scheme: str, cfg: KernelConfig) -> bool:
    """Weight-only swapped tiles that Triton 3.6 got wrong on the H100 (session 7): a 256-wide x
    tile (wrong results, relative error 0.15 to NaN: probe_midm.py), and two warpgroups (the int4
    128x128 one raced: different outputs on identical calls, some inf: stress_configs.py; its TMA
    twin passed but runs as that kernel wherever TMA is unavailable)."""
    return cfg.kind == "gemm" and scheme in WEIGHT_ONLY and cfg.swap and (cfg.bm > 128 or cfg.warps >= 8)


def _runnable(cfg: KernelConfig, scheme: str, M: int, N: int, K: int, group: int,
              scaled_mm_ok: bool) -> KernelConfig:
    """cfg if it can run here (a gemv only up to GEMV_MAX_M, deq only for weight-only schemes,
    scaled_mm where scaled_mm_ok; "cxx" is resolved before this) and is not a known-bad tile
    family, else the default gemm (deq for weight-only)."""
    if _known_bad(scheme, cfg):  # an autotune cache written before they were dropped may name them
        return default_config(scheme, max(M, 17), N, K, group)
    if (cfg.kind == "gemm" or (cfg.kind == "gemv" and M <= GEMV_MAX_M and scheme not in NO_GEMV)
            or (cfg.kind in ("deq", "deqgemm") and scheme in WEIGHT_ONLY)
            or (cfg.kind == "scaled_mm" and scaled_mm_ok)):
        return cfg
    return default_config(scheme, max(M, 17), N, K, group)


def linear(scheme: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
           bias: torch.Tensor | None, group: int = 0, cfg: KernelConfig | None = None) -> torch.Tensor:
    """out[..., N] = the fxquant op `scheme` applied to x[..., K]; cfg overrides the lookup."""
    K = x.shape[-1]
    N = qweight.shape[0]
    x2 = x.reshape(-1, K)  # a view where possible: the kernels take strides
    M = x2.shape[0]
    if M == 0:
        return x.new_empty((*x.shape[:-1], N))
    if scheme in _FP8:
        check_fp8_supported(x.device)
    qweight, scales = _kernel_ready(qweight, scales)
    smm = scaled_mm_fits(scheme, N, K, x.dtype, scales.numel(), M)
    if cfg is None:
        cfg = get_config(scheme, M, N, K, group, x.dtype, x.device, allow_scaled_mm=smm)
        if _autotune_now(x):
            cfg = _maybe_autotune(scheme, x2, qweight, scales, bias, group, cfg)
    if cfg.kind == "cutlass":
        if _cutlass_fits(scheme, x, qweight, scales, bias, group, cfg) and _cutlass_ready():
            from ..cuda import cutlass
            if scheme == "int8_dyn":
                return _run_cutlass_int8_dynamic(x2, qweight, scales, bias, cfg).reshape(*x.shape[:-1], N)
            return cutlass.linear(scheme, x, qweight, scales, bias, group, cfg.bn, cfg.bm, cfg.split_k,
                                  cfg.warps)
        cfg = get_config(scheme, M, N, K, group, x.dtype, x.device, allow_scaled_mm=smm, allow_cutlass=False)
    if cfg.kind == "cxx":
        if cxx_fits(scheme, x, qweight, scales, bias, group) and _cxx_ready():
            if scheme == "int4_wo":
                return torch.ops.fxquant.cxx_int4_weight_only_linear(x, qweight, scales, bias, group)
            if scheme == "int4_mma":
                return torch.ops.fxquant.cxx_int4_mma_weight_only_linear(x, qweight, scales, bias, group)
            if scheme == "int8_wo":
                return torch.ops.fxquant.cxx_int8_weight_only_linear(x, qweight, scales, bias)
            return _run_cxx_dynamic(scheme, x, x2, qweight, scales, bias)
        cfg = get_config(scheme, M, N, K, group, x.dtype, x.device, allow_cxx=False, allow_scaled_mm=smm,
                         allow_cutlass=False)  # the best of the others
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)  # after the cxx branch: it allocates its own
    cfg = _runnable(cfg, scheme, M, N, K, group, smm)
    if cfg.kind == "gemv":
        _run_gemv(scheme, x2, qweight, scales, bias, group, cfg, out)
    elif cfg.kind == "deq":
        _run_deq(scheme, x2, qweight, scales, bias, group, cfg, out)
    elif cfg.kind == "deqgemm":
        _run_deqgemm(scheme, x2, qweight, scales, bias, group, cfg, out)
    elif cfg.kind == "scaled_mm":
        _run_scaled_mm(scheme, x2, qweight, scales, bias, out)
    else:
        _run_gemm(scheme, x2, qweight, scales, bias, group, cfg, out)
    return out.reshape(*x.shape[:-1], N)


def linear_prequant(scheme: str, xq: torch.Tensor, x_scales: torch.Tensor, qweight: torch.Tensor,
                    scales: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """A per-row dynamic scheme ("int8_dyn", "fp8_dyn_row") on activations quantized beforehand:
    xq [..., K] int8/e4m3, x_scales [..., 1] float32. Same kernels and configs as `linear` (a "cxx"
    entry: the C++ 8-bit MMA kernel's prequant op)."""
    assert scheme in ("int8_dyn", "fp8_dyn_row"), scheme
    K = xq.shape[-1]
    N = qweight.shape[0]
    xq2 = xq.reshape(-1, K)
    M = xq2.shape[0]
    if M == 0:
        return torch.empty((*xq.shape[:-1], N), device=xq.device, dtype=out_dtype)
    if scheme in _FP8:
        check_fp8_supported(xq.device)
    if xq2.stride(1) != 1 or xq2.data_ptr() % 16:
        xq2 = xq2.contiguous() if xq2.stride(1) != 1 else xq2.clone()
    xs = x_scales.reshape(-1)
    xs = xs if xs.is_contiguous() else xs.contiguous()
    qweight, scales = _kernel_ready(qweight, scales)
    smm = scaled_mm_fits(scheme, N, K, out_dtype, scales.numel(), M)
    cfg = get_config(scheme, M, N, K, 0, out_dtype, xq.device, allow_scaled_mm=smm)
    if _autotune_now(xq) and not _tuned(scheme, out_dtype, N, K, 0, M, xq.device):
        # Tuned as the whole op on these activations dequantized: same kernels, same cache key.
        x_f = (xq2.float() * xs.reshape(-1, 1)).to(out_dtype)
        cfg = _maybe_autotune(scheme, x_f, qweight, scales, bias, 0, cfg)
    if cfg.kind == "cxx":
        if cxx_prequant_fits(scheme, xq2, xs, qweight, scales, bias, out_dtype) and _cxx_ready():
            op = (torch.ops.fxquant.cxx_int8_dynamic_linear_prequant if scheme == "int8_dyn"
                  else torch.ops.fxquant.cxx_float8_dynamic_linear_prequant)
            return op(xq2, xs.reshape(-1, 1), qweight, scales, bias, out_dtype).reshape(*xq.shape[:-1], N)
        cfg = get_config(scheme, M, N, K, 0, out_dtype, xq.device, allow_cxx=False, allow_scaled_mm=smm)
    if cfg.kind == "cutlass":
        if (scheme == "int8_dyn" and out_dtype == torch.bfloat16 and xs.device == xq2.device
                and _cutlass_fits(scheme, xq2, qweight, scales, bias, 0, cfg) and _cutlass_ready()):
            out = _run_cutlass_int8_dynamic(xq2, qweight, scales, bias, cfg, pre=(xq2, xs))
            return out.reshape(*xq.shape[:-1], N)
        cfg = get_config(scheme, M, N, K, 0, out_dtype, xq.device, allow_cxx=False, allow_scaled_mm=smm,
                         allow_cutlass=False)
    cfg = _runnable(cfg, scheme, M, N, K, 0, smm)
    out = torch.empty((M, N), device=xq.device, dtype=out_dtype)
    if cfg.kind == "scaled_mm":
        _run_scaled_mm(scheme, xq2, qweight, scales, bias, out, pre=(xq2, xs))
    else:
        run = _run_gemv if cfg.kind == "gemv" else _run_gemm
        run(scheme, xq2, qweight, scales, bias, 0, cfg, out, pre=(xq2, xs))
    return out.reshape(*xq.shape[:-1], N)


def cxx_fits(scheme: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None, group: int) -> bool:
    """Whether the CUDA C++ kernels cover these inputs well (else its op would take its slow
    ATen path: float32 x, scales in another dtype, K or group not multiples of 32, empty or
    >= 2^31-element weights; tensors on other devices go to Triton, which names them).
    M must be within CXX_MAX_M. int4 at M > 2 also needs the tensor-core kernel (K % 128 == 0,
    sm_80+, FXQUANT_CXX_INT4_MMA not 0): the CUDA-core GEMV loses to Triton there. Dynamic
    schemes: see _cxx_dynamic_fits."""
    K, N = x.shape[-1], qweight.shape[0]
    if not (scheme in CXX_SCHEMES and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and 0 < N * K < 2 ** 31 and all(t.device == x.device for t in (qweight, scales, bias)
                                            if t is not None)):
        return False
    m = x.numel() // max(K, 1)
    if not 1 <= m <= CXX_MAX_M[scheme]:
        return False
    if scheme in DYNAMIC:
        return _cxx_dynamic_fits(scheme, x.device, m, K, N, scales)
    if scheme == "int4_mma":  # int4_mma_layout.cu: any such weight (the layout guarantees N % 16, K % 64)
        return (scales.dtype == x.dtype and group >= 64 and group & (group - 1) == 0
                and _device_info(x.device)[2] >= (8, 0))
    if not (scales.dtype == x.dtype and K % 32 == 0 and (scheme != "int4_wo" or group % 32 == 0)):
        return False
    mma = K % 128 == 0 and _device_info(x.device)[2] >= (8, 0) and os.environ.get("FXQUANT_CXX_INT4_MMA") != "0"
    return scheme != "int4_wo" or m <= 2 or mma


def _cxx_dynamic_fits(scheme: str, device: torch.device, m: int, K: int, N: int, scales: torch.Tensor) -> bool:
    """dynamic_mma.cu's range: K % 64 == 0, float32 weight scales ([N], or [1] for fp8), fp8 on
    sm_89+, and, where it quantizes x itself (M <= CXX_QUANT_MAX_M), M x K bytes of shared memory."""
    if not (K % 64 == 0 and scales.dtype == torch.float32 and scales.is_contiguous()
            and scales.numel() in ((N,) if scheme == "int8_dyn" else (N, 1))):
        return False
    if scheme != "int8_dyn" and _device_info(device)[2] < (8, 9):
        return False
    return m > _cxx_quant_max_m(scheme) or m * (K + 16) <= _smem_optin(device) - 1024


def _smem_optin(device: torch.device) -> int:
    if device.type != "cuda":
        return 227 * 1024  # the interpreter: an H100
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def cxx_prequant_fits(scheme: str, xq2: torch.Tensor, xs: torch.Tensor, qweight: torch.Tensor,
                      scales: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> bool:
    """The C++ 8-bit MMA kernel on activations quantized beforehand: M <= CXX_MAX_M, a bf16/fp16
    output, one device, and _cxx_dynamic_fits' weight rules."""
    M, K, N = xq2.shape[0], xq2.shape[1], qweight.shape[0]
    return (xq2.is_cuda and out_dtype in (torch.bfloat16, torch.float16) and 1 <= M <= CXX_MAX_M[scheme]
            and 0 < N * K < 2 ** 31 and xs.numel() == M
            and all(t.device == xq2.device for t in (xs, qweight, scales, bias) if t is not None)
            and _cxx_dynamic_fits(scheme, xq2.device, 5, K, N, scales))  # (no x in shared memory)


def _cxx_ready() -> bool:
    """Loads (first use: builds) the C++/CUDA library; warns once and returns False if it can't."""
    from ..cuda import build
    return _library_ready("the CUDA C++ kernels are", build.available, build.unavailable_reason)


def _cutlass_ready() -> bool:
    """Loads (first use: builds) the CUTLASS library; warns once and returns False if it can't."""
    from ..cuda import build
    return _library_ready("the CUTLASS GEMM library is", build.cutlass_available, lambda: build._cutlass_state["error"])


def _cutlass_fits(scheme, x, qweight, scales, bias, group, cfg) -> bool:
    from ..cuda import cutlass
    return cutlass.fits(scheme, x, qweight, scales, bias, group, cfg.bn, cfg.bm, cfg.split_k, cfg.warps,
                        cfg.cluster)


_library_warned: set[str] = set()


def _library_ready(what: str, available, reason) -> bool:
    if available():
        return True
    if what not in _library_warned:
        _library_warned.add(what)
        import warnings
        warnings.warn(f"fxquant: {what} unavailable ({reason()}); using the other kernels instead",
                      RuntimeWarning, stacklevel=4)
    return False


# --------------------------------------------------------------------------- autotuning
def _autotune_enabled() -> bool:
    return os.environ.get("FXQUANT_AUTOTUNE", "0") == "1"


def _autotune_now(t: torch.Tensor) -> bool:
    """FXQUANT_AUTOTUNE=1, a CUDA tensor, and not inside a CUDA-graph capture."""
    return _autotune_enabled() and t.is_cuda and not torch.cuda.is_current_stream_capturing()


def _tuned(scheme: str, dtype: torch.dtype, n: int, k: int, group: int, m: int, device: torch.device) -> bool:
    return config_key(scheme, dtype, n, k, group, m) in _table("cache").get(_device_info(device)[0], {})


def candidate_configs(scheme: str, m: int, group: int) -> list[KernelConfig]:
    """The search space the tuner times for one M-bucket (kept small: every entry compiles)."""
    mma = scheme in DYNAMIC
    out: list[KernelConfig] = []
    G = KernelConfig
    if m <= 8 and scheme not in NO_GEMV:  # GEMV: bytes in flight per SM come from programs x row bytes; small N wants few rows
        tiles = (((1, 4096, 4), (2, 4096, 4), (2, 2048, 4), (4, 2048, 4), (4, 1024, 4), (8, 1024, 4),
                  (2, 1024, 2), (4, 4096, 8), (8, 2048, 8))
                 if scheme == "int4_wo" else
                 ((1, 4096, 4), (2, 4096, 4), (2, 2048, 4), (4, 2048, 4), (4, 1024, 4), (8, 1024, 4),
                  (4, 4096, 8), (8, 2048, 8), (16, 512, 4)))
        if m > 2:  # the FMA work grows with M: keep the register tile small
            tiles = tuple(t for t in tiles if t[0] * t[1] <= 8192)
        out += [G("gemv", bn=bn, bk=max(bk, group), warps=w) for bn, bk, w in tiles]
    if 2 <= m <= 256:  # swapped: W tile on the MMA's wide side, x (small M) on the narrow side
        bm = max(16, min(128, triton.next_power_of_2(m)))
        tiles = [(64, 128, 4, 4), (128, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 5)]
        if bm >= 128:
            tiles = [(128, 64, 8, 4), (64, 128, 4, 3), (128, 128, 8, 3)]
        out += [G("gemm", bm=bm, bn=bn, bk=bk, warps=w, stages=st, split_k=sk, swap=True)
                for bn, bk, w, st in tiles for sk in (0, 1)]  # auto split-K, or none
    if 2 <= m <= 64:  # mma.sync with narrow N tiles: many programs without split-K
        bm = max(16, triton.next_power_of_2(m))
        out += [G("gemm", bm=bm, bn=bn, bk=bk, warps=4, stages=st, split_k=0)
                for bn, bk, st in ((32, 256, 3), (64, 128, 4), (32, 128, 4))]
    if 64 <= m <= 512:
        tiles = ((64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (64, 256, 128, 8, 3)) if mma else \
            ((64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3))
        out += [G("gemm", bm=bm, bn=bn, bk=bk, warps=w, stages=st, split_k=0)
                for bm, bn, bk, w, st in tiles]
    if m >= 512:
        tiles = ((128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (128, 128, 128, 4, 4),
                 (256, 128, 128, 8, 3)) if mma else \
            ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 128, 8, 3))
        out += [G("gemm", bm=bm, bn=bn, bk=bk, warps=w, stages=st) for bm, bn, bk, w, st in tiles]
    if not mma and 128 <= m <= 1024:
        # Weight-only, swapped (the dequantized weight is wgmma's register operand) with wide
        # x tiles: large M is compute-bound, so fewer dequantizations per weight byte (at most
        # 128 wide: see _known_bad).
        out += [G("gemm", bm=128, bn=bn, bk=bk, warps=4, stages=st, split_k=sk, swap=True)
                for bn, bk, st, sk in ((64, 128, 4, 1), (64, 128, 3, 1), (64, 64, 4, 0))]
    if not mma and m >= 128:
        out.append(G("deq", bn=64, bk=128, warps=4))
    if not mma and m >= 256:  # all-Triton dequantize + plain GEMM (the triton_op path's large M)
        out += [G("deqgemm", bm=bm, bn=bn, bk=bk, warps=w, stages=st)
                for bm, bn, bk, w, st in ((128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4))]
    if (scheme in ("fp8_dyn_row", "fp8_dyn_tensor") and m >= 16) or (scheme == "int8_dyn" and m >= 32):
        out.append(G("scaled_mm", bn=0, bk=0))
    if m >= 64 and scheme != "int4_mma":  # each GEMM again with TMA loads (Hopper; elsewhere, and on
        # the int4 MMA-fragment layout, whose bytes are gathered, they would run as plain loads: duplicates)
        out += [dataclasses.replace(c, tma=True) for c in out if c.kind == "gemm" and c.bk <= 128]
    out = [c for c in out if not _known_bad(scheme, c)]
    if scheme in CXX_SCHEMES and m <= CXX_MAX_M[scheme] and torch.cuda.is_available() and _cxx_ready():
        out.append(G("cxx", bn=0, bk=0))
    if (scheme in ("int4_wo", "int4_mma", "int8_wo", "fp8_wo") and m > 16
            and group % 64 == 0 and torch.cuda.is_available()
            and torch.cuda.get_device_capability() == (9, 0) and _cutlass_ready()):
        # (autotune skips the ones cutlass.fits refuses for its inputs: fp16, N % 8, K % 64 for int8 / fp8,
        # per-tensor fp8 scales, alignment). The narrow token tiles (bm < 128) where M is within half to
        # four times bm: wider, a tile computes mostly padding; narrower, each weight tile is read again
        # for every token tile. The wide ones from M = 128 (int4_mma: 17, where it has no Triton GEMM worth timing).
        from ..cuda.cutlass import VARIANTS
        out += [G("cutlass", bn=bn, bk=64, bm=bm, warps=w, split_k=sk) for bn, bm, sk, w in VARIANTS
                if (bm / 2 <= m <= 4 * bm if bm < 128 else m >= 128 or scheme == "int4_mma")]
    if (scheme == "int8_dyn" and m >= 32 and torch.cuda.is_available()
            and torch.cuda.get_device_capability() == (9, 0) and _cutlass_ready()):
        from ..cuda.cutlass import I8_VARIANTS
        out += [G("cutlass", bn=bn, bk=128, bm=bm, warps=w, split_k=sk, cluster=c) for bn, bm, sk, w, c in I8_VARIANTS]
    return list(dict.fromkeys(out))  # each config once


TUNE_MAX_ERR = 1e-2  # relative Frobenius error of a tuning candidate against reference_linear (the tests' bf16 bound)


def reference_linear(scheme: str, x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """float32 [M, N] from numerics.py's dequantization (and activation quantization): what
    every kernel config must agree with. The weight is dequantized in row chunks
    (DEQ_CHUNK_ELEMS), so an lm_head-sized one needs no full float32 copy."""
    if scheme == "int8_dyn":
        xq, xs = nq.quantize_int8_per_token(x2)
        x2 = xq.float() * xs
    elif scheme in DYNAMIC:
        xq, xs = nq.quantize_fp8(x2, scheme == "fp8_dyn_row")
        x2 = xq.float() * xs
    x2 = x2.float()
    N = qweight.shape[0]
    out = torch.empty((x2.shape[0], N), device=x2.device, dtype=torch.float32)
    rows = max(16, DEQ_CHUNK_ELEMS // max(1, x2.shape[1]) // 16 * 16)  # int4_mma: whole 16-row blocks
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        q = qweight[n0:n1]
        if scheme in INT4:
            w = nq.dequantize_int4(q, scales[:, n0:n1], group, torch.float32,
                                   "mma" if scheme == "int4_mma" else "rows")
        else:
            s = scales.reshape(-1)[n0:n1] if scales.numel() == N else scales
            if scheme == "int8_wo":
                w = nq.dequantize_int8_per_channel(q, s, torch.float32)
            elif scheme == "fp8_wo":
                w = nq.dequantize_fp8_weight(q, s, torch.float32)
            else:
                w = q.float() * s.float().reshape(-1, 1)
        out[:, n0:n1] = x2 @ w.t()
    return out if bias is None else out + bias.float()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def time_config(fn, reps: int = 20) -> float:
    """Median µs of fn() over CUDA-graph replays (launch gaps excluded)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return times[len(times) // 2]


def autotune(scheme: str, x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None, group: int, reps: int = 20,
             candidates: list[KernelConfig] | None = None) -> tuple[KernelConfig, dict]:
    """Time every candidate on these inputs; returns (best, {config repr: µs}). A candidate whose
    output is off the reference (TUNE_MAX_ERR) is rejected, not timed: a compiler bug in one tile
    shape must not become the cached choice."""
    M = x2.shape[0]
    results: dict = {}
    best, best_t = None, float("inf")
    ref = reference_linear(scheme, x2, qweight, scales, bias, group)
    for cfg in candidates or candidate_configs(scheme, M, group):
        if ((cfg.kind == "cxx" and not cxx_fits(scheme, x2, qweight, scales, bias, group))
                or (cfg.kind == "cutlass" and not _cutlass_fits(scheme, x2, qweight, scales, bias, group, cfg))
                or (cfg.kind == "scaled_mm"
                    and not scaled_mm_fits(scheme, qweight.shape[0], x2.shape[1], x2.dtype, scales.numel(),
                                           x2.shape[0]))):
            continue  # linear() would run another config under this label
        try:
            err = _rel_err(linear(scheme, x2, qweight, scales, bias, group, cfg), ref)
            if not err <= TUNE_MAX_ERR:  # NaN too
                results[repr(cfg)] = f"wrong: relative error {err:.3g}"
                continue
            t = time_config(lambda: linear(scheme, x2, qweight, scales, bias, group, cfg), reps)
        except Exception as e:  # a config that does not compile or fit is skipped
            results[repr(cfg)] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        results[repr(cfg)] = t
        if t < best_t:
            best, best_t = cfg, t
    return best or default_config(scheme, M, qweight.shape[0], x2.shape[1], group), results


def _maybe_autotune(scheme, x2, qweight, scales, bias, group, cfg):
    N, K, M = qweight.shape[0], x2.shape[1], x2.shape[0]
    if _tuned(scheme, x2.dtype, N, K, group, M, x2.device):
        return cfg
    best, _ = autotune(scheme, x2, qweight, scales, bias, group)
    save_tuned(_device_info(x2.device)[0], {config_key(scheme, x2.dtype, N, K, group, M): best})
    return best
