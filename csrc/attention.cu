// Fused attention, forward and backward: a simple flash-style reference kernel set (the fast path is Triton).
//
// Layout and conventions are those of fastformer/ops/attention/: q (B, Sq, H, D), k/v (B, Sk, Hkv, D) with
// any (batch, token, head) strides and a contiguous head dimension, or packed varlen rows addressed through
// int32 cu_seqlens; lse is fp32 natural-log, +inf for rows that see no key; causal is bottom-right aligned;
// dropout decides element (row r, key j) of the dropout matrix with row length drop_stride (dropout.cuh), where
// r is the flat lse index; the kernels visit a row's keys in order and reuse each Philox call for its four keys.
//
// Forward: a block owns kRowsPerBlock query rows of one (batch, head); each warp owns kRowsPerWarp rows and
// each lane holds head-dim elements d = lane + 32 t (D <= 256, a runtime value). K/V tiles of kKeysPerTile
// keys are staged in shared memory as fp32; per key, a warp reduction gives the score and the softmax is
// updated online (running max m, normaliser l, fp32 accumulator rescaled when m grows). Causal tiles past
// the diagonal are not visited.
// Backward: delta = rowsum(dO * O); a dK/dV kernel where each block owns kKeysPerBlock keys of one kv head
// and loops over its GQA group's query heads and over query tiles staged in shared memory (no atomics);
// and a dQ kernel shaped like the forward. P is recomputed as exp(s - lse).
#include <vector>

#include "common.cuh"
#include "dropout.cuh"
#include "ops.h"

namespace fastformer {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kPerLane = 8;  // head-dim elements per lane: D <= 32 * 8 = 256
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kKeysPerTile = 16;  // forward/dQ K/V tile: 2 * 16 * 256 * 4 B = 32 KiB of shared memory at D = 256
constexpr int kKeysPerWarp = 2;
constexpr int kKeysPerBlock = kWarps * kKeysPerWarp;
constexpr int kQueryTile = 16;  // dK/dV Q/dO tile, same size

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

// query i may see key j under causality (bottom-right aligned)
__device__ __forceinline__ bool causal_ok(const Params& p, const Seq& s, int64_t i, int64_t j) {
  return !p.causal || j <= i + s.len_k - s.len_q;
}

__device__ __forceinline__ int64_t lse_row(const Params& p, int64_t b, int64_t h, const Seq& s, int64_t i) {
  return b * p.lse_b + h * p.lse_h + s.q0 + i;
}

// The dropout factor (keep_scale or 0; 1 without dropout) of element (row, j), remembering the last Philox call:
// it decides four consecutive keys of a row, so a thread visiting a row's keys in order makes one call per four.
struct KeepCache {
  uint64_t counter = ~uint64_t{0};  // no counter reaches 2**64 - 1
  uint32_t bits = 0;

  __device__ __forceinline__ float factor(const Params& p, int64_t row, int64_t j) {
    if (!p.dropout) return 1.f;
    const uint64_t c = dropout_counter(row, j, p.drop_stride);
    if (c != counter) {
      counter = c;
      bits = dropout_keep4(p.seed, row, j & ~int64_t{3}, p.drop_stride, p.thresh24);
    }
    return (bits >> (j & 3)) & 1u ? p.keep_scale : 0.f;
  }
};

// Stage keys [n0, n0 + kKeysPerTile) of K and V (one kv head) into shared memory as fp32, zero past the end.
template <typename T>
__device__ void stage_kv(const Params& p, int64_t b, int64_t hk, const Seq& s, int64_t n0, float* ks, float* vs) {
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  for (int64_t idx = threadIdx.x; idx < kKeysPerTile * p.dim; idx += blockDim.x) {
    const int64_t j = n0 + idx / p.dim, d = idx % p.dim;
    const bool ok = j < s.len_k;
    ks[idx] = ok ? to_f32(k[at(p.sk, b, s.k0 + j, hk) + d]) : 0.f;
    vs[idx] = ok ? to_f32(v[at(p.sv, b, s.k0 + j, hk) + d]) : 0.f;
  }
}

template <typename T>
__device__ void load_row(const T* base, int64_t dim, float (&r)[kPerLane]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    r[t] = d < dim ? to_f32(base[d]) : 0.f;
  }
}

