"""The one place where fxquant's quantization arithmetic lives.

Passes (packing at compile time), CPU kernels, GPU kernels' references and tests all
import from here, so a scheme's rounding, clamping and layout are defined exactly once.

Layouts (chosen for coalesced GPU reads, see lowering/):
  int8 weight       : int8  [N, K], per-output-channel scale [N]
  int4 weight       : uint8 [N, K // 2]; byte j of row n holds k = 2j in the low nibble and
                      k = 2j + 1 in the high nibble. Values q in [0, 15] dequantize as
                      w = (q - 8) * scale + zero, per group of `group_size` along K.
  int4 scales/zeros : [K // group_size, N, 2] in the model dtype ([..., 0] scale, [..., 1] zero),
                      N contiguous so one K-group of a tile is one coalesced read.
  fp8 weight        : float8_e4m3fn [N, K], float32 scale [N] (row) or [1] (tensor).
"""
from __future__ import annotations

import torch

INT8_QMAX = 127
INT4_MID = 8
INT4_QMAX = 15
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _safe_scale(scale: torch.Tensor, dtype: torch.dtype, qmax: float = 1.0) -> torch.Tensor:
    """Round a float32 scale to `dtype` without letting it underflow to zero, nor let
    qmax * scale overflow `dtype` when dequantized (fp16 weights near 65504)."""
    info = torch.finfo(dtype)
    s = scale.clamp(min=info.tiny, max=info.max / qmax).to(dtype)
    # Rounding to dtype may step up past the limit: step back one ulp there.
    over = s.float() * qmax > info.max
    return torch.where(over, torch.nextafter(s, torch.zeros_like(s)), s)


def _div(t: torch.Tensor, c: float) -> torch.Tensor:
    """t / c with an IEEE division on every device, as the GPU kernels divide (div_rn). On CUDA,
    `tensor / python_float` multiplies by the reciprocal instead: one ulp off at times, and a scale
    one ulp off moves q across rounding ties (seen: 156 of 36 864 e4m3 values of a bf16 x)."""
    return torch.div(t, torch.full_like(t, c))


