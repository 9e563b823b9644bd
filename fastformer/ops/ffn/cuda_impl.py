"""The feed-forward block on cuBLAS GEMMs (torch.matmul) and the fused elementwise kernels of csrc/ffn.cu.

``gemm`` without an epilogue is one cuBLAS call (bias through ``addmm``); with an activation, dropout or a
stored pre-activation it is a GEMM followed by ``ffn_bias_act_fwd``, which writes ``pre = z + bias`` back over
the GEMM result. ``grad_pre`` is a GEMM (or a copy of dy) turned into d(pre) in place by ``ffn_act_bwd``.
Results are contiguous, in the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastformer import _ext, utils
from fastformer.ops import dropout
from fastformer.ops.ffn.op import ACT_CODE, PLAIN, Epilogue


def _epilogue_args(t: Tensor, epi: Epilogue) -> tuple:
    """The trailing arguments both csrc/ffn.cu launchers take: act, seed, p, threshold, dtype, stream."""
    seed, thresh, _ = dropout.kernel_args(epi.dropout_p, epi.seed)
    p = float(epi.dropout_p)
    return ACT_CODE[epi.act], seed, p, thresh, utils.DTYPE_CODE[t.dtype], utils.stream_handle(t.device)


def gemm(
    a: Tensor, b: Tensor, out_dtype: torch.dtype, bias: Tensor | None = None, epi: Epilogue = PLAIN, store_pre=False
) -> tuple[Tensor, Tensor | None]:
    """(dropout(act(a @ b + bias)), a @ b + bias when store_pre else None); cuBLAS computes in a's dtype."""
    if epi.act == "none" and epi.dropout_p == 0 and not store_pre:
        c = torch.addmm(bias, a, b) if bias is not None else torch.matmul(a, b)
        return c.contiguous().to(out_dtype), None
    z = torch.matmul(a, b).contiguous()  # becomes the pre-activation in place when store_pre
    y = torch.empty_like(z)
    if z.numel():
        _ext.load().ffn_bias_act_fwd(
            z.data_ptr(), utils.ptr(bias), y.data_ptr(), int(store_pre), *z.shape, *_epilogue_args(z, epi)
        )
    return y.to(out_dtype), z if store_pre else None


def grad_pre(dy: Tensor, w_t: Tensor | None, pre: Tensor | None, epi: Epilogue, want_h: bool) -> tuple:
    """(d(pre) = (dy @ w_t or dy) * act'(pre) * keep/(1-p), h = dropout(act(pre)) when want_h), contiguous.

    ``pre`` may be None when there is no activation (the kernel then reads only the gradient).
    """
    # a fresh contiguous buffer that the kernel turns into d(pre) in place
    g = torch.matmul(dy, w_t).contiguous() if w_t is not None else dy.clone(memory_format=torch.contiguous_format)
    h = torch.empty_like(g) if want_h else None
    if g.numel():
        _ext.load().ffn_act_bwd(g.data_ptr(), utils.ptr(pre), utils.ptr(h), *g.shape, *_epilogue_args(g, epi))
    return g, h
