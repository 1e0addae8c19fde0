"""The backend end to end on CUDA: every scheme compiles, runs its CUDA kernels and meets the
accuracy floors; outputs match the CPU compile of the same model. Skipped without a GPU."""
import pytest
import torch
import torch.nn as nn

import fxquant
from helpers import plain_then_cudagraphs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCHEMES = [
    (fxquant.Int8WeightOnly(), 38.0),
    (fxquant.Int4WeightOnly(group_size=128), 18.0),
    (fxquant.Int4WeightOnly(group_size=32, symmetric=True), 18.0),
    (fxquant.Int8DynamicActivationInt8Weight(), 30.0),
    (fxquant.Float8DynamicActivationFloat8Weight(granularity="row"), 25.0),
    (fxquant.Float8DynamicActivationFloat8Weight(granularity="tensor"), 20.0),
    (fxquant.Float8WeightOnly(), 25.0),
]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.SiLU(), nn.Linear(1024, 512)).to(torch.bfloat16)


@pytest.mark.parametrize("cfg,floor", SCHEMES, ids=lambda v: getattr(v, "describe", lambda: str(v))())
def test_scheme_end_to_end_on_cuda(cfg, floor):
    cpu_model = _mlp()
    gpu_model = _mlp().cuda()
    x = torch.randn(3, 17, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        torch._dynamo.reset()
        be = fxquant.backend(cfg)
        f = torch.compile(gpu_model, backend=be)
        outs = [f(x.cuda()), f(torch.randn(5, 9, 512, dtype=torch.bfloat16, device="cuda")),
                f(torch.randn(1, 1, 512, dtype=torch.bfloat16, device="cuda"))]
        ref = gpu_model(x.cuda())
        assert outs[0].device.type == "cuda" and outs[0].dtype == torch.bfloat16
        assert fxquant.sqnr(ref.float(), outs[0].float()) >= floor
        assert [r.status for r in be.report] == ["quantized", "quantized"]
        assert sum(v for k, v in be.compiled_graphs[0].items() if k.startswith("fxquant.")) == 2
        torch._dynamo.reset()
        cpu_out = torch.compile(cpu_model, backend=fxquant.backend(cfg))(x)
    # CUDA kernels vs the CPU kernels on identical packed weights: same function, other rounding.
    assert fxquant.sqnr(cpu_out.float(), outs[0].float().cpu()) >= 30


def test_llama_tiny_on_cuda_int4():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 512, (2, 16), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
        torch._dynamo.reset()
        be = fxquant.backend(fxquant.Int4WeightOnly(group_size=64))
        out = torch.compile(model, backend=be)(ids).logits
    # int4 noise through 15 linears of a random-init Llama: the CPU compile measures 15.0 dB,
    # the H100 13.6 dB (bf16 rounding in other places); the floor guards against breakage.
    assert fxquant.sqnr(ref.float(), out.float()) >= 12
    assert sum(r.status == "quantized" for r in be.report) == 2 * 7 + 1


@pytest.mark.parametrize("cfg", [fxquant.Int4WeightOnly(group_size=128), fxquant.Int8DynamicActivationInt8Weight()],
                         ids=lambda c: c.describe())
def test_reduce_overhead_one_compile_all_batch_sizes(cfg):
    """CUDA graphs (mode reduce-overhead via options, as HF's CompileConfig passes it): one
    dynamic compile serves every M, every kernel family is captured, outputs match the
    no-CUDA-graph compile's, and Inductor does not skip CUDA graphs."""
    model = _mlp().cuda()
    # M = 6 .. 4096: GEMV, split-K and tiled kernels. No dim of size 1 (Dynamo specializes sizes
    # 0 and 1: a batch-1 decode gets a graph of its own) and batch != seq in the first call
    # (equal sizes would share one symbol and recompile when they differ).
    xs = [torch.randn(b, s, 512, dtype=torch.bfloat16, device="cuda")
          for b, s in ((2, 3), (4, 5), (2, 50), (8, 300), (2, 2048))]
    want, got, frames, skips = plain_then_cudagraphs(model, xs, cfg)  # rounds: warm-up, record, replay
    assert frames == 1, f"{frames} graphs compiled for {len(xs)} batch sizes"
    assert skips == 0
    for rnd in got:  # split-K's fp32 atomics may add in another order: not bit-exact
        for a, b in zip(rnd, want):
            assert a.shape == b.shape and fxquant.sqnr(b.float(), a.float()) >= 40


_CG_LEAK = ("with mode='reduce-overhead' on torch 2.11 the compiled graph's runner (Runner.call and the "
             "CUDA-graph partition functions) stays referenced from outside Python's gc after "
             "torch._dynamo.reset(), keeping the graph module's constants (32 MiB here); measured "
             "2026-11-22, not fixed")


@pytest.mark.parametrize("mode", [None, pytest.param("reduce-overhead", marks=pytest.mark.xfail(
    strict=torch.__version__.startswith("2.11."), reason=_CG_LEAK))])
@pytest.mark.parametrize("string_backend", [False, True])
def test_dynamo_reset_frees_packed_weights(string_backend, mode):
    """After torch._dynamo.reset() (and the model's end) the packed weights' GPU memory is
    freed: Backend.reset drops the pack cache and Inductor's module references. Seen in
    benchmarks/llm.py, where a second fxquant scheme's steady memory included the first's
    packed weights (7 GiB)."""
    import gc
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(8)]).to(torch.bfloat16).cuda()  # 64 MiB
    with_model = torch.cuda.memory_allocated()
    cfg = fxquant.Int8WeightOnly()
    with torch.no_grad():
        if string_backend:
            opts = {"config": cfg} if mode is None else {"config": cfg, "mode": mode}
            f = torch.compile(model, backend="fxquant", options=opts)
        else:
            f = torch.compile(model, backend=fxquant.backend(cfg, release_weights=True), mode=mode)
        for _ in range(3):
            f(torch.randn(4, 2048, dtype=torch.bfloat16, device="cuda"))
    torch.cuda.synchronize()
    # The packed weights (32 MiB) live: beside the model's, or in place of the released ones.
    compiled = torch.cuda.memory_allocated()
    assert (compiled - with_model if string_backend else compiled - base) > 24 * 2**20
    if not string_backend:
        assert compiled < with_model  # release_weights gave back the bf16 weights
    del model, f
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    left = torch.cuda.memory_allocated() - base
    assert left < 4 * 2**20, f"{left / 2**20:.1f} MiB still allocated after reset"


