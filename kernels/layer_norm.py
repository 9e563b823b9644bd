"""LayerNorm over the last dimension, fused with dropout and a residual add: forward and backward.

Forward, for each row of length N (BLOCK_M rows per program, the whole row in registers)::

    s = dropout(x) + residual          # each part optional; s is stored when it differs from x
    mean = sum(s) / N,  rstd = 1 / sqrt(sum((s - mean)^2) / N + eps)      (fp32)
    y = (s - mean) * rstd * w + b

Backward, with xhat = (s - mean) * rstd and g = w * dy::

    ds = rstd * (g - (xhat * mean(xhat * g) + mean(g))) + d(s_out)
    dx = ds * keep / (1 - p),   dresidual = ds
    dw = sum_rows(dy * xhat),   db = sum_rows(dy)

A row is NUM_CHUNKS chunks of BLOCK_N columns (a power of two), unrolled with ``tl.static_range`` and kept in
registers as tuples between the passes, so a width c * 2^k with small odd c is not padded to a power of two:
N = 768 runs as three 256-column chunks, not one 1024-column block whose last quarter is masked (a masked lane
moves no data but its warp still issues every instruction). The chunks are added elementwise before each row
reduction, so a statistic costs one reduction whatever NUM_CHUNKS is. With ROWS_SPREAD (a chunk of the tile is
one 16-byte vector per thread, so each row sits in its own threads), w and b are read through the tile's layout
and the backward keeps dw/db partials per row, summing them over rows once after its loop.

The backward grid is persistent (about one program per SM); each program accumulates dw/db in fp32 registers
over its rows and writes one partial row, which the launcher reduces with a single sum. Dropout masks are
regenerated from (seed, row, col) rather than stored: element (row, col) of the (M, N) dropout matrix of
fastformer/ops/dropout.py, one Philox call per 4 columns (BLOCK_N is a multiple of 4, so each chunk starts on
a group of 4).

Limits: a row must fit in one program (N <= 65536); row offsets are int64, so M * N may exceed 2**31.
"""

import triton
import triton.language as tl
from fastformer.kernels.dropout import dropout_keep


