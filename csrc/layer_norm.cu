// LayerNorm with fused dropout + residual add, forward and backward, for rows of any length.
//
//   s = dropout(x) + residual            (each part optional; s is written out when it differs from x)
//   y = (s - mean) * rstd * weight + bias, statistics in fp32
//
// Backward, with xhat = (s - mean) * rstd and g = weight * dy:
//
//   ds = rstd * (g - (xhat * mean(xhat * g) + mean(g))) + d(s_out),   dx = ds * keep / (1 - p),   dres = ds
//   dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy
//
// Memory access. A thread moves a row in packs of VEC consecutive columns, VEC a multiple of 4 and each pack
// starting on a multiple of VEC. On the vector path (Vec16) a pack is 16 bytes, one LDG.128 or STG.128: 8 halfs or
// bfloat16s, or 4 floats. The launcher takes it when n and the row strides are multiples of VEC and every pointer
// is 16-byte aligned, so that no pack straddles two rows; otherwise (Scalar4) a pack is 4 columns moved one
// element at a time, the last pack of a row partly masked. Either way a pack is one or two whole groups of four
// columns of the dropout mask, so one Philox call decides four elements (the mapping of dropout.cuh, shared with
// the Triton kernels). A pack stays in registers as 32-bit words (two 16-bit values to a word) and its values are
// converted to fp32 where they are used: a 16-byte pack costs four registers whatever the dtype.
//
// The main path (*_rows kernels): the row in registers. A row belongs to a team of `team` threads, a power of two
// from 1 to kMaxThreads: lanes of one warp up to 32 * kFwdPacks packs (forward: 1024 halfs or 512 floats), whole
// warps beyond. One warp per row up to 8k columns would hold 256 values per lane, past a thread's 255 registers
// once the backward's fp32 dweight/dbias partials are counted, and would leave the SM a few warps at best. Thread
// t of a team holds packs t, t + team, t + 2 * team, ... of its row (each load instruction of a team reads
// consecutive 16-byte vectors), at most kFwdPacks (forward) or kBwdPacks (backward) of them; the launcher picks
// the smallest team that covers the row, so a short row shares its warp with others rather than leaving lanes
// idle. A block holds blockDim / team rows at a time and strides over the rows. A reduction over a row is warp
// shuffles within the team, then, when the team spans several warps, one shared-memory step across them: a fixed
// order, so results do not depend on timing.
//   Forward: s is read once into fp32 registers; mean = sum(s) / n, then var = sum((s - mean)^2) / n over the
//   registers (two passes over registers, one over memory: no E[s^2] - mean^2 cancellation when |mean| >> std);
//   y is written from the registers.
//   Backward: s and dy are read once; each thread adds dy * xhat and dy for its columns into fp32 registers over
//   all the rows its team handles (the grid is persistent), then the block's teams add theirs through shared
//   memory (team order) and the block writes one partial row of dw_partial/db_partial. The launcher sums the
//   partial rows with one torch reduction: the final, deterministic step (no atomics anywhere).
// Capacity: 16-byte packs hold 8 halfs or 4 floats, so the main path takes rows of up to 512 * 4 * VEC columns
// forward (16384 halfs, 8192 floats) and 512 * 16 backward (8192; 4096 on the scalar path).
// Longer rows take the *_long kernels: one block per row (grid-stride), each pass re-reading the row from global
// memory (L2 for any realistic row), and the backward adding into its block's own partial row in global memory.
//
// Whenever s is not x itself it is stored (the launcher always passes res_out then), rounded to T, and that
// rounded s is what the forward normalises and the backward reloads.
// Limits: offsets are int64 (rows * n may exceed 2^31); n < 2^31 (columns within a row are int).
#include "common.cuh"
#include "dropout.cuh"
#include "ops.h"

#include <climits>