__device__ __forceinline__ float dot_row(const float (&r)[kPerLane], const float* tile_row, int64_t dim) {
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < dim) acc += r[t] * tile_row[d];
  }
  return warp_sum(acc);
}

template <typename T>
__device__ void store_row(T* base, const float (&r)[kPerLane], float scale, int64_t dim) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < dim) base[d] = from_f32<T>(r[t] * scale);
  }
}

// The query tile of a forward or dQ block: kRowsPerBlock rows from m0 of one (batch, head), and its kv head.
struct QTile {
  int64_t b, h, hk, m0;
  Seq s;
};

__device__ __forceinline__ QTile q_tile(const Params& p) {
  const int64_t n_m = (p.seq_q + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t bh = blockIdx.x / n_m, b = bh / p.heads, h = bh % p.heads;
  return {b, h, h / (p.heads / p.kv_heads), (blockIdx.x % n_m) * kRowsPerBlock, seq_of(p, b)};
}

// The key loop of the forward and dQ kernels: K/V tiles of kKeysPerTile keys up to the causal diagonal of the
// block's rows are staged in shared memory (ks, vs as fp32); then, for each row slot r of this warp and each key j
// that row sees, visit(r, row, jj, j) with row the lse index of the query and jj the key's slot in the tile.
template <typename T, typename Visit>
__device__ __forceinline__ void for_visible_keys(const Params& p, const QTile& qt, float* ks, float* vs,
                                                 Visit&& visit) {
  const int warp = threadIdx.x >> 5;
  int64_t hi = qt.s.len_k;
  if (p.causal) hi = imin(hi, qt.m0 + kRowsPerBlock + qt.s.len_k - qt.s.len_q);  // skip tiles past the diagonal
  for (int64_t n0 = 0; n0 < hi; n0 += kKeysPerTile) {
    __syncthreads();  // the previous tile is no longer read
    stage_kv<T>(p, qt.b, qt.hk, qt.s, n0, ks, vs);
    __syncthreads();
    const int64_t n_end = imin(kKeysPerTile, hi - n0);
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t i = qt.m0 + warp * kRowsPerWarp + r;
      if (i >= qt.s.len_q) break;
      const int64_t row = lse_row(p, qt.b, qt.h, qt.s, i);
      for (int64_t jj = 0; jj < n_end; ++jj) {
        const int64_t j = n0 + jj;
        if (!key_on(p, qt.b, j) || !causal_ok(p, qt.s, i, j)) continue;  // uniform over the warp
        visit(r, row, jj, j);
      }
    }
  }
}

template <typename T>
__global__ void attn_fwd_kernel(Params p, T* out, Strides3 so, float* lse) {
  extern __shared__ float smem[];
  float* ks = smem;
  float* vs = smem + kKeysPerTile * p.dim;
  const QTile qt = q_tile(p);
  if (qt.m0 >= qt.s.len_q) return;  // uniform over the block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  float q[kRowsPerWarp][kPerLane], acc[kRowsPerWarp][kPerLane], m[kRowsPerWarp], l[kRowsPerWarp];
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = qt.m0 + warp * kRowsPerWarp + r;
    const int64_t ii = i < qt.s.len_q ? i : 0;
    load_row(static_cast<const T*>(p.q) + at(p.sq, qt.b, qt.s.q0 + ii, qt.h), p.dim, q[r]);
    for (int t = 0; t < kPerLane; ++t) acc[r][t] = 0.f;
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  KeepCache drop;
  for_visible_keys<T>(p, qt, ks, vs, [&](int r, int64_t row, int64_t jj, int64_t j) {
    const float sc = dot_row(q[r], ks + jj * p.dim, p.dim) * p.scale;
    const float m_new = fmaxf(m[r], sc);
    const float alpha = expf(m[r] - m_new);  // 0 while no key has been seen (m = -inf)
    const float e = expf(sc - m_new);
    l[r] = l[r] * alpha + e;
    const float w = e * drop.factor(p, row, j);
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int64_t d = lane + 32 * t;
      acc[r][t] = acc[r][t] * alpha + (d < p.dim ? w * vs[jj * p.dim + d] : 0.f);
    }
    m[r] = m_new;
  });
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = qt.m0 + warp * kRowsPerWarp + r;
    if (i >= qt.s.len_q) break;
    store_row(out + at(so, qt.b, qt.s.q0 + i, qt.h), acc[r], l[r] > 0.f ? 1.f / l[r] : 0.f, p.dim);
    if (lane == 0) lse[lse_row(p, qt.b, qt.h, qt.s, i)] = l[r] > 0.f ? m[r] + logf(l[r]) : INFINITY;
  }
}

