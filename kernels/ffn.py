"""Triton kernels of the feed-forward block: a GEMM with fused epilogues, and an activation-gradient pass.

``linear_kernel`` computes ``acc = A @ B`` for strided A (M, K) and B (K, N) in fp32 and finishes the
tile in one of two epilogues, chosen by the EPILOGUE constexpr:

- 0 (forward): ``pre = acc + bias``; ``y = act(pre)``, times keep/(1-p) when DROPOUT. ``y`` goes to C;
  with STORE_AUX the pre-activation also goes to AUX (kept for backward).
- 1 (activation gradient): ``acc`` is dh, the gradient with respect to the activation output. It reads
  ``pre`` from AUX and stores ``d(pre) = acc * act'(pre) * keep/(1-p)`` to C; with STORE_AUX it also
  stores ``h = act(pre) * keep/(1-p)`` to H (the input of the second layer, needed for its weight
  gradient, so forward does not have to keep it).

Why the derivative sits in an epilogue rather than a prologue: multiplying the dY tile by act'(pre)
as it is loaded would put the GEMM's A operand through registers (breaking the shared-memory
operand pipeline on sm90) and recompute erf and the Philox mask once per re-load of the tile (K/BLOCK_N
times). In the feed-forward block the gradient reaching the activation is produced by a GEMM
(dh = dout @ W2), so its epilogue applies act'(pre) once per element for free. A single ``linear``
has no such GEMM before it, so it uses ``act_grad_kernel``: one elementwise pass reading dy and pre and
writing d(pre) once, which the dX and dW GEMMs then read as a plain operand.

Tiles are visited in groups of GROUP_M rows of tiles so that neighbouring programs share A and B
tiles in L2. Rows use modular indexing (always in bounds) and K is masked, so any M, N, K works;
pointer offsets are int64. fp32 inputs use ``DOT_PRECISION`` ("ieee", or "tf32" on GPU when torch
allows it). Dropout decides element (row, col) of the (M, N) dropout matrix of the shared Philox scheme
(kernels/dropout.py): one Philox call per 4 columns, so BLOCK_N is a multiple of 4 (tiles start at multiples of it).

Limits: outputs C/AUX/H are contiguous (M, N); inputs may have any strides. bf16 runs only on GPU
(the Triton interpreter computes bf16 dots wrongly).
"""

import triton
import triton.language as tl
from fastformer.kernels.dropout import dropout_keep

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_C = tl.constexpr(0.044715)


@triton.jit
def _act_and_grad(
    x,  # fp32 pre-activation tile
    ACT: tl.constexpr,  # 0 none, 1 gelu (erf), 2 gelu_tanh, 3 relu
    NEED_GRAD: tl.constexpr,  # also return act'(x)
):
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
        y = x * cdf
        if NEED_GRAD:
            g = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        else:
            g = y
    elif ACT == 2:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh primitive needed, and no cancellation near 0
        u = _SQRT_2_OVER_PI * (x + _GELU_C * x * x * x)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))
        y = x * s
        if NEED_GRAD:
            g = s + x * 2.0 * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * x * x)
        else:
            g = y
    elif ACT == 3:
        y = tl.maximum(x, 0.0)
        if NEED_GRAD:
            g = tl.where(x > 0.0, 1.0, 0.0)
        else:
            g = y
    else:
        y = x
        if NEED_GRAD:
            g = tl.full(x.shape, 1.0, tl.float32)
        else:
            g = y
    return y, g


