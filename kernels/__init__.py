"""Triton kernels of fastformer (installed as ``fastformer.kernels``); launchers live in ``fastformer.ops``."""
