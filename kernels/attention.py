"""Fused attention kernels (FlashAttention-2 algorithm); launchers live in fastformer/ops/attention/triton_impl.py.

Forward (``attention_fwd_kernel``): one program owns BLOCK_M query rows of one (batch, head). It streams the keys
and values of the matching kv head (GQA: head h reads kv head h // group) in BLOCK_N tiles and keeps the
softmax online: a running row max ``m`` (base-2 domain, the scale folded into ``qk_scale``), a running
normaliser ``l`` and an fp32 accumulator rescaled by exp2(m_old - m_new) whenever the max grows. It
stores the output and the row logsumexp ``lse`` (natural log); nothing of size S×S is written.
With USE_TMA (sm_90, operands TMA-aligned) Q, K and V arrive through tensor descriptors bounded by the sequence and
the head dim, so the hardware zero-fills what the pointer path masks and the loop does no address arithmetic.
With WARP_SPEC (non-causal, unmasked, no dropout, dense, keys a multiple of 128: the launcher decides) the key
loop is warp-specialised: Triton 3.6 splits it into a TMA producer warp and two consumer warpgroups that take
turns between softmax and matmuls, which it does only for a single loop fed by descriptors.

Backward: ``attention_bwd_preprocess_kernel`` computes delta = rowsum(dO * O). ``attention_bwd_dkdv_kernel`` owns
BLOCK_N keys of one kv head and loops over every query head of its GQA group and every query tile, recomputing
P = exp(s - lse) to accumulate dV = Pᵀ dO and dK = dSᵀ Q with dS = P * (dP - delta); one program owns each
dK/dV tile, so dK and dV need no atomics. dQ = dS K has two modes, chosen by the launcher from
``torch.are_deterministic_algorithms_enabled()``. Deterministic (7 matmuls per tile pair): ``attention_bwd_dq_kernel``
owns BLOCK_M queries and loops over keys, recomputing S and dP; every sum has a fixed order, so reruns are bitwise
equal. Otherwise (the default, ATOMIC_DQ, FlashAttention-2's 5 matmuls) the dK/dV program also forms dS K for each
query tile it visits and adds it with ``tl.atomic_add`` into an fp32 q-shaped buffer, which the launcher scales by
sm_scale and casts; the order of those additions varies, so dQ's last bits may differ between runs. The programs
share their prologue through the helpers below (``_program``, ``_seq_bounds``, ``_head_ids``: program decode,
sequence bounds, indices; ``_load_rows``: tile loads; ``_load_q_side``: the per-query-row inputs of backward), as
the Triton tutorial factors its inner loop.

Masks, all generated in-kernel from indices: key columns past the sequence, the key padding mask
(True/1 = attend), and causality aligned bottom-right (query i sees key j <= i + seqlen_k - seqlen_q).
With IS_CAUSAL the loops stop at (forward, dQ) or start from (dK/dV) the diagonal, so tiles entirely
above it are never visited. A row with no visible key stores out = 0 and lse = +inf, so that backward's
exp(s - lse) is 0 there and its gradient is 0, never NaN.

Split-KV decoding (IS_SPLIT): for few query rows and long keys, the keys are cut into splits of ``split_len``
so that many programs share one row; each writes a normalised fp32 partial output and its lse, and
``attention_fwd_combine_kernel`` merges them with weights exp(lse_split - lse). A split program owns one kv head:
its BLOCK_M rows enumerate the pairs (query head of the group, query position), so each K/V split is read once
per kv head and decoding fills group rows of the tile instead of one. The combine's programs tile (rows, chunks
of D), sized by the launcher so that a decoding step's few rows still occupy every SM.

Dropout (HAS_DROPOUT) drops P after the normaliser is accumulated; element (row r, key j) is element (r, j) of
the dropout matrix with row length ``drop_stride`` (kernels/dropout.py: word j % 4 of the Philox call at counter
``r * ceil(drop_stride / 4) + j // 4``), where r is the flat lse index of the row (see fastformer/ops/attention/).
Key tiles start at multiples of BLOCK_N, a multiple of 4, so one Philox call decides 4 keys. Backward
regenerates the same decisions; the dK/dV kernel builds the (queries, keys) mask and transposes it.

Layouts: tensors are addressed as base + b*stride_b + (seq_start + i)*stride_s + h*stride_h + d with all
strides passed in (last dimension contiguous), so views such as a packed QKV projection need no copy.
IS_VARLEN reads the sequence starts and lengths from cu_seqlens (stride_b is then 0). Offsets are int64.
Every pointer argument is followed by its strides.

Limits: head dims up to 256 (BLOCK_D = next power of two >= D, the padding lanes are masked); fp16,
bf16, fp32 (fp32 dot precision chosen by the launcher through DOT_PREC).
"""

import triton
import triton.language as tl
from fastformer.kernels.dropout import dropout_keep

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _unravel(
    idx,  # flat index
    n,  # extent of the fastest coordinate
    REVERSE: tl.constexpr,  # count the fast coordinate down from n - 1
):
    low = idx % n
    if REVERSE:
        low = n - 1 - low
    return low, idx // n