def _div_round(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # torch.round is round-half-to-even, as the GPU kernels' rint is.
    return torch.round(w / scale)


# --------------------------------------------------------------------------- int8 weights
def quantize_int8_per_channel(w: torch.Tensor, scale_dtype: torch.dtype | None = None):
    """Symmetric per-output-channel int8. w: [N, K] float -> (q int8 [N, K], scale [N])."""
    scale_dtype = scale_dtype or w.dtype
    w32 = w.float()
    amax = w32.abs().amax(dim=1)
    scale = _safe_scale(_div(amax, INT8_QMAX), scale_dtype, INT8_QMAX)
    q = _div_round(w32, scale.float()[:, None]).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scale


def dequantize_int8_per_channel(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


# --------------------------------------------------------------------------- int4 weights
def quantize_int4_groupwise(w: torch.Tensor, group_size: int, symmetric: bool = False,
                            scale_dtype: torch.dtype | None = None):
    """Group-wise int4 along K. w: [N, K], K % group_size == 0.

    Returns (q uint8 [N, K] with values 0..15, scales_zeros [K // group_size, N, 2]).
    Scale and zero are rounded to their storage dtype *before* q is computed, so the stored
    (q, scale, zero) triple is the best one for what the kernels actually read.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"K={K} is not a multiple of group_size={group_size}")
    scale_dtype = scale_dtype or w.dtype
    g = w.float().reshape(N, K // group_size, group_size)
    if symmetric:
        amax = g.abs().amax(dim=2)
        scale = _safe_scale(_div(amax, INT4_MID - 1), scale_dtype, INT4_MID)
        zero = torch.zeros_like(scale)
    else:
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        scale = _safe_scale(_div(hi - lo, INT4_QMAX), scale_dtype)
        # zero is the value of q == 8, so q == 0 lands on the group minimum; a constant group
        # is carried by the zero alone (q == 8), exactly.
        zero = torch.where(hi == lo, lo, lo + INT4_MID * scale.float()).to(scale_dtype)
    s32, z32 = scale.float()[..., None], zero.float()[..., None]
    q = (_div_round(g - z32, s32) + INT4_MID).clamp(0, INT4_QMAX).to(torch.uint8)
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return q.reshape(N, K), scales_zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K // 2] (even k low nibble, odd k high nibble)."""
    if q.shape[-1] % 2:
        raise ValueError("int4 packing needs an even K")
    q = q.to(torch.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] values 0..15."""
    # One broadcast shift (not a stack of two halves) so Inductor fuses it into the dequantize.
    shifts = torch.arange(0, 8, 4, dtype=torch.uint8, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return nibbles.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# The MMA-fragment int4 layout (Int4WeightOnly(layout="mma"); docs/int4-decode.md, "One int4 layout
# for both ends"). Blocks of 16 rows x 64 k, 512 bytes each, block (R, S) at byte (R * K / 64 + S) * 512,
# so weight rows 16R .. 16R + 15 are buffer rows 16R .. 16R + 15 (concatenating or slicing along N at
# multiples of 16 works as for row-major bytes). In a block, lane l = 4g + t owns 16 bytes, one 32-bit
# word per 16-k step j, whose nibbles are (row, k) = (g, 2t), (g+8, 2t), (g, 2t+8), (g+8, 2t+8),
# (g, 2t+1), (g+8, 2t+1), (g, 2t+9), (g+8, 2t+9) of that step: pair (i, i + 4) is register a_i of
# mma.m16n8k16's A fragment. It is CUTLASS's compute_memory_reordering_atom with four k-steps per
# thread and value order [0,2,4,6,1,3,5,7], blocks tiled K first.
# q [N, K] is viewed as (R, h, g, S, j, kh, t, e) with row = 16R + 8h + g, k = 64S + 16j + 8kh + 2t + e,
# and laid out as (R, S, g, t, j, e, kh, h).
_MMA_ORDER = (0, 3, 2, 6, 4, 7, 5, 1)
INT4_LAYOUTS = ("rows", "mma")  # pack_int4's row-major bytes, pack_int4_mma's blocks


def pack_int4_mma(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 (N % 16 == 0, K % 64 == 0) -> uint8 [N, K // 2] holding the bytes of
    the MMA-fragment layout above (buffer rows 16R.. hold weight rows 16R.., in block order)."""
    N, K = q.shape
    if N % 16 or K % 64:
        raise ValueError(f"the MMA-fragment int4 layout needs N % 16 == 0 and K % 64 == 0, got {N} x {K}")
    nib = q.to(torch.uint8).reshape(N // 16, 2, 8, K // 64, 4, 2, 4, 2).permute(_MMA_ORDER).reshape(-1, 2)
    return (nib[:, 0] | (nib[:, 1] << 4)).reshape(N, K // 2)


def unpack_int4_mma(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4_mma's bytes [N, K // 2] -> uint8 [N, K] values 0..15 in row-major order."""
    N, K = packed.shape[0], packed.shape[1] * 2
    shifts = torch.arange(0, 8, 4, dtype=torch.uint8, device=packed.device)  # traceable: no tensor constant
    nib = (packed.reshape(-1, 1) >> shifts) & 0xF
    inverse = [_MMA_ORDER.index(d) for d in range(8)]
    return nib.reshape(N // 16, K // 64, 8, 4, 4, 2, 2, 2).permute(inverse).reshape(N, K)


def unpack_int4_layout(packed: torch.Tensor, layout: str) -> torch.Tensor:
    """Packed int4 [N, K // 2] in `layout` (INT4_LAYOUTS) -> uint8 [N, K] values 0..15."""
    if layout == "rows":
        return unpack_int4(packed)
    if layout == "mma":
        return unpack_int4_mma(packed)
    raise ValueError(f"unknown int4 layout {layout!r}; known: {', '.join(INT4_LAYOUTS)}")


def dequantize_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype, layout: str = "rows") -> torch.Tensor:
    """Packed int4 [N, K // 2] (in `layout`) -> float [N, K] in `dtype` (computed in float32)."""
    q = unpack_int4_layout(packed, layout).float()
    N, K = q.shape
    sz = scales_zeros.float().transpose(0, 1)  # [N, G, 2]
    g = q.reshape(N, K // group_size, group_size)
    w = (g - INT4_MID) * sz[..., 0:1] + sz[..., 1:2]
    return w.reshape(N, K).to(dtype)


# --------------------------------------------------------------------------- int8 activations
def quantize_int8_per_token(x: torch.Tensor):
    """Dynamic symmetric per-row int8. x: [M, K] -> (q int8 [M, K], scale float32 [M, 1])."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)
    scale = _div(amax, INT8_QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = _div_round(x32, scale).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scale


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A gated MLP's SiLU-and-multiply (Llama's `silu(gate_proj(x)) * up_proj(x)`) in the inputs'
    dtype: silu rounds to that dtype, then the product does, as eager PyTorch computes it."""
    return torch.nn.functional.silu(gate) * up


def quantize_swiglu_per_token(gate: torch.Tensor, up: torch.Tensor, fp8: bool):
    """Per-token dynamic quantization of swiglu(gate, up). gate, up: [M, I] ->
    (q int8 / e4m3 [M, I], scale float32 [M, 1]), exactly as quantizing swiglu's output."""
    h = swiglu(gate, up)
    return quantize_fp8(h, per_row=True) if fp8 else quantize_int8_per_token(h)


def quantize_int8_weight_for_dynamic(w: torch.Tensor):
    """Per-channel int8 weight with a float32 scale (the int32 accumulator is rescaled in fp32)."""
    return quantize_int8_per_channel(w, scale_dtype=torch.float32)


# --------------------------------------------------------------------------- fp8
def quantize_fp8(t: torch.Tensor, per_row: bool):
    """e4m3 with a float32 scale per row ([R, 1]) or per tensor ([1, 1]). t: [R, C]."""
    t32 = t.float()
    if per_row:
        amax = t32.abs().amax(dim=-1, keepdim=True)
    else:  # amax() of an empty tensor (M == 0) is an error: its scale is irrelevant anyway
        amax = t32.abs().amax().reshape(1, 1) if t32.numel() else t32.new_zeros(1, 1)
    scale = _div(amax, FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (t32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_fp8_weight(w: torch.Tensor, per_row: bool = True):
    """w: [N, K] -> (q e4m3 [N, K], scale float32 [N] or [1])."""
    q, scale = quantize_fp8(w, per_row)
    return q, scale.reshape(-1)


def dequantize_fp8_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float().reshape(-1, 1)).to(dtype)


# --------------------------------------------------------------------------- metrics
def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).mean() / noise))
