"""Triton kernels, each beside the plain-PyTorch reference it is tested against."""
from sft_kernels.cross_entropy import fused_masked_linear_cross_entropy, reference_masked_linear_cross_entropy, runs_on
from sft_kernels.sparse_adam import check_indices, reference_sparse_adamw_, sparse_adamw_

__all__ = ["fused_masked_linear_cross_entropy", "reference_masked_linear_cross_entropy", "runs_on",
           "sparse_adamw_", "reference_sparse_adamw_", "check_indices"]
