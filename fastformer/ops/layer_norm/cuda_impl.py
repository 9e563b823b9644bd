"""LayerNorm on the CUDA C++ kernels of csrc/layer_norm.cu (fastformer._C)."""

from __future__ import annotations

from torch import Tensor

from fastformer import _ext, utils
from fastformer.ops import dropout
from fastformer.ops.layer_norm import op
from fastformer.ops.layer_norm.op import LayerNormArgs


def fwd(a: LayerNormArgs, x2: Tensor, r2: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s, mean, rstd) of (M, N) rows: a team of threads per row, the row in registers (csrc/layer_norm.cu)."""
    m, n = x2.shape
    store_s = a.stores_s(r2)
    # the kernel reads weight and bias in x's dtype: cast the two short vectors, never the activations
    w = a.w.to(x2.dtype) if a.weight is not None else None
    b = a.b.to(x2.dtype) if a.bias is not None else None
    y, s_out, mean, rstd = out = op.fwd_buffers(x2, store_s)
    seed, thresh, _ = dropout.kernel_args(a.dropout_p, a.seed)
    _ext.load().layer_norm_fwd(
        x2.data_ptr(), utils.ptr(r2), utils.ptr(w), utils.ptr(b), y.data_ptr(), s_out.data_ptr() if store_s else 0,
        mean.data_ptr(), rstd.data_ptr(), m, n, op.row_stride(x2), op.row_stride(r2),
        a.eps, seed, a.dropout_p, thresh, utils.DTYPE_CODE[x2.dtype], utils.stream_handle(x2.device),
    )  # fmt: skip
    return out


def bwd(
    a: LayerNormArgs, dy2: Tensor, dso2: Tensor | None, s2: Tensor, mean: Tensor, rstd: Tensor, has_res: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dres, dw, db); the kernel accumulates one fp32 dW/dB partial row per block."""
    m, n = s2.shape
    # the kernel indexes rows densely
    dy2, s2 = dy2.contiguous(), s2.contiguous()
    dso2 = dso2.contiguous() if dso2 is not None else None
    w = a.w.to(s2.dtype) if a.weight is not None else None
    grid = op.partial_rows(m, 1, s2.device)
    dx, dres, dw_part, db_part = op.bwd_buffers(a, s2, has_res, grid)
    seed, thresh, _ = dropout.kernel_args(a.dropout_p, a.seed)
    _ext.load().layer_norm_bwd(
        dy2.data_ptr(), utils.ptr(dso2), s2.data_ptr(), utils.ptr(w), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
        utils.ptr(dres), utils.ptr(dw_part), utils.ptr(db_part), m, n, grid, seed, a.dropout_p, thresh,
        utils.DTYPE_CODE[s2.dtype], utils.stream_handle(s2.device),
    )  # fmt: skip
    return dx, dres if has_res else s2.new_empty(0), *op.reduce_partials(a, dw_part, db_part, s2)
