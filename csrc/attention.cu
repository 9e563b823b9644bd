// Fused attention, forward and backward, on the tensor cores: mma.sync m16n8k16 fed by ldmatrix from shared memory
// that cp.async fills (sm_80 and later), and two sm_90a forwards on wgmma (below, after the mma.sync forward). fp16
// and bf16, head dims 64 and 128 (others run on the Triton backend).
//
// Layout and conventions are those of fastformer/ops/attention/: q (B, Sq, H, D), k/v (B, Sk, Hkv, D) with
// (batch, token, head) strides that are multiples of 8 elements, a contiguous head dimension and 16-byte aligned
// bases (the launcher copies anything else), or packed varlen rows addressed through int32 cu_seqlens; lse is fp32
// natural-log, +inf for rows that see no key; causal is bottom-right aligned; dropout decides element (row r, key j)
// of the dropout matrix with row length drop_stride (dropout.cuh), where r is the flat lse index.
//
// Shared-memory tiles hold rows of D 16-bit elements as D / 8 chunks of 16 bytes, chunk c of row r stored at
// c ^ (r % 8): the eight row addresses of one ldmatrix then fall in eight different bank groups. Loads are cp.async
// 16-byte copies; rows past the sequence and padded keys are zero-filled instead of read, so NaN or inf stored in
// padding never reaches an accumulator.
//
// Forward (the FlashAttention-2 split): a block of 4 warps owns 64 query rows of one (batch, head), 16 per warp, in
// the M dimension of the mma. Q goes through shared memory into A fragments held in registers; K/V tiles of 64 keys
// stream through a two-stage cp.async ring, the next tile's copy in flight during this tile's math. Per tile:
// S = Q K^T (fp32), the online softmax on exp2 with the scale folded into log2 units (running max m, per-lane partial
// normaliser l, accumulator rescaled when m grows), then O += P V with P packed from the S accumulators straight into
// A fragments. Tiles that cross the sequence end or the causal diagonal, and every tile under a padding mask, take
// the per-element masking; causal tiles wholly past the diagonal are not visited.
//
// Backward: delta = rowsum(dO * O) (a warp per row); dK/dV: a block owns 64 keys of one kv head (16 per warp, the M
// dimension), keeps K and V in shared memory and streams Q/dO tiles of every query head of its GQA group:
// S^T = K Q^T, P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q; dQ: a
// block shaped like the forward, dQ += dS K over the key tiles. Each output element has one owner that sums in a
// fixed order: no atomics, and reruns are bitwise equal.
#include <vector>

#include "common.cuh"
#include "dropout.cuh"
#include "mma.cuh"
#include "ops.h"

namespace fastformer {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // query rows of a forward/dQ block, keys of a dK/dV block
constexpr int kKeys = 64;           // keys per K/V tile in the forward and dQ
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// queries per Q/dO tile in the dK/dV kernel: 32 keeps dK, dV (2 x D / 4 fp32 per lane) and P^T, dP^T in registers
template <int D>
constexpr int kBwdQueries = D == 128 ? 16 : 32;

struct Strides3 {
  int64_t b, s, h;  // batch (0 for varlen), token, head
};

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* mask;  // (B, Sk) key padding mask, nonzero = attend; nullptr when absent
  const int* cu_q;      // (B + 1) sequence starts when varlen
  const int* cu_k;
  int64_t batch, heads, kv_heads, seq_q, seq_k, dim, drop_stride;
  int64_t tokens_q, tokens_k;  // rows of q and k along their token dimension: Sq/Sk, or the packed totals (varlen)
  bool varlen, causal, dropout;
  Strides3 sq, sk, sv;
  int64_t lse_b, lse_h, mask_b, mask_k;
  float scale, keep_scale;
  uint64_t seed;
  uint32_t thresh24;
};

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

struct Seq {
  int64_t q0, k0, len_q, len_k;
};

__device__ __forceinline__ Seq seq_of(const Params& p, int64_t b) {
  if (p.varlen) {
    const int64_t q0 = p.cu_q[b], k0 = p.cu_k[b];
    return {q0, k0, p.cu_q[b + 1] - q0, p.cu_k[b + 1] - k0};
  }
  return {0, 0, p.seq_q, p.seq_k};
}

__device__ __forceinline__ int64_t at(const Strides3& st, int64_t b, int64_t tok, int64_t h) {
  return b * st.b + tok * st.s + h * st.h;
}

// key j (relative to its sequence) passes the padding mask
__device__ __forceinline__ bool key_on(const Params& p, int64_t b, int64_t j) {
  return p.mask == nullptr || p.mask[b * p.mask_b + j * p.mask_k] != 0;
}

__device__ __forceinline__ int64_t lse_row(const Params& p, int64_t b, int64_t h, const Seq& s, int64_t i) {
  return b * p.lse_b + h * p.lse_h + s.q0 + i;
}

// Element offset of (row, col) in a swizzled tile of rows of D elements; col % 8 is kept within the chunk.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

// This lane's row address in an ldmatrix .x4 over the 16 x 16 block at (r0, c0) of a swizzled tile, for
//  - A fragments (and B fragments through .trans): matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15),
//    (8-15, 8-15), so registers 0-3 are a[0..3] of rows r0.. and k = cols c0..; with .trans on a tile whose rows are
//    the k dimension, registers 0-1 are the B fragment of columns c0..c0+7 and 2-3 that of c0+8..c0+15;
//  - B fragments without .trans, on a tile whose rows are the n dimension (K for S = Q K^T): matrices (0-7, 0-7),
//    (0-7, 8-15), (8-15, 0-7), (8-15, 8-15), so registers 0-1 are the B fragment of n = r0..r0+7, k = c0..c0+15 and
//    registers 2-3 that of n = r0+8..r0+15.
template <int D, typename T>
__device__ __forceinline__ const T* frag_a(const T* tile, int r0, int c0) {
  const int lane = threadIdx.x & 31;
  return tile + swz<D>(r0 + ((lane >> 3) & 1) * 8 + (lane & 7), c0 + ((lane >> 4) & 1) * 8);
}
template <int D, typename T>
__device__ __forceinline__ const T* frag_b(const T* tile, int r0, int c0) {
  const int lane = threadIdx.x & 31;
  return tile + swz<D>(r0 + ((lane >> 4) & 1) * 8 + (lane & 7), c0 + ((lane >> 3) & 1) * 8);
}

// Element offset of (row, col) in a core-matrix tile of R rows (the sm_90a kernels' wgmma operand layout, below):
// 8 x 8 core matrices of 128 contiguous bytes, core (row block rb, column block cb) at index cb * R / 8 + rb.
template <int R>
__device__ __forceinline__ int core_off(int row, int col) {
  return ((col >> 3) * (R / 8) + (row >> 3)) * 64 + (row & 7) * 8 + (col & 7);
}

// How a tile of rows of D 16-bit elements is laid out in shared memory: swizzled rows (ldmatrix) or core matrices
// (wgmma descriptors).
enum class Layout { kSwizzled, kCore };

template <Layout L, int D, int ROWS>
__device__ __forceinline__ int tile_off(int row, int col) {
  if constexpr (L == Layout::kSwizzled) {
    return swz<D>(row, col);
  } else {
    return core_off<ROWS>(row, col);
  }
}

// Start copying rows [r0, r0 + ROWS) of one head into a tile, THREADS threads sharing the 16-byte chunks; `base`
// points at row 0 of the sequence and rows are `stride` elements apart. Row r is copied when r < limit and on(r),
// else zero-filled.
template <typename T, int D, int ROWS, Layout L = Layout::kSwizzled, int THREADS = kThreads, typename On>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t stride, int64_t r0, int64_t limit, On on) {
  constexpr int kChunks = D / 8;
  static_assert(ROWS * kChunks % THREADS == 0, "every thread copies the same number of chunks");
  // offsets recomputed per call (a few integer ops) rather than kept live through the main loop in registers
  const int tid = static_cast<int>(opaque(threadIdx.x));
#pragma unroll
  for (int n = 0; n < ROWS * kChunks / THREADS; ++n) {
    const int idx = tid + n * THREADS, r = idx / kChunks, c = idx % kChunks;
    const int64_t row = r0 + r;
    const bool full = row < limit && on(row);
    cp_async16(tile + tile_off<L, D, ROWS>(r, c * 8), full ? base + row * stride + c * 8 : base, full);
  }
}