namespace fastformer {
namespace {

constexpr int kThreads = 256;     // block of the main path, unless one team is larger
constexpr int kMaxThreads = 512;  // largest team and block: __launch_bounds__ caps registers at 128 per thread

// The two ways of moving a pack (see the top of the file). Their names are in the kernels' mangled names, which
// tests/test_cuda_sass.py reads: a Vec16 kernel must move its rows with 16-byte accesses only.
template <typename T>
struct Vec16 {
  static constexpr int kVec = 16 / sizeof(T);  // columns per pack
  static constexpr bool kVector = true;
};
struct Scalar4 {
  static constexpr int kVec = 4;
  static constexpr bool kVector = false;
};

// Packs per thread on the main path, bounded by registers (128 a thread under kMaxThreads). Forward: 4 packs of
// each of x, residual, weight and bias (16 registers each) and s in fp32 (32 halfs or 16 floats). Backward: 16
// columns of s, dy, weight and d(s_out), plus 2 x 16 fp32 dweight/dbias partials; 8 on the scalar path, whose
// values arrive one load each and need more registers in flight.
template <typename Io>
constexpr int kFwdPacks = 4;
template <typename Io>
constexpr int kBwdPacks = Io::kVector ? 16 / Io::kVec : 2;
constexpr int kMaxBwdCols = 16;  // columns per thread of any backward instantiation

// The bits of a value of T, in the low bits of a word, and back
__device__ __forceinline__ uint32_t to_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t to_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
template <typename T>
__device__ __forceinline__ T from_bits(uint32_t b);
template <>
__device__ __forceinline__ float from_bits<float>(uint32_t b) {
  return __uint_as_float(b);
}
template <>
__device__ __forceinline__ __half from_bits<__half>(uint32_t b) {
  return __ushort_as_half(static_cast<unsigned short>(b));
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(uint32_t b) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(b));
}

// VEC values of T as 32-bit words, value e in bits 16 * (e % kPer) of word e / kPer. Zero-initialised ({}) it holds
// zeros (all-zero bits are +0 in every dtype).
template <typename T, int VEC>
struct Pack {
  static constexpr int kPer = 4 / sizeof(T);  // values per word
  uint32_t w[VEC / kPer];

  __device__ __forceinline__ T raw(int e) const { return from_bits<T>(w[e / kPer] >> (16 * (e % kPer))); }
  __device__ __forceinline__ float get(int e) const { return to_f32(raw(e)); }
  // value e of a pack that holds zero there
  __device__ __forceinline__ void put_raw(int e, T v) { w[e / kPer] |= to_bits(v) << (16 * (e % kPer)); }
  __device__ __forceinline__ void put(int e, float v) { put_raw(e, from_f32<T>(v)); }
};

// The pack at p; `avail` columns of the row remain from p. Vec16: one 16-byte load (a whole pack). Scalar4:
// element loads, zero past the row's end.
template <typename Io, typename T>
__device__ __forceinline__ Pack<T, Io::kVec> load_pack(const T* p, int avail) {
  Pack<T, Io::kVec> r{};
  if constexpr (Io::kVector) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);  // (stays one LDG.128: tests/test_cuda_sass.py checks)
    r.w[0] = u.x, r.w[1] = u.y, r.w[2] = u.z, r.w[3] = u.w;
  } else {
#pragma unroll
    for (int e = 0; e < Io::kVec; ++e) {
      if (e < avail) r.put_raw(e, p[e]);
    }
  }
  return r;
}

template <typename Io, typename T>
__device__ __forceinline__ void store_pack(T* p, int avail, const Pack<T, Io::kVec>& v) {
  if constexpr (Io::kVector) {
    store_global16(p, v.w[0], v.w[1], v.w[2], v.w[3]);  // one st.global.v4 (the long forward re-reads res_out)
  } else {
#pragma unroll
    for (int e = 0; e < Io::kVec; ++e) {
      if (e < avail) p[e] = v.raw(e);
    }
  }
}

// VEC fp32 values at p (a dw_partial/db_partial row): float4 accesses on the vector path (VEC and n are
// multiples of 4 there), else element by element up to `avail`.
template <typename Io>
__device__ __forceinline__ void load_f32(const float* p, int avail, float* v) {
#pragma unroll
  for (int e = 0; e < Io::kVec; e += 4) {
    if constexpr (Io::kVector) {
      const float4 q = *reinterpret_cast<const float4*>(p + e);
      v[e] = q.x, v[e + 1] = q.y, v[e + 2] = q.z, v[e + 3] = q.w;
    } else {
      for (int k = 0; k < 4; ++k) v[e + k] = e + k < avail ? p[e + k] : 0.f;
    }
  }
}

template <typename Io>
__device__ __forceinline__ void store_f32(float* p, int avail, const float* v) {
#pragma unroll
  for (int e = 0; e < Io::kVec; e += 4) {
    if constexpr (Io::kVector) {
      *reinterpret_cast<float4*>(p + e) = make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]);
    } else {
      for (int k = 0; k < 4; ++k) {
        if (e + k < avail) p[e + k] = v[e + k];
      }
    }
  }
}

