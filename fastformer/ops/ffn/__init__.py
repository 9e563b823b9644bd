"""Linear layers with a fused bias + activation + dropout epilogue, and the whole feed-forward block.

- :func:`linear`: ``y = dropout(act(x @ W^T + b))`` with ``W`` in ``nn.Linear`` layout ``(out, in)`` or, with
  ``weight_layout="in_out"``, GPT-2 ``Conv1D`` layout ``(in, out)`` (read through strides, never copied).
- :func:`feed_forward`: ``out = dropout(act(x @ W1^T + b1)) @ W2^T + b2``: a linear, then a second layer.

One module per job, in the order every op follows:

- ``api``: ``linear``, ``feed_forward`` and ``check_activation``: input checks, backend choice, the dropout seed.
- ``op``: :class:`FFNArgs` (a linear is a block without a second layer), the forward and backward algorithm
  written once, and the custom ops ``fastformer::linear_fwd`` / ``linear_bwd`` and ``ffn_fwd`` / ``ffn_bwd``
  with their fakes and autograd.
- ``torch_impl`` (the reference math and the fp32 CPU path), ``triton_impl`` (kernels/ffn.py: bias, activation
  and dropout in the GEMM epilogue; backward multiplies by act'(pre) and the mask in the epilogue of the GEMM
  producing dh, so the wide activation has no elementwise pass) and ``cuda_impl`` (cuBLAS through
  ``torch.matmul`` plus the elementwise kernels of csrc/ffn.cu), each with the same two primitives on 2-D
  operands, ``epi`` being an :class:`~fastformer.ops.ffn.op.Epilogue` (activation, dropout_p, seed):
  ``gemm(a, b, out_dtype, bias, epi, store_pre) -> (dropout(act(a @ b + bias)), a @ b + bias or None)`` and
  ``grad_pre(dy, w_t, pre, epi, want_h) -> (d(pre), h or None)`` with d(pre) = (dy @ w_t or dy) * act'(pre) *
  mask.

What backward keeps: ``x`` and the first layer's pre-activation (only when backward reads it: with an
activation, or with a second layer, which needs ``h``), never ``h`` or a mask. With ``recompute=True`` the
pre-activation is not saved but recomputed in backward by one extra GEMM (less memory, more FLOPs).

Dropout uses the shared counter-based Philox scheme (fastformer/ops/dropout.py) on the (tokens, d_ff) matrix of
the activation: element (row, col) is word col % 4 of the Philox call at counter row * ceil(d_ff / 4) + col // 4,
so every backend draws the same mask for a seed.
"""

from fastformer.ops.ffn.api import check_activation, feed_forward, linear
from fastformer.ops.ffn.op import ACTIVATIONS
from fastformer.ops.ffn.torch_impl import act_fn, feed_forward_reference, linear_reference

__all__ = [
    "ACTIVATIONS",
    "act_fn",
    "check_activation",
    "feed_forward",
    "feed_forward_reference",
    "linear",
    "linear_reference",
]
