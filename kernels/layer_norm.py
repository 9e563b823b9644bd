"""LayerNorm over the last dimension, fused with dropout and a residual add: forward and backward.

Forward, for each row of length N (BLOCK_M rows per program, the whole row in registers)::

    s = dropout(x) + residual          # each part optional; s is stored when it differs from x
    mean = sum(s) / N,  rstd = 1 / sqrt(sum((s - mean)^2) / N + eps)      (fp32)
    y = (s - mean) * rstd * w + b

Backward, with xhat = (s - mean) * rstd and g = w * dy::

    ds = rstd * (g - (xhat * mean(xhat * g) + mean(g))) + d(s_out)
    dx = ds * keep / (1 - p),   dresidual = ds
    dw = sum_rows(dy * xhat),   db = sum_rows(dy)

The backward grid is persistent (about one program per SM); each program accumulates dw/db in fp32
registers over its rows and writes one partial row, which the launcher reduces with a single sum.
Dropout masks are regenerated from (seed, row, col) rather than stored: element (row, col) of the (M, N)
dropout matrix of fastformer/ops/dropout.py, one Philox call per 4 columns (BLOCK_N is a multiple of 4).

Limits: a row must fit in one block (N <= 65536); row offsets are int64, so M * N may exceed 2**31.
"""

import triton
import triton.language as tl
from fastformer.kernels.dropout import dropout_keep


@triton.jit
def layer_norm_fwd_kernel(
    X,  # input (m, n), unit column stride
    R,  # residual (m, n), or None
    W,  # weight (n,), or None
    B,  # bias (n,), or None
    Y,  # output (m, n), contiguous
    S,  # residual sum out (m, n), contiguous; written when STORE_S
    MEAN,  # (m,) fp32
    RSTD,  # (m,) fp32
    stride_x,  # row stride of X
    stride_r,  # row stride of R
    m,  # rows
    n,  # columns
    eps,  # added to the variance
    seed,  # Philox key for dropout
    thresh,  # dropout keep threshold on 24 random bits
    keep_scale,  # 1 / (1 - p)
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < m
    mask = row_ok[:, None] & (cols < n)[None, :]
    s = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        s = tl.where(dropout_keep(seed, rows, 0, n, thresh, BLOCK_N), s * keep_scale, 0.0)
    if HAS_RESIDUAL:
        s += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_S:
        s_low = s.to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * n + cols[None, :], s_low, mask=mask)
        # normalise the rounded sum: it is what the backward pass will reload
        s = s_low.to(tl.float32)
    mean = tl.sum(s, axis=1) / n
    d = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / n + eps)
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * n + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def layer_norm_bwd_kernel(
    DY,  # grad of the output (m, n), unit column stride
    DS_OUT,  # grad of the residual-sum output (m, n), or None
    S,  # the normalised input (m, n): x itself or the stored residual sum
    W,  # weight (n,), or None
    MEAN,  # (m,) fp32
    RSTD,  # (m,) fp32
    DX,  # grad of x (m, n), contiguous
    DRES,  # grad of the residual (m, n), contiguous, or None
    DW,  # fp32 partial dw (num_programs, n), or None
    DB,  # fp32 partial db (num_programs, n), or None
    stride_dy,  # row stride of DY
    stride_dso,  # row stride of DS_OUT
    stride_s,  # row stride of S
    m,  # rows
    n,  # columns
    n_progs,  # programs in the (persistent) grid
    seed,  # Philox key of the forward's mask, regenerated here
    thresh,  # its 24-bit keep threshold
    keep_scale,  # kept gradients are scaled by 1 / (1 - p)
    HAS_DS_OUT: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, m, n_progs * BLOCK_M):
        rows = tl.arange(0, BLOCK_M).to(tl.int64) + start
        row_ok = rows < m
        mask = row_ok[:, None] & col_ok[None, :]
        s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :] if HAS_WEIGHT else dy
        c1 = tl.sum(xhat * g, axis=1) / n
        c2 = tl.sum(g, axis=1) / n
        ds = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS_OUT:
            ds += tl.load(DS_OUT + rows[:, None] * stride_dso + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        offs = rows[:, None] * n + cols[None, :]
        if HAS_DRES:
            tl.store(DRES + offs, ds.to(DRES.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            ds = tl.where(dropout_keep(seed, rows, 0, n, thresh, BLOCK_N), ds * keep_scale, 0.0)
        tl.store(DX + offs, ds.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    if HAS_WEIGHT:
        tl.store(DW + pid.to(tl.int64) * n + cols, dw, mask=col_ok)
    if DB is not None:
        tl.store(DB + pid.to(tl.int64) * n + cols, db, mask=col_ok)