// Bit e set when column col + e (e < VEC, col a multiple of 4) of `row` is kept: one Philox call per group of four
// columns (dropout.cuh); every bit without dropout.
template <int VEC>
__device__ __forceinline__ uint32_t keep_bits(bool dropout, uint64_t seed, int64_t row, int64_t col, int64_t n,
                                              uint32_t thresh24) {
  if (!dropout) return 0xFFFFFFFFu;
  uint32_t bits = 0;
#pragma unroll
  for (int g = 0; g < VEC; g += 4) bits |= dropout_keep4(seed, row, col + g, n, thresh24) << g;
  return bits;
}

// v[k] summed over each team of `team` consecutive threads (a power of two); every thread of the team gets the
// same bits (a butterfly adds the same two numbers in both lanes of each pair: addition commutes). A team within a
// warp reduces by shuffles alone; a team of several warps then adds its warps' sums through `scratch` in warp
// order. The whole block must call it (it may hold barriers): `team` is the same for the whole launch.
template <int K>
__device__ __forceinline__ void team_sum(float (&v)[K], int team, float (*scratch)[kMaxThreads / 32]) {
  const int width = team < 32 ? team : 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int o = width >> 1; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xFFFFFFFFu, v[k], o);
  }
  if (team <= 32) return;
  const int warp = threadIdx.x >> 5, warps = team >> 5, first = warp & ~(warps - 1);
  __syncthreads();  // the previous call's readers are done with scratch
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += scratch[k][first + w];
    v[k] = s;
  }
}

template <typename T>
struct LnArgs {
  const T* x;         // input (rows, n), unit column stride, row stride stride_x
  const T* residual;  // (rows, n) with row stride stride_r, added after dropout; nullptr when absent
  const T* weight;    // (n,) scale; nullptr when absent
  const T* bias;      // (n,) shift; nullptr when absent
  T* y;               // output (rows, n), contiguous
  T* res_out;         // s = dropout(x) + residual, (rows, n) contiguous; nullptr when s is x itself
  float* mean;        // (rows,) fp32 statistics for the backward
  float* rstd;        // (rows,) 1 / sqrt(var + eps)
  int64_t rows;       // rows of the problem
  int64_t n;          // columns: the normalised length
  int64_t stride_x;   // row stride of x, in elements
  int64_t stride_r;   // row stride of residual, in elements
  float eps;          // added to the variance
  uint64_t seed;      // Philox key of the dropout mask
  uint32_t thresh24;  // an element is kept when the top 24 bits of its Philox word reach this
  float keep_scale;   // 1 / (1 - p): kept elements are scaled up
  bool dropout;       // p > 0
  int team;           // threads per row (rows kernel; a power of two that divides blockDim.x)
};

// s of the pack at column col of `row` in fp32, from its x and residual packs; when s is an output, rounded to T
// and stored, so that what is normalised is exactly what the backward will reload.
template <typename Io, typename T>
__device__ __forceinline__ void make_s(const LnArgs<T>& a, int64_t row, int col, const Pack<T, Io::kVec>& xp,
                                       const Pack<T, Io::kVec>& rp, float (&v)[Io::kVec]) {
  constexpr int V = Io::kVec;
  const uint32_t keep = keep_bits<V>(a.dropout, a.seed, row, col, a.n, a.thresh24);
  Pack<T, V> rounded{};
#pragma unroll
  for (int e = 0; e < V; ++e) {
    float s = xp.get(e);
    if (a.dropout) s = (keep >> e) & 1u ? s * a.keep_scale : 0.f;
    if (a.residual != nullptr) s += rp.get(e);
    rounded.put(e, s);
    v[e] = a.res_out != nullptr ? rounded.get(e) : s;
  }
  if (a.res_out != nullptr) store_pack<Io>(a.res_out + row * a.n + col, static_cast<int>(a.n) - col, rounded);
}

// y of one pack from s (fp32) and the row's statistics
template <typename Io, typename T>
__device__ __forceinline__ Pack<T, Io::kVec> make_y(const LnArgs<T>& a, const float (&v)[Io::kVec], float mu,
                                                    float rs, const Pack<T, Io::kVec>& wp,
                                                    const Pack<T, Io::kVec>& bp) {
  Pack<T, Io::kVec> out{};
#pragma unroll
  for (int e = 0; e < Io::kVec; ++e) {
    float o = (v[e] - mu) * rs;
    if (a.weight != nullptr) o *= wp.get(e);
    if (a.bias != nullptr) o += bp.get(e);
    out.put(e, o);
  }
  return out;
}

