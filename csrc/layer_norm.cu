// LayerNorm with fused dropout + residual add, forward and backward, for rows of any length.
//
//   s = dropout(x) + residual            (each part optional; s is written out when it differs from x)
//   y = (s - mean) * rstd * weight + bias, statistics in fp32
//
// One block per row. Rows of up to kSmemCols values keep s in shared memory, so global memory is read
// once; longer rows recompute s from global memory on each pass (correct, slower). The backward pass
// runs `partial_rows` persistent blocks; each owns one fp32 row of dweight/dbias partial sums (no
// atomics, deterministic) that Python reduces with one sum. Dropout regenerates the forward's Philox
// mask of element (row, col) of the (rows, n) dropout matrix (dropout.cuh); the passes that draw it give
// each thread groups of four consecutive columns, so one Philox call serves four elements.
#include "common.cuh"
#include "dropout.cuh"
#include "ops.h"

namespace fastformer {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSmemCols = 12288;  // 48 KiB of fp32: the default dynamic shared memory limit

template <typename T>
struct LnArgs {
  const T* x;
  const T* residual;  // nullptr when absent
  const T* weight;    // nullptr when absent
  const T* bias;      // nullptr when absent
  T* y;
  T* res_out;  // nullptr when s == x
  float* mean;
  float* rstd;
  int64_t n, stride_x, stride_r;
  float eps;
  uint64_t seed;
  uint32_t thresh24;
  float keep_scale;  // 1 / (1 - p)
  bool dropout;
};

// f(j0, cnt) for each group of four columns j0 .. j0 + cnt - 1 (j0 a multiple of 4, cnt <= 4) this thread owns
template <typename F>
__device__ __forceinline__ void for_each_group(int64_t n, F&& f) {
  const int64_t step = 4 * static_cast<int64_t>(blockDim.x);
  for (int64_t j0 = 4 * static_cast<int64_t>(threadIdx.x); j0 < n; j0 += step) {
    f(j0, n - j0 < 4 ? static_cast<int>(n - j0) : 4);
  }
}

// s at columns j0 .. j0 + cnt - 1 of `row` into v: one Philox call decides the four
template <typename T>
__device__ __forceinline__ void load_s(const LnArgs<T>& a, int64_t row, int64_t j0, int cnt, float (&v)[4]) {
  const uint32_t keep = a.dropout ? dropout_keep4(a.seed, row, j0, a.n, a.thresh24) : 0xFu;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    if (t >= cnt) break;
    float x = to_f32(a.x[row * a.stride_x + j0 + t]);
    if (a.dropout) x = (keep >> t) & 1u ? x * a.keep_scale : 0.f;
    if (a.residual) x += to_f32(a.residual[row * a.stride_r + j0 + t]);
    v[t] = x;
  }
}

// The row's s at columns j0 .. j0 + cnt - 1 after the first pass: from the shared-memory cache (one 16-byte
// access per full group), the rounded residual output, or recomputed.
template <typename T>
__device__ __forceinline__ void reload_s(const LnArgs<T>& a, const float* cache, int64_t row, int64_t j0, int cnt,
                                         float (&v)[4]) {
  if (cache != nullptr && cnt == 4) {
    const float4 c = *reinterpret_cast<const float4*>(cache + j0);
    v[0] = c.x, v[1] = c.y, v[2] = c.z, v[3] = c.w;
  } else if (cache != nullptr || a.res_out != nullptr) {
    for (int t = 0; t < cnt; ++t) v[t] = cache != nullptr ? cache[j0 + t] : to_f32(a.res_out[row * a.n + j0 + t]);
  } else {
    load_s(a, row, j0, cnt, v);
  }
}

template <typename T>
__global__ void layer_norm_fwd_kernel(LnArgs<T> a) {
  extern __shared__ float4 cache4[];  // s for this row, when the row fits (float4: 16-byte aligned)
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  float* cache = a.n <= kSmemCols ? reinterpret_cast<float*>(cache4) : nullptr;
  // the residual output is rounded to T; normalise exactly that so backward (which reloads it) agrees
  const bool rounded = a.res_out != nullptr;

  float sum = 0.f;
  for_each_group(a.n, [&](int64_t j0, int cnt) {
    float v[4];
    load_s(a, row, j0, cnt, v);
    for (int t = 0; t < cnt; ++t) {
      if (rounded) {
        const T r = from_f32<T>(v[t]);
        a.res_out[row * a.n + j0 + t] = r;
        v[t] = to_f32(r);
      }
      sum += v[t];
    }
    if (cache != nullptr && cnt == 4) {
      cache4[j0 / 4] = make_float4(v[0], v[1], v[2], v[3]);
    } else if (cache != nullptr) {
      for (int t = 0; t < cnt; ++t) cache[j0 + t] = v[t];
    }
  });
  const float mu = block_sum(sum, scratch) / static_cast<float>(a.n);

  float sq = 0.f;
  for_each_group(a.n, [&](int64_t j0, int cnt) {
    float v[4];
    reload_s(a, cache, row, j0, cnt, v);
    for (int t = 0; t < cnt; ++t) sq += (v[t] - mu) * (v[t] - mu);
  });
  const float rs = rsqrtf(block_sum(sq, scratch) / static_cast<float>(a.n) + a.eps);
  if (threadIdx.x == 0) {
    a.mean[row] = mu;
    a.rstd[row] = rs;
  }

  for_each_group(a.n, [&](int64_t j0, int cnt) {
    float v[4];
    reload_s(a, cache, row, j0, cnt, v);
    for (int t = 0; t < cnt; ++t) {
      const int64_t j = j0 + t;
      float out = (v[t] - mu) * rs;
      if (a.weight) out *= to_f32(a.weight[j]);
      if (a.bias) out += to_f32(a.bias[j]);
      a.y[row * a.n + j] = from_f32<T>(out);
    }
  });
}

