"""The Triton GEMM as the GPU would run it, compiled for sm_90 on this CPU machine (Triton's
compiler needs no GPU): properties of the generated code that decide its speed.

Runs in a subprocess (helpers.compile_for_sm90).
"""
from helpers import compile_for_sm90

SCRIPT = r"""
import itertools
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxquant.lowering.triton import common as C, gemm as G

out = {}
for (name, wkind, ty), swap, tma in itertools.product(
        (("int8", C.WK_INT8_MMA, "i8"), ("fp8", C.WK_FP8_MMA, "fp8e4nv")), (False, True), (False, True)):
        bm, bn, warps = (128, 64, 4) if swap else (128, 128, 8)
        sig = {"x_ptr": "*" + ty, "w_ptr": "*" + ty, "s_ptr": "*fp32", "xs_ptr": "*fp32", "b_ptr": "*bf16",
               "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
               "x_desc": f"tensordesc<{ty}[{bm},128]>" if tma else "constexpr",
               "w_desc": f"tensordesc<{ty}[{bn},128]>" if tma else "constexpr",
               "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
               "stride_xk": "i32", "stride_om": "i32", "split_k": "i32"}
        consts = dict(WKIND=wkind, XS_MODE=C.SC_ROW, WS_MODE=C.SC_ROW, GROUP=0, HAS_BIAS=False, REDUCE=0, SWAP=swap,
                      IEEE=False, XK1=True, BM=bm, BN=bn, BK=128, GROUP_M=8,
                      FP8_ACC=128 if name == "fp8" else 0, PDL=False, TMA=tma)
        if not tma:
            consts.update(x_desc=None, w_desc=None)
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 15)}
        src = ASTSource(fn=G.gemm_kernel, signature={**sig, **{k: "constexpr" for k in consts if k not in sig}},
                        constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=3))
        ir = k.asm["ttgir"]
        dots = [line for line in ir.splitlines() if "ttng.warp_group_dot " in line]
        out[f"{name} swap={swap} tma={tma}"] = {"dots": len(dots), "operands_in_smem": all(
            line.split(" : ", 1)[1].count("!ttg.memdesc") == 2 for line in dots),
            "local_loads": ir.count("ttg.local_load"), "tma_copies": ir.count("ttng.async_tma_copy_global_to_local")}
print(json.dumps(out))
"""


def test_8bit_gemm_operands_feed_wgmma_straight_from_the_pipelined_tiles():
    # An fp8 tile loaded as int8 and bitcast went through registers and a second shared-memory
    # store every K step (seen in session 5); both int8 and fp8 must feed wgmma from the tiles
    # the pipeline copied, with pointer loads and with TMA.
    res = compile_for_sm90(SCRIPT, timeout=600)
    assert len(res) == 8
    for key, r in res.items():
        assert r["dots"] >= 1 and r["operands_in_smem"] and r["local_loads"] == 0, (key, r)
        # tma=True: both tiles arrive through the copy engine; tma=False never uses it.
        assert (r["tma_copies"] >= 2) if key.endswith("tma=True") else r["tma_copies"] == 0, (key, r)
