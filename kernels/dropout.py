"""Dropout decisions of the Triton kernels; the scheme is described in fastformer/ops/dropout.py.

Element (row, col) of a dropout matrix with row length ``n`` uses word ``col % 4`` of the Philox4x32-10 call at
counter ``row * ceil(n / 4) + col // 4``, so one call decides four consecutive columns.
"""

import triton
import triton.language as tl

# Philox4x32's round multipliers and key increments (Weyl constants)
_ROUND_A, _ROUND_B = tl.constexpr(0xD2511F53), tl.constexpr(0xCD9E8D57)
_KEY_A, _KEY_B = tl.constexpr(0x9E3779B9), tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32(
    seed,  # int64 key (lo32, hi32)
    counters,  # int64 counters (lo32, hi32, 0, 0)
):
    # the four words of Philox4x32-10, what tl.randint4x(seed, counters) returns; each 32x32-bit product is one
    # 64-bit multiply (one wide multiply on the GPU) instead of separate high and low halves
    c0 = counters.to(tl.uint32)
    c1 = (counters >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c2
    key = tl.zeros([], dtype=tl.int64) + seed  # a tensor even where seed arrives as a constexpr
    k0 = key.to(tl.uint32)
    k1 = (key >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        prod_a = c0.to(tl.uint64) * _ROUND_A
        prod_b = c2.to(tl.uint64) * _ROUND_B
        c0 = (prod_b >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (prod_a >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = prod_b.to(tl.uint32)
        c3 = prod_a.to(tl.uint32)
        k0 = tl.add(k0, _KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, _KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def dropout_keep(
    seed,  # int64 Philox key
    rows,  # (BLOCK_M,) int64 dropout row ids
    col0,  # first column of the tile, a multiple of 4
    n,  # row length of the dropout matrix (columns per row)
    thresh,  # keep when the top 24 random bits are >= thresh (see threshold24)
    BLOCK_N: tl.constexpr,  # columns of the tile, a multiple of 4
):
    # (BLOCK_M, BLOCK_N) keep mask of columns col0 .. col0 + BLOCK_N - 1 of ``rows``
    tl.static_assert(BLOCK_N % 4 == 0, "dropout tiles cover whole groups of 4 columns")
    groups = (col0 // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.int64)
    r0, r1, r2, r3 = philox4x32(seed, rows.to(tl.int64)[:, None] * ((n + 3) // 4) + groups[None, :])
    # decide first (compare 24 bits as int32, independent of unsigned promotion rules), then move one byte per element
    # rather than one 32-bit word: fewer live registers and less shared memory in the layout conversion
    k0 = ((r0 >> 8).to(tl.int32) >= thresh).to(tl.int8)
    k1 = ((r1 >> 8).to(tl.int32) >= thresh).to(tl.int8)
    k2 = ((r2 >> 8).to(tl.int32) >= thresh).to(tl.int8)
    k3 = ((r3 >> 8).to(tl.int32) >= thresh).to(tl.int8)
    # tl.join stacks along a new last axis: [g, b, a] of the (BLOCK_M, BLOCK_N // 4, 2, 2) tile is word 2b + a, which
    # the row-major reshape puts at column 4g + 2b + a, i.e. word w of group g lands on column 4g + w
    return tl.reshape(tl.join(tl.join(k0, k2), tl.join(k1, k3)), (rows.shape[0], BLOCK_N)) != 0