// Forward, main path: a team of a.team threads per row, the row in registers; one read and one write of it.
template <typename T, typename Io>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_fwd_rows_kernel(LnArgs<T> a) {
  constexpr int V = Io::kVec, ITEMS = kFwdPacks<Io>;
  __shared__ float scratch[1][kMaxThreads / 32];
  const int team = a.team, t = threadIdx.x & (team - 1), per_block = blockDim.x / team;
  const int n = static_cast<int>(a.n);  // <= team * ITEMS * V
  // the loop bounds are the same for the whole block, so every thread reaches team_sum's barriers
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * per_block; first < a.rows;
       first += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t row = first + threadIdx.x / team;
    const bool live = row < a.rows;
    // every load before any arithmetic: they are independent, so all of them are in flight at once
    Pack<T, V> xp[ITEMS], rp[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (i * team + t) * V;
      const bool ok = live && col < n;
      xp[i] = ok ? load_pack<Io>(a.x + row * a.stride_x + col, n - col) : Pack<T, V>{};
      rp[i] = ok && a.residual != nullptr ? load_pack<Io>(a.residual + row * a.stride_r + col, n - col)
                                          : Pack<T, V>{};
    }
    float v[ITEMS][V];  // s in fp32, zero outside the row
    float sum[1] = {0.f};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (i * team + t) * V;
      if (live && col < n) {
        make_s<Io>(a, row, col, xp[i], rp[i], v[i]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[i][e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < V; ++e) sum[0] += v[i][e];
    }
    team_sum(sum, team, scratch);
    const float mu = sum[0] / static_cast<float>(n);
    float sq[1] = {0.f};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (i * team + t) * V;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float d = col + e < n ? v[i][e] - mu : 0.f;
        sq[0] += d * d;
      }
    }
    team_sum(sq, team, scratch);
    const float rs = rsqrtf(sq[0] / static_cast<float>(n) + a.eps);
    if (live && t == 0) {
      a.mean[row] = mu;
      a.rstd[row] = rs;
    }
    // weight and bias: the same n values for every row, so these loads hit L1/L2
    Pack<T, V> wp[ITEMS], bp[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (i * team + t) * V;
      const bool ok = live && col < n;
      wp[i] = ok && a.weight != nullptr ? load_pack<Io>(a.weight + col, n - col) : Pack<T, V>{};
      bp[i] = ok && a.bias != nullptr ? load_pack<Io>(a.bias + col, n - col) : Pack<T, V>{};
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (i * team + t) * V;
      if (live && col < n) store_pack<Io>(a.y + row * a.n + col, n - col, make_y<Io>(a, v[i], mu, rs, wp[i], bp[i]));
    }
  }
}

// Forward for rows longer than a block's registers hold: a block per row (grid-stride), three passes over the row
// (sum; centred squares; output), the last two re-reading s from global memory.
template <typename T, typename Io>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_fwd_long_kernel(LnArgs<T> a) {
  constexpr int V = Io::kVec;
  __shared__ float scratch[1][kMaxThreads / 32];
  const int64_t n = a.n, step = static_cast<int64_t>(blockDim.x) * V;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    // s after the first pass: the residual output when there is one (this thread wrote those very packs), else x
    const T* s_row = a.res_out != nullptr ? a.res_out + row * n : a.x + row * a.stride_x;
    float sum[1] = {0.f};
    for (int64_t col = threadIdx.x * V; col < n; col += step) {
      const int avail = static_cast<int>(n - col < V ? n - col : V);
      const Pack<T, V> xp = load_pack<Io>(a.x + row * a.stride_x + col, avail);
      const Pack<T, V> rp =
          a.residual != nullptr ? load_pack<Io>(a.residual + row * a.stride_r + col, avail) : Pack<T, V>{};
      float v[V];
      make_s<Io>(a, row, static_cast<int>(col), xp, rp, v);
#pragma unroll
      for (int e = 0; e < V; ++e) sum[0] += e < avail ? v[e] : 0.f;
    }
    team_sum(sum, blockDim.x, scratch);
    const float mu = sum[0] / static_cast<float>(n);
    float sq[1] = {0.f};
    for (int64_t col = threadIdx.x * V; col < n; col += step) {
      const int avail = static_cast<int>(n - col < V ? n - col : V);
      const Pack<T, V> sp = load_pack<Io>(s_row + col, avail);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float d = e < avail ? sp.get(e) - mu : 0.f;
        sq[0] += d * d;
      }
    }
    team_sum(sq, blockDim.x, scratch);
    const float rs = rsqrtf(sq[0] / static_cast<float>(n) + a.eps);
    if (threadIdx.x == 0) {
      a.mean[row] = mu;
      a.rstd[row] = rs;
    }
    for (int64_t col = threadIdx.x * V; col < n; col += step) {
      const int avail = static_cast<int>(n - col < V ? n - col : V);
      const Pack<T, V> sp = load_pack<Io>(s_row + col, avail);
      const Pack<T, V> wp = a.weight != nullptr ? load_pack<Io>(a.weight + col, avail) : Pack<T, V>{};
      const Pack<T, V> bp = a.bias != nullptr ? load_pack<Io>(a.bias + col, avail) : Pack<T, V>{};
      float v[V];
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = sp.get(e);
      store_pack<Io>(a.y + row * n + col, avail, make_y<Io>(a, v, mu, rs, wp, bp));
    }
  }
}

