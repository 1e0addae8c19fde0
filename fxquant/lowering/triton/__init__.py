"""Triton (CUDA) kernels of the fxquant ops. See register.py for how they are attached."""
