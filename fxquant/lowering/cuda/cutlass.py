"""The CUTLASS GEMMs as the dispatcher's kernel kind "cutlass": the weight-only ones (int4, int8,
fp8; csrc_cutlass/mixed_input_gemm.cuh) and the W8A8 int8 dynamic one (csrc_cutlass/scaled_int8_gemm.cuh):
which inputs they take, the int4 scale / zero arrays, and the call.

A KernelConfig of kind "cutlass" names the CUTLASS tile by bn (weight rows) x bm (tokens):
128 x 128 and 128 x 256 (cooperative: two consumer warpgroups share a tile), 64 x 128 (ping-pong);
split_k 0 is the 128 x 256 or 128 x 128 tile with CUTLASS's stream-K scheduler (each SM takes a share
of the tiles' K loops, for grids of too few tiles to fill the GPU), split_k 1 the persistent one;
128 x 64 / 32 / 16 and 256 x 64 / 32 / 128 exist only with stream-K (cooperative; for 17-128 tokens,
where a 128-token tile computes mostly padding and N = 4096 makes few tiles); warps 4
asks for the ping-pong schedule (one consumer warpgroup per tile) of 128 x 128 and 64 x 256,
warps 0 for the tile's default.

int8 dynamic has its own tiles (I8_VARIANTS, the same (bn, bm, split_k, warps) naming plus the
cluster size along M, K tile 128):
the plain product out [M, N] = xq [M, K] x W^T, so bm is the tile's token side.

Numerics:
- int4: CUTLASS dequantizes q * scale + zero' with zero' = zero - 8 * scale rounded to bf16, so
  with asymmetric quantization about half the weights land one bf16 step away from numerics.py's
  (q - 8) * scale + zero: 4.4e-3 relative error on the weights in tests/test_cutlass_kind.py, next
  to int4's own ~10 % (symmetric: zero' is exact and so are the weights).
- int8 and fp8: q converted to bf16 (exact), the per-row scale (int8: bf16, fp8: float32) and the bias
  applied to the float32 accumulator, rounded once to bf16 (as the Triton kernels; the reference
  rounds q * scale to bf16 before the product instead).
- int8 dynamic: the int32 product exactly, then (acc * w_scale) * x_scale + bias in float32,
  rounded once to bf16 (the reference multiplies the scales in the other order: float32 rounding).
The GEMMs stay within the tests' 1e-2 bound against the reference (tests/gpu/test_gpu_cutlass.py,
test_gpu_cutlass_fp8.py, test_gpu_cutlass_int8_dyn.py).

The int4 scale / zero arrays are made once per packed weight at compile time (`prepare_int4`, called
through ops.prepare_args by the backend for the op nodes of its final graph), outside any CUDA-graph
pool; a packed weight that was not prepared (or was written in place since) gets them per call
(two small kernels).
"""
from __future__ import annotations

import functools
import os
import weakref

import torch

# (bn, bm, split_k, warps) -> the library's variant number
VARIANTS = {(128, 128, 1, 0): 0, (128, 256, 1, 0): 1, (64, 128, 1, 0): 2, (128, 256, 0, 0): 3,
            (128, 128, 1, 4): 4, (64, 256, 1, 4): 5, (128, 128, 0, 0): 6,
            (128, 64, 0, 0): 7, (128, 32, 0, 0): 8, (128, 16, 0, 0): 9,
            (256, 64, 0, 0): 10, (256, 32, 0, 0): 11, (256, 128, 0, 0): 12}
# int8 dynamic: (bn, bm, split_k, warps, cluster) -> variant of csrc_cutlass/int8_dyn_tiles_*.cu
# (cluster 2: two CTAs along M share each weight tile through TMA multicast)
I8_VARIANTS = {(128, 128, 1, 0, 1): 0, (256, 128, 1, 0, 1): 1, (128, 256, 1, 0, 1): 2, (256, 128, 0, 0, 1): 3,
               (128, 128, 1, 4, 1): 4, (128, 64, 1, 4, 1): 5, (256, 64, 1, 4, 1): 6, (128, 128, 0, 0, 1): 7,
               (256, 128, 1, 0, 2): 8, (128, 256, 1, 0, 2): 9, (256, 128, 0, 0, 2): 10, (128, 128, 1, 4, 2): 11}