// delta[row] = sum_d dO * O; one warp per row
template <typename T>
__global__ void attn_bwd_delta_kernel(Params p, const T* out, Strides3 so, const T* dout, Strides3 sdo,
                                      float* delta) {
  const int64_t n_m = (p.seq_q + kWarps - 1) / kWarps;
  const int64_t bh = blockIdx.x / n_m, b = bh / p.heads, h = bh % p.heads;
  const int64_t i = (blockIdx.x % n_m) * kWarps + (threadIdx.x >> 5);
  const Seq s = seq_of(p, b);
  if (i >= s.len_q) return;
  float o[kPerLane], g[kPerLane];
  load_row(out + at(so, b, s.q0 + i, h), p.dim, o);
  load_row(dout + at(sdo, b, s.q0 + i, h), p.dim, g);
  float acc = 0.f;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) acc += o[t] * g[t];
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) delta[lse_row(p, b, h, s, i)] = acc;
}

template <typename T>
__global__ void attn_bwd_dkdv_kernel(Params p, const T* dout, Strides3 sdo, const float* lse, const float* delta,
                                     T* dk, Strides3 sdk, T* dv, Strides3 sdv) {
  extern __shared__ float smem[];
  float* qs = smem;
  float* dos = smem + kQueryTile * p.dim;
  __shared__ float lse_s[kQueryTile], delta_s[kQueryTile];
  const int64_t group = p.heads / p.kv_heads;
  const int64_t n_n = (p.seq_k + kKeysPerBlock - 1) / kKeysPerBlock;
  const int64_t bh = blockIdx.x / n_n, b = bh / p.kv_heads, hk = bh % p.kv_heads;
  const int64_t n0 = (blockIdx.x % n_n) * kKeysPerBlock;
  const Seq s = seq_of(p, b);
  if (n0 >= s.len_k) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* q = static_cast<const T*>(p.q);

  float kr[kKeysPerWarp][kPerLane], vr[kKeysPerWarp][kPerLane];
  float dkr[kKeysPerWarp][kPerLane], dvr[kKeysPerWarp][kPerLane];
  bool on[kKeysPerWarp];
  for (int c = 0; c < kKeysPerWarp; ++c) {
    const int64_t j = n0 + warp * kKeysPerWarp + c;
    on[c] = j < s.len_k && key_on(p, b, j);
    const int64_t jj = j < s.len_k ? j : 0;
    load_row(static_cast<const T*>(p.k) + at(p.sk, b, s.k0 + jj, hk), p.dim, kr[c]);
    load_row(static_cast<const T*>(p.v) + at(p.sv, b, s.k0 + jj, hk), p.dim, vr[c]);
    for (int t = 0; t < kPerLane; ++t) dkr[c][t] = dvr[c][t] = 0.f;
  }
  // queries before the first one that can see key n0 see none of this block's keys
  const int64_t lo = p.causal ? imax(0, n0 - (s.len_k - s.len_q)) : 0;
  KeepCache drop;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    for (int64_t i0 = lo; i0 < s.len_q; i0 += kQueryTile) {
      __syncthreads();
      for (int64_t idx = threadIdx.x; idx < kQueryTile * p.dim; idx += blockDim.x) {
        const int64_t i = i0 + idx / p.dim, d = idx % p.dim;
        const bool ok = i < s.len_q;
        qs[idx] = ok ? to_f32(q[at(p.sq, b, s.q0 + i, h) + d]) : 0.f;
        dos[idx] = ok ? to_f32(dout[at(sdo, b, s.q0 + i, h) + d]) : 0.f;
      }
      if (threadIdx.x < kQueryTile) {
        const int64_t i = i0 + threadIdx.x;
        lse_s[threadIdx.x] = i < s.len_q ? lse[lse_row(p, b, h, s, i)] : INFINITY;
        delta_s[threadIdx.x] = i < s.len_q ? delta[lse_row(p, b, h, s, i)] : 0.f;
      }
      __syncthreads();
      const int64_t i_end = imin(kQueryTile, s.len_q - i0);
      // queries outer, this warp's (consecutive) keys inner, so that they share the row's Philox calls; each key's
      // sums still run over the queries in order
      for (int64_t ii = 0; ii < i_end; ++ii) {
        const int64_t i = i0 + ii;
        const int64_t row = lse_row(p, b, h, s, i);
        for (int c = 0; c < kKeysPerWarp; ++c) {
          const int64_t j = n0 + warp * kKeysPerWarp + c;
          if (!on[c] || !causal_ok(p, s, i, j)) continue;  // uniform over the warp
          const float sc = dot_row(kr[c], qs + ii * p.dim, p.dim) * p.scale;
          const float pr = expf(sc - lse_s[ii]);  // 0 for rows with lse = +inf
          const float keep = drop.factor(p, row, j);
          const float dp = dot_row(vr[c], dos + ii * p.dim, p.dim) * keep;
          const float ds = pr * (dp - delta_s[ii]);
#pragma unroll
          for (int t = 0; t < kPerLane; ++t) {
            const int64_t d = lane + 32 * t;
            if (d < p.dim) {
              dvr[c][t] += pr * keep * dos[ii * p.dim + d];
              dkr[c][t] += ds * qs[ii * p.dim + d];
            }
          }
        }
      }
    }
  }
  for (int c = 0; c < kKeysPerWarp; ++c) {
    const int64_t j = n0 + warp * kKeysPerWarp + c;
    if (j >= s.len_k) break;
    T* dkp = dk + at(sdk, b, s.k0 + j, hk);
    T* dvp = dv + at(sdv, b, s.k0 + j, hk);
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < p.dim) {
        dkp[d] = from_f32<T>(dkr[c][t] * p.scale);
        dvp[d] = from_f32<T>(dvr[c][t]);
      }
    }
  }
}

