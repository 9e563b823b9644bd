"""LayerNorm on the Triton kernels of kernels/layer_norm.py (CUDA tensors, or CPU under the interpreter)."""

from __future__ import annotations

from torch import Tensor

from fastformer import utils
from fastformer.kernels.layer_norm import layer_norm_bwd_kernel, layer_norm_fwd_kernel
from fastformer.ops import dropout
from fastformer.ops.layer_norm import op
from fastformer.ops.layer_norm.op import LayerNormArgs

# chunk counts a row may be split into (kernels/layer_norm.py): 768 = 3 * 256, 1536 = 3 * 512, 2560 <= 3 * 1024
_CHUNK_COUNTS = (1, 3, 5, 7)


def settings(n: int, elem_bytes: int) -> tuple[int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, NUM_CHUNKS, num_warps, ROWS_SPREAD) for rows of ``n`` columns.

    BLOCK_M and num_warps are those of the power-of-two block (utils.row_settings). The row is then the least
    padded NUM_CHUNKS * BLOCK_N >= n (BLOCK_N a power of two >= 4, for the dropout groups; a tie keeps fewer
    chunks) among the splits whose (BLOCK_M, BLOCK_N) chunk still gives every thread a whole 16-byte vector:
    a narrower chunk would be read in narrower loads, or need fewer warps and more registers per thread.
    ROWS_SPREAD says a chunk gives each thread exactly one vector, so the tile's rows lie in different threads.
    """
    block_m, _, warps = utils.row_settings(n, elem_bytes)
    vectors = 512 * warps  # bytes of one 16-byte vector per thread
    splits = [(c * max(4, utils.next_pow2(utils.cdiv(n, c))), c) for c in _CHUNK_COUNTS]
    width, chunks = min((w, c) for w, c in splits if c == 1 or block_m * (w // c) * elem_bytes >= vectors)
    block_n = width // chunks
    return block_m, block_n, chunks, warps, block_m > 1 and block_m * block_n * elem_bytes <= vectors


def fwd(a: LayerNormArgs, x2: Tensor, r2: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s, mean, rstd) of (M, N) rows, BLOCK_M rows per program."""
    m, n = x2.shape
    store_s = a.stores_s(r2)
    y, s_out, mean, rstd = op.fwd_buffers(x2, store_s)
    block_m, block_n, chunks, warps, spread = settings(n, x2.element_size())
    layer_norm_fwd_kernel[(utils.cdiv(m, block_m),)](
        x2, r2, a.w, a.b, y, s_out, mean, rstd, op.row_stride(x2), op.row_stride(r2), m, n, a.eps,
        *dropout.kernel_args(a.dropout_p, a.seed),
        HAS_RESIDUAL=r2 is not None, HAS_WEIGHT=a.weight is not None, HAS_BIAS=a.bias is not None,
        HAS_DROPOUT=a.dropout_p > 0, STORE_S=store_s, BLOCK_M=block_m, BLOCK_N=block_n, NUM_CHUNKS=chunks,
        ROWS_SPREAD=spread, num_warps=warps,
    )  # fmt: skip
    return y, s_out, mean, rstd


def bwd(
    a: LayerNormArgs, dy2: Tensor, dso2: Tensor | None, s2: Tensor, mean: Tensor, rstd: Tensor, has_res: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dres, dw, db) with a persistent grid, one fp32 dW/dB partial row per program."""
    m, n = s2.shape
    block_m, block_n, chunks, warps, spread = settings(n, s2.element_size())
    grid = op.partial_rows(m, block_m, s2.device)
    dx, dres, dw_part, db_part = op.bwd_buffers(a, s2, has_res, grid)
    layer_norm_bwd_kernel[(grid,)](
        dy2, dso2, s2, a.w, mean, rstd, dx, dres, dw_part, db_part, op.row_stride(dy2), op.row_stride(dso2),
        op.row_stride(s2), m, n, grid, *dropout.kernel_args(a.dropout_p, a.seed),
        HAS_DS_OUT=dso2 is not None, HAS_DRES=has_res, HAS_WEIGHT=a.weight is not None,
        HAS_DROPOUT=a.dropout_p > 0, BLOCK_M=block_m, BLOCK_N=block_n, NUM_CHUNKS=chunks,
        ROWS_SPREAD=spread, num_warps=warps,
    )  # fmt: skip
    return dx, dres if has_res else s2.new_empty(0), *op.reduce_partials(a, dw_part, db_part, s2)
