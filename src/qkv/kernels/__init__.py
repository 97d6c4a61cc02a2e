"""Native CPU kernels for the hot spots PyTorch leaves on the table (see native.py)."""

from qkv.kernels.cpu_linear import linear, linears

__all__ = ["linear", "linears"]
