"""A kernel for the programmatic-dependent-launch tests: it lets its dependents start at once and
writes its output only after spinning (~50 us at SPIN=20000 on an H100), so a dependent that reads
before its griddepcontrol.wait sees the old bytes."""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents


@triton.jit
def late_copy_kernel(src, dst, n, sink, SPIN: tl.constexpr, BLOCK: tl.constexpr):
    """Lets its dependents start at once, spins, and only then copies src to dst (bytes)."""
    gdc_launch_dependents()
    acc = tl.program_id(0).to(tl.float32)
    for _ in range(SPIN):
        acc = acc * 0.999 + 1.0
    tl.store(sink + tl.program_id(0), acc)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


def late_copy(src, dst, sink) -> None:
    late_copy_kernel[(triton.cdiv(src.numel(), 1024),)](src, dst, src.numel(), sink, SPIN=20000, BLOCK=1024)