template <typename T>
__global__ void attn_bwd_dq_kernel(Params p, const T* dout, Strides3 sdo, const float* lse, const float* delta,
                                   T* dq, Strides3 sdq) {
  extern __shared__ float smem[];
  float* ks = smem;
  float* vs = smem + kKeysPerTile * p.dim;
  const QTile qt = q_tile(p);
  if (qt.m0 >= qt.s.len_q) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  float q[kRowsPerWarp][kPerLane], g[kRowsPerWarp][kPerLane], acc[kRowsPerWarp][kPerLane];
  float lr[kRowsPerWarp], dl[kRowsPerWarp];
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = qt.m0 + warp * kRowsPerWarp + r;
    const bool ok = i < qt.s.len_q;
    const int64_t ii = ok ? i : 0;
    load_row(static_cast<const T*>(p.q) + at(p.sq, qt.b, qt.s.q0 + ii, qt.h), p.dim, q[r]);
    load_row(dout + at(sdo, qt.b, qt.s.q0 + ii, qt.h), p.dim, g[r]);
    for (int t = 0; t < kPerLane; ++t) acc[r][t] = 0.f;
    lr[r] = ok ? lse[lse_row(p, qt.b, qt.h, qt.s, i)] : INFINITY;
    dl[r] = ok ? delta[lse_row(p, qt.b, qt.h, qt.s, i)] : 0.f;
  }
  KeepCache drop;
  for_visible_keys<T>(p, qt, ks, vs, [&](int r, int64_t row, int64_t jj, int64_t j) {
    const float sc = dot_row(q[r], ks + jj * p.dim, p.dim) * p.scale;
    const float pr = expf(sc - lr[r]);
    const float dp = dot_row(g[r], vs + jj * p.dim, p.dim) * drop.factor(p, row, j);
    const float ds = pr * (dp - dl[r]);
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < p.dim) acc[r][t] += ds * ks[jj * p.dim + d];
    }
  });
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = qt.m0 + warp * kRowsPerWarp + r;
    if (i >= qt.s.len_q) break;
    store_row(dq + at(sdq, qt.b, qt.s.q0 + i, qt.h), acc[r], p.scale, p.dim);
  }
}