@triton.jit
def linear_kernel(
    A,  # (M, K), any strides
    B,  # (K, N), any strides (the weight seen as (in, out) in either storage layout)
    BIAS,  # (N,) bias, read when HAS_BIAS
    C,  # (M, N) contiguous output
    AUX,  # (M, N) contiguous pre-activation: written in epilogue 0 (STORE_AUX), read in epilogue 1
    H,  # (M, N) contiguous activation output, written in epilogue 1 with STORE_AUX
    m,  # rows of A and C
    n,  # columns of B and C
    k,  # reduction length
    stride_am,  # A row stride (elements)
    stride_ak,  # A column stride
    stride_bk,  # B row stride
    stride_bn,  # B column stride
    seed,  # Philox key of the dropout mask
    thresh,  # 24-bit keep threshold (threshold24(p))
    scale,  # 1 / (1 - p)
    m_bucket,  # next power of two of m: autotune key only  # noqa: ARG001
    n_bucket,  # next power of two of n: autotune key only  # noqa: ARG001
    k_bucket,  # next power of two of k: autotune key only  # noqa: ARG001
    HAS_BIAS: tl.constexpr,  # add bias (epilogue 0)
    ACT: tl.constexpr,  # 0 none, 1 gelu, 2 gelu_tanh, 3 relu
    DROPOUT: tl.constexpr,  # apply the dropout mask
    EPILOGUE: tl.constexpr,  # 0 forward, 1 activation gradient (see module docstring)
    STORE_AUX: tl.constexpr,  # epilogue 0: write pre to aux; epilogue 1: write h
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 inputs
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # tile rows per L2 group
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(m, BLOCK_M)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap edge rows/cols onto valid ones so A and B loads need no M/N mask; the store masks them
    rows = (offs_m % m).to(tl.int64)
    cols = (offs_n % n).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = B + offs_k[:, None].to(tl.int64) * stride_bk + cols[None, :] * stride_bn
    # int64 step: BLOCK_K * stride can pass 2**31 for a transposed view of a large operand
    step_a = tl.full((), BLOCK_K, tl.int64) * stride_ak
    step_b = tl.full((), BLOCK_K, tl.int64) * stride_bk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        k_left = k - k0
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += step_a
        b_ptrs += step_b

    out_rows = offs_m.to(tl.int64)
    out_cols = offs_n.to(tl.int64)
    mask = (offs_m[:, None] < m) & (offs_n[None, :] < n)
    flat = out_rows[:, None] * n + out_cols[None, :]
    out_ty = C.dtype.element_ty

    if EPILOGUE == 0:
        if HAS_BIAS:
            bias = tl.load(BIAS + out_cols, mask=offs_n < n, other=0.0).to(tl.float32)
            acc += bias[None, :]
        if STORE_AUX:
            tl.store(AUX + flat, acc.to(out_ty), mask=mask)
        y, _ = _act_and_grad(acc, ACT, False)
        if DROPOUT:
            y = tl.where(dropout_keep(seed, out_rows, pid_n * BLOCK_N, n, thresh, BLOCK_N), y * scale, 0.0)
        tl.store(C + flat, y.to(out_ty), mask=mask)
    else:
        pre = tl.load(AUX + flat, mask=mask, other=0.0).to(tl.float32)
        h, dact = _act_and_grad(pre, ACT, True)
        g = acc * dact
        if DROPOUT:
            keep = dropout_keep(seed, out_rows, pid_n * BLOCK_N, n, thresh, BLOCK_N)
            g = tl.where(keep, g * scale, 0.0)
            h = tl.where(keep, h * scale, 0.0)
        tl.store(C + flat, g.to(out_ty), mask=mask)
        if STORE_AUX:
            tl.store(H + flat, h.to(out_ty), mask=mask)


@triton.jit
def act_grad_kernel(
    DY,  # (M, N) gradient of the activation output, any strides
    PRE,  # (M, N) contiguous pre-activation, read when ACT != 0
    OUT,  # (M, N) contiguous d(pre)
    m,  # rows
    n,  # columns
    stride_dym,  # dy row stride
    stride_dyn,  # dy column stride
    seed,  # Philox key of the dropout mask
    thresh,  # 24-bit keep threshold
    scale,  # 1 / (1 - p)
    ACT: tl.constexpr,  # 0 none (PRE is not read: act' = 1), 1 gelu, 2 gelu_tanh, 3 relu
    DROPOUT: tl.constexpr,  # apply the dropout mask
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    flat = rows[:, None] * n + cols[None, :]
    g = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        pre = tl.load(PRE + flat, mask=mask, other=0.0).to(tl.float32)
        _, dact = _act_and_grad(pre, ACT, True)
        g = g * dact
    if DROPOUT:
        g = tl.where(dropout_keep(seed, rows, tl.program_id(1) * BLOCK_N, n, thresh, BLOCK_N), g * scale, 0.0)
    tl.store(OUT + flat, g.to(OUT.dtype.element_ty), mask=mask)
