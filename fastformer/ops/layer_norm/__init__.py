"""LayerNorm, optionally fused with dropout and a residual add.

One module per job, in the order every op follows:

- ``api``: ``layer_norm`` and ``dropout_add_layer_norm``: input checks, backend choice, the dropout seed.
- ``op``: :class:`LayerNormArgs` and the custom ops ``fastformer::layer_norm_fwd`` / ``layer_norm_bwd`` with
  their fakes and autograd.
- ``torch_impl`` (the reference math and the CPU path), ``triton_impl`` (kernels/layer_norm.py) and
  ``cuda_impl`` (csrc/layer_norm.cu): each ``fwd(a, x2, r2)`` and ``bwd(a, dy2, dso2, s2, mean, rstd, has_res)``
  on (M, N) rows.
"""

from fastformer.ops.layer_norm.api import dropout_add_layer_norm, layer_norm

__all__ = ["dropout_add_layer_norm", "layer_norm"]
