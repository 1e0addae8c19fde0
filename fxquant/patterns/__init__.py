"""Graph forms of a linear with a constant weight, one small pattern per form.

Each module registers (search pattern, eligibility check, replacement) into `LINEAR_PATTERNS`
with Inductor's pattern matcher. The checks and the replacement are shared in
`fxquant.passes.rewrite`, which knows how to find the constant weight behind a node.
"""
from torch._inductor.pattern_matcher import PatternMatcherPass

LINEAR_PATTERNS = PatternMatcherPass(pass_name="fxquant_linear")

from . import addmm, aten_linear, mm  # noqa: E402,F401  (registration side effects)
