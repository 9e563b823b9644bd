// LayerNorm with fused dropout + residual add, forward and backward, for rows of any length.
//
//   s = dropout(x) + residual            (each part optional; s is written out when it differs from x)
//   y = (s - mean) * rstd * weight + bias, statistics in fp32
//
// One block per row. Rows of up to kSmemCols values keep s in shared memory, so global memory is read
// once; longer rows recompute s from global memory on each pass (correct, slower). The backward pass
// runs `partial_rows` persistent blocks; each owns one fp32 row of dweight/dbias partial sums (no
// atomics, deterministic) that Python reduces with one sum. Dropout regenerates the forward's Philox
// mask from (seed, row * n + col).
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

template <typename T>
__device__ __forceinline__ float load_s(const LnArgs<T>& a, int64_t row, int64_t j) {
  float v = to_f32(a.x[row * a.stride_x + j]);
  if (a.dropout) v = dropout_keep(a.seed, static_cast<uint64_t>(row * a.n + j), a.thresh24) ? v * a.keep_scale : 0.f;
  if (a.residual) v += to_f32(a.residual[row * a.stride_r + j]);
  return v;
}

template <typename T>
__global__ void layer_norm_fwd_kernel(LnArgs<T> a) {
  extern __shared__ float cache[];  // s for this row, when the row fits
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const bool cached = a.n <= kSmemCols;
  // the residual output is rounded to T; normalise exactly that so backward (which reloads it) agrees
  const bool rounded = a.res_out != nullptr;

  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
    float v = load_s(a, row, j);
    if (rounded) {
      const T r = from_f32<T>(v);
      a.res_out[row * a.n + j] = r;
      v = to_f32(r);
    }
    if (cached) cache[j] = v;
    sum += v;
  }
  const float mu = block_sum(sum, scratch) / static_cast<float>(a.n);

  float sq = 0.f;
  for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
    const float d = (cached ? cache[j] : (rounded ? to_f32(a.res_out[row * a.n + j]) : load_s(a, row, j))) - mu;
    sq += d * d;
  }
  const float rs = rsqrtf(block_sum(sq, scratch) / static_cast<float>(a.n) + a.eps);
  if (threadIdx.x == 0) {
    a.mean[row] = mu;
    a.rstd[row] = rs;
  }

  for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
    const float v = cached ? cache[j] : (rounded ? to_f32(a.res_out[row * a.n + j]) : load_s(a, row, j));
    float out = (v - mu) * rs;
    if (a.weight) out *= to_f32(a.weight[j]);
    if (a.bias) out += to_f32(a.bias[j]);
    a.y[row * a.n + j] = from_f32<T>(out);
  }
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
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
      const float g = to_f32(a.dy[base + j]);
      const float xhat = (to_f32(a.s[base + j]) - mu) * rs;
      float ds = rs * (g * (a.weight ? to_f32(a.weight[j]) : 1.f) - (xhat * c1 + c2));
      if (a.dres_out) ds += to_f32(a.dres_out[base + j]);
      if (a.dres) a.dres[base + j] = from_f32<T>(ds);
      float d = ds;
      if (a.dropout) d = dropout_keep(a.seed, static_cast<uint64_t>(base + j), a.thresh24) ? d * a.keep_scale : 0.f;
      a.dx[base + j] = from_f32<T>(d);
      // each block owns its partial row: plain read-modify-write, no atomics
      if (dw) dw[j] += g * xhat;
      if (db) db[j] += g;
    }
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