@triton.jit
def _seq_bounds(
    CuQ,  # int32/int64 (B + 1) query sequence starts (IS_VARLEN)
    CuK,  # same for keys
    b,  # batch index
    max_seq_q,  # dense query length
    max_seq_k,  # dense key length
    IS_VARLEN: tl.constexpr,  # read the bounds from CuQ/CuK
):
    if IS_VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int64)
        k_start = tl.load(CuK + b).to(tl.int64)
        seq_q = (tl.load(CuQ + b + 1) - q_start).to(tl.int32)
        seq_k = (tl.load(CuK + b + 1) - k_start).to(tl.int32)
    else:
        q_start = tl.zeros([], dtype=tl.int64)
        k_start = tl.zeros([], dtype=tl.int64)
        seq_q = max_seq_q
        seq_k = max_seq_k
    return q_start, k_start, seq_q, seq_k


@triton.jit
def _tile(
    start,  # first index of the tile in its sequence
    seq_start,  # int64 row of the sequence's first token in the tensor
    seq_len,  # tokens in the sequence
    BLOCK: tl.constexpr,  # tile length
):
    # (index in the sequence, inside the sequence, int64 row in the tensor)
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < seq_len, seq_start + offs.to(tl.int64)


@triton.jit
def _program(
    n_tiles,  # tiles along the program's own sequence axis
    n_split,  # key splits per tile (1 unless split-KV)
    n_heads,  # query heads, or kv heads for the programs that own keys
    REVERSE: tl.constexpr,  # count the tiles down: with causal the longest rows start first
):
    # (tile, split, batch, head) of this program: the flat id runs over tiles fastest (consecutive programs share
    # one head's K/V in L2), then key splits, heads and batches
    tile, rest = _unravel(tl.program_id(0), n_tiles, REVERSE)
    split, bh = _unravel(rest, n_split, False)
    head, b = _unravel(bh, n_heads, False)
    return tile, split, b, head


@triton.jit
def _head_ids(
    b,  # batch
    h,  # query head
    group,  # query heads per kv head
    head_dim,  # D
    BLOCK_D: tl.constexpr,  # head-dim lanes
):
    # int64 batch, head and kv head indices, the head-dim lanes and their bounds; computed after a program's early
    # exit, as the compiler then keeps 32-bit index products
    offs_d = tl.arange(0, BLOCK_D)
    return b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64), offs_d, offs_d < head_dim


