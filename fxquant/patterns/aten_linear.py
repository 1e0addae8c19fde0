"""`aten.linear(x, W, b?)`: graphs that kept linear undecomposed (torch.export IR, make_fx
without decompositions). The weight here is [N, K] as stored by nn.Linear."""
import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, register_graph_pattern

from ..passes import rewrite
from . import LINEAR_PATTERNS

aten = torch.ops.aten

PATTERN = CallFunction(aten.linear.default, KeywordArg("x"), KeywordArg("w_nk"))
PATTERN_BIAS = CallFunction(aten.linear.default, KeywordArg("x"), KeywordArg("w_nk"), KeywordArg("bias"))


@register_graph_pattern(PATTERN, extra_check=rewrite.is_linear_match, pass_dict=LINEAR_PATTERNS)
def replace(match, x, w_nk):
    rewrite.replace_linear(match, x=x, w_nk=w_nk, bias=None)


@register_graph_pattern(PATTERN_BIAS, extra_check=rewrite.is_linear_match, pass_dict=LINEAR_PATTERNS)
def replace_bias(match, x, w_nk, bias):
    rewrite.replace_linear(match, x=x, w_nk=w_nk, bias=bias)
