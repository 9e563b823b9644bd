"""Fused attention kernels (FlashAttention-2 algorithm); launchers live in fastformer/ops/attention.py.

Forward (``_attn_fwd``): one program owns BLOCK_M query rows of one (batch, head). It streams the keys and
values of the matching kv head (GQA: head h reads kv head h // GROUP) in BLOCK_N tiles and keeps the
softmax online: a running row max ``m`` (base-2 domain, the scale folded into ``qk_scale``), a running
normaliser ``l`` and an fp32 accumulator rescaled by exp2(m_old - m_new) whenever the max grows. It
stores the output and the row logsumexp ``lse`` (natural log); nothing of size S×S is written.

Backward: ``_attn_bwd_preprocess`` computes delta = rowsum(dO * O). ``_attn_bwd_dkdv`` owns BLOCK_N keys
of one kv head and loops over every query head of its GQA group and every query tile, recomputing
P = exp(s - lse) to accumulate dV = Pᵀ dO and dK = dSᵀ Q with dS = P * (dP - delta); because one program
owns each dK/dV tile there are no atomics and the result is deterministic. ``_attn_bwd_dq`` owns BLOCK_M
queries and loops over keys for dQ = dS K.

Masks, all generated in-kernel from indices: key columns past the sequence, the key padding mask
(True/1 = attend), and causality aligned bottom-right (query i sees key j <= i + seqlen_k - seqlen_q).
With IS_CAUSAL the loops stop at (forward, dQ) or start from (dK/dV) the diagonal, so tiles entirely
above it are never visited. A row with no visible key stores out = 0 and lse = +inf, so that backward's
exp(s - lse) is 0 there and its gradient is 0, never NaN.

Split-KV decoding (IS_SPLIT): for few query rows and long keys, the keys are cut into splits of ``split_len``
so that many programs share one row; each writes a normalised fp32 partial output and its lse, and
``_attn_fwd_combine`` merges them with weights exp(lse_split - lse).

Dropout (HAS_DROPOUT) drops P after the normaliser is accumulated; element (row r, key j) uses the Philox
offset ``r * drop_stride + j`` where r is the flat lse index of the row (see fastformer/ops/attention.py),
and backward regenerates the same decisions.

Layouts: tensors are addressed as base + b*stride_b + (seq_start + i)*stride_s + h*stride_h + d with all
strides passed in (last dimension contiguous), so views such as a packed QKV projection need no copy.
IS_VARLEN reads the sequence starts and lengths from cu_seqlens (stride_b is then 0). Offsets are int64.

Limits: head dims up to 256 (BLOCK_D = next power of two >= D, the padding lanes are masked); fp16,
bf16, fp32 (fp32 dot precision chosen by the launcher through DOT_PREC).
"""

import triton
import triton.language as tl
from fastformer.kernels.dropout import dropout_keep


@triton.jit
def _seq_bounds(
    CuQ,  # int32/int64 (B + 1) query sequence starts (IS_VARLEN)
    CuK,  # same for keys
    b,  # batch index
    SEQ_Q,  # dense query length
    SEQ_K,  # dense key length
    IS_VARLEN: tl.constexpr,
):
    if IS_VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int64)
        k_start = tl.load(CuK + b).to(tl.int64)
        seq_q = (tl.load(CuQ + b + 1) - q_start).to(tl.int32)
        seq_k = (tl.load(CuK + b + 1) - k_start).to(tl.int32)
    else:
        q_start = tl.zeros([], dtype=tl.int64)
        k_start = tl.zeros([], dtype=tl.int64)
        seq_q = SEQ_Q
        seq_k = SEQ_K
    return q_start, k_start, seq_q, seq_k


@triton.jit
def _unmasked_end(
    seq_k,  # keys in this sequence
    first_row_limit,  # first query row of the tile + causal offset: its last visible key
    IS_CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
    IS_CAUSAL: tl.constexpr,
):
    ok = n_ok[None, :]
    if IS_CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + causal_off)
    return ok