def fits(scheme: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
         group: int, bn: int, bm: int, split_k: int = 1, warps: int = 0, cluster: int = 1) -> bool:
    """Hopper (sm_90, CUDA), bf16 x / scales / bias on x's device, a known tile, and what TMA and the
    kernel need: 16-byte weight rows (int4: K % 32), N % 8 (16-byte output rows), 16-byte aligned x
    and weight, and a scale group that is a multiple of the 64-wide K tile (int4: group % 64).
    int8 / fp8 weight-only: see fits_row_scaled; int8 dynamic: fits_int8_dynamic."""
    if scheme == "int8_dyn":
        return fits_int8_dynamic(x, qweight, scales, bias, bn, bm, split_k, warps, cluster)
    if scheme in ("int8_wo", "fp8_wo"):
        return fits_row_scaled(scheme, x, qweight, scales, bias, bn, bm, split_k, warps, cluster)
    if not (scheme in ("int4_wo", "int4_mma") and x.dtype == torch.bfloat16 and scales.dtype == torch.bfloat16
            and (bn, bm, split_k, warps) in VARIANTS and cluster == 1 and _hopper(x)):
        return False
    K, N = x.shape[-1], qweight.shape[0]
    if qweight.dtype != torch.uint8 or K != qweight.shape[1] * 2 or group % 64 or K % group or K % 32:
        return False
    if N % 8 or N == 0 or x.numel() == 0 or (scheme == "int4_mma" and (N % 16 or K % 64)):
        return False
    if any(t is not None and t.device != x.device for t in (qweight, scales, bias)):
        return False
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.numel() != N):  # [N]: the epilogue's
        return False
    return qweight.is_contiguous() and qweight.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0


def fits_row_scaled(scheme: str, x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                    bias: torch.Tensor | None, bn: int, bm: int, split_k: int = 1, warps: int = 0,
                    cluster: int = 1) -> bool:
    """int8 / fp8 weight-only (per-row scales and bias in the epilogue): Hopper, bf16 x, an int8 / e4m3
    [N, K] weight (16-byte aligned; K % 64: the K tile, other K are not tested), per-row scales [N]
    (int8: bf16, fp8: float32; per-tensor ones go to the Triton kernels), a bf16 [N] bias, N % 8, a
    known tile."""
    qdtype, sdtype = {"int8_wo": (torch.int8, torch.bfloat16), "fp8_wo": (torch.float8_e4m3fn, torch.float32)}[scheme]
    if not (x.dtype == torch.bfloat16 and (bn, bm, split_k, warps) in VARIANTS and cluster == 1 and _hopper(x)):
        return False
    K, N = x.shape[-1], qweight.shape[0]
    if (qweight.dtype != qdtype or qweight.shape[1] != K or K % 64 or N % 8 or N == 0
            or x.numel() == 0 or w_scales.dtype != sdtype or w_scales.numel() != N
            or not w_scales.is_contiguous()):
        return False
    if any(t is not None and t.device != x.device for t in (qweight, w_scales, bias)):
        return False
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.numel() != N or not bias.is_contiguous()):
        return False
    return qweight.is_contiguous() and qweight.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0