Strides3 strides3(const std::vector<int64_t>& st, size_t at) { return {st[at], st[at + 1], st[at + 2]}; }

// dims = [B, H, Hkv, Sq (max), Sk (max), D, drop_stride, varlen]
// strides = [q b,s,h | k b,s,h | v b,s,h | lse b,h | mask b,k] then, as b,s,h triples,
// forward: out; backward: do, out, dq, dk, dv
Params make_params(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t cu_q, uintptr_t cu_k,
                   const std::vector<int64_t>& dims, const std::vector<int64_t>& st, bool causal, double scale,
                   uint64_t seed, double p, uint32_t thresh24) {
  if (dims.size() != 8 || st.size() < 13) throw std::invalid_argument("fastformer._C.attention: bad dims/strides");
  if (dims[5] <= 0 || dims[5] > 32 * kPerLane) throw std::invalid_argument("fastformer._C.attention: head dim > 256");
  if (dims[2] <= 0 || dims[1] % dims[2] != 0) throw std::invalid_argument("fastformer._C.attention: bad kv heads");
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

void check_grid(int64_t blocks) {
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("fastformer._C.attention: problem too large for one grid");
}

}  // namespace

void attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t mask,
                   uintptr_t cu_q, uintptr_t cu_k, const std::vector<int64_t>& dims,
                   const std::vector<int64_t>& strides, bool causal, double scale, uint64_t seed, double p,
                   uint32_t thresh24, int dtype, uintptr_t stream) {
  const Params prm = make_params(q, k, v, mask, cu_q, cu_k, dims, strides, causal, scale, seed, p, thresh24);
  if (prm.batch == 0 || prm.seq_q == 0) return;
  if (strides.size() != 16) throw std::invalid_argument("fastformer._C.attention_fwd: expected 16 strides");
  const Strides3 so = strides3(strides, 13);
  const int64_t blocks = cdiv64(prm.seq_q, kRowsPerBlock) * prm.batch * prm.heads;
  check_grid(blocks);
  const size_t smem = 2 * kKeysPerTile * prm.dim * sizeof(float);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_FLOAT(dtype, T, {
    attn_fwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, smem, st>>>(prm, reinterpret_cast<T*>(out), so,
                                                                                reinterpret_cast<float*>(lse));
    FF_LAUNCH_CHECK();
  });
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
  auto st = reinterpret_cast<cudaStream_t>(stream);
  auto* lse_p = reinterpret_cast<const float*>(lse);
  auto* delta_p = reinterpret_cast<float*>(delta);
  const int64_t b_delta = cdiv64(prm.seq_q, kWarps) * prm.batch * prm.heads;
  const int64_t b_kv = cdiv64(prm.seq_k, kKeysPerBlock) * prm.batch * prm.kv_heads;
  const int64_t b_q = cdiv64(prm.seq_q, kRowsPerBlock) * prm.batch * prm.heads;
  check_grid(b_delta);
  check_grid(b_kv);
  check_grid(b_q);
  const size_t smem = 2 * kKeysPerTile * prm.dim * sizeof(float);
  static_assert(kKeysPerTile == kQueryTile, "the dK/dV and dQ kernels share one shared-memory size");
  FF_DISPATCH_FLOAT(dtype, T, {
    const T* dout_p = reinterpret_cast<const T*>(dout);
    attn_bwd_delta_kernel<T><<<static_cast<unsigned>(b_delta), kThreads, 0, st>>>(
        prm, reinterpret_cast<const T*>(out), so, dout_p, sdo, delta_p);
    FF_LAUNCH_CHECK();
    attn_bwd_dkdv_kernel<T><<<static_cast<unsigned>(b_kv), kThreads, smem, st>>>(
        prm, dout_p, sdo, lse_p, delta_p, reinterpret_cast<T*>(dk), sdk, reinterpret_cast<T*>(dv), sdv);
    FF_LAUNCH_CHECK();
    attn_bwd_dq_kernel<T><<<static_cast<unsigned>(b_q), kThreads, smem, st>>>(prm, dout_p, sdo, lse_p, delta_p,
                                                                               reinterpret_cast<T*>(dq), sdq);
    FF_LAUNCH_CHECK();
  });
}

}  // namespace fastformer
