"""Triton kernels of lmfused, installed as the subpackage ``lmfused.triton_kernels``."""
