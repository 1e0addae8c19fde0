"""Constants shared by the kernels and their launchers."""
import os

import triton.language as tl


def eager(kernel):
    """Launch a kernel as it is: the launchers' default `wrap` (triton_ops.py passes wrap_triton)."""
    return kernel


# Running under TRITON_INTERPRET=1 (CPU tests): a few interpreter bugs are worked around.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# How the weight is stored / fed to the dot (kernel constexpr WKIND).
WK_INT8 = tl.constexpr(0)      # int8 [N, K], converted to x's dtype (weight-only)
WK_INT4 = tl.constexpr(1)      # uint8 [N, K//2] + scales_zeros [K//gs, N, 2] (weight-only)
WK_FP8 = tl.constexpr(2)       # e4m3 [N, K], converted to x's dtype (weight-only)
WK_INT8_MMA = tl.constexpr(3)  # int8 weight x int8 activations, int32 accumulate
WK_FP8_MMA = tl.constexpr(4)   # e4m3 weight x e4m3 activations, fp32 accumulate
WK_PLAIN = tl.constexpr(5)     # [N, K] in x's dtype, dequantized beforehand (kind "deqgemm")
WK_INT4_MMA = tl.constexpr(6)  # int4 as WK_INT4, in the MMA-fragment layout (numerics.pack_int4_mma)

# Scale vectors (XS_MODE / WS_MODE): none, one per row/column, one for the whole tensor.
SC_NONE = tl.constexpr(0)
SC_ROW = tl.constexpr(1)
SC_TENSOR = tl.constexpr(2)

# 2**23 + 8: OR-ing a nibble q into the mantissa of 2**23 and subtracting this gives q - 8
# exactly in two ALU ops (cheaper than an int->float convert).
MAGIC_BITS = tl.constexpr(0x4B000000)
MAGIC_Q8 = tl.constexpr(8388616.0)