@triton.jit
def _attn_fwd(
    Q,  # (B, Sq, H, D) or packed (Tq, H, D)
    K,  # (B, Sk, Hkv, D) or packed (Tk, Hkv, D)
    V,  # like K
    Out,  # like Q, written
    Lse,  # fp32 row logsumexp (natural log), written; +inf for rows with no visible key
    Mask,  # (B, Sk) bool key padding mask, True = attend (HAS_MASK)
    CuQ,  # (B + 1) query sequence starts (IS_VARLEN)
    CuK,  # (B + 1) key sequence starts (IS_VARLEN)
    seed,  # Philox key for dropout (HAS_DROPOUT)
    stride_qb,
    stride_qs,
    stride_qh,  # Q strides: batch (0 if varlen), token, head
    stride_kb,
    stride_ks,
    stride_kh,  # K strides
    stride_vb,
    stride_vs,
    stride_vh,  # V strides
    stride_ob,
    stride_os,
    stride_oh,  # Out strides
    stride_lb,
    stride_lh,  # Lse strides: batch (0 if varlen), head; tokens are contiguous
    stride_mb,
    stride_mk,  # Mask strides
    H,  # query heads
    GROUP,  # query heads per kv head
    SEQ_Q,  # query length (dense) or max query length (varlen)
    SEQ_K,  # key length (dense) or max key length (varlen)
    HEAD_DIM,  # D
    qk_scale,  # softmax scale * log2(e)
    drop_thresh,  # dropout threshold on 24 random bits
    drop_scale,  # 1 / (1 - p)
    drop_stride,  # keys per dropout row (Sk dense, max_seqlen_k varlen)
    seq_bucket,  # autotune key only
    split_len,  # keys per split, a multiple of 128 (IS_SPLIT)
    stride_osplit,  # Out stride between splits (IS_SPLIT)
    stride_lsplit,  # Lse stride between splits (IS_SPLIT)
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_SPLIT: tl.constexpr,  # split-KV decoding: write per-split partials (fp32 out, lse) for _attn_fwd_combine
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(SEQ_Q, BLOCK_M)
    # consecutive programs share one (batch, head) so its K/V stay in L2; with causal the longest rows go first
    start_m = num_m - 1 - pid % num_m
    bh = pid // num_m
    split = 0
    if IS_SPLIT:
        n_split = tl.cdiv(SEQ_K, split_len)
        split = bh % n_split
        bh = bh // n_split
    b = bh // H
    h = bh % H
    q_start, k_start, seq_q, seq_k = _seq_bounds(CuQ, CuK, b, SEQ_Q, SEQ_K, IS_VARLEN)
    if start_m * BLOCK_M >= seq_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seq_q
    rows64 = q_start + offs_m.to(tl.int64)

    q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + rows64[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vs
    # flat lse index of each row; also the dropout row id
    lse_rows = b64 * stride_lb + h64 * stride_lh + rows64

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_off = seq_k - seq_q
    lo = 0
    hi = seq_k
    if IS_CAUSAL:
        # key tiles past the last visible key of this query tile are not visited at all
        hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M + causal_off)
    if IS_SPLIT:
        lo = split * split_len
        hi = tl.minimum(hi, lo + split_len)
        Out += split.to(tl.int64) * stride_osplit
        Lse += split.to(tl.int64) * stride_lsplit
    # key tiles that start below `mid` lie inside the sequence and (causal) below the diagonal for every row of
    # this query tile, so they need no element masks; only the last tiles pay for them
    mid = _unmasked_end(seq_k, start_m * BLOCK_M + causal_off, IS_CAUSAL, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < seq_k
        cols64 = cols.to(tl.int64)
        kt = tl.load(
            k_base + cols64[None, :] * stride_ks + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0
        )
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if HAS_MASK:
            km = tl.load(Mask + b64 * stride_mb + cols64 * stride_mk, mask=n_ok, other=0)
            s = tl.where((km != 0)[None, :], s, float("-inf"))
        if start_n + BLOCK_N > mid:
            s = tl.where(_edge_ok(cols, offs_m, n_ok, causal_off, IS_CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, lse_rows[:, None] * drop_stride + cols64[None, :], drop_thresh)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = tl.load(
            v_base + cols64[:, None] * stride_vs + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # a row with no key: +inf makes backward's P zero; a split with no key must weigh 0 in the combine: -inf
    lse_empty = float("-inf") if IS_SPLIT else float("inf")
    lse = tl.where(empty, lse_empty, (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = Out + b64 * stride_ob + h64 * stride_oh + rows64[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + lse_rows, lse, mask=m_ok)


@triton.jit
def _attn_fwd_combine(
    OPart,  # fp32 (splits, rows, D) per-split normalised outputs
    LPart,  # fp32 (splits, rows) per-split logsumexp, -inf for a split with no visible key
    Out,  # (B, Sq, H, D) output, written
    Lse,  # fp32 (B, H, Sq) logsumexp, written (+inf for rows with no visible key)
    stride_ob,
    stride_os,
    stride_oh,  # Out strides
    n_split,  # number of key splits
    n_rows,  # B * H * Sq; row r = (b * H + h) * Sq + i
    H,  # query heads
    SEQ_Q,  # query length
    HEAD_DIM,  # D
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = rows < n_rows
    ld = r_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # int64 split stride as a tensor: n_rows may arrive as a constexpr (== 1) that has no .to()
    split_stride = tl.zeros([BLOCK_M], dtype=tl.int64) + n_rows
    for sp in range(0, n_split):
        base = rows64 + sp * split_stride
        ls = tl.load(LPart + base, mask=r_ok, other=float("-inf"))
        o = tl.load(OPart + base[:, None] * HEAD_DIM + offs_d[None, :], mask=ld, other=0.0)
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
    i = rows64 % SEQ_Q
    bh = rows64 // SEQ_Q
    o_ptrs = Out + (bh // H) * stride_ob + (bh % H) * stride_oh + i * stride_os
    tl.store(o_ptrs[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=ld)
    tl.store(Lse + rows64, lse, mask=r_ok)


@triton.jit
def _attn_bwd_preprocess(
    Out,  # forward output
    DO,  # gradient of the output
    Delta,  # fp32, lse-shaped, written: rowsum(dO * O)
    CuQ,  # (B + 1) query sequence starts (IS_VARLEN)
    stride_ob,
    stride_os,
    stride_oh,  # Out strides
    stride_db,
    stride_ds,
    stride_dh,  # DO strides
    stride_lb,
    stride_lh,  # Delta strides (as Lse)
    H,  # query heads
    SEQ_Q,  # query length (max for varlen)
    HEAD_DIM,  # D
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(SEQ_Q, BLOCK_M)
    start_m = pid % num_m
    bh = pid // num_m
    b = bh // H
    h = bh % H
    q_start, _k, seq_q, _s = _seq_bounds(CuQ, CuQ, b, SEQ_Q, SEQ_Q, IS_VARLEN)
    if start_m * BLOCK_M >= seq_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = q_start + offs_m.to(tl.int64)
    ok = (offs_m < seq_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        Out + b64 * stride_ob + h64 * stride_oh + rows64[:, None] * stride_os + offs_d[None, :], mask=ok, other=0.0
    )
    do = tl.load(
        DO + b64 * stride_db + h64 * stride_dh + rows64[:, None] * stride_ds + offs_d[None, :], mask=ok, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + rows64, delta, mask=offs_m < seq_q)


@triton.jit
def _attn_bwd_dkdv(
    Q,  # forward q
    K,  # forward k
    V,  # forward v
    DO,  # gradient of the output (q-shaped)
    Lse,  # fp32 forward logsumexp
    Delta,  # fp32 rowsum(dO * O)
    Mask,  # (B, Sk) bool key padding mask (HAS_MASK)
    CuQ,  # (B + 1) query sequence starts (IS_VARLEN)
    CuK,  # (B + 1) key sequence starts (IS_VARLEN)
    seed,  # Philox key (HAS_DROPOUT)
    DK,  # k-shaped, written
    DV,  # v-shaped, written
    stride_qb,
    stride_qs,
    stride_qh,  # Q strides
    stride_kb,
    stride_ks,
    stride_kh,  # K strides
    stride_vb,
    stride_vs,
    stride_vh,  # V strides
    stride_db,
    stride_ds,
    stride_dh,  # DO strides
    stride_lb,
    stride_lh,  # Lse/Delta strides
    stride_mb,
    stride_mk,  # Mask strides
    stride_dkb,
    stride_dks,
    stride_dkh,  # DK strides
    stride_dvb,
    stride_dvs,
    stride_dvh,  # DV strides
    H,  # query heads
    GROUP,  # query heads per kv head
    SEQ_Q,  # query length (max for varlen)
    SEQ_K,  # key length (max for varlen)
    HEAD_DIM,  # D
    sm_scale,  # softmax scale (natural)
    drop_thresh,  # dropout threshold on 24 random bits
    drop_scale,  # 1 / (1 - p)
    drop_stride,  # keys per dropout row
    seq_bucket,  # autotune key only
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    HKV = H // GROUP
    pid = tl.program_id(0)
    num_n = tl.cdiv(SEQ_K, BLOCK_N)
    start_n = pid % num_n
    bh = pid // num_n
    b = bh // HKV
    hk = bh % HKV
    q_start, k_start, seq_q, seq_k = _seq_bounds(CuQ, CuK, b, SEQ_Q, SEQ_K, IS_VARLEN)
    if start_n * BLOCK_N >= seq_k:
        return
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < seq_k
    cols64 = k_start + offs_n.to(tl.int64)
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b64 * stride_kb + hk64 * stride_kh + cols64[:, None] * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0
    )
    v = tl.load(
        V + b64 * stride_vb + hk64 * stride_vh + cols64[:, None] * stride_vs + offs_d[None, :], mask=kv_ok, other=0.0
    )
    # keys past the sequence produce rows of dK/dV that are never stored, so only real masks are applied
    key_ok = n_ok
    if HAS_MASK:
        km = tl.load(Mask + b64 * stride_mb + offs_n.to(tl.int64) * stride_mk, mask=n_ok, other=0)
        key_ok = n_ok & (km != 0)
    qk_scale = sm_scale * LOG2E
    causal_off = seq_k - seq_q
    lo = 0
    diag_end = 0
    if IS_CAUSAL:
        # query tiles whose last row cannot see the first key of this tile are skipped
        lo = tl.maximum(start_n * BLOCK_N - causal_off, 0) // BLOCK_M * BLOCK_M
        diag_end = start_n * BLOCK_N + BLOCK_N - 1 - causal_off
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        h64 = hk64 * GROUP + g
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        do_base = DO + b64 * stride_db + h64 * stride_dh
        l_base = b64 * stride_lb + h64 * stride_lh
        for start_m in range(lo, seq_q, BLOCK_M):
            rows = start_m + offs_m
            m_ok = rows < seq_q
            rows64 = q_start + rows.to(tl.int64)
            ld = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows64[:, None] * stride_qs + offs_d[None, :], mask=ld, other=0.0)
            do = tl.load(do_base + rows64[:, None] * stride_ds + offs_d[None, :], mask=ld, other=0.0)
            # padding rows get lse = +inf, hence P = 0
            lse = tl.load(Lse + l_base + rows64, mask=m_ok, other=float("inf")) * LOG2E
            delta = tl.load(Delta + l_base + rows64, mask=m_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M) = S transposed
            pt = tl.math.exp2(st * qk_scale - lse[None, :])
            if HAS_MASK:
                pt = tl.where(key_ok[:, None], pt, 0.0)
            if IS_CAUSAL:
                # only query tiles that start before the last key of this tile is visible cross the diagonal
                if start_m < diag_end:
                    pt = tl.where(offs_n[:, None] <= rows[None, :] + causal_off, pt, 0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            if HAS_DROPOUT:
                keep = dropout_keep(
                    seed, (l_base + rows64)[None, :] * drop_stride + offs_n.to(tl.int64)[:, None], drop_thresh
                )
                dv += tl.dot(tl.where(keep, pt * drop_scale, 0.0).to(do.dtype), do, input_precision=DOT_PREC)
                dpt = tl.where(keep, dpt * drop_scale, 0.0)
            else:
                dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * sm_scale
    tl.store(
        DK + b64 * stride_dkb + hk64 * stride_dkh + cols64[:, None] * stride_dks + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=kv_ok,
    )
    tl.store(
        DV + b64 * stride_dvb + hk64 * stride_dvh + cols64[:, None] * stride_dvs + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_ok,
    )


@triton.jit
def _attn_bwd_dq(
    Q,  # forward q
    K,  # forward k
    V,  # forward v
    DO,  # gradient of the output
    Lse,  # fp32 forward logsumexp
    Delta,  # fp32 rowsum(dO * O)
    Mask,  # (B, Sk) bool key padding mask (HAS_MASK)
    CuQ,  # (B + 1) query sequence starts (IS_VARLEN)
    CuK,  # (B + 1) key sequence starts (IS_VARLEN)
    seed,  # Philox key (HAS_DROPOUT)
    DQ,  # q-shaped, written
    stride_qb,
    stride_qs,
    stride_qh,  # Q strides
    stride_kb,
    stride_ks,
    stride_kh,  # K strides
    stride_vb,
    stride_vs,
    stride_vh,  # V strides
    stride_db,
    stride_ds,
    stride_dh,  # DO strides
    stride_lb,
    stride_lh,  # Lse/Delta strides
    stride_mb,
    stride_mk,  # Mask strides
    stride_dqb,
    stride_dqs,
    stride_dqh,  # DQ strides
    H,  # query heads
    GROUP,  # query heads per kv head
    SEQ_Q,  # query length (max for varlen)
    SEQ_K,  # key length (max for varlen)
    HEAD_DIM,  # D
    sm_scale,  # softmax scale (natural)
    drop_thresh,  # dropout threshold on 24 random bits
    drop_scale,  # 1 / (1 - p)
    drop_stride,  # keys per dropout row
    seq_bucket,  # autotune key only
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    num_m = tl.cdiv(SEQ_Q, BLOCK_M)
    start_m = num_m - 1 - pid % num_m
    bh = pid // num_m
    b = bh // H
    h = bh % H
    q_start, k_start, seq_q, seq_k = _seq_bounds(CuQ, CuK, b, SEQ_Q, SEQ_K, IS_VARLEN)
    if start_m * BLOCK_M >= seq_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seq_q
    rows64 = q_start + offs_m.to(tl.int64)
    ld = m_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + rows64[:, None] * stride_qs + offs_d[None, :], mask=ld, other=0.0
    )
    do = tl.load(
        DO + b64 * stride_db + h64 * stride_dh + rows64[:, None] * stride_ds + offs_d[None, :], mask=ld, other=0.0
    )
    l_rows = b64 * stride_lb + h64 * stride_lh + rows64
    lse = tl.load(Lse + l_rows, mask=m_ok, other=float("inf")) * LOG2E
    delta = tl.load(Delta + l_rows, mask=m_ok, other=0.0)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vs
    qk_scale = sm_scale * LOG2E
    causal_off = seq_k - seq_q
    hi = seq_k
    if IS_CAUSAL:
        hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M + causal_off)
    mid = _unmasked_end(seq_k, start_m * BLOCK_M + causal_off, IS_CAUSAL, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < seq_k
        cols64 = cols.to(tl.int64)
        ldt = n_ok[None, :] & d_ok[:, None]
        kt = tl.load(k_base + cols64[None, :] * stride_ks + offs_d[:, None], mask=ldt, other=0.0)
        vt = tl.load(v_base + cols64[None, :] * stride_vs + offs_d[:, None], mask=ldt, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if HAS_MASK:
            km = tl.load(Mask + b64 * stride_mb + cols64 * stride_mk, mask=n_ok, other=0)
            p = tl.where((km != 0)[None, :], p, 0.0)
        if start_n + BLOCK_N > mid:
            p = tl.where(_edge_ok(cols, offs_m, n_ok, causal_off, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, l_rows[:, None] * drop_stride + cols64[None, :], drop_thresh)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)
    dq = dq * sm_scale
    tl.store(
        DQ + b64 * stride_dqb + h64 * stride_dqh + rows64[:, None] * stride_dqs + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=ld,
    )