@triton.jit
def _load_cols(
    P,  # (n,) vector: the weight or the bias
    cols,  # (BLOCK_N,) column ids of one chunk
    n,  # columns
    BLOCK_M: tl.constexpr,  # rows of the tile the values will meet
    BLOCK_N: tl.constexpr,  # columns of the chunk
    ROWS_SPREAD: tl.constexpr,  # the tile's rows lie in different threads
):
    # P[cols] in fp32, broadcastable against a (BLOCK_M, BLOCK_N) tile. A (BLOCK_N,) load gets a layout of its own,
    # which is the tile's column slice only when each thread holds whole columns of the tile; when the rows are
    # spread over threads it would cost a shared-memory conversion per chunk, so each row of the tile reads the
    # same (cached) values through the tile's own layout instead
    if ROWS_SPREAD:
        offs = tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N))
        return tl.load(P + offs, mask=offs < n, other=0.0).to(tl.float32)
    else:
        return tl.load(P + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]


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
    HAS_RESIDUAL: tl.constexpr,  # add R
    HAS_WEIGHT: tl.constexpr,  # scale by W
    HAS_BIAS: tl.constexpr,  # shift by B
    HAS_DROPOUT: tl.constexpr,  # drop elements of X before the residual add
    STORE_S: tl.constexpr,  # write the residual sum to S
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per chunk, a power of two
    NUM_CHUNKS: tl.constexpr,  # chunks per row: NUM_CHUNKS * BLOCK_N >= n
    ROWS_SPREAD: tl.constexpr,  # the tile's rows lie in different threads (see _load_cols)
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    # pass 1: load s chunk by chunk and keep every chunk in registers for the two passes that follow
    s_all = ()
    for c in tl.static_range(NUM_CHUNKS):
        cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < n)[None, :]
        s = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            s = tl.where(dropout_keep(seed, rows, c * BLOCK_N, n, thresh, BLOCK_N), s * keep_scale, 0.0)
        if HAS_RESIDUAL:
            s += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if STORE_S:
            s_low = s.to(S.dtype.element_ty)
            tl.store(S + rows[:, None] * n + cols[None, :], s_low, mask=mask)
            # normalise the rounded sum: it is what the backward pass will reload
            s = s_low.to(tl.float32)
        s_all += (s,)
    # chunks are added elementwise first, so each statistic costs a single row reduction
    acc = s_all[0]
    for c in tl.static_range(1, NUM_CHUNKS):
        acc += s_all[c]
    mean = tl.sum(acc, axis=1) / n
    # pass 2: centred values (zero in the padding, which must not count in the variance)
    d_all = ()
    for c in tl.static_range(NUM_CHUNKS):
        cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
        d_all += (tl.where(row_ok[:, None] & (cols < n)[None, :], s_all[c] - mean[:, None], 0.0),)
    acc = d_all[0] * d_all[0]
    for c in tl.static_range(1, NUM_CHUNKS):
        acc += d_all[c] * d_all[c]
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / n + eps)
    # pass 3: normalise, scale, shift, store
    for c in tl.static_range(NUM_CHUNKS):
        cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
        y = d_all[c] * rstd[:, None]
        if HAS_WEIGHT:
            y *= _load_cols(W, cols, n, BLOCK_M, BLOCK_N, ROWS_SPREAD)
        if HAS_BIAS:
            y += _load_cols(B, cols, n, BLOCK_M, BLOCK_N, ROWS_SPREAD)
        mask = row_ok[:, None] & (cols < n)[None, :]
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
    HAS_DS_OUT: tl.constexpr,  # add DS_OUT to the gradient of s
    HAS_DRES: tl.constexpr,  # write the gradient of s to DRES
    HAS_WEIGHT: tl.constexpr,  # W scales the output
    HAS_DROPOUT: tl.constexpr,  # regenerate the forward's mask for DX
    BLOCK_M: tl.constexpr,  # rows per step of the persistent loop
    BLOCK_N: tl.constexpr,  # columns per chunk, a power of two
    NUM_CHUNKS: tl.constexpr,  # chunks per row: NUM_CHUNKS * BLOCK_N >= n
    ROWS_SPREAD: tl.constexpr,  # the tile's rows lie in different threads (see _load_cols)
):
    pid = tl.program_id(0)
    w_all = ()
    dw_all = ()
    db_all = ()
    for c in tl.static_range(NUM_CHUNKS):
        cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
        if HAS_WEIGHT:
            w_all += (_load_cols(W, cols, n, BLOCK_M, BLOCK_N, ROWS_SPREAD),)
        if ROWS_SPREAD:
            # one partial per (row, column): summing over rows inside the loop would cross threads (shared memory
            # and a barrier per step), so rows are summed once, after the loop
            dw_all += (tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),)
            db_all += (tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),)
        else:
            # each thread holds all BLOCK_M rows of its columns: the sum over rows stays in the thread
            dw_all += (tl.zeros((BLOCK_N,), dtype=tl.float32),)
            db_all += (tl.zeros((BLOCK_N,), dtype=tl.float32),)
    for start in range(pid * BLOCK_M, m, n_progs * BLOCK_M):
        rows = tl.arange(0, BLOCK_M).to(tl.int64) + start
        row_ok = rows < m
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        # pass 1: xhat and g of every chunk, kept in registers for pass 2
        xhat_all = ()
        dy_all = ()
        g_all = ()
        for c in tl.static_range(NUM_CHUNKS):
            cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < n)[None, :]
            s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xhat_all += (tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0),)
            dy_all += (dy,)
            g_all += (dy * w_all[c] if HAS_WEIGHT else dy,)
        # chunks are added elementwise first, so each of c1, c2 costs a single row reduction
        acc1 = xhat_all[0] * g_all[0]
        acc2 = g_all[0]
        for c in tl.static_range(1, NUM_CHUNKS):
            acc1 += xhat_all[c] * g_all[c]
            acc2 += g_all[c]
        c1 = tl.sum(acc1, axis=1) / n
        c2 = tl.sum(acc2, axis=1) / n
        # pass 2: ds, dx, and the dw/db partials
        dw_next = ()
        db_next = ()
        for c in tl.static_range(NUM_CHUNKS):
            cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < n)[None, :]
            ds = (g_all[c] - (xhat_all[c] * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DS_OUT:
                dso = tl.load(DS_OUT + rows[:, None] * stride_dso + cols[None, :], mask=mask, other=0.0)
                ds += dso.to(tl.float32)
            offs = rows[:, None] * n + cols[None, :]
            if HAS_DRES:
                tl.store(DRES + offs, ds.to(DRES.dtype.element_ty), mask=mask)
            if HAS_DROPOUT:
                ds = tl.where(dropout_keep(seed, rows, c * BLOCK_N, n, thresh, BLOCK_N), ds * keep_scale, 0.0)
            tl.store(DX + offs, ds.to(DX.dtype.element_ty), mask=mask)
            if ROWS_SPREAD:
                dw_next += (dw_all[c] + dy_all[c] * xhat_all[c],)
                db_next += (db_all[c] + dy_all[c],)
            else:
                dw_next += (dw_all[c] + tl.sum(dy_all[c] * xhat_all[c], axis=0),)
                db_next += (db_all[c] + tl.sum(dy_all[c], axis=0),)
        dw_all = dw_next
        db_all = db_next
    for c in tl.static_range(NUM_CHUNKS):
        cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
        if HAS_WEIGHT:
            dw = tl.sum(dw_all[c], axis=0) if ROWS_SPREAD else dw_all[c]
            tl.store(DW + pid.to(tl.int64) * n + cols, dw, mask=cols < n)
        if DB is not None:
            db = tl.sum(db_all[c], axis=0) if ROWS_SPREAD else db_all[c]
            tl.store(DB + pid.to(tl.int64) * n + cols, db, mask=cols < n)
