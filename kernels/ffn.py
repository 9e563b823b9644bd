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

The kernel is persistent (the design of Triton's persistent-matmul tutorial): the grid holds about as many
programs as fit on the device at once, and each walks work items strided by the grid size; with TMA the tile
and K loops are flattened into one loop, so the software pipeline runs on from one tile into the next instead
of draining at every tile. There is no tail of CTA launches. Tiles are numbered in groups of GROUP_M rows of
tiles so that the programs running together share A and B panels in L2.

Operands reach shared memory one of two ways, chosen by the USE_TMA constexpr:

- tensor descriptors (sm_90+, and the interpreter): ``tl.make_tensor_descriptor`` built on the device, one per
  operand and program, describing the operand's row-major storage. A transposed view (an nn.Linear weight seen
  as (K, N): B_KMAJOR; an activation or gradient seen as (K, M) in a weight gradient: A_MMAJOR) is loaded as
  stored and transposed for the dot (16-bit wgmma reads either major order from shared memory as it is).
  Boxes past M, N or K read zeros. Needs a 16-byte aligned base and row strides that are multiples of 16
  bytes (``utils.tma_aligned``).
- masked pointer loads (sm_80, or operands TMA cannot describe): any strides; rows and columns wrap modulo M
  and N (always in bounds, the store masks them), K is masked; offsets are int64.

Split-K (SPLIT_K > 1, plain epilogue only: no bias, activation, dropout or AUX): a work item is a tile and
one of SPLIT_K equal slices of K (in whole BLOCK_K steps; the last slices may be short or empty), items
ordered slice-major. Each writes its fp32 partial tile to C, which is then the (SPLIT_K, M, N) workspace;
``splitk_reduce_kernel`` sums the slices in slice order into the output dtype, so the result is the same on
every run (no atomics). It fills the device when the output has few tiles and K is long (weight gradients).

fp32 inputs use ``DOT_PRECISION`` ("ieee", or "tf32" on GPU when torch allows it). Dropout decides element
(row, col) of the (M, N) dropout matrix of the shared Philox scheme (kernels/dropout.py): one Philox call per 4
columns, so BLOCK_N is a multiple of 4 (tiles start at multiples of it).