template <typename T>
struct LnBwdArgs {
  const T* dy;        // gradient of y (rows, n), contiguous
  const T* dres_out;  // gradient flowing into the residual output (rows, n), contiguous; nullptr when unused
  const T* s;         // the normalised input (x itself, or the residual output), contiguous
  const T* weight;    // (n,) or nullptr
  const float* mean;  // (rows,) from the forward
  const float* rstd;  // (rows,) from the forward
  T* dx;              // gradient of x (rows, n), contiguous
  T* dres;            // gradient of the residual (rows, n), contiguous; nullptr when there is no residual input
  float* dw_partial;  // (partial_rows, n) zeroed fp32, row b for block b; nullptr when there is no weight
  float* db_partial;  // the same for the bias
  int64_t rows;       // rows of the problem
  int64_t n;          // columns
  uint64_t seed;      // Philox key of the forward's dropout mask, regenerated here
  uint32_t thresh24;  // its 24-bit keep threshold
  float keep_scale;   // 1 / (1 - p)
  bool dropout;       // p > 0
  int team;           // threads per row (rows kernel; a power of two that divides blockDim.x)
};

// The partial sums of c1 = sum(xhat * g) and c2 = sum(g) (g = weight * dy) over the first `avail` columns of a
// pack (only columns of the row count: past its end xhat need not be finite)
template <typename Io, typename T>
__device__ __forceinline__ void pack_c(const LnBwdArgs<T>& a, float mu, float rs, const Pack<T, Io::kVec>& sp,
                                       const Pack<T, Io::kVec>& gp, const Pack<T, Io::kVec>& wp, int avail,
                                       float (&c)[2]) {
#pragma unroll
  for (int e = 0; e < Io::kVec; ++e) {
    if (!Io::kVector && e >= avail) break;  // (a 16-byte pack is never cut by the row's end)
    const float g = gp.get(e) * (a.weight != nullptr ? wp.get(e) : 1.f);
    c[0] += (sp.get(e) - mu) * rs * g;
    c[1] += g;
  }
}

// The gradients of one pack: ds = rstd * (g - (xhat * c1 + c2)) + d(s_out), stored as dres and, through the
// dropout mask, as dx; dy * xhat and dy added to the dweight/dbias partials dw, db.
template <typename Io, typename T>
__device__ __forceinline__ void pack_grads(const LnBwdArgs<T>& a, int64_t row, int col, float mu, float rs, float c1,
                                           float c2, const Pack<T, Io::kVec>& sp, const Pack<T, Io::kVec>& gp,
                                           const Pack<T, Io::kVec>& wp, const Pack<T, Io::kVec>& op,
                                           float (&dw)[Io::kVec], float (&db)[Io::kVec]) {
  constexpr int V = Io::kVec;
  const uint32_t keep = keep_bits<V>(a.dropout, a.seed, row, col, a.n, a.thresh24);
  Pack<T, V> dsp{}, dxp{};
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float dy = gp.get(e), xhat = (sp.get(e) - mu) * rs;
    float ds = rs * (dy * (a.weight != nullptr ? wp.get(e) : 1.f) - (xhat * c1 + c2));
    if (a.dres_out != nullptr) ds += op.get(e);
    dsp.put(e, ds);
    dxp.put(e, a.dropout ? ((keep >> e) & 1u ? ds * a.keep_scale : 0.f) : ds);
    dw[e] += dy * xhat;
    db[e] += dy;
  }
  const int avail = static_cast<int>(a.n) - col;
  if (a.dres != nullptr) store_pack<Io>(a.dres + row * a.n + col, avail, dsp);
  store_pack<Io>(a.dx + row * a.n + col, avail, dxp);
}

