"""The attention kernels (decode and prefill) compiled for sm_90 on this CPU machine, as the GPU
compiles them (Triton's compiler needs no GPU). The CPU tests run them under the interpreter, which
accepts code the compiler rejects (session 20: plain-int globals inside a kernel; 51 GPU tests
failed). Here every mask form must compile and fit an H100's shared memory, and the prefill
kernel's dots must be Hopper warp-group MMAs (wgmma) on K / V tiles its pipeline copies ahead.

Runs in a subprocess (helpers.compile_for_sm90).
"""
from helpers import compile_for_sm90

SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxquant.lowering.triton import attention as A, attention_prefill as P

PTR = {"mask_ptr": "*i1", "flags_ptr": "*i8", "part_ptr": "*fp32", "stat_ptr": "*fp32", "bounds_ptr": "*i32"}


def build(fn, consts, warps, stages, mask_ty="*i1"):
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = mask_ty if p.name == "mask_ptr" else PTR.get(p.name, "*bf16")
        else:
            sig[p.name] = "fp32" if p.name == "qk_scale" else "i32"
        # what Triton specializes at a launch of the benchmark's shapes: 16-byte aligned pointers and
        # strides that are multiples of 16 (the unit strides become constants; left as plain ints here)
        if p.name.endswith("_ptr") or p.name[:3] in ("sq_", "sk_", "sv_", "so_") or p.name in ("sm_b", "sm_l"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ir = k.asm["ttgir"]
    return {"shared": k.metadata.shared, "wgmma": ir.count("ttng.warp_group_dot "), "dots": ir.count("tt.dot "),
            "async_copies": ir.count("ttg.async_copy_global_to_local")}


out = {}
for kind, ty in ((A.MASK_NONE, "*i1"), (A.MASK_BOOL, "*i1"), (A.MASK_FLOAT, "*fp32")):
    k = int(kind.value)
    out[f"prefill mask={k}"] = build(P.prefill_attention_kernel, dict(
        G=4, D=128, BLOCK_M=128, BLOCK_N=64, KT_POW2=64, MASK=kind, MASK_BATCH=True, MASK_HEADS=False), 8, 3, ty)
    if kind != A.MASK_NONE:
        out[f"tiles mask={k}"] = build(P.mask_tiles_kernel, dict(MASK=kind, BLOCK_M=128, BLOCK_N=64), 4, 3, ty)
    for split in (False, True):
        out[f"decode mask={k} split={split}"] = build(A.gqa_decode_kernel, dict(
            G=4, D=128, BLOCK_R=16, BLOCK_N=64, MASK=kind, MASK_HEADS=False, SPLIT=split), 4, 3, ty)
out["combine"] = build(A.gqa_combine_kernel, dict(G=4, D=128, BLOCK_R=16), 4, 3)
print(json.dumps(out))
"""
H100_SHARED = 232448  # bytes per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)


def test_attention_kernels_compile_for_sm90_fit_and_use_wgmma():
    res = compile_for_sm90(SCRIPT)
    assert len(res) == 12, res
    for name, r in res.items():
        assert r["shared"] <= H100_SHARED, (name, r)
        if name.startswith("prefill"):  # q k^T and p v as Hopper warp-group MMAs, in each loop,
            assert r["wgmma"] >= 4 and r["dots"] == 0, (name, r)
            assert r["async_copies"] >= 4, (name, r)  # on K / V tiles that the pipeline copies ahead
        elif name.startswith("decode"):  # 16-row blocks: below wgmma's 64 rows, so mma.sync
            assert r["dots"] == 2, (name, r)
