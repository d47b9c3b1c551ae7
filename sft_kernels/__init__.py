"""Loss and optimizer kernels, each beside the plain-PyTorch reference it is tested against.

Import the module you need: cross_entropy.py and sparse_adam.py load Triton, chunked_cross_entropy.py
(the model's default loss) does not, so a model and sample.py stay free of Triton.
"""
