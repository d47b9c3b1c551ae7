"""Shared test setup.

Triton reads TRITON_INTERPRET when it is imported (transformers imports it too), so the flag is
set here, before any test module loads: without a GPU the Triton kernels then run on the CPU
under Triton's interpreter. With a GPU they compile as usual."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