// This block's partial row `out` (of dweight or dbias) from every thread's register partials acc. The block's
// teams own the same columns: with several teams, their partials are added through shared memory (`red`,
// blockDim.x * ITEMS * V floats) in team order; a lone team writes its registers directly.
template <typename Io, int ITEMS>
__device__ __forceinline__ void write_partial(const float (&acc)[ITEMS][Io::kVec], float* out, int n, int team,
                                              float* red) {
  constexpr int V = Io::kVec;
  const int t = threadIdx.x & (team - 1), teams = blockDim.x / team;
  if (teams == 1) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (i * team + t) * V;
      if (col < n) store_f32<Io>(out + col, n - col, acc[i]);
    }
    return;
  }
  const int cap = team * ITEMS * V;  // columns a team covers: >= n
  float* mine = red + (threadIdx.x / team) * cap;
  __syncthreads();  // the previous call's readers are done with red
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int col = (i * team + t) * V;
#pragma unroll
    for (int e = 0; e < V; e += 4) {
      *reinterpret_cast<float4*>(mine + col + e) = make_float4(acc[i][e], acc[i][e + 1], acc[i][e + 2], acc[i][e + 3]);
    }
  }
  __syncthreads();
  for (int col = threadIdx.x * V; col < n; col += blockDim.x * V) {
    float sum[V] = {};
    for (int r = 0; r < teams; ++r) {
#pragma unroll
      for (int e = 0; e < V; e += 4) {
        const float4 q = *reinterpret_cast<const float4*>(red + r * cap + col + e);
        sum[e] += q.x, sum[e + 1] += q.y, sum[e + 2] += q.z, sum[e + 3] += q.w;
      }
    }
    store_f32<Io>(out + col, n - col, sum);
  }
}

// Backward, main path: a persistent grid; a team of a.team threads per row with s, dy and d(s_out) of the row in
// registers (each read once), the weight in registers for the whole kernel, dweight/dbias partials in registers
// until the end.
template <typename T, typename Io>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_bwd_rows_kernel(LnBwdArgs<T> a) {
  constexpr int V = Io::kVec, ITEMS = kBwdPacks<Io>;
  __shared__ float scratch[2][kMaxThreads / 32];
  // write_partial's; only needed with several teams per block, hence blockDim.x == kThreads
  __shared__ __align__(16) float red[kThreads * kMaxBwdCols];
  const int team = a.team, t = threadIdx.x & (team - 1), per_block = blockDim.x / team;
  const int n = static_cast<int>(a.n);  // <= team * ITEMS * V
  Pack<T, V> wp[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int col = (i * team + t) * V;
    wp[i] = a.weight != nullptr && col < n ? load_pack<Io>(a.weight + col, n - col) : Pack<T, V>{};
  }
  float dw[ITEMS][V] = {}, db[ITEMS][V] = {};
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * per_block; first < a.rows;
       first += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t row = first + threadIdx.x / team;
    const bool live = row < a.rows;
    const float mu = live ? a.mean[row] : 0.f, rs = live ? a.rstd[row] : 0.f;
    Pack<T, V> sp[ITEMS], gp[ITEMS];  // s and dy
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (i * team + t) * V;
      const bool ok = live && col < n;
      sp[i] = ok ? load_pack<Io>(a.s + row * a.n + col, n - col) : Pack<T, V>{};
      gp[i] = ok ? load_pack<Io>(a.dy + row * a.n + col, n - col) : Pack<T, V>{};
    }
    float c[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (i * team + t) * V;
      if (live && col < n) pack_c<Io>(a, mu, rs, sp[i], gp[i], wp[i], n - col, c);
    }
    team_sum(c, team, scratch);
    const float inv_n = 1.f / static_cast<float>(n);
    const float c1 = c[0] * inv_n, c2 = c[1] * inv_n;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (i * team + t) * V;
      if (live && col < n) {
        // d(s_out) only now: its registers are not held through the reduction
        const Pack<T, V> op = a.dres_out != nullptr ? load_pack<Io>(a.dres_out + row * a.n + col, n - col)
                                                    : Pack<T, V>{};
        pack_grads<Io>(a, row, col, mu, rs, c1, c2, sp[i], gp[i], wp[i], op, dw[i], db[i]);
      }
    }
  }
  if (a.dw_partial != nullptr) write_partial<Io>(dw, a.dw_partial + blockIdx.x * a.n, n, team, red);
  if (a.db_partial != nullptr) write_partial<Io>(db, a.db_partial + blockIdx.x * a.n, n, team, red);
}

