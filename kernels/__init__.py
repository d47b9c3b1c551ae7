"""Triton kernels, each beside the plain-PyTorch reference it is tested against."""
from kernels.cross_entropy import fused_masked_linear_cross_entropy, reference_masked_linear_cross_entropy, runs_on

__all__ = ["fused_masked_linear_cross_entropy", "reference_masked_linear_cross_entropy", "runs_on"]