// Write rows [r0, r0 + ROWS) of a swizzled tile to global memory in 16-byte stores, rows < limit only.
template <typename T, int D, int ROWS, int THREADS = kThreads>
__device__ __forceinline__ void store_tile(const T* tile, T* base, int64_t stride, int64_t r0, int64_t limit) {
  constexpr int kChunks = D / 8;
  // 32-bit row tests from opaque values: the loads' 64-bit (r0 + r < limit) would otherwise be kept through the loop
  const int rows = static_cast<int>(imin(imax(opaque(limit) - opaque(r0), 0), ROWS));
  base += opaque(r0) * stride;
#pragma unroll
  for (int n = 0; n < ROWS * kChunks / THREADS; ++n) {
    const int idx = threadIdx.x + n * THREADS, r = idx / kChunks, c = idx % kChunks;
    if (r < rows) {
      *reinterpret_cast<uint4*>(base + static_cast<uint32_t>(r) * stride + c * 8) =
          *reinterpret_cast<const uint4*>(tile + swz<D>(r, c * 8));
    }
  }
}

// Put a warp's accumulators for 16 rows x D columns (acc[c / 8][...] in the C layout) into a swizzled tile, times
// `mul`, as T.
template <typename T, int D>
__device__ __forceinline__ void acc_to_tile(T* tile, int r0, const float (&acc)[D / 8][4], float mul0, float mul1) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
    *reinterpret_cast<uint32_t*>(tile + swz<D>(r0 + g, nb * 8 + 2 * t)) =
        pack2<T>(acc[nb][0] * mul0, acc[nb][1] * mul0);
    *reinterpret_cast<uint32_t*>(tile + swz<D>(r0 + g + 8, nb * 8 + 2 * t)) =
        pack2<T>(acc[nb][2] * mul1, acc[nb][3] * mul1);
  }
}

// acc (16 x N, C layout, N / 8 tiles) += A (16 x K, fragments a[K / 16]) times B from a swizzled tile whose rows are
// k (TRANS, ldmatrix .trans: V, dO, Q or K read as k x n) or n (!TRANS: K, Q, V or dO read as n x k), from row 0.
template <typename T, int D, int K, int N, bool TRANS>
__device__ __forceinline__ void mma_ab(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4], const T* b_tile) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int n2 = 0; n2 < N / 16; ++n2) {
      uint32_t b[4];
      if constexpr (TRANS) {
        ldsm_x4_trans(b, frag_a<D>(b_tile, kk * 16, n2 * 16));
      } else {
        ldsm_x4(b, frag_b<D>(b_tile, n2 * 16, kk * 16));
      }
      mma_16816<T>(acc[2 * n2], a[kk], b[0], b[1]);
      mma_16816<T>(acc[2 * n2 + 1], a[kk], b[2], b[3]);
    }
  }
}

// acc (16 x N) += rows a_r0..a_r0+15 of swizzled tile A (16 x D) times B^T, B being N rows of tile b (n x k = D):
// the S = Q K^T shape, A fragments loaded per k step.
template <typename T, int D, int N>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], const T* a_tile, int a_r0, const T* b_tile) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldsm_x4(a, frag_a<D>(a_tile, a_r0, kk * 16));
#pragma unroll
    for (int n2 = 0; n2 < N / 16; ++n2) {
      uint32_t b[4];
      ldsm_x4(b, frag_b<D>(b_tile, n2 * 16, kk * 16));
      mma_16816<T>(acc[2 * n2], a, b[0], b[1]);
      mma_16816<T>(acc[2 * n2 + 1], a, b[2], b[3]);
    }
  }
}

// Accumulators of 16 x N in the C layout, packed as the A fragments of a 16 x N left operand.
template <typename T, int N>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[N / 16][4], const float (&c)[N / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    a[kk][0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// Dropout keep bits of this lane's accumulator elements, bit 4 nb + e for element e of C tile nb, in a loop kept
// rolled so that the Philox rounds are not replicated per element. Forward/dQ layout (rows = queries): element e
// is (lse row row0 or row1 by e / 2, key j0 + 8 nb + 2t + e % 2); one Philox call serves both keys of a row.
__device__ __forceinline__ uint32_t keep_bits_q(const Params& p, int64_t row0, int64_t row1, int64_t j0) {
  const int t = threadIdx.x & 3;
  uint32_t bits = 0;
#pragma unroll 1
  for (int nb = 0; nb < kKeys / 8; ++nb) {
#pragma unroll 1
    for (int r = 0; r < 2; ++r) {
      const int64_t j = j0 + nb * 8 + 2 * t;
      const uint32_t w = dropout_keep4(p.seed, r ? row1 : row0, j & ~int64_t{3}, p.drop_stride, p.thresh24) >> (j & 3);
      bits |= (w & 3u) << (nb * 4 + 2 * r);
    }
  }
  return bits;
}

// The same for the dK/dV layout (rows = keys): element e of tile qb is (key j0 + 8 (e / 2), lse row of query
// i0 + 8 qb + 2t + e % 2 of head h); one Philox call per element.
template <int M>
__device__ __forceinline__ uint32_t keep_bits_k(const Params& p, int64_t b, int64_t h, const Seq& s, int64_t j0,
                                                int64_t i0) {
  const int t = threadIdx.x & 3;
  uint32_t bits = 0;
#pragma unroll 1
  for (int idx = 0; idx < M / 2; ++idx) {
    const int qb = idx >> 2, e = idx & 3;
    const int64_t j = j0 + 8 * (e >> 1), row = lse_row(p, b, h, s, i0 + qb * 8 + 2 * t + (e & 1));
    const uint32_t w = dropout_keep4(p.seed, row, j & ~int64_t{3}, p.drop_stride, p.thresh24) >> (j & 3);
    bits |= (w & 1u) << idx;
  }
  return bits;
}

// The causal test of a tile as a small integer: pair (query row ri, key column cj) of a tile is hidden when
// cj - ri > diag, with diag clamped so that the comparison stays in 32 bits.
__device__ __forceinline__ int causal_diag(int64_t m0, int64_t n0, int64_t off) {
  return static_cast<int>(imax(-256, imin(256, m0 + off - n0)));
}

// The key tile loop's bounds for query rows [m0, m0 + rows): keys [0, hi) of which causal tiles past the diagonal
// are skipped.
__device__ __forceinline__ int64_t key_end(const Params& p, const Seq& s, int64_t m0, int rows) {
  int64_t hi = s.len_k;
  if (p.causal) hi = imax(0, imin(hi, m0 + rows + s.len_k - s.len_q));
  return hi;
}

// Does the tile of keys [n0, n0 + n) need per-element masking for query rows [m0, m0 + rows)?
__device__ __forceinline__ bool tile_masked(const Params& p, const Seq& s, int64_t m0, int64_t n0, int n) {
  return p.mask != nullptr || n0 + n > s.len_k || (p.causal && n0 + n - 1 > m0 + s.len_k - s.len_q);
}

// The forward/dQ block: `rows` query rows from m0 of one (batch, head), and its kv head.
struct QTile {
  int64_t b, h, hk, m0;
  Seq s;
};

__device__ __forceinline__ QTile q_tile(const Params& p, int rows = kRows) {
  const int64_t n_m = (p.seq_q + rows - 1) / rows;
  const int64_t bh = blockIdx.x / n_m, b = bh / p.heads, h = bh % p.heads;
  return {b, h, h / (p.heads / p.kv_heads), (blockIdx.x % n_m) * rows, seq_of(p, b)};
}

// The K and V tiles of keys [n0, n0 + N) of one kv head, and their additive mask (0 or -inf) in `bias`.
template <typename T, int D, int N, Layout L = Layout::kSwizzled, int THREADS = kThreads>
__device__ __forceinline__ void load_kv(const Params& p, int64_t b, int64_t hk, const Seq& s, int64_t n0, T* ks,
                                        T* vs, float* bias) {
  auto on = [&](int64_t j) { return key_on(p, b, j); };
  load_tile<T, D, N, L, THREADS>(ks, static_cast<const T*>(p.k) + at(p.sk, b, s.k0, hk), p.sk.s, n0, s.len_k, on);
  load_tile<T, D, N, L, THREADS>(vs, static_cast<const T*>(p.v) + at(p.sv, b, s.k0, hk), p.sv.s, n0, s.len_k, on);
  if (threadIdx.x < N) {
    const int64_t j = n0 + threadIdx.x;
    bias[threadIdx.x] = j < s.len_k && key_on(p, b, j) ? 0.f : -INFINITY;
  }
}

// One key tile of the forward's online softmax for this lane's rows g and g + 8 (C layout), shared by the mma.sync and
// wgmma kernels. sc holds the tile's raw scores (NB tiles of 8 keys); on return it holds the probabilities times
// their dropout factors (keep_scale or 0), m the running row maxima (log2 units), l this lane's partial normalisers
// (counting dropped probabilities too), and alpha the factors the output accumulator must be rescaled by before
// this tile's P V is added (softmax_step does it at once; the TMA forward later, while its P V of the previous tile
// runs). bias (0 or -inf per key, nullptr when the tile needs no masking) and the causal test apply per element;
// row is this lane's first row within the block, row0 its lse row.
template <int NB>
__device__ __forceinline__ void softmax_scores(const Params& p, float (&sc)[NB][4], float (&m)[2], float (&l)[2],
                                               float (&alpha)[2], const float* bias, int row, int diag,
                                               int64_t row0, int64_t n0) {
  const int t = threadIdx.x & 3;
  const float c = p.scale * kLog2e;  // scores in log2 units
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = sc[nb][e] * c;
      if (bias != nullptr) {
        const int jj = nb * 8 + 2 * t + (e & 1);
        x += bias[jj];
        if (p.causal && jj - (row + 8 * (e >> 1)) > diag) x = -INFINITY;
      }
      sc[nb][e] = x;
      mx[e >> 1] = fmaxf(mx[e >> 1], x);
    }
  }
  float base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(m[r], mx[r]);
    base[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: every exp2 below is 0
    alpha[r] = exp2f(m[r] - base[r]);
    m[r] = m_new;
    l[r] *= alpha[r];
  }
  const uint32_t kept = p.dropout ? keep_bits_q(p, row0, row0 + 8, n0) : ~0u;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pr = exp2f(sc[nb][e] - base[e >> 1]);
      l[e >> 1] += pr;
      sc[nb][e] = (kept >> (nb * 4 + e)) & 1u ? pr * p.keep_scale : 0.f;
    }
  }
}