// Backward for rows longer than a block's registers hold: a block per row (persistent grid), two passes (c1 and
// c2; the gradients), each reading the row from global memory; each block adds into its own fp32 partial row in
// global memory (plain read-modify-write: no other block touches it).
template <typename T, typename Io>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_bwd_long_kernel(LnBwdArgs<T> a) {
  constexpr int V = Io::kVec;
  __shared__ float scratch[2][kMaxThreads / 32];
  const int64_t n = a.n, step = static_cast<int64_t>(blockDim.x) * V;
  float* dw_row = a.dw_partial != nullptr ? a.dw_partial + blockIdx.x * n : nullptr;
  float* db_row = a.db_partial != nullptr ? a.db_partial + blockIdx.x * n : nullptr;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const float mu = a.mean[row], rs = a.rstd[row];
    float c[2] = {0.f, 0.f};
    for (int64_t col = threadIdx.x * V; col < n; col += step) {
      const int avail = static_cast<int>(n - col < V ? n - col : V);
      const Pack<T, V> sp = load_pack<Io>(a.s + row * n + col, avail);
      const Pack<T, V> gp = load_pack<Io>(a.dy + row * n + col, avail);
      const Pack<T, V> wp = a.weight != nullptr ? load_pack<Io>(a.weight + col, avail) : Pack<T, V>{};
      pack_c<Io>(a, mu, rs, sp, gp, wp, avail, c);
    }
    team_sum(c, blockDim.x, scratch);
    const float inv_n = 1.f / static_cast<float>(n);
    const float c1 = c[0] * inv_n, c2 = c[1] * inv_n;
    for (int64_t col = threadIdx.x * V; col < n; col += step) {
      const int avail = static_cast<int>(n - col < V ? n - col : V);
      const Pack<T, V> sp = load_pack<Io>(a.s + row * n + col, avail);
      const Pack<T, V> gp = load_pack<Io>(a.dy + row * n + col, avail);
      const Pack<T, V> wp = a.weight != nullptr ? load_pack<Io>(a.weight + col, avail) : Pack<T, V>{};
      const Pack<T, V> op = a.dres_out != nullptr ? load_pack<Io>(a.dres_out + row * n + col, avail) : Pack<T, V>{};
      float dw[V] = {}, db[V] = {};
      if (dw_row != nullptr) load_f32<Io>(dw_row + col, avail, dw);
      if (db_row != nullptr) load_f32<Io>(db_row + col, avail, db);
      pack_grads<Io>(a, row, static_cast<int>(col), mu, rs, c1, c2, sp, gp, wp, op, dw, db);
      if (dw_row != nullptr) store_f32<Io>(dw_row + col, avail, dw);
      if (db_row != nullptr) store_f32<Io>(db_row + col, avail, db);
    }
  }
}

bool aligned16(uintptr_t p) { return p % 16 == 0; }  // (0, an absent buffer, is)

// Threads per row: the smallest power of two whose threads, per_thread packs of vec columns each, cover n columns
int64_t team_for(int64_t n, int vec, int per_thread) {
  const int64_t packs = (n + vec - 1) / vec;
  int64_t team = 1;
  while (team * per_thread < packs) team <<= 1;
  return team;
}

unsigned blocks(int64_t x) { return static_cast<unsigned>(x < INT_MAX ? (x > 0 ? x : 1) : INT_MAX); }

template <typename T, typename Io>
void launch_fwd(LnArgs<T> a, cudaStream_t stream) {
  const int64_t team = team_for(a.n, Io::kVec, kFwdPacks<Io>);
  if (team <= kMaxThreads) {
    a.team = static_cast<int>(team);
    const int block = team > kThreads ? static_cast<int>(team) : kThreads;
    const int64_t per_block = block / team;
    launch(layer_norm_fwd_rows_kernel<T, Io>, blocks((a.rows + per_block - 1) / per_block), block, 0, stream, a);
  } else {
    launch(layer_norm_fwd_long_kernel<T, Io>, blocks(a.rows), kMaxThreads, 0, stream, a);
  }
}

