"""`addmm(b, x, W^T)` (nn.Linear with bias on 2-D or flattened 3-D input) and
`addmm(b, x, W)` with a constant [K, N] weight (HF GPT-2 Conv1D)."""
import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, register_graph_pattern

from ..passes import rewrite
from . import LINEAR_PATTERNS

aten = torch.ops.aten

PATTERN = CallFunction(aten.addmm.default, KeywordArg("bias"), KeywordArg("x"), KeywordArg("w"))


def _check(match) -> bool:
    node = match.output_node()
    plain = node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
    return plain and rewrite.is_linear_match(match)


@register_graph_pattern(PATTERN, extra_check=_check, pass_dict=LINEAR_PATTERNS)
def replace(match, bias, x, w):
    rewrite.replace_linear(match, x=x, w=w, bias=bias)