@triton.jit
def _split_rows(
    start_r,  # first row of the tile
    head0,  # int64 first query head of the kv head's group
    group,  # query heads per kv head
    seq_q,  # query positions per head
    BLOCK_M: tl.constexpr,  # rows per tile
):
    # split-KV forward: row r of a kv head's tiles is (query head head0 + r // seq_q, position r % seq_q). Returns
    # the rows' positions, which rows exist, their int64 heads, and bounds on the tile's first and last positions
    # (a tile that wraps into the next head's rows spans them all)
    r = start_r + tl.arange(0, BLOCK_M)
    p0 = start_r % seq_q
    wraps = p0 + BLOCK_M > seq_q
    first = tl.where(wraps, 0, p0)
    last = tl.where(wraps, seq_q - 1, p0 + BLOCK_M - 1)
    return r % seq_q, r < group * seq_q, head0 + (r // seq_q).to(tl.int64), first, last


@triton.jit
def _load_rows(
    Base,  # the (batch, head) base pointer
    idx64,  # int64 token rows
    stride_s,  # token stride
    offs_d,  # head-dim lanes
    idx_ok,  # rows inside the sequence
    d_ok,  # lanes inside the head dim
    TRANS: tl.constexpr,  # load (BLOCK_D, rows) instead of (rows, BLOCK_D)
):
    if TRANS:
        t = tl.load(Base + idx64[None, :] * stride_s + offs_d[:, None], mask=idx_ok[None, :] & d_ok[:, None], other=0.0)
    else:
        t = tl.load(Base + idx64[:, None] * stride_s + offs_d[None, :], mask=idx_ok[:, None] & d_ok[None, :], other=0.0)
    return t


@triton.jit
def _store_rows(
    Base,  # the (batch, head) base pointer
    value,  # (rows, BLOCK_D) fp32, stored in Base's dtype
    idx64,  # int64 token rows
    stride_s,  # token stride
    offs_d,  # head-dim lanes
    idx_ok,  # rows inside the sequence
    d_ok,  # lanes inside the head dim
):
    ptrs = Base + idx64[:, None] * stride_s + offs_d[None, :]
    tl.store(ptrs, value.to(Base.dtype.element_ty), mask=idx_ok[:, None] & d_ok[None, :])


@triton.jit
def _key_on(
    Mask,  # (B, Sk) key padding mask
    b64,  # batch
    cols64,  # int64 key indices in the sequence
    stride_mb,  # Mask batch stride
    stride_mk,  # Mask key stride
    n_ok,  # keys inside the sequence
):
    # keys the padding mask lets through (True/1 = attend)
    return tl.load(Mask + b64 * stride_mb + cols64 * stride_mk, mask=n_ok, other=0) != 0


@triton.jit
def _load_q_side(
    QBase,  # Q at the (batch, head)
    DOBase,  # DO at the (batch, head)
    LseBase,  # Lse, or Lse at the (batch, head)
    DeltaBase,  # Delta, or Delta at the (batch, head)
    rows64,  # int64 query rows
    lse_rows,  # the rows' indices from LseBase and DeltaBase
    stride_qs,  # Q token stride
    stride_ds,  # DO token stride
    offs_d,  # head-dim lanes
    m_ok,  # rows inside the sequence
    d_ok,  # lanes inside the head dim
):
    # backward's per-query-row inputs: q, dO, lse in the base-2 domain and delta; padding rows get lse = +inf,
    # hence P = 0
    q = _load_rows(QBase, rows64, stride_qs, offs_d, m_ok, d_ok, False)
    do = _load_rows(DOBase, rows64, stride_ds, offs_d, m_ok, d_ok, False)
    lse = tl.load(LseBase + lse_rows, mask=m_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DeltaBase + lse_rows, mask=m_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _unmasked_end(
    seq_k,  # keys in this sequence
    first_row_limit,  # first query row of the tile + causal offset: its last visible key
    IS_CAUSAL: tl.constexpr,  # bottom-right causal mask
    BLOCK_N: tl.constexpr,  # keys per tile
):
    # key tiles starting at or past the returned column need element masks (sequence end, causal diagonal)
    end = seq_k // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        end = tl.minimum(end, tl.maximum(first_row_limit + 1, 0) // BLOCK_N * BLOCK_N)
    return end


@triton.jit
def _edge_ok(
    cols,  # (BLOCK_N,) key indices in the sequence
    rows,  # (BLOCK_M,) query indices in the sequence
    n_ok,  # (BLOCK_N,) cols < seqlen_k
    causal_off,  # seqlen_k - seqlen_q
    IS_CAUSAL: tl.constexpr,  # bottom-right causal mask
):
    ok = n_ok[None, :]
    if IS_CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + causal_off)
    return ok


@triton.jit
def _fwd_key_tiles(
    acc,  # (BLOCK_M, BLOCK_D) fp32 running output, rescaled to the running max
    l_i,  # (BLOCK_M,) running softmax normaliser
    m_i,  # (BLOCK_M,) running row max of the scores times qk_scale (base 2); -inf before any visible key
    q,  # (BLOCK_M, BLOCK_D) query tile
    k_src,  # K at the (batch, kv head, sequence start): a pointer, or a (seq_k, D) tensor descriptor (USE_TMA)
    v_src,  # V, the same way
    stride_ks,  # K token stride
    stride_vs,  # V token stride
    Mask,  # (B, Sk) key padding mask (HAS_MASK)
    stride_mb,  # Mask batch stride
    stride_mk,  # Mask key stride
    b64,  # int64 batch
    offs_m,  # (BLOCK_M,) query indices in the sequence
    offs_d,  # head-dim lanes
    d_ok,  # lanes inside the head dim
    seq_k,  # keys in this sequence
    causal_off,  # seqlen_k - seqlen_q
    qk_scale,  # softmax scale * log2(e), > 0
    seed,  # Philox key (HAS_DROPOUT)
    thresh,  # dropout threshold on 24 random bits
    keep_scale,  # 1 / (1 - p)
    drop_stride,  # keys per dropout row
    lse_rows,  # (BLOCK_M,) flat lse index of each row: the dropout row id
    lo,  # first key of the first tile, a multiple of BLOCK_N
    hi,  # keys from hi on are not visited
    EDGE: tl.constexpr,  # tiles may cross the sequence end or the causal diagonal: apply the element masks
    IS_CAUSAL: tl.constexpr,  # bottom-right causal mask
    HAS_MASK: tl.constexpr,  # apply Mask
    HAS_DROPOUT: tl.constexpr,  # drop P after its normaliser is accumulated
    USE_TMA: tl.constexpr,  # k_src and v_src are tensor descriptors
    WARP_SPEC: tl.constexpr,  # warp-specialise the loop (producer warps issue the loads)
    BLOCK_N: tl.constexpr,  # keys per streamed tile
    DOT_PREC: tl.constexpr,  # tl.dot input_precision (fp32 inputs)
):
    # the online-softmax steps of attention_fwd_kernel over the key tiles in [lo, hi)
    offs_n = tl.arange(0, BLOCK_N)
    # causal: each row's last visible key inside the sequence, so that one compare per element masks both
    last = tl.minimum(offs_m + causal_off, seq_k - 1)
    # the edge tiles are one or two: software-pipelining them would only cost registers
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if EDGE else None, warp_specialize=WARP_SPEC):
        cols = start_n + offs_n
        cols64 = cols.to(tl.int64)
        if EDGE:
            n_ok = cols < seq_k
        else:
            n_ok = tl.full([BLOCK_N], 1, tl.int1)
        if USE_TMA:
            # rows past the sequence and lanes past D arrive as zeros, as the masked pointer load gives them
            kt = tl.trans(k_src.load([start_n, 0]))
        else:
            kt = _load_rows(k_src, cols64, stride_ks, offs_d, n_ok, d_ok, True)
        # raw scores; the scale goes into the exp2 argument below (one multiply-add per element)
        s = tl.dot(q, kt, input_precision=DOT_PREC)
        if HAS_MASK:
            key_on = _key_on(Mask, b64, cols64, stride_mb, stride_mk, n_ok)
            s = tl.where(key_on[None, :], s, float("-inf"))
        if EDGE:
            if IS_CAUSAL:
                s = tl.where(offs_n[None, :] <= (last - start_n)[:, None], s, float("-inf"))
            else:
                s = tl.where(n_ok[None, :], s, float("-inf"))
        # qk_scale > 0, so the max of the scaled scores is the scaled max
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = tl.where(dropout_keep(seed, lse_rows, start_n, drop_stride, thresh, BLOCK_N), p * keep_scale, 0.0)
        if USE_TMA:
            v = v_src.load([start_n, 0])
        else:
            v = _load_rows(v_src, cols64, stride_vs, offs_d, n_ok, d_ok, False)
        if HAS_MASK:
            # a masked key's P is 0, but 0 * NaN is NaN: whatever its V holds must not reach the product
            v = tl.where(key_on[:, None], v, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attention_fwd_kernel(
    Q,  # (B, Sq, H, D) queries, or packed (Tq, H, D) when IS_VARLEN; one BLOCK_M tile per program
    stride_qb,  # Q batch stride (0 when IS_VARLEN)
    stride_qs,  # Q token stride
    stride_qh,  # Q head stride
    K,  # (B, Sk, Hkv, D) keys, or packed (Tk, Hkv, D); streamed in BLOCK_N tiles
    stride_kb,  # K batch stride
    stride_ks,  # K token stride
    stride_kh,  # K head stride
    V,  # values, shaped like K; streamed with it
    stride_vb,  # V batch stride
    stride_vs,  # V token stride
    stride_vh,  # V head stride
    Out,  # like Q, written; IS_SPLIT: fp32 per-split partial outputs
    stride_ob,  # Out batch stride
    stride_os,  # Out token stride
    stride_oh,  # Out head stride
    Lse,  # fp32 row logsumexp (natural log), written; +inf for a row with no visible key
    stride_lb,  # Lse batch stride (0 when IS_VARLEN)
    stride_lh,  # Lse head stride; a head's rows are contiguous
    Mask,  # (B, Sk) bool key padding mask, True = attend (HAS_MASK); scores of other keys are -inf
    stride_mb,  # Mask batch stride
    stride_mk,  # Mask key stride
    CuQ,  # (B + 1) query sequence starts (IS_VARLEN)
    CuK,  # (B + 1) key sequence starts (IS_VARLEN)
    n_heads,  # H: programs run over (batch, head, query tile); IS_SPLIT: (batch, kv head, key split, row tile)
    group,  # query heads per kv head
    max_seq_q,  # query length (dense) or max query length (varlen)
    max_seq_k,  # key length (dense) or max key length (varlen)
    head_dim,  # D
    qk_scale,  # softmax scale * log2(e)
    seed,  # Philox key (HAS_DROPOUT)
    thresh,  # dropout threshold on 24 random bits
    keep_scale,  # 1 / (1 - p)
    drop_stride,  # keys per dropout row (Sk dense, max_seqlen_k varlen)
    seq_bucket,  # autotune key only  # noqa: ARG001
    split_len,  # keys per split, a multiple of 128 (IS_SPLIT)
    stride_osplit,  # Out stride between splits (IS_SPLIT)
    stride_lsplit,  # Lse stride between splits (IS_SPLIT)
    IS_CAUSAL: tl.constexpr,  # bottom-right causal mask; key tiles past the diagonal are skipped
    HAS_MASK: tl.constexpr,  # apply Mask
    IS_VARLEN: tl.constexpr,  # packed sequences bounded by CuQ/CuK
    HAS_DROPOUT: tl.constexpr,  # drop P after its normaliser is accumulated
    IS_SPLIT: tl.constexpr,  # split-KV decoding: write per-split partials for attention_fwd_combine_kernel
    USE_TMA: tl.constexpr,  # stream K/V through tensor descriptors (TMA on sm_90); the launcher checks alignment
    WARP_SPEC: tl.constexpr,  # warp-specialise the unmasked key loop (non-causal, no dropout: see the launcher)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per streamed tile
    BLOCK_D: tl.constexpr,  # head-dim lanes, a power of two >= D
    DOT_PREC: tl.constexpr,  # tl.dot input_precision (fp32 inputs)
):
    if IS_SPLIT:
        # one program per (batch, kv head, key split, row tile): the rows pack the kv head's query heads
        n_split = tl.cdiv(max_seq_k, split_len)
        start_m, split, b, hk = _program(tl.cdiv(group * max_seq_q, BLOCK_M), n_split, n_heads // group, True)
        q_start, k_start, seq_q, seq_k = _seq_bounds(CuQ, CuK, b, max_seq_q, max_seq_k, IS_VARLEN)
        b64, hk64, _hk, offs_d, d_ok = _head_ids(b, hk, 1, head_dim, BLOCK_D)
        offs_m, m_ok, head64, q_first, q_last = _split_rows(start_m * BLOCK_M, hk64 * group, group, seq_q, BLOCK_M)
        rows64 = q_start + offs_m.to(tl.int64)
        # each row's (head, token) offset, loaded with row stride 1
        q = _load_rows(Q + b64 * stride_qb, head64 * stride_qh + rows64 * stride_qs, 1, offs_d, m_ok, d_ok, False)
        lse_rows = b64 * stride_lb + head64 * stride_lh + rows64
    else:
        start_m, split, b, h = _program(tl.cdiv(max_seq_q, BLOCK_M), 1, n_heads, True)
        q_start, k_start, seq_q, seq_k = _seq_bounds(CuQ, CuK, b, max_seq_q, max_seq_k, IS_VARLEN)
        if IS_VARLEN:  # dense grids cover the rows exactly (an early exit would also defeat warp specialisation)
            if start_m * BLOCK_M >= seq_q:
                return
        offs_m, m_ok, rows64 = _tile(start_m * BLOCK_M, q_start, seq_q, BLOCK_M)
        b64, h64, hk64, offs_d, d_ok = _head_ids(b, h, group, head_dim, BLOCK_D)
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        if USE_TMA:  # (also what lets Triton 3.6 warp-specialise the key loop: a pointer load here defeats it)
            q_desc = tl.make_tensor_descriptor(q_base + q_start * stride_qs, [seq_q, head_dim], [stride_qs, 1],
                                               [BLOCK_M, BLOCK_D])  # fmt: skip
            q = q_desc.load([start_m * BLOCK_M, 0])
        else:
            q = _load_rows(q_base, rows64, stride_qs, offs_d, m_ok, d_ok, False)
        # flat lse index of each row; also the dropout row id
        lse_rows = b64 * stride_lb + h64 * stride_lh + rows64
        q_first = start_m * BLOCK_M
    k_src = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_ks
    v_src = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vs
    if USE_TMA:
        # one descriptor per sequence and kv head: its bounds are the sequence's keys and D, so the hardware
        # zero-fills what the pointer path masks, and a tile never reads a neighbouring sequence or head (a
        # sequence with no key loads nothing, but a descriptor needs a non-empty extent)
        n_keys = tl.maximum(seq_k, 1)
        k_src = tl.make_tensor_descriptor(k_src, [n_keys, head_dim], [stride_ks, 1], [BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_src, [n_keys, head_dim], [stride_vs, 1], [BLOCK_N, BLOCK_D])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_off = seq_k - seq_q
    lo = 0
    hi = seq_k
    if IS_CAUSAL:
        # key tiles past the last visible key of this query tile are not visited at all
        if IS_SPLIT:
            hi = tl.minimum(seq_k, q_last + 1 + causal_off)
        else:
            hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M + causal_off)
    if IS_SPLIT:
        lo = split * split_len
        hi = tl.minimum(hi, lo + split_len)
        Out += split.to(tl.int64) * stride_osplit
        Lse += split.to(tl.int64) * stride_lsplit
    # key tiles that start below `mid` lie inside the sequence and (causal) below the diagonal for every row of
    # this query tile, so they need no element masks; only the tiles in [mid, hi) pay for them. Clamped into
    # [lo, hi] (one split's keys with IS_SPLIT); lo, mid and a clamped mid < hi are all multiples of BLOCK_N
    mid = tl.minimum(tl.maximum(_unmasked_end(seq_k, q_first + causal_off, IS_CAUSAL, BLOCK_N), lo), hi)
    # fmt: off
    acc, l_i, m_i = _fwd_key_tiles(
        acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs, Mask, stride_mb, stride_mk, b64, offs_m, offs_d, d_ok,
        seq_k, causal_off, qk_scale, seed, thresh, keep_scale, drop_stride, lse_rows, lo, mid,
        False, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, USE_TMA, WARP_SPEC, BLOCK_N, DOT_PREC)
    if not WARP_SPEC:  # (Triton 3.6 cannot warp-specialise a loop whose results feed another loop)
        acc, l_i, m_i = _fwd_key_tiles(
            acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs, Mask, stride_mb, stride_mk, b64, offs_m, offs_d,
            d_ok, seq_k, causal_off, qk_scale, seed, thresh, keep_scale, drop_stride, lse_rows, mid, hi,
            True, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, USE_TMA, False, BLOCK_N, DOT_PREC)
    # fmt: on

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # a row with no key: +inf makes backward's P zero; a split with no key must weigh 0 in the combine: -inf
    lse_empty = float("-inf") if IS_SPLIT else float("inf")
    lse = tl.where(empty, lse_empty, (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if IS_SPLIT:
        _store_rows(Out + b64 * stride_ob, out, head64 * stride_oh + rows64 * stride_os, 1, offs_d, m_ok, d_ok)
    else:
        _store_rows(Out + b64 * stride_ob + h64 * stride_oh, out, rows64, stride_os, offs_d, m_ok, d_ok)
    tl.store(Lse + lse_rows, lse, mask=m_ok)


@triton.jit
def attention_fwd_combine_kernel(
    OPart,  # fp32 (splits, rows, D) per-split normalised outputs
    LPart,  # fp32 (splits, rows) per-split logsumexp, -inf for a split with no visible key
    Out,  # (B, Sq, H, D) output, written
    stride_ob,  # Out batch stride
    stride_os,  # Out token stride
    stride_oh,  # Out head stride
    Lse,  # fp32 (B, H, Sq) logsumexp, written (+inf for rows with no visible key)
    n_split,  # number of key splits
    n_rows,  # B * H * Sq; row r = (b * H + h) * Sq + i
    n_heads,  # H
    max_seq_q,  # Sq (split-KV is dense only)
    head_dim,  # D
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # head-dim lanes per program (program_id(1) picks the chunk of D); a power of two
):
    # programs tile (rows, D chunks) so that even one decoding step's few rows spread over the whole GPU; every
    # chunk recomputes its rows' weights from the split lse (n_split loads), the chunk of D 0 stores the lse
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = rows < n_rows
    ld = r_ok[:, None] & (offs_d < head_dim)[None, :]
    rows64 = rows.to(tl.int64)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # int64 split stride as a tensor: n_rows may arrive as a constexpr (== 1) that has no .to()
    split_stride = tl.zeros([BLOCK_M], dtype=tl.int64) + n_rows
    for sp in range(0, n_split):
        base = rows64 + sp * split_stride
        ls = tl.load(LPart + base, mask=r_ok, other=float("-inf"))
        o = tl.load(OPart + base[:, None] * head_dim + offs_d[None, :], mask=ld, other=0.0)
        m_new = tl.maximum(m, ls)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(ls - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o
        l_sum = l_sum * alpha + w
        m = m_new
    empty = l_sum == 0.0
    out = acc / tl.where(empty, 1.0, l_sum)[:, None]
    lse = tl.where(empty, float("inf"), m + tl.log(tl.where(empty, 1.0, l_sum)))
    i = rows64 % max_seq_q
    bh = rows64 // max_seq_q
    o_ptrs = Out + (bh // n_heads) * stride_ob + (bh % n_heads) * stride_oh + i * stride_os
    tl.store(o_ptrs[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=ld)
    tl.store(Lse + rows64, lse, mask=r_ok & (tl.program_id(1) == 0))


@triton.jit
def attention_bwd_preprocess_kernel(
    Out,  # forward output
    stride_ob,  # Out batch stride (0 when IS_VARLEN)
    stride_os,  # Out token stride
    stride_oh,  # Out head stride
    DO,  # gradient of the output (Out-shaped)
    stride_db,  # DO batch stride
    stride_ds,  # DO token stride
    stride_dh,  # DO head stride
    Delta,  # fp32, lse-shaped, written: rowsum(dO * O)
    stride_lb,  # Delta batch stride (as Lse)
    stride_lh,  # Delta head stride
    CuQ,  # (B + 1) query sequence starts (IS_VARLEN)
    n_heads,  # H
    max_seq_q,  # query length (max for varlen)
    head_dim,  # D
    IS_VARLEN: tl.constexpr,  # packed sequences bounded by CuQ
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # head-dim lanes, a power of two >= D
):
    start_m, _split, b, h = _program(tl.cdiv(max_seq_q, BLOCK_M), 1, n_heads, False)
    q_start, _k_start, seq_q, _seq_k = _seq_bounds(CuQ, CuQ, b, max_seq_q, max_seq_q, IS_VARLEN)
    if start_m * BLOCK_M >= seq_q:
        return
    _offs_m, m_ok, rows64 = _tile(start_m * BLOCK_M, q_start, seq_q, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    o = _load_rows(Out + b64 * stride_ob + h64 * stride_oh, rows64, stride_os, offs_d, m_ok, d_ok, False)
    do = _load_rows(DO + b64 * stride_db + h64 * stride_dh, rows64, stride_ds, offs_d, m_ok, d_ok, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + rows64, delta, mask=m_ok)


@triton.jit
def attention_bwd_dkdv_kernel(
    K,  # forward keys; this program's BLOCK_N of them stay in registers
    stride_kb,  # K batch stride (0 when IS_VARLEN)
    stride_ks,  # K token stride
    stride_kh,  # K head stride
    V,  # forward values, resident like K
    stride_vb,  # V batch stride
    stride_vs,  # V token stride
    stride_vh,  # V head stride
    DK,  # k-shaped, written
    stride_dkb,  # DK batch stride
    stride_dks,  # DK token stride
    stride_dkh,  # DK head stride
    DV,  # v-shaped, written
    stride_dvb,  # DV batch stride
    stride_dvs,  # DV token stride
    stride_dvh,  # DV head stride
    DQ,  # ATOMIC_DQ: fp32 q-shaped, zeroed by the launcher; gets dS K (unscaled) added atomically; else unused
    stride_dqb,  # DQ batch stride
    stride_dqs,  # DQ token stride
    stride_dqh,  # DQ head stride
    Q,  # forward queries, streamed in BLOCK_M tiles for every head of the kv head's group
    stride_qb,  # Q batch stride
    stride_qs,  # Q token stride
    stride_qh,  # Q head stride
    DO,  # gradient of the output (q-shaped), streamed with Q
    stride_db,  # DO batch stride
    stride_ds,  # DO token stride
    stride_dh,  # DO head stride
    Lse,  # fp32 forward logsumexp of the streamed rows
    Delta,  # fp32 rowsum(dO * O) of the streamed rows
    stride_lb,  # Lse/Delta batch stride
    stride_lh,  # Lse/Delta head stride
    Mask,  # (B, Sk) bool key padding mask (HAS_MASK), read once for the program's keys
    stride_mb,  # Mask batch stride
    stride_mk,  # Mask key stride
    CuQ,  # (B + 1) query sequence starts (IS_VARLEN)
    CuK,  # (B + 1) key sequence starts (IS_VARLEN)
    n_heads,  # H: programs run over (batch, kv head, key tile)
    group,  # query heads per kv head: the heads each program loops over
    max_seq_q,  # query length (max for varlen): bounds the loop over query tiles
    max_seq_k,  # key length (max for varlen): sizes the grid
    head_dim,  # D
    sm_scale,  # softmax scale (natural); dK is scaled by it once at the end
    seed,  # Philox key (HAS_DROPOUT)
    thresh,  # dropout threshold on 24 random bits
    keep_scale,  # 1 / (1 - p)
    drop_stride,  # keys per dropout row (Sk dense, max_seqlen_k varlen)
    seq_bucket,  # autotune key only  # noqa: ARG001
    IS_CAUSAL: tl.constexpr,  # bottom-right causal mask; query tiles above the diagonal are skipped
    HAS_MASK: tl.constexpr,  # apply Mask
    IS_VARLEN: tl.constexpr,  # packed sequences bounded by CuQ/CuK
    HAS_DROPOUT: tl.constexpr,  # regenerate the forward's dropout decisions
    ATOMIC_DQ: tl.constexpr,  # also add each visited query tile's dQ share into DQ (no dQ kernel; not deterministic)
    BLOCK_M: tl.constexpr,  # query rows per streamed tile
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # head-dim lanes, a power of two >= D
    DOT_PREC: tl.constexpr,  # tl.dot input_precision (fp32 inputs)
):
    start_n, _split, b, hk = _program(tl.cdiv(max_seq_k, BLOCK_N), 1, n_heads // group, False)
    q_start, k_start, seq_q, seq_k = _seq_bounds(CuQ, CuK, b, max_seq_q, max_seq_k, IS_VARLEN)
    if start_n * BLOCK_N >= seq_k:
        return
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_n, n_ok, cols64 = _tile(start_n * BLOCK_N, k_start, seq_k, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    k = _load_rows(K + b64 * stride_kb + hk64 * stride_kh, cols64, stride_ks, offs_d, n_ok, d_ok, False)
    v = _load_rows(V + b64 * stride_vb + hk64 * stride_vh, cols64, stride_vs, offs_d, n_ok, d_ok, False)
    # keys past the sequence produce rows of dK/dV that are never stored, so only real masks are applied. With
    # ATOMIC_DQ their P also enters dQ: their k rows are 0, but exp2(0 - lse) overflows to inf for a row whose
    # scores are all very negative, and inf * 0 is NaN, so a tile that crosses the sequence end masks them too
    key_ok = n_ok
    if HAS_MASK:
        key_ok = n_ok & _key_on(Mask, b64, offs_n.to(tl.int64), stride_mb, stride_mk, n_ok)
        # masked keys' rows enter every product of this program: zeroed, NaN or inf there cannot leak (0 * NaN)
        k = tl.where(key_ok[:, None], k, 0.0)
        v = tl.where(key_ok[:, None], v, 0.0)
    tail = start_n * BLOCK_N + BLOCK_N > seq_k
    qk_scale = sm_scale * _LOG2E
    causal_off = seq_k - seq_q
    lo = 0
    diag_end = 0
    if IS_CAUSAL:
        # query tiles whose last row cannot see the first key of this tile are skipped
        lo = tl.maximum(start_n * BLOCK_N - causal_off, 0) // BLOCK_M * BLOCK_M
        diag_end = start_n * BLOCK_N + BLOCK_N - 1 - causal_off
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        h64 = hk64 * group + g
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        do_base = DO + b64 * stride_db + h64 * stride_dh
        l_base = b64 * stride_lb + h64 * stride_lh
        dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh
        for start_m in range(lo, seq_q, BLOCK_M):
            rows, m_ok, rows64 = _tile(start_m, q_start, seq_q, BLOCK_M)
            q, do, lse, delta = _load_q_side(
                q_base, do_base, Lse + l_base, Delta + l_base, rows64, rows64, stride_qs, stride_ds, offs_d, m_ok, d_ok
            )
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M) = S transposed
            pt = tl.math.exp2(st * qk_scale - lse[None, :])
            if HAS_MASK:
                pt = tl.where(key_ok[:, None], pt, 0.0)
            elif ATOMIC_DQ:
                if tail:
                    pt = tl.where(key_ok[:, None], pt, 0.0)
            if IS_CAUSAL:
                # only query tiles that start before the last key of this tile is visible cross the diagonal
                if start_m < diag_end:
                    pt = tl.where(offs_n[:, None] <= rows[None, :] + causal_off, pt, 0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            if HAS_DROPOUT:
                # the (queries, keys) mask of the forward, transposed to this (keys, queries) tile
                keep = tl.trans(dropout_keep(seed, l_base + rows64, start_n * BLOCK_N, drop_stride, thresh, BLOCK_N))
                dv += tl.dot(tl.where(keep, pt * keep_scale, 0.0).to(do.dtype), do, input_precision=DOT_PREC)
                dpt = tl.where(keep, dpt * keep_scale, 0.0)
            else:
                dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
            dst = (pt * (dpt - delta[None, :])).to(q.dtype)
            dk += tl.dot(dst, q, input_precision=DOT_PREC)
            if ATOMIC_DQ:
                # this key tile's share of the rows' dQ = dS K (the fifth matmul), summed over the kv programs in
                # fp32; relaxed: only the sum matters, and the launcher reads it after the kernel ends. wgmma needs
                # 64 rows in its first operand, so the product is formed with the longer of BLOCK_D and BLOCK_M there
                if BLOCK_D >= BLOCK_M:
                    dqt = tl.dot(tl.trans(k), dst, input_precision=DOT_PREC)  # (BLOCK_D, BLOCK_M) = dQ transposed
                    dq_ptrs = dq_base + rows64[None, :] * stride_dqs + offs_d[:, None]
                    tl.atomic_add(dq_ptrs, dqt, mask=m_ok[None, :] & d_ok[:, None], sem="relaxed")
                else:
                    dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PREC)
                    dq_ptrs = dq_base + rows64[:, None] * stride_dqs + offs_d[None, :]
                    tl.atomic_add(dq_ptrs, dq, mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
    dk = dk * sm_scale
    _store_rows(DK + b64 * stride_dkb + hk64 * stride_dkh, dk, cols64, stride_dks, offs_d, n_ok, d_ok)
    _store_rows(DV + b64 * stride_dvb + hk64 * stride_dvh, dv, cols64, stride_dvs, offs_d, n_ok, d_ok)


@triton.jit
def attention_bwd_dq_kernel(
    Q,  # forward queries; this program's BLOCK_M rows stay in registers
    stride_qb,  # Q batch stride (0 when IS_VARLEN)
    stride_qs,  # Q token stride
    stride_qh,  # Q head stride
    DO,  # gradient of the output, resident like Q
    stride_db,  # DO batch stride
    stride_ds,  # DO token stride
    stride_dh,  # DO head stride
    DQ,  # q-shaped, written
    stride_dqb,  # DQ batch stride
    stride_dqs,  # DQ token stride
    stride_dqh,  # DQ head stride
    Lse,  # fp32 forward logsumexp of the program's rows
    Delta,  # fp32 rowsum(dO * O) of the program's rows
    stride_lb,  # Lse/Delta batch stride
    stride_lh,  # Lse/Delta head stride
    K,  # forward keys, streamed in BLOCK_N tiles up to the causal diagonal
    stride_kb,  # K batch stride
    stride_ks,  # K token stride
    stride_kh,  # K head stride
    V,  # forward values, streamed with K
    stride_vb,  # V batch stride
    stride_vs,  # V token stride
    stride_vh,  # V head stride
    Mask,  # (B, Sk) bool key padding mask (HAS_MASK), read per key tile
    stride_mb,  # Mask batch stride
    stride_mk,  # Mask key stride
    CuQ,  # (B + 1) query sequence starts (IS_VARLEN)
    CuK,  # (B + 1) key sequence starts (IS_VARLEN)
    n_heads,  # H: programs run over (batch, head, query tile)
    group,  # query heads per kv head
    max_seq_q,  # query length (max for varlen): sizes the grid
    max_seq_k,  # key length (max for varlen): bounds the loop over key tiles
    head_dim,  # D
    sm_scale,  # softmax scale (natural)
    seed,  # Philox key (HAS_DROPOUT)
    thresh,  # dropout threshold on 24 random bits
    keep_scale,  # 1 / (1 - p)
    drop_stride,  # keys per dropout row (Sk dense, max_seqlen_k varlen)
    seq_bucket,  # autotune key only  # noqa: ARG001
    IS_CAUSAL: tl.constexpr,  # bottom-right causal mask; stop at the diagonal
    HAS_MASK: tl.constexpr,  # apply Mask
    IS_VARLEN: tl.constexpr,  # packed sequences bounded by CuQ/CuK
    HAS_DROPOUT: tl.constexpr,  # regenerate the forward's dropout decisions
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per streamed tile
    BLOCK_D: tl.constexpr,  # head-dim lanes, a power of two >= D
    DOT_PREC: tl.constexpr,  # tl.dot input_precision (fp32 inputs)
):
    start_m, _split, b, h = _program(tl.cdiv(max_seq_q, BLOCK_M), 1, n_heads, True)
    q_start, k_start, seq_q, seq_k = _seq_bounds(CuQ, CuK, b, max_seq_q, max_seq_k, IS_VARLEN)
    if start_m * BLOCK_M >= seq_q:
        return
    b64, h64, hk64, offs_d, d_ok = _head_ids(b, h, group, head_dim, BLOCK_D)
    offs_m, m_ok, rows64 = _tile(start_m * BLOCK_M, q_start, seq_q, BLOCK_M)
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DO + b64 * stride_db + h64 * stride_dh
    l_rows = b64 * stride_lb + h64 * stride_lh + rows64
    q, do, lse, delta = _load_q_side(
        q_base, do_base, Lse, Delta, rows64, l_rows, stride_qs, stride_ds, offs_d, m_ok, d_ok
    )
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vs
    qk_scale = sm_scale * _LOG2E
    causal_off = seq_k - seq_q
    hi = seq_k
    if IS_CAUSAL:
        hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M + causal_off)
    mid = _unmasked_end(seq_k, start_m * BLOCK_M + causal_off, IS_CAUSAL, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < seq_k
        cols64 = cols.to(tl.int64)
        kt = _load_rows(k_base, cols64, stride_ks, offs_d, n_ok, d_ok, True)
        vt = _load_rows(v_base, cols64, stride_vs, offs_d, n_ok, d_ok, True)
        if HAS_MASK:
            # masked keys: P = 0, and zeroed K^T / V^T columns so that NaN or inf there cannot leak (0 * NaN)
            key_on = _key_on(Mask, b64, cols64, stride_mb, stride_mk, n_ok)
            kt = tl.where(key_on[None, :], kt, 0.0)
            vt = tl.where(key_on[None, :], vt, 0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if HAS_MASK:
            p = tl.where(key_on[None, :], p, 0.0)
        if start_n + BLOCK_N > mid:
            p = tl.where(_edge_ok(cols, offs_m, n_ok, causal_off, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        if HAS_DROPOUT:
            dp = tl.where(dropout_keep(seed, l_rows, start_n, drop_stride, thresh, BLOCK_N), dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)
    dq = dq * sm_scale
    _store_rows(DQ + b64 * stride_dqb + h64 * stride_dqh, dq, rows64, stride_dqs, offs_d, m_ok, d_ok)
