"""`mm(x, W^T)` (F.linear / nn.Linear without bias, `x @ w.T`, 3-D inputs after the view)
and `mm(x, W)` with a constant [K, N] weight (HF Conv1D without bias, `x @ w`)."""
import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, register_graph_pattern

from ..passes import rewrite
from . import LINEAR_PATTERNS

aten = torch.ops.aten

PATTERN = CallFunction(aten.mm.default, KeywordArg("x"), KeywordArg("w"))


@register_graph_pattern(PATTERN, extra_check=rewrite.is_linear_match, pass_dict=LINEAR_PATTERNS)
def replace(match, x, w):
    rewrite.replace_linear(match, x=x, w=w, bias=None)