template <int DN>
__device__ __forceinline__ void rescale(float (&o)[DN][4], const float (&alpha)[2]) {
#pragma unroll
  for (int nb = 0; nb < DN; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nb][e] *= alpha[e >> 1];
  }
}

template <int NB, int DN>
__device__ __forceinline__ void softmax_step(const Params& p, float (&sc)[NB][4], float (&o)[DN][4], float (&m)[2],
                                             float (&l)[2], const float* bias, int row, int diag, int64_t row0,
                                             int64_t n0) {
  float alpha[2];
  softmax_scores(p, sc, m, l, alpha, bias, row, diag, row0, n0);
  rescale(o, alpha);
}

// The forward's end: reduce l over the quad, write lse (natural log; +inf for rows that saw no key) and O / l through
// the block's Q tile (a swizzled ROWS x D tile of shared memory, free once the key loop is done) as 16-byte stores.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void fwd_epilogue(const Params& p, const QTile& qt, T* qs, const float (&o)[D / 8][4],
                                             float (&m)[2], float (&l)[2], T* out, const Strides3& so, float* lse) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const int64_t i = opaque(qt.m0) + warp * 16 + g + 8 * r;  // recomputed: see opaque()
    if (t == 0 && i < qt.s.len_q) {
      lse[lse_row(p, qt.b, qt.h, qt.s, i)] = l[r] > 0.f ? m[r] * kLn2 + logf(l[r]) : INFINITY;
    }
  }
  cp_async_wait<0>();  // with no key tile, the Q copy may still be in flight into qs
  __syncthreads();
  acc_to_tile<T, D>(qs, warp * 16, o, inv[0], inv[1]);
  __syncthreads();
  store_tile<T, D, ROWS, THREADS>(qs, out + at(so, qt.b, qt.s.q0, qt.h), so.s, qt.m0, qt.s.len_q);
}

template <int D>
constexpr size_t fwd_smem(size_t elem) {
  return (kRows + 4 * kKeys) * D * elem + 2 * kKeys * sizeof(float);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attn_fwd_kernel(Params p, T* out, Strides3 so, float* lse) {
  T* qs = reinterpret_cast<T*>(dynamic_smem());  // kRows x D
  T* ks = qs + kRows * D;                         // 2 stages x kKeys x D
  T* vs = ks + 2 * kKeys * D;                     // 2 stages x kKeys x D
  float* bias = reinterpret_cast<float*>(vs + 2 * kKeys * D);  // 2 stages x kKeys
  const QTile qt = q_tile(p);
  const Seq& s = qt.s;
  if (qt.m0 >= s.len_q) return;  // uniform over the block
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
  const int64_t off = s.len_k - s.len_q;  // causal: query i sees keys j <= i + off
  const int64_t hi = key_end(p, s, qt.m0, kRows);
  const int n_tiles = static_cast<int>((hi + kKeys - 1) / kKeys);

  load_tile<T, D, kRows>(qs, static_cast<const T*>(p.q) + at(p.sq, qt.b, s.q0, qt.h), p.sq.s, qt.m0, s.len_q,
                         [](int64_t) { return true; });
  if (n_tiles > 0) load_kv<T, D, kKeys>(p, qt.b, qt.hk, s, 0, ks, vs, bias);
  cp_async_commit();

  const int64_t row0 = lse_row(p, qt.b, qt.h, s, qt.m0 + warp * 16 + g);  // this lane's rows: row0 and row0 + 8
  float o[D / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  zero(o);
  uint32_t qf[D / 16][4];
  for (int it = 0; it < n_tiles; ++it) {
    const int st = it & 1;
    const int64_t n0 = static_cast<int64_t>(it) * kKeys;
    if (it + 1 < n_tiles) {
      load_kv<T, D, kKeys>(p, qt.b, qt.hk, s, n0 + kKeys, ks + (st ^ 1) * kKeys * D, vs + (st ^ 1) * kKeys * D,
                           bias + (st ^ 1) * kKeys);
    }
    cp_async_commit();  // possibly empty: the wait below always leaves exactly the next tile in flight
    cp_async_wait<1>();
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], frag_a<D>(qs, warp * 16, kk * 16));
    }
    const T* kt = ks + st * kKeys * D;
    const T* vt = vs + st * kKeys * D;
    const float* bt = bias + st * kKeys;

    float sc[kKeys / 8][4];
    zero(sc);
    mma_ab<T, D, D, kKeys, false>(sc, qf, kt);

    const bool masked = tile_masked(p, s, qt.m0, n0, kKeys);
    softmax_step(p, sc, o, m, l, masked ? bt : nullptr, warp * 16 + g, causal_diag(qt.m0, n0, off), row0, n0);
    uint32_t pf[kKeys / 16][4];
    acc_to_a<T, kKeys>(pf, sc);
    mma_ab<T, D, kKeys, D, true>(o, pf, vt);
    __syncthreads();  // this stage is refilled by the next iteration
  }

  fwd_epilogue<T, D, kRows, kThreads>(p, qt, qs, o, m, l, out, so, lse);
}

