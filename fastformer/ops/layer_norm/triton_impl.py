"""LayerNorm on the Triton kernels of kernels/layer_norm.py (CUDA tensors, or CPU under the interpreter)."""

from __future__ import annotations

from torch import Tensor

from fastformer import utils
from fastformer.kernels.layer_norm import layer_norm_bwd_kernel, layer_norm_fwd_kernel
from fastformer.ops import dropout
from fastformer.ops.layer_norm import op
from fastformer.ops.layer_norm.op import LayerNormArgs


def fwd(a: LayerNormArgs, x2: Tensor, r2: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s, mean, rstd) of (M, N) rows, BLOCK_M rows per program."""
    m, n = x2.shape
    store_s = a.stores_s(r2)
    y, s_out, mean, rstd = op.fwd_buffers(x2, store_s)
    block_m, block_n, warps = utils.row_settings(n, x2.element_size())
    layer_norm_fwd_kernel[(utils.cdiv(m, block_m),)](
        x2, r2, a.w, a.b, y, s_out, mean, rstd, op.row_stride(x2), op.row_stride(r2), m, n, a.eps,
        *dropout.kernel_args(a.dropout_p, a.seed),
        HAS_RESIDUAL=r2 is not None, HAS_WEIGHT=a.weight is not None, HAS_BIAS=a.bias is not None,
        HAS_DROPOUT=a.dropout_p > 0, STORE_S=store_s, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return y, s_out, mean, rstd


def bwd(
    a: LayerNormArgs, dy2: Tensor, dso2: Tensor | None, s2: Tensor, mean: Tensor, rstd: Tensor, has_res: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dres, dw, db) with a persistent grid, one fp32 dW/dB partial row per program."""
    m, n = s2.shape
    block_m, block_n, warps = utils.row_settings(n, s2.element_size())
    grid = op.partial_rows(m, block_m, s2.device)
    dx, dres, dw_part, db_part = op.bwd_buffers(a, s2, has_res, grid)
    layer_norm_bwd_kernel[(grid,)](
        dy2, dso2, s2, a.w, mean, rstd, dx, dres, dw_part, db_part, op.row_stride(dy2), op.row_stride(dso2),
        op.row_stride(s2), m, n, grid, *dropout.kernel_args(a.dropout_p, a.seed),
        HAS_DS_OUT=dso2 is not None, HAS_DRES=has_res, HAS_WEIGHT=a.weight is not None,
        HAS_DROPOUT=a.dropout_p > 0, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return dx, dres if has_res else s2.new_empty(0), *op.reduce_partials(a, dw_part, db_part, s2)
