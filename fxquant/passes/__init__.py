"""Graph passes: find linears with constant weights (patterns/), quantize and pack their
weights once, and rewrite each into one `torch.ops.fxquant.*` node."""