// ---- sm_90a forward: wgmma --------------------------------------------------------------------------------------------
//
// Two warpgroups share a block of kWgRows = 128 query rows, 64 each in the M dimension of wgmma.m64nNk16. Every
// operand is read by wgmma straight from shared memory, in the no-swizzle canonical layout of mma.cuh: a tile of R
// rows x D columns is stored as 8 x 8 core matrices, core (row block rb, column block cb) at ((cb * R/8) + rb) * 128
// bytes. One layout serves both operand majors: for Q (A) and K (B of S = Q K^T), K-major with the head dim as K,
// core matrices are 128 bytes apart along M/N (SBO) and R * 16 bytes apart along K (LBO); for V (B of O = P V,
// transposed: MN-major with the keys as K), 128 bytes apart along K (LBO) and R * 16 bytes apart along N (SBO). P
// goes from the S accumulators into A registers without touching shared memory. K/V tiles of 64 keys stream
// through the same two-stage cp.async ring as the sm_80 kernel, loaded by all 256 threads; cp.async writes through
// the generic proxy, so each thread fences to the async proxy before the barrier that publishes a tile.
// Not (yet) the FlashAttention-3 design: no TMA, no producer warpgroup, no overlap of one tile's softmax with the
// next tile's matmuls (each wgmma group is waited for at once).
constexpr int kWgThreads = 256;
constexpr int kWgRows = 128;

// S = Q K^T for one warpgroup's 64 rows (q_wg: its rows of the kWgRows-row Q tile) against a tile of kKeys keys,
// both core-matrix tiles: issued and committed as one wgmma group, not waited for.
template <typename T, int D>
__device__ __forceinline__ void wgmma_qk(float (&sc)[kKeys / 8][4], const T* q_wg, const T* kt) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint64_t da = wgmma_desc(q_wg + kk * 2 * kWgRows * 8, kWgRows * 16, 128);
    const uint64_t db = wgmma_desc(kt + kk * 2 * kKeys * 8, kKeys * 16, 128);
    wgmma_ss_n64<T>(sc, da, db, kk > 0);  // the first overwrites sc
  }
  wgmma_commit();
}

// O += P V for one warpgroup (P in A fragments, V a core-matrix tile read MN-major), 16 keys per wgmma: issued and
// committed as one group, not waited for.
template <typename T, int D>
__device__ __forceinline__ void wgmma_pv(float (&o)[D / 8][4], const uint32_t (&pf)[kKeys / 16][4], const T* vt) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    const uint64_t db = wgmma_desc(vt + kk * 2 * 64, 128, kKeys * 16);
    if constexpr (D == 64) {
      wgmma_rs_n64<T>(o, pf[kk], db, true);
    } else {
      wgmma_rs_n128<T>(o, pf[kk], db, true);
    }
  }
  wgmma_commit();
}

template <int D>
constexpr size_t fwd_wgmma_smem(size_t elem) {
  return (kWgRows + 4 * kKeys) * D * elem + 2 * kKeys * sizeof(float);
}