class _NormLinear(nn.Module):
    def __init__(self, hidden=4096):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.proj = nn.Linear(hidden, 1024, bias=False)

    def forward(self, x):
        return self.proj(self.norm(x))


@pytest.mark.parametrize("limit,persistent", [("", True), ("0", False)])
def test_norm_and_activation_quant_read_the_row_once(limit, persistent, monkeypatch):
    # RMSNorm -> per-token fp8 quantization over a 4096-wide row, fused by Inductor: with
    # fxquant's choices handler the kernel keeps the row in registers (a persistent reduction,
    # one read of x); Inductor's own rule (FXQUANT_PERSISTENT_RNUMEL=0) loops over it twice.
    from torch._inductor.utils import run_and_get_code
    monkeypatch.setenv("FXQUANT_PERSISTENT_RNUMEL", limit)
    torch.manual_seed(0)
    m = _NormLinear().to(torch.bfloat16).cuda()
    x = torch.randn(64, 4096, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        torch._dynamo.reset()
        f = torch.compile(m, backend=fxquant.backend(fxquant.Float8DynamicActivationFloat8Weight(granularity="row")))
        out, codes = run_and_get_code(f, x)
        ref = m(x)
    assert fxquant.sqnr(ref.float(), out.float()) >= 25
    src = "\n".join(codes)
    kernels = [k for k in src.split("@triton_heuristics.")[1:] if "float8e4nv" in k]  # they store fp8
    assert kernels, "no fused activation-quantization kernel found"
    kinds = {k.split("(", 1)[0] for k in kernels}
    assert kinds == ({"persistent_reduction"} if persistent else {"reduction"}), kinds
