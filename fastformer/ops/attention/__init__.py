"""Fused attention: dense (batch, seq, heads, dim) and packed variable-length, forward and backward.

One module per job, in the order every op follows:

- ``api``: ``attention``, ``attention_varlen``, ``unpad_input`` and ``pad_input``: input checks, backend choice,
  the dropout seed; ``sdpa``: the ``scaled_dot_product_attention`` drop-in.
- ``op``: :class:`~fastformer.ops.attention.op.AttentionArgs` and the custom ops ``fastformer::attention_fwd`` /
  ``attention_bwd`` with their fakes and autograd.
- ``torch_impl`` (the reference math, :func:`attention_reference`, and the CPU path), ``triton_impl``
  (kernels/attention.py; launch settings in ``triton_tuning``) and ``cuda_impl`` (csrc/attention.cu): each
  ``fwd(a) -> (out, lse)`` and ``bwd(a, dout, out, lse) -> (dq, dk, dv)``.

Conventions shared by every backend:

- ``causal`` with seqlen_q != seqlen_k is aligned bottom-right: query i sees keys j <= i + Sk - Sq
  (per sequence in the varlen layout).
- A query row that sees no key outputs 0, its logsumexp is stored as +inf so backward gets P = 0.
- ``lse`` (fp32, natural log) is (B, H, Sq) dense and (H, total_q) varlen. Its flat index is the row id
  ``r``: dense ``r = (b*H + h)*Sq + i``; varlen ``r = h*total_q + cu_seqlens_q[b] + i``.
- Dropout keeps P[r, j] by the shared Philox scheme (fastformer/ops/dropout.py) as element (r, j) of a dropout
  matrix with row length ``n = Sk`` (dense) or ``max_seqlen_k`` (varlen): word j % 4 of the Philox call at counter
  ``r * ceil(n / 4) + j // 4``, so Triton, CUDA C++ and torch drop the same elements for the same seed. Kept
  probabilities are scaled by 1/(1-p).
- Backward: each dK/dV tile has one owner that loops over its GQA group, so dK and dV need no atomics. The Triton
  backend's dQ follows ``torch.are_deterministic_algorithms_enabled()``: off (the default), the dK/dV program also
  adds its share of dQ into an fp32 buffer atomically (5 matmuls per tile pair, the last bits of dQ may vary);
  on, a separate dQ kernel recomputes the scores (7 matmuls) and reruns are bitwise equal. The torch and cuda
  backends are deterministic either way.
- Triton forward with few query rows (<= 16, e.g. decoding with a KV cache) and long keys splits the keys
  across programs (split-KV) and combines the partial results; the output and lse are those of the plain path.
  On sm_90 the forward reads Q/K/V through tensor descriptors (TMA) when their strides allow it, and warp-
  specialises its key loop for plain non-causal problems (``triton_tuning.warp_spec_ok``).
- On GPU the Triton kernels are autotuned per (head dim, seqlen bucket, flags); ``FASTFORMER_AUTOTUNE=0`` uses
  one heuristic config per kernel instead.
- The CUDA C++ kernels (``cuda_impl``) take fp16/bf16 with head dim 64 or 128 on sm_80+ GPUs: mma.sync everywhere,
  and on sm_90 with ``FASTFORMER_CUDA_WGMMA=1`` a wgmma forward (TMA and warp-specialised without a padding mask).
  Inputs whose strides are not multiples of 8 elements or whose base is not 16-byte aligned are copied first.
"""

from fastformer.ops.attention.api import attention, attention_varlen, pad_input, unpad_input
from fastformer.ops.attention.sdpa import scaled_dot_product_attention
from fastformer.ops.attention.torch_impl import attention_reference

__all__ = [
    "attention",
    "attention_varlen",
    "scaled_dot_product_attention",
    "unpad_input",
    "pad_input",
    "attention_reference",
]