template <typename T, int D>
__global__ void __launch_bounds__(kWgThreads, 1) attn_fwd_wgmma_kernel(Params p, T* out, Strides3 so, float* lse) {
#if defined(FF_SM90A_DEVICE) || defined(FF_HOST_EMULATION)
  T* qs = reinterpret_cast<T*>(dynamic_smem());  // kWgRows x D, core-matrix tile (swizzled tile in the epilogue)
  T* ks = qs + kWgRows * D;                       // 2 stages x kKeys x D, core-matrix tiles
  T* vs = ks + 2 * kKeys * D;                     // 2 stages x kKeys x D, core-matrix tiles
  float* bias = reinterpret_cast<float*>(vs + 2 * kKeys * D);  // 2 stages x kKeys
  const QTile qt = q_tile(p, kWgRows);
  const Seq& s = qt.s;
  if (qt.m0 >= s.len_q) return;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, wg = threadIdx.x >> 7;
  const int64_t off = s.len_k - s.len_q;
  const int64_t hi = key_end(p, s, qt.m0, kWgRows);
  const int n_tiles = static_cast<int>((hi + kKeys - 1) / kKeys);

  load_tile<T, D, kWgRows, Layout::kCore, kWgThreads>(qs, static_cast<const T*>(p.q) + at(p.sq, qt.b, s.q0, qt.h), p.sq.s, qt.m0, s.len_q,
                                [](int64_t) { return true; });
  if (n_tiles > 0) load_kv<T, D, kKeys, Layout::kCore, kWgThreads>(p, qt.b, qt.hk, s, 0, ks, vs, bias);
  cp_async_commit();

  const int64_t row0 = lse_row(p, qt.b, qt.h, s, qt.m0 + warp * 16 + g);
  float o[D / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  zero(o);
  const T* q_wg = qs + wg * 64 * 8;  // this warpgroup's 64 rows: core row blocks 8 wg .. 8 wg + 7
  for (int it = 0; it < n_tiles; ++it) {
    const int st = it & 1;
    const int64_t n0 = static_cast<int64_t>(it) * kKeys;
    if (it + 1 < n_tiles) {
      load_kv<T, D, kKeys, Layout::kCore, kWgThreads>(p, qt.b, qt.hk, s, n0 + kKeys, ks + (st ^ 1) * kKeys * D,
                                                      vs + (st ^ 1) * kKeys * D, bias + (st ^ 1) * kKeys);
    }
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();  // this thread's cp.async data, visible to wgmma once the barrier has passed
    __syncthreads();
    const T* kt = ks + st * kKeys * D;
    const T* vt = vs + st * kKeys * D;

    float sc[kKeys / 8][4];  // S = Q K^T: 64 rows x 64 keys per warpgroup
    wgmma_qk<T, D>(sc, q_wg, kt);
    wgmma_wait<0>();
    wgmma_hold(sc);

    const bool masked = tile_masked(p, s, qt.m0, n0, kKeys);
    softmax_step(p, sc, o, m, l, masked ? bias + st * kKeys : nullptr, warp * 16 + g, causal_diag(qt.m0, n0, off),
                 row0, n0);
    uint32_t pf[kKeys / 16][4];
    acc_to_a<T, kKeys>(pf, sc);
    wgmma_pv<T, D>(o, pf, vt);
    wgmma_wait<0>();
    wgmma_hold(o);
    __syncthreads();  // this stage is refilled by the next iteration
  }
  fwd_epilogue<T, D, kWgRows, kWgThreads>(p, qt, qs, o, m, l, out, so, lse);
#else
  __trap();  // launched only where the sm_90a code was built and the device is sm_90
#endif
}

// ---- sm_90a forward: TMA, a producer warpgroup and two consumer warpgroups --------------------------------------------
//
// The FlashAttention-3 arrangement, for calls without a key padding mask: warpgroup 0 produces, warpgroups 1 and 2
// consume 64 query rows each (the wgmma forward above, otherwise). The producer gives most of its registers back
// (setmaxnreg) and one of its threads issues TMA copies: Q once, then the K and V tiles of 64 keys into a two-stage
// ring, each stage guarded by two mbarriers: `full` (the copies' bytes have landed and the stage's key bias is
// written: 1 arrival with the byte count plus the bias writers') and `empty` (each of the 8 consumer warps is done
// with it). Consumers take the registers the producer gave back, wait on `full`, run S = Q K^T, the online softmax
// and O += P V on wgmma, then arrive on `empty`: while they compute one tile the TMA unit is already filling the
// other stage, and each consumer overlaps its P V of one tile with the softmax of the next (see the loop). The tensor maps view q/k/v as 5-D (8 elements, token, head dim / 8,
// head, batch) so that a box (8, rows, D / 8, 1, 1) lands in shared memory as the core-matrix tile wgmma reads;
// tokens past the tensor arrive as zeros. O is written from registers (each quad of lanes stores 16 contiguous
// bytes) so the two consumer warpgroups never wait for each other.
// Not done: the ping-pong scheduling of the two consumers against each other, and swizzled (128-byte) layouts.
constexpr int kTmaThreads = 384;

struct TmaMaps {
  CUtensorMap q, k, v;
};

template <int D>
constexpr size_t fwd_tma_smem(size_t elem) {
  // 128 bytes of alignment slack; Q, the K/V ring, the key bias and 5 mbarriers
  return 128 + (kWgRows + 4 * kKeys) * D * elem + 2 * kKeys * sizeof(float) + 5 * sizeof(uint64_t);
}

template <typename T, int D>
__global__ void __launch_bounds__(kTmaThreads, 1)
    attn_fwd_tma_kernel(const __grid_constant__ TmaMaps maps, Params p, T* out, Strides3 so, float* lse) {
#if defined(FF_SM90A_DEVICE) || defined(FF_HOST_EMULATION)
  unsigned char* base = dynamic_smem();
  base += (128 - reinterpret_cast<uintptr_t>(base) % 128) % 128;  // TMA destinations are 128-byte aligned
  T* qs = reinterpret_cast<T*>(base);  // kWgRows x D, core-matrix tile
  T* ks = qs + kWgRows * D;            // 2 stages x kKeys x D
  T* vs = ks + 2 * kKeys * D;          // 2 stages x kKeys x D
  float* bias = reinterpret_cast<float*>(vs + 2 * kKeys * D);  // 2 stages x kKeys
  uint64_t* bars = reinterpret_cast<uint64_t*>(bias + 2 * kKeys);
  uint64_t *q_full = bars, *full = bars + 1, *empty = bars + 3;
  const QTile qt = q_tile(p, kWgRows);
  const Seq& s = qt.s;
  if (qt.m0 >= s.len_q) return;
  const int64_t hi = key_end(p, s, qt.m0, kWgRows);
  const int n_tiles = static_cast<int>((hi + kKeys - 1) / kKeys);
  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int st = 0; st < 2; ++st) {
      mbar_init(full + st, kKeys);  // the bias writers, one of which also brings the byte count
      mbar_init(empty + st, 8);     // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();
  // tensor coordinates: (0, token, 0, head, batch); varlen maps are (.., total, .., head, 1) at token q0/k0 + i
  const int b_coord = p.varlen ? 0 : static_cast<int>(qt.b);

  constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128 x 40 + 256 x 232 <= 65536 registers
  if (threadIdx.x < 128) {  // producer warpgroup
    setmaxnreg_dec<kProducerRegs>();
    const int tid = threadIdx.x;
    if (tid == 0) {
      mbar_arrive_expect_tx(q_full, kWgRows * D * sizeof(T));
      tma_load_5d(qs, &maps.q, 0, static_cast<int>(s.q0 + qt.m0), 0, static_cast<int>(qt.h), b_coord, q_full);
    }
    for (int it = 0; it < n_tiles; ++it) {
      const int st = it & 1;
      const int64_t n0 = static_cast<int64_t>(it) * kKeys;
      if (tid >= kKeys) break;
      mbar_wait(empty + st, ((it >> 1) & 1) ^ 1);  // the consumers are done with this stage's previous tile
      const int64_t j = n0 + tid;
      bias[st * kKeys + tid] = j < s.len_k ? 0.f : -INFINITY;
      if (tid == 0) {
        mbar_arrive_expect_tx(full + st, 2 * kKeys * D * sizeof(T));
        const int row = static_cast<int>(s.k0 + n0);
        tma_load_5d(ks + st * kKeys * D, &maps.k, 0, row, 0, static_cast<int>(qt.hk), b_coord, full + st);
        tma_load_5d(vs + st * kKeys * D, &maps.v, 0, row, 0, static_cast<int>(qt.hk), b_coord, full + st);
      } else {
        mbar_arrive(full + st);
      }
    }
    return;
  }

  setmaxnreg_inc<kConsumerRegs>();
  const int warp = (threadIdx.x >> 5) - 4, g = (threadIdx.x & 31) >> 2, wg = warp >> 2;  // consumer warp 0..7
  const int64_t off = s.len_k - s.len_q;
  const int64_t row0 = lse_row(p, qt.b, qt.h, s, qt.m0 + warp * 16 + g);
  float o[D / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  zero(o);
  const T* q_wg = qs + wg * 64 * 8;
  auto issue_s = [&](int it, float (&sc)[kKeys / 8][4]) { wgmma_qk<T, D>(sc, q_wg, ks + (it & 1) * kKeys * D); };
  // the softmax of tile `it` (its S waited for): P into pf, the rescale of O it needs into alpha
  auto softmax = [&](int it, float (&sc)[kKeys / 8][4], uint32_t (&pf)[kKeys / 16][4], float (&alpha)[2]) {
    const int64_t n0 = static_cast<int64_t>(it) * kKeys;
    const float* bt = tile_masked(p, s, qt.m0, n0, kKeys) ? bias + (it & 1) * kKeys : nullptr;
    softmax_scores(p, sc, m, l, alpha, bt, warp * 16 + g, causal_diag(qt.m0, n0, off), row0, n0);
    acc_to_a<T, kKeys>(pf, sc);
  };
  // Software pipeline (FlashAttention-3's intra-warpgroup overlap): while O += P V of tile `it` runs on the tensor
  // cores, S of tile it + 1 is waited for and its softmax computed; O is rescaled only once P V is done.
  float sc[kKeys / 8][4];
  uint32_t pf[kKeys / 16][4];
  float alpha[2];
  zero(sc);
  mbar_wait(q_full, 0);
  if (n_tiles > 0) {
    mbar_wait(full, 0);
    issue_s(0, sc);
    wgmma_wait<0>();
    wgmma_hold(sc);
    softmax(0, sc, pf, alpha);  // O is still zero: nothing to rescale
  }
  auto issue_pv = [&](int it) { wgmma_pv<T, D>(o, pf, vs + (it & 1) * kKeys * D); };
  auto release = [&](int it) {  // this warp is done with tile it's stage
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(empty + (it & 1));
  };
  // every iteration but the last has a next tile: straight-line code lets ptxas see that the S group it waits for
  // (wait_group 1) is complete, rather than serialising the wgmmas
  for (int it = 0; it + 1 < n_tiles; ++it) {
    mbar_wait(full + ((it + 1) & 1), ((it + 1) >> 1) & 1);
    issue_s(it + 1, sc);  // overwrites sc: its first wgmma does not accumulate
    issue_pv(it);
    uint32_t pf_next[kKeys / 16][4];
    float alpha_next[2];
    wgmma_wait<1>();  // S of tile it + 1 (groups complete in order; P V may still run)
    wgmma_hold(sc);
    softmax(it + 1, sc, pf_next, alpha_next);
    wgmma_wait<0>();
    wgmma_hold(o);
    release(it);
    rescale(o, alpha_next);
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
#pragma unroll
      for (int u = 0; u < 4; ++u) pf[kk][u] = pf_next[kk][u];
    }
  }
  if (n_tiles > 0) {
    issue_pv(n_tiles - 1);
    wgmma_wait<0>();
    wgmma_hold(o);
    release(n_tiles - 1);
  }
  // O / l straight from registers, and lse
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const int64_t i = opaque(qt.m0) + warp * 16 + g + 8 * r;
    if (i >= s.len_q) continue;
    if (t == 0) lse[lse_row(p, qt.b, qt.h, s, i)] = l[r] > 0.f ? m[r] * kLn2 + logf(l[r]) : INFINITY;
    T* orow = out + at(so, qt.b, s.q0 + i, qt.h);
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      *reinterpret_cast<uint32_t*>(orow + nb * 8 + 2 * t) = pack2<T>(o[nb][2 * r] * inv, o[nb][2 * r + 1] * inv);
    }
  }