def fits_int8_dynamic(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None,
                      bn: int, bm: int, split_k: int = 1, warps: int = 0, cluster: int = 1) -> bool:
    """The int8 dynamic GEMM: Hopper, x (unquantized, or xq) on the GPU with a bf16 output (x bf16,
    or int8 xq: the prequant op checks its out_dtype), K % 16 and N % 8 (16-byte TMA rows), float32
    per-row weight scales, a bf16 bias, 16-byte aligned weight, scales and bias, a known tile."""
    if not (x.dtype in (torch.bfloat16, torch.int8) and (bn, bm, split_k, warps, cluster) in I8_VARIANTS
            and _hopper(x)):
        return False
    K, N = x.shape[-1], qweight.shape[0]
    if (qweight.dtype != torch.int8 or qweight.shape[1] != K or K % 16 or N % 8 or N == 0 or x.numel() == 0
            or w_scales.dtype != torch.float32 or w_scales.numel() != N):
        return False
    if any(t is not None and t.device != x.device for t in (qweight, w_scales, bias)):
        return False
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.numel() != N or not bias.is_contiguous()
                             or bias.data_ptr() % 16):
        return False
    return (qweight.is_contiguous() and qweight.data_ptr() % 16 == 0 and w_scales.is_contiguous()
            and w_scales.data_ptr() % 16 == 0)


def _hopper(x: torch.Tensor) -> bool:
    """x is a CUDA (not ROCm) tensor on an sm_90 GPU."""
    return (x.is_cuda and torch.version.hip is None
            and _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) == (9, 0))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)  # asked once per GPU, not on every call