template <typename T, typename Io>
void launch_bwd(LnBwdArgs<T> a, int64_t partial_rows, cudaStream_t stream) {
  const int64_t team = team_for(a.n, Io::kVec, kBwdPacks<Io>);
  if (team <= kMaxThreads) {
    a.team = static_cast<int>(team);
    const int block = team > kThreads ? static_cast<int>(team) : kThreads;
    const int64_t per_block = block / team, needed = (a.rows + per_block - 1) / per_block;
    // at most one block per partial row (more would be idle anyway); rows of blocks not launched stay zero
    launch(layer_norm_bwd_rows_kernel<T, Io>, blocks(needed < partial_rows ? needed : partial_rows), block, 0, stream,
           a);
  } else {
    launch(layer_norm_bwd_long_kernel<T, Io>, blocks(partial_rows), kMaxThreads, 0, stream, a);
  }
}

}  // namespace

void layer_norm_fwd(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y,
                    uintptr_t res_out, uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t n,
                    int64_t stride_x, int64_t stride_r, double eps, uint64_t seed, double p, uint32_t thresh24,
                    int dtype, uintptr_t stream) {
  if (rows == 0) return;
  if ((residual != 0 || p > 0.0) && res_out == 0) {
    // the kernels re-read s from res_out (the long path) and normalise s as stored, rounded to the dtype
    throw std::invalid_argument("fastformer._C: layer_norm_fwd needs res_out with a residual or dropout");
  }
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_FLOAT(dtype, T, {
    LnArgs<T> a{reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(residual), reinterpret_cast<const T*>(weight),
                reinterpret_cast<const T*>(bias), reinterpret_cast<T*>(y), reinterpret_cast<T*>(res_out),
                reinterpret_cast<float*>(mean), reinterpret_cast<float*>(rstd), rows, n, stride_x, stride_r,
                static_cast<float>(eps), seed, thresh24, static_cast<float>(1.0 / (1.0 - p)), p > 0.0, 0};
    // 16-byte packs need every row of every tensor to start on a 16-byte boundary
    constexpr int kVec = Vec16<T>::kVec;
    const bool vec = n % kVec == 0 && stride_x % kVec == 0 && (residual == 0 || stride_r % kVec == 0) &&
                     aligned16(x) && aligned16(residual) && aligned16(weight) && aligned16(bias) && aligned16(y) &&
                     aligned16(res_out);
    if (vec) {
      launch_fwd<T, Vec16<T>>(a, st);
    } else {
      launch_fwd<T, Scalar4>(a, st);
    }
  });
}

void layer_norm_bwd(uintptr_t dy, uintptr_t dres_out, uintptr_t s, uintptr_t weight, uintptr_t mean,
                    uintptr_t rstd, uintptr_t dx, uintptr_t dres, uintptr_t dw_partial, uintptr_t db_partial,
                    int64_t rows, int64_t n, int64_t partial_rows, uint64_t seed, double p, uint32_t thresh24,
                    int dtype, uintptr_t stream) {
  if (rows == 0) return;
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_FLOAT(dtype, T, {
    LnBwdArgs<T> a{reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(dres_out),
                   reinterpret_cast<const T*>(s), reinterpret_cast<const T*>(weight),
                   reinterpret_cast<const float*>(mean), reinterpret_cast<const float*>(rstd),
                   reinterpret_cast<T*>(dx), reinterpret_cast<T*>(dres), reinterpret_cast<float*>(dw_partial),
                   reinterpret_cast<float*>(db_partial), rows, n, seed, thresh24,
                   static_cast<float>(1.0 / (1.0 - p)), p > 0.0, 0};
    constexpr int kVec = Vec16<T>::kVec;
    const bool vec = n % kVec == 0 && aligned16(dy) && aligned16(dres_out) && aligned16(s) && aligned16(weight) &&
                     aligned16(dx) && aligned16(dres) && aligned16(dw_partial) && aligned16(db_partial);
    if (vec) {
      launch_bwd<T, Vec16<T>>(a, partial_rows, st);
    } else {
      launch_bwd<T, Scalar4>(a, partial_rows, st);
    }
  });
}

}  // namespace fastformer