#else
  __trap();
#endif
}

// delta[row] = sum_d dO * O; one warp per row, D / 32 elements per lane
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_delta_kernel(Params p, const T* out, Strides3 so, const T* dout,
                                                                  Strides3 sdo, float* delta) {
  const int64_t n_m = (p.seq_q + kWarps - 1) / kWarps;
  const int64_t bh = blockIdx.x / n_m, b = bh / p.heads, h = bh % p.heads;
  const int64_t i = (blockIdx.x % n_m) * kWarps + (threadIdx.x >> 5);
  const Seq s = seq_of(p, b);
  if (i >= s.len_q) return;
  const int lane = threadIdx.x & 31;
  const T* o = out + at(so, b, s.q0 + i, h);
  const T* g = dout + at(sdo, b, s.q0 + i, h);
  float acc = 0.f;
#pragma unroll
  for (int d = lane; d < D; d += 32) acc += to_f32(o[d]) * to_f32(g[d]);
  acc = warp_sum(acc);
  if (lane == 0) delta[lse_row(p, b, h, s, i)] = acc;
}

template <int D>
constexpr size_t dkdv_smem(size_t elem) {
  return (2 * kRows + 4 * kBwdQueries<D>) * D * elem + (4 * kBwdQueries<D> + kRows) * sizeof(float);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attn_bwd_dkdv_kernel(Params p, const T* dout, Strides3 sdo, const float* lse, const float* delta, T* dk,
                         Strides3 sdk, T* dv, Strides3 sdv) {
  constexpr int M = kBwdQueries<D>;
  T* ks = reinterpret_cast<T*>(dynamic_smem());  // kRows x D
  T* vs = ks + kRows * D;                         // kRows x D
  T* qs = vs + kRows * D;                         // 2 stages x M x D
  T* dos = qs + 2 * M * D;                        // 2 stages x M x D
  float* lse_s = reinterpret_cast<float*>(dos + 2 * M * D);  // 2 stages x M, in log2 units
  float* delta_s = lse_s + 2 * M;                            // 2 stages x M
  float* bias = delta_s + 2 * M;                             // kRows: 0 or -inf per key
  const int64_t group = p.heads / p.kv_heads;
  const int64_t n_n = (p.seq_k + kRows - 1) / kRows;
  const int64_t bh = blockIdx.x / n_n, b = bh / p.kv_heads, hk = bh % p.kv_heads;
  const int64_t n0 = (blockIdx.x % n_n) * kRows;
  const Seq s = seq_of(p, b);
  if (n0 >= s.len_k) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t off = s.len_k - s.len_q;
  const T* q = static_cast<const T*>(p.q);

  load_kv<T, D, kRows>(p, b, hk, s, n0, ks, vs, bias);
  // queries before the first one that can see key n0 see none of this block's keys
  const int64_t lo = p.causal ? imin(s.len_q, imax(0, n0 - off)) : 0;
  const int64_t per_head = (s.len_q - lo + M - 1) / M;
  const int64_t steps = per_head * group;
  auto load_q = [&](int64_t step, int st) {
    const int64_t h = hk * group + step / per_head, i0 = lo + (step % per_head) * M;
    auto all = [](int64_t) { return true; };
    load_tile<T, D, M>(qs + st * M * D, q + at(p.sq, b, s.q0, h), p.sq.s, i0, s.len_q, all);
    load_tile<T, D, M>(dos + st * M * D, dout + at(sdo, b, s.q0, h), sdo.s, i0, s.len_q, all);
    if (threadIdx.x < M) {
      const int64_t i = i0 + threadIdx.x;
      const bool ok = i < s.len_q;
      lse_s[st * M + threadIdx.x] = ok ? lse[lse_row(p, b, h, s, i)] * kLog2e : INFINITY;
      delta_s[st * M + threadIdx.x] = ok ? delta[lse_row(p, b, h, s, i)] : 0.f;
    }
  };
  if (steps > 0) load_q(0, 0);
  cp_async_commit();

  const float c = p.scale * kLog2e;
  float dka[D / 8][4], dva[D / 8][4];
  zero(dka);
  zero(dva);
  const int kr = warp * 16;  // this warp's keys within the block: rows kr..kr+15 of the M dimension
  for (int64_t step = 0; step < steps; ++step) {
    const int st = static_cast<int>(step & 1);
    if (step + 1 < steps) load_q(step + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int64_t h = hk * group + step / per_head, i0 = lo + (step % per_head) * M;
    const T* qt = qs + st * M * D;
    const T* dot = dos + st * M * D;
    const float* ls = lse_s + st * M;
    const float* ds = delta_s + st * M;

    // masking applies to keys (rows: padding, sequence end) and to (key, query) pairs (causal)
    const bool masked = p.mask != nullptr || n0 + kRows > s.len_k || (p.causal && n0 + kRows - 1 > i0 + off);
    const float bias_r[2] = {bias[kr + g], bias[kr + g + 8]};
    // P^T (keys x queries), then dV += dropout(P^T) dO; the keep decisions are remembered as bits for dS
    float pt[M / 8][4];
    zero(pt);
    mma_abt<T, D, M>(pt, ks, kr, qt);
    const uint32_t kept = p.dropout ? keep_bits_k<M>(p, b, h, s, n0 + kr + g, i0) : ~0u;
    const int diag = causal_diag(i0, n0, off);
    {
      float pd[M / 8][4];
#pragma unroll
      for (int qb = 0; qb < M / 8; ++qb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qq = qb * 8 + 2 * t + (e & 1);
          float x = pt[qb][e] * c - ls[qq];
          if (masked) {
            x += bias_r[e >> 1];
            if (p.causal && kr + g + 8 * (e >> 1) - qq > diag) x = -INFINITY;
          }
          pt[qb][e] = exp2f(x);  // 0 for rows with lse = +inf and for masked pairs
          pd[qb][e] = (kept >> (qb * 4 + e)) & 1u ? pt[qb][e] * p.keep_scale : 0.f;
        }
      }
      uint32_t pf[M / 16][4];
      acc_to_a<T, M>(pf, pd);
      mma_ab<T, D, M, D, true>(dva, pf, dot);
    }
    // dP^T = V dO^T, dS^T = P^T (dropout(dP^T) - delta), dK += dS^T Q
    float dpt[M / 8][4];
    zero(dpt);
    mma_abt<T, D, M>(dpt, vs, kr, dot);
#pragma unroll
    for (int qb = 0; qb < M / 8; ++qb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float keep = (kept >> (qb * 4 + e)) & 1u ? p.keep_scale : 0.f;
        dpt[qb][e] = pt[qb][e] * (dpt[qb][e] * keep - ds[qb * 8 + 2 * t + (e & 1)]);
      }
    }
    uint32_t dsf[M / 16][4];
    acc_to_a<T, M>(dsf, dpt);
    mma_ab<T, D, M, D, true>(dka, dsf, qt);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();
  // ks/vs are free now: stage dK (times the softmax scale) and dV there for 16-byte stores
  acc_to_tile<T, D>(ks, kr, dka, p.scale, p.scale);
  acc_to_tile<T, D>(vs, kr, dva, 1.f, 1.f);
  __syncthreads();
  store_tile<T, D, kRows>(ks, dk + at(sdk, b, s.k0, hk), sdk.s, n0, s.len_k);
  store_tile<T, D, kRows>(vs, dv + at(sdv, b, s.k0, hk), sdv.s, n0, s.len_k);
}

template <int D>
constexpr size_t dq_smem(size_t elem) {
  return (2 * kRows + 4 * kKeys) * D * elem + 2 * kKeys * sizeof(float);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dq_kernel(Params p, const T* dout, Strides3 sdo, const float* lse,
                                                               const float* delta, T* dq, Strides3 sdq) {
  T* qs = reinterpret_cast<T*>(dynamic_smem());  // kRows x D
  T* dos = qs + kRows * D;                        // kRows x D
  T* ks = dos + kRows * D;                        // 2 stages x kKeys x D
  T* vs = ks + 2 * kKeys * D;                     // 2 stages x kKeys x D
  float* bias = reinterpret_cast<float*>(vs + 2 * kKeys * D);  // 2 stages x kKeys
  const QTile qt = q_tile(p);
  const Seq& s = qt.s;
  if (qt.m0 >= s.len_q) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t off = s.len_k - s.len_q;
  const int64_t hi = key_end(p, s, qt.m0, kRows);
  const int n_tiles = static_cast<int>((hi + kKeys - 1) / kKeys);
  auto all = [](int64_t) { return true; };
  load_tile<T, D, kRows>(qs, static_cast<const T*>(p.q) + at(p.sq, qt.b, s.q0, qt.h), p.sq.s, qt.m0, s.len_q, all);
  load_tile<T, D, kRows>(dos, dout + at(sdo, qt.b, s.q0, qt.h), sdo.s, qt.m0, s.len_q, all);
  if (n_tiles > 0) load_kv<T, D, kKeys>(p, qt.b, qt.hk, s, 0, ks, vs, bias);
  cp_async_commit();

  const float c = p.scale * kLog2e;
  const int64_t row0 = lse_row(p, qt.b, qt.h, s, qt.m0 + warp * 16 + g);  // this lane's rows: row0 and row0 + 8
  float ls[2], dl[2];
  for (int r = 0; r < 2; ++r) {
    const bool ok = qt.m0 + warp * 16 + g + 8 * r < s.len_q;
    ls[r] = ok ? lse[row0 + 8 * r] * kLog2e : INFINITY;
    dl[r] = ok ? delta[row0 + 8 * r] : 0.f;
  }
  float dqa[D / 8][4];
  zero(dqa);
  for (int it = 0; it < n_tiles; ++it) {
    const int st = it & 1;
    const int64_t n0 = static_cast<int64_t>(it) * kKeys;
    if (it + 1 < n_tiles) {
      load_kv<T, D, kKeys>(p, qt.b, qt.hk, s, n0 + kKeys, ks + (st ^ 1) * kKeys * D, vs + (st ^ 1) * kKeys * D,
                           bias + (st ^ 1) * kKeys);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* kt = ks + st * kKeys * D;
    const T* vt = vs + st * kKeys * D;
    const float* bt = bias + st * kKeys;

    float sc[kKeys / 8][4], dp[kKeys / 8][4];
    zero(sc);
    zero(dp);
    mma_abt<T, D, kKeys>(sc, qs, warp * 16, kt);
    mma_abt<T, D, kKeys>(dp, dos, warp * 16, vt);
    const bool masked = tile_masked(p, s, qt.m0, n0, kKeys);
    const int diag = causal_diag(qt.m0, n0, off);
    const uint32_t kept = p.dropout ? keep_bits_q(p, row0, row0 + 8, n0) : ~0u;
#pragma unroll
    for (int nb = 0; nb < kKeys / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, jj = nb * 8 + 2 * t + (e & 1);
        float x = sc[nb][e] * c - ls[r];
        if (masked) {
          x += bt[jj];
          if (p.causal && jj - (warp * 16 + g + 8 * r) > diag) x = -INFINITY;
        }
        const float keep = (kept >> (nb * 4 + e)) & 1u ? p.keep_scale : 0.f;
        sc[nb][e] = exp2f(x) * (dp[nb][e] * keep - dl[r]);  // dS
      }
    }
    uint32_t dsf[kKeys / 16][4];
    acc_to_a<T, kKeys>(dsf, sc);
    mma_ab<T, D, kKeys, D, true>(dqa, dsf, kt);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();
  acc_to_tile<T, D>(qs, warp * 16, dqa, p.scale, p.scale);
  __syncthreads();
  store_tile<T, D, kRows>(qs, dq + at(sdq, qt.b, s.q0, qt.h), sdq.s, qt.m0, s.len_q);
}

Strides3 strides3(const std::vector<int64_t>& st, size_t at) { return {st[at], st[at + 1], st[at + 2]}; }

#ifndef FF_HOST_EMULATION  // the emulation encodes its own maps
// A rank-5 tiled tensor map of 16-bit elements, no swizzle, zero fill outside the tensor: the driver's
// cuTensorMapEncodeTiled, looked up through the runtime so that nothing links the driver library.
CUtensorMap make_tensor_map_5d(const void* base, int dtype, const uint64_t (&dims)[5], const uint64_t (&strides)[4],
                               const uint32_t (&box)[5]) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    FF_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) {
      throw std::runtime_error("fastformer._C: the driver has no cuTensorMapEncodeTiled");
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const uint32_t unit[5] = {1, 1, 1, 1, 1};
  const CUresult r = encode(&map, dtype == kF16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 5,
                            const_cast<void*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) throw std::runtime_error("fastformer._C: cuTensorMapEncodeTiled failed: " + std::to_string(r));
  return map;
}
#endif

// The 5-D view (8 elements, token, D / 8, head, batch) of q, k or v that the TMA forward copies boxes of `rows`
// tokens from (see attn_fwd_tma_kernel); tokens = Sq/Sk (dense) or the packed total (varlen, batch 1).
CUtensorMap qkv_map(const void* base, int dtype, int64_t d, int64_t tokens, int64_t heads, int64_t batch,
                    const Strides3& st, uint32_t rows) {
  const uint64_t dims[5] = {8, static_cast<uint64_t>(tokens), static_cast<uint64_t>(d / 8),
                            static_cast<uint64_t>(heads), static_cast<uint64_t>(batch)};
  // a batch stride of 0 (varlen) is not a valid TMA stride; any will do for a dimension of size 1
  const uint64_t sb = st.b != 0 ? st.b : st.s * tokens;
  const uint64_t strides[4] = {static_cast<uint64_t>(st.s) * 2, 16, static_cast<uint64_t>(st.h) * 2, sb * 2};
  const uint32_t box[5] = {8, rows, static_cast<uint32_t>(d / 8), 1, 1};
  return make_tensor_map_5d(base, dtype, dims, strides, box);
}

// dims = [B, H, Hkv, Sq (max), Sk (max), D, drop_stride, varlen, tokens_q, tokens_k]
// strides = [q b,s,h | k b,s,h | v b,s,h | lse b,h | mask b,k] then, as b,s,h triples,
// forward: out; backward: do, out, dq, dk, dv
Params make_params(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t cu_q, uintptr_t cu_k,
                   const std::vector<int64_t>& dims, const std::vector<int64_t>& st, bool causal, double scale,
                   uint64_t seed, double p, uint32_t thresh24) {
  if (dims.size() != 10 || st.size() < 13) throw std::invalid_argument("fastformer._C.attention: bad dims/strides");
  if (dims[5] != 64 && dims[5] != 128) {
    throw std::invalid_argument("fastformer._C.attention: head dim must be 64 or 128, got " + std::to_string(dims[5]));
  }
  if (dims[2] <= 0 || dims[1] % dims[2] != 0) throw std::invalid_argument("fastformer._C.attention: bad kv heads");
  for (size_t i = 0; i < 9; ++i) {
    if (st[i] % 8 != 0) throw std::invalid_argument("fastformer._C.attention: q/k/v strides must be multiples of 8");
  }
  for (uintptr_t ptr : {q, k, v}) {
    if (ptr % 16 != 0) throw std::invalid_argument("fastformer._C.attention: q/k/v must be 16-byte aligned");
  }
  Params prm{};
  prm.q = reinterpret_cast<const void*>(q);
  prm.k = reinterpret_cast<const void*>(k);
  prm.v = reinterpret_cast<const void*>(v);
  prm.mask = reinterpret_cast<const uint8_t*>(mask);
  prm.cu_q = reinterpret_cast<const int*>(cu_q);
  prm.cu_k = reinterpret_cast<const int*>(cu_k);
  prm.batch = dims[0];
  prm.heads = dims[1];
  prm.kv_heads = dims[2];
  prm.seq_q = dims[3];
  prm.seq_k = dims[4];
  prm.dim = dims[5];
  prm.drop_stride = dims[6];
  prm.varlen = dims[7] != 0;
  prm.tokens_q = dims[8];
  prm.tokens_k = dims[9];
  prm.causal = causal;
  prm.dropout = p > 0.0;
  prm.sq = strides3(st, 0);
  prm.sk = strides3(st, 3);
  prm.sv = strides3(st, 6);
  prm.lse_b = st[9];
  prm.lse_h = st[10];
  prm.mask_b = st[11];
  prm.mask_k = st[12];
  prm.scale = static_cast<float>(scale);
  prm.keep_scale = p > 0.0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.f;
  prm.seed = seed;
  prm.thresh24 = thresh24;
  return prm;
}

int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_of(int64_t blocks) {
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("fastformer._C.attention: problem too large for one grid");
  return static_cast<unsigned>(blocks);
}

// Runs the statement list with T the 16-bit type of `dtype` and D the head dimension (64 or 128): four
// instantiations per kernel; causal, masks, varlen, GQA and dropout are runtime flags.
#define FF_DISPATCH_ATTENTION(dtype, dim, ...)                                                              \
  do {                                                                                                      \
    auto run_ = [&](auto t_, auto d_) {                                                                     \
      using T = decltype(t_);                                                                               \
      constexpr int D = decltype(d_)::value;                                                                \
      __VA_ARGS__;                                                                                          \
    };                                                                                                      \
    auto dims_ = [&](auto t_) {                                                                             \
      if ((dim) == 64) run_(t_, std::integral_constant<int, 64>{});                                         \
      else run_(t_, std::integral_constant<int, 128>{});                                                    \
    };                                                                                                      \
    if ((dtype) == kF16) dims_(__half{});                                                                   \
    else if ((dtype) == kBF16) dims_(__nv_bfloat16{});                                                      \
    else throw std::invalid_argument("fastformer._C.attention: dtype must be float16 or bfloat16");         \
  } while (0)

}  // namespace

void attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t mask,
                   uintptr_t cu_q, uintptr_t cu_k, const std::vector<int64_t>& dims,
                   const std::vector<int64_t>& strides, bool causal, double scale, uint64_t seed, double p,
                   uint32_t thresh24, int dtype, bool wgmma, uintptr_t stream) {
  if (strides.size() != 16) throw std::invalid_argument("fastformer._C.attention_fwd: expected 16 strides");
  if (wgmma && !has_sm90a()) throw std::invalid_argument("fastformer._C.attention_fwd: built without sm_90a code");
  const Params prm = make_params(q, k, v, mask, cu_q, cu_k, dims, strides, causal, scale, seed, p, thresh24);
  if (prm.batch == 0 || prm.seq_q == 0) return;
  const Strides3 so = strides3(strides, 13);
  const int rows = wgmma ? kWgRows : kRows;
  const unsigned grid = grid_of(cdiv64(prm.seq_q, rows) * prm.batch * prm.heads);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_ATTENTION(dtype, prm.dim, {
    auto* o = reinterpret_cast<T*>(out);
    auto* l = reinterpret_cast<float*>(lse);
    // TMA copies whole boxes, so padded keys could not be zero-filled per row; a tensor map needs a token
    if (wgmma && prm.mask == nullptr && prm.tokens_q > 0 && prm.tokens_k > 0) {
      TmaMaps maps{};
      const int64_t nb = prm.varlen ? 1 : prm.batch;
      maps.q = qkv_map(prm.q, dtype, D, prm.tokens_q, prm.heads, nb, prm.sq, kWgRows);
      maps.k = qkv_map(prm.k, dtype, D, prm.tokens_k, prm.kv_heads, nb, prm.sk, kKeys);
      maps.v = qkv_map(prm.v, dtype, D, prm.tokens_k, prm.kv_heads, nb, prm.sv, kKeys);
      launch(attn_fwd_tma_kernel<T, D>, grid, kTmaThreads, fwd_tma_smem<D>(sizeof(T)), st, maps, prm, o, so, l);
    } else if (wgmma) {
      launch(attn_fwd_wgmma_kernel<T, D>, grid, kWgThreads, fwd_wgmma_smem<D>(sizeof(T)), st, prm, o, so, l);
    } else {
      launch(attn_fwd_kernel<T, D>, grid, kThreads, fwd_smem<D>(sizeof(T)), st, prm, o, so, l);
    }
  });
}