template <typename T>
struct LnBwdArgs {
  const T* dy;
  const T* dres_out;  // gradient flowing into the residual output; nullptr when unused
  const T* s;         // the normalised input (x itself, or the residual output)
  const T* weight;
  const float* mean;
  const float* rstd;
  T* dx;
  T* dres;            // nullptr when there is no residual input
  float* dw_partial;  // (partial_rows, n) or nullptr
  float* db_partial;  // (partial_rows, n) or nullptr
  int64_t rows, n;
  uint64_t seed;
  uint32_t thresh24;
  float keep_scale;
  bool dropout;
};

template <typename T>
__global__ void layer_norm_bwd_kernel(LnBwdArgs<T> a) {
  __shared__ float scratch[32];
  float* dw = a.dw_partial ? a.dw_partial + blockIdx.x * a.n : nullptr;
  float* db = a.db_partial ? a.db_partial + blockIdx.x * a.n : nullptr;
  const float inv_n = 1.f / static_cast<float>(a.n);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const float mu = a.mean[row], rs = a.rstd[row];
    const int64_t base = row * a.n;
    float c1 = 0.f, c2 = 0.f;  // sums of xhat * w * dy and of w * dy
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
      const float xhat = (to_f32(a.s[base + j]) - mu) * rs;
      const float wdy = to_f32(a.dy[base + j]) * (a.weight ? to_f32(a.weight[j]) : 1.f);
      c1 += xhat * wdy;
      c2 += wdy;
    }
    c1 = block_sum(c1, scratch) * inv_n;
    c2 = block_sum(c2, scratch) * inv_n;
    for_each_group(a.n, [&](int64_t j0, int cnt) {
      const uint32_t keep = a.dropout ? dropout_keep4(a.seed, row, j0, a.n, a.thresh24) : 0xFu;
      for (int t = 0; t < cnt; ++t) {
        const int64_t j = j0 + t;
        const float g = to_f32(a.dy[base + j]);
        const float xhat = (to_f32(a.s[base + j]) - mu) * rs;
        float ds = rs * (g * (a.weight ? to_f32(a.weight[j]) : 1.f) - (xhat * c1 + c2));
        if (a.dres_out) ds += to_f32(a.dres_out[base + j]);
        if (a.dres) a.dres[base + j] = from_f32<T>(ds);
        a.dx[base + j] = from_f32<T>((keep >> t) & 1u ? ds * a.keep_scale : 0.f);
        // each block owns its partial row: plain read-modify-write, no atomics
        if (dw) dw[j] += g * xhat;
        if (db) db[j] += g;
      }
    });
  }
}

}  // namespace

void layer_norm_fwd(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y,
                    uintptr_t res_out, uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t n,
                    int64_t stride_x, int64_t stride_r, double eps, uint64_t seed, double p, uint32_t thresh24,
                    int dtype, uintptr_t stream) {
  if (rows == 0) return;
  const size_t smem = n <= kSmemCols ? static_cast<size_t>(n) * sizeof(float) : 0;
  FF_DISPATCH_FLOAT(dtype, T, {
    LnArgs<T> a{reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(residual), reinterpret_cast<const T*>(weight),
                reinterpret_cast<const T*>(bias), reinterpret_cast<T*>(y), reinterpret_cast<T*>(res_out),
                reinterpret_cast<float*>(mean), reinterpret_cast<float*>(rstd), n, stride_x, stride_r,
                static_cast<float>(eps), seed, thresh24, static_cast<float>(1.0 / (1.0 - p)), p > 0.0};
    layer_norm_fwd_kernel<T><<<static_cast<unsigned>(rows), kThreads, smem, reinterpret_cast<cudaStream_t>(stream)>>>(a);
    FF_LAUNCH_CHECK();
  });
}

void layer_norm_bwd(uintptr_t dy, uintptr_t dres_out, uintptr_t s, uintptr_t weight, uintptr_t mean,
                    uintptr_t rstd, uintptr_t dx, uintptr_t dres, uintptr_t dw_partial, uintptr_t db_partial,
                    int64_t rows, int64_t n, int64_t partial_rows, uint64_t seed, double p, uint32_t thresh24,
                    int dtype, uintptr_t stream) {
  if (rows == 0) return;
  FF_DISPATCH_FLOAT(dtype, T, {
    LnBwdArgs<T> a{reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(dres_out),
                   reinterpret_cast<const T*>(s), reinterpret_cast<const T*>(weight),
                   reinterpret_cast<const float*>(mean), reinterpret_cast<const float*>(rstd),
                   reinterpret_cast<T*>(dx), reinterpret_cast<T*>(dres), reinterpret_cast<float*>(dw_partial),
                   reinterpret_cast<float*>(db_partial), rows, n, seed, thresh24,
                   static_cast<float>(1.0 / (1.0 - p)), p > 0.0};
    layer_norm_bwd_kernel<T><<<static_cast<unsigned>(partial_rows), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
    FF_LAUNCH_CHECK();
  });
}

}  // namespace fastformer