def scales_and_zeros(scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fxquant's [K / g, N, 2] (scale, zero) -> CUTLASS's scales and zeros, each [K / g, N]: CUTLASS
    computes q * scale + zero on the unsigned nibble, so its zero is zero - 8 * scale (rounded once)."""
    s = scales_zeros[..., 0]
    return s.contiguous(), torch.sub(scales_zeros[..., 1], s, alpha=8)


# id(scales_zeros) -> (weak reference to it, its _version then, scales, zeros); an entry dies with
# its tensor, and is not used once the tensor was written in place.
_prepared: dict[int, tuple[weakref.ref, int, torch.Tensor, torch.Tensor]] = {}


def prepare_int4(qweight: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> None:
    """Makes the CUTLASS scale / zero arrays of one packed int4 weight now (at compile time) and
    keeps them for as long as `scales_zeros` lives and is not written in place. Only where the kernel can ever run on them
    (a bf16 weight on a Hopper GPU, group % 64, FXQUANT_CUTLASS not 0); they cost as much memory
    as scales_zeros itself (~6 % of the packed int4 weight at g128).

    Made here rather than on first use: a first use can happen inside CUDA-graph warm-up, whose
    allocations belong to the graph's memory pool (a tensor cached from there broke cudagraph trees)."""
    if not (scales_zeros.is_cuda and scales_zeros.dtype == torch.bfloat16 and group_size % 64 == 0
            and os.environ.get("FXQUANT_CUTLASS", "1") != "0" and os.environ.get("FXQUANT_CXX", "1") != "0"
            and os.environ.get("FXQUANT_CUTLASS_PREPARE", "1") != "0" and torch.version.hip is None
            and _capability(scales_zeros.device.index or 0) == (9, 0)):
        return
    if _current(scales_zeros) is not None:
        return
    key = id(scales_zeros)
    entry = _prepared.get(key)
    known = entry is not None and entry[0]() is scales_zeros  # written in place since: make them again
    with torch.no_grad():
        s, z = scales_and_zeros(scales_zeros)
    ref = entry[0] if known else weakref.ref(scales_zeros)
    _prepared[key] = (ref, scales_zeros._version, s, z)
    if not known:  # one finalizer per tensor
        weakref.finalize(scales_zeros, _forget, key, ref)


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _prepared.get(key)
    if entry is not None and entry[0] is ref:  # not a newer tensor that reused the id
        del _prepared[key]


def _current(scales_zeros: torch.Tensor) -> tuple | None:
    """The prepared entry of this very tensor, if it was not written in place since."""
    entry = _prepared.get(id(scales_zeros))
    if entry is not None and entry[0]() is scales_zeros and entry[1] == scales_zeros._version:
        return entry
    return None


def _int4_arrays(scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    entry = _current(scales_zeros)
    return (entry[2], entry[3]) if entry is not None else scales_and_zeros(scales_zeros)


SCHED_SHIFT = 4  # mixed_input_gemm.cuh's kSchedShift: variant = tile + scheduler order << SCHED_SHIFT
_RASTERS = {"auto": 0, "rows": 1, "tokens": 2}


_SPLITS = ("1", "2", "4", "8", "16", "32", "64", "128")


def _sched() -> int:
    """The weight-only GEMMs' tile order from FXQUANT_CUTLASS_SCHED="SWIZZLE,RASTER[,REDUCTION[,SPLITS]]"
    (experiments, read at every call): SWIZZLE 1, 2, 4 or 8 output tiles per scheduler step, RASTER auto
    (CUTLASS's rule), rows (along the weight rows) or tokens; for the stream-K tiles, REDUCTION det (partial
    sums added in K order) or any, and SPLITS 1 (stream-K's own split) or a split-K count up to 128.
    0 (the defaults) for anything else."""
    v = os.environ.get("FXQUANT_CUTLASS_SCHED", "").replace(" ", "").split(",")
    v += ["det", "1"][len(v) - 2:] if 2 <= len(v) <= 4 else []
    if (len(v) != 4 or v[0] not in ("1", "2", "4", "8") or v[1] not in _RASTERS or v[2] not in ("det", "any")
            or v[3] not in _SPLITS):
        return 0
    return (int(v[0]).bit_length() - 1 | _RASTERS[v[1]] << 2 | (v[2] == "any") << 4
            | _SPLITS.index(v[3]) << 5)


def linear(scheme: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
           group: int, bn: int, bm: int, split_k: int = 1, warps: int = 0) -> torch.Tensor:
    """scheme "int4_wo" (scales = fxquant's scales_zeros), "int4_mma" (the same, on the MMA-fragment
    layout: numerics.pack_int4_mma), "int8_wo" (per-channel bf16 scales [N]) or
    "fp8_wo" (per-row float32 scales [N]); int8 dynamic goes through int8_dynamic_linear."""
    if scheme not in ("int4_wo", "int4_mma", "int8_wo", "fp8_wo"):
        raise ValueError(f"cutlass.linear: {scheme!r} is not a weight-only scheme (int8 dynamic: int8_dynamic_linear)")
    variant = VARIANTS[(bn, bm, split_k, warps)] | _sched() << SCHED_SHIFT
    b = _epilogue_bias(bias)
    if scheme == "int8_wo":
        return torch.ops.fxquant.cutlass_int8_weight_only_linear(x, qweight, scales, b, variant)
    if scheme == "fp8_wo":
        return torch.ops.fxquant.cutlass_float8_weight_only_linear(x, qweight, scales.reshape(-1), b, variant)
    s, z = _int4_arrays(scales)
    if scheme == "int4_mma":
        return torch.ops.fxquant.cutlass_int4_mma_weight_only_linear(x, qweight, s, z, b, group, variant)
    return torch.ops.fxquant.cutlass_int4_weight_only_linear(x, qweight, s, z, b, group, variant)


def _epilogue_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as the epilogue reads it: [N], contiguous, 16-byte aligned (its vector loads); a
    view that is not gets copied (N values)."""
    if bias is None:
        return None
    b = bias.reshape(-1)
    return b if b.is_contiguous() and b.data_ptr() % 16 == 0 else b.clone(memory_format=torch.contiguous_format)


def int8_dynamic_linear(xq: torch.Tensor, x_scales: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                        bias: torch.Tensor | None, bn: int, bm: int, split_k: int = 1, warps: int = 0,
                        cluster: int = 1) -> torch.Tensor:
    """bf16 [M, N] from xq int8 [M, K] (rows contiguous) and its float32 per-row scales."""
    if not xq.is_contiguous():
        xq = xq.contiguous()
    if xq.data_ptr() % 16:  # TMA reads from 16-byte aligned addresses
        xq = xq.clone()
    xs = x_scales.reshape(-1)
    xs = xs if xs.is_contiguous() and xs.dtype == torch.float32 else xs.float().contiguous()
    b = None if bias is None else bias.reshape(-1)
    return torch.ops.fxquant.cutlass_int8_dynamic_linear(xq, xs, qweight, w_scales.reshape(-1), b,
                                                         I8_VARIANTS[(bn, bm, split_k, warps, cluster)])