bool has_sm90a() {
#if defined(FF_HAVE_SM90A) || defined(FF_HOST_EMULATION)
  return true;
#else
  return false;
#endif
}

void attention_bwd(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                   uintptr_t delta, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t mask, uintptr_t cu_q,
                   uintptr_t cu_k, const std::vector<int64_t>& dims, const std::vector<int64_t>& strides, bool causal,
                   double scale, uint64_t seed, double p, uint32_t thresh24, int dtype, uintptr_t stream) {
  if (strides.size() != 28) throw std::invalid_argument("fastformer._C.attention_bwd: expected 28 strides");
  const Params prm = make_params(q, k, v, mask, cu_q, cu_k, dims, strides, causal, scale, seed, p, thresh24);
  if (prm.batch == 0 || prm.seq_q == 0 || prm.seq_k == 0) return;
  const Strides3 sdo = strides3(strides, 13), so = strides3(strides, 16), sdq = strides3(strides, 19);
  const Strides3 sdk = strides3(strides, 22), sdv = strides3(strides, 25);
  for (int i = 13; i < 28; ++i) {
    if (strides[i] % 8 != 0) throw std::invalid_argument("fastformer._C.attention_bwd: strides must be multiples of 8");
  }
  for (uintptr_t ptr : {dout, dq, dk, dv}) {
    if (ptr % 16 != 0) throw std::invalid_argument("fastformer._C.attention_bwd: dout/dq/dk/dv must be 16-byte aligned");
  }
  auto st = reinterpret_cast<cudaStream_t>(stream);
  auto* lse_p = reinterpret_cast<const float*>(lse);
  auto* delta_p = reinterpret_cast<float*>(delta);
  const unsigned g_delta = grid_of(cdiv64(prm.seq_q, kWarps) * prm.batch * prm.heads);
  const unsigned g_kv = grid_of(cdiv64(prm.seq_k, kRows) * prm.batch * prm.kv_heads);
  const unsigned g_q = grid_of(cdiv64(prm.seq_q, kRows) * prm.batch * prm.heads);
  FF_DISPATCH_ATTENTION(dtype, prm.dim, {
    const T* dout_p = reinterpret_cast<const T*>(dout);
    launch(attn_bwd_delta_kernel<T, D>, g_delta, kThreads, 0, st, prm, reinterpret_cast<const T*>(out), so, dout_p,
           sdo, delta_p);
    launch(attn_bwd_dkdv_kernel<T, D>, g_kv, kThreads, dkdv_smem<D>(sizeof(T)), st, prm, dout_p, sdo, lse_p,
           delta_p, reinterpret_cast<T*>(dk), sdk, reinterpret_cast<T*>(dv), sdv);
    launch(attn_bwd_dq_kernel<T, D>, g_q, kThreads, dq_smem<D>(sizeof(T)), st, prm, dout_p, sdo, lse_p, delta_p,
           reinterpret_cast<T*>(dq), sdq);
  });
}

}  // namespace fastformer