Limits: outputs C/AUX/H are contiguous (M, N); inputs may have any strides. bf16 runs only on GPU
(the Triton interpreter computes bf16 dots wrongly). Stores are masked pointer stores (not TMA), and a
persistent program keeps its pipeline buffers while it converts the accumulator's layout for them, so the
epilogue's shared memory comes on top of the pipeline's.
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
def _tile_coords(
    tile,  # output tile id, 0 .. num_pid_m * num_pid_n - 1
    num_pid_m,  # tile rows
    num_pid_n,  # tile columns
    GROUP_M: tl.constexpr,  # tile rows per L2 group
):
    # consecutive tile ids walk down a group of GROUP_M tile rows before moving right, so the programs working at
    # one time share A row panels and B column panels in L2
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def linear_kernel(
    A,  # (M, K), any strides
    B,  # (K, N), any strides (the weight seen as (in, out) in either storage layout)
    BIAS,  # (N,) bias, read when HAS_BIAS
    C,  # (M, N) contiguous output; with SPLIT_K > 1 the (SPLIT_K, M, N) contiguous fp32 partial products
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
    USE_TMA: tl.constexpr,  # load A and B through device-side tensor descriptors (else masked pointer loads)
    A_MMAJOR: tl.constexpr,  # with USE_TMA: A's storage is (K, M) row-major (stride_am == 1), A a transposed view
    B_KMAJOR: tl.constexpr,  # with USE_TMA: B's storage is (N, K) row-major (stride_bn == 1), e.g. an nn.Linear weight
    SPLIT_K: tl.constexpr,  # programs per output tile, each over a slice of K (plain epilogue only)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # tile rows per L2 group
):
    tl.static_assert(
        SPLIT_K == 1 or (EPILOGUE == 0 and not HAS_BIAS and ACT == 0 and not DROPOUT and not STORE_AUX),
        "split-K writes raw partial products: only the plain epilogue can be applied after their sum",
    )
    num_pid_m = tl.cdiv(m, BLOCK_M)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    # every split runs the same number of BLOCK_K steps (a loop bound the same for all items, so the tile loop
    # flattens into one pipelined loop); steps past k read zeros
    k_iters = tl.cdiv(tl.cdiv(k, BLOCK_K), SPLIT_K)
    offs_k = tl.arange(0, BLOCK_K)
    if USE_TMA:
        # one descriptor per operand and program, built on the device once and reused for every tile; each
        # describes the operand's row-major storage, so a transposed view is loaded as stored and transposed in
        # shared memory (16-bit wgmma reads either major order) instead of losing TMA. Out-of-bounds boxes read zeros.
        if A_MMAJOR:
            a_desc = tl.make_tensor_descriptor(A, shape=[k, m], strides=[stride_ak, 1], block_shape=[BLOCK_K, BLOCK_M])
        else:
            a_desc = tl.make_tensor_descriptor(A, shape=[m, k], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        if B_KMAJOR:
            b_desc = tl.make_tensor_descriptor(B, shape=[n, k], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(B, shape=[k, n], strides=[stride_bk, 1], block_shape=[BLOCK_K, BLOCK_N])
    else:
        # int64 step: BLOCK_K * stride can pass 2**31 for a transposed view of a large operand
        step_a = tl.full((), BLOCK_K, tl.int64) * stride_ak
        step_b = tl.full((), BLOCK_K, tl.int64) * stride_bk

    # persistent: the grid is about what fits on the device at once, and each program walks work items (an output
    # tile and, with SPLIT_K, a slice of K) strided by the grid size; items are split-major so that the programs
    # running together work on neighbouring tiles of one K slice (L2 reuse, as GROUP_M orders them). The tile and
    # K loops are flattened into one pipelined loop only with TMA: on the pointer path the next tile's loads in
    # flight sit in registers beside the epilogue's, and the flattened loop spills (sm_80, activation-gradient
    # epilogue with dropout)
    for item in tl.range(tl.program_id(0), num_tiles * SPLIT_K, tl.num_programs(0), flatten=USE_TMA):
        if SPLIT_K == 1:
            split = 0
            tile = item
        else:
            split = item // num_tiles
            tile = item % num_tiles
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        k_lo = split * k_iters * BLOCK_K
        if not USE_TMA:
            # wrap edge rows/cols onto valid ones so A and B loads need no M/N mask; the store masks them
            rows = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % m).to(tl.int64)
            cols = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % n).to(tl.int64)
            ks = (k_lo + offs_k).to(tl.int64)
            a_ptrs = A + rows[:, None] * stride_am + ks[None, :] * stride_ak
            b_ptrs = B + ks[:, None] * stride_bk + cols[None, :] * stride_bn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_iters):
            k0 = k_lo + ki * BLOCK_K
            if USE_TMA:
                if A_MMAJOR:
                    a = a_desc.load([k0, pid_m * BLOCK_M]).T
                else:
                    a = a_desc.load([pid_m * BLOCK_M, k0])
                if B_KMAJOR:
                    b = b_desc.load([pid_n * BLOCK_N, k0]).T
                else:
                    b = b_desc.load([k0, pid_n * BLOCK_N])
            else:
                k_left = k - k0
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
                a_ptrs += step_a
                b_ptrs += step_b
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out_rows = offs_m.to(tl.int64)
        out_cols = offs_n.to(tl.int64)
        mask = (offs_m[:, None] < m) & (offs_n[None, :] < n)
        flat = out_rows[:, None] * n + out_cols[None, :]
        out_ty = C.dtype.element_ty

        if SPLIT_K > 1:
            # this slice's fp32 partial; splitk_reduce_kernel sums the slices in a fixed order
            tl.store(C + split.to(tl.int64) * m * n + flat, acc, mask=mask)
        elif EPILOGUE == 0:
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
def splitk_reduce_kernel(
    PART,  # (SPLIT_K, M * N) contiguous fp32 partial products of linear_kernel
    C,  # (M * N,) contiguous output
    mn,  # elements of C
    SPLIT_K: tl.constexpr,  # number of partials
    BLOCK: tl.constexpr,  # elements per program
):
    # partials summed in split order 0, 1, ...: the same bits on every run (atomics would add in arrival order)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < mn
    part = PART + offs
    acc = tl.load(part, mask=mask, other=0.0)
    for _ in tl.static_range(1, SPLIT_K):
        part += mn  # one slice on, stepping the pointer: s * mn itself can pass 2**31
        acc += tl.load(part, mask=mask, other=0.0)
    tl.store(C + offs, acc.to(C.dtype.element_ty), mask=mask)


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
