// Fused elementwise kernels of the feed-forward block's `cuda` backend. The GEMMs are cuBLAS (torch.matmul
// on the Python side); these kernels do everything around them in one pass each:
//
//   ffn_bias_act_fwd: y = dropout(act(z + bias)), optionally writing pre = z + bias back over z.
//   ffn_act_bwd:      g <- g * act'(pre) * keep/(1-p) in place, optionally h = act(pre) * keep/(1-p).
//
// All tensors are contiguous (rows, cols); the dropout counter of element (r, c) is the flat offset
// r * cols + c, as in the Triton kernels and the torch reference. Math is fp32. When cols is a multiple of
// the vector width and every pointer is 16-byte aligned, each thread moves 16 bytes per load and store;
// otherwise the same kernel runs with one element per thread. Offsets are int64 (grid-stride loops).
#include "common.cuh"
#include "dropout.cuh"
#include "ops.h"

namespace fastformer {
namespace {

enum Act : int { kNone = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// act(x) and act'(x); gelu_tanh uses 0.5 * (1 + tanh(u)) == sigmoid(2u) like the Triton kernel
__device__ __forceinline__ void act_and_grad(float x, int act, float& y, float& dy) {
  switch (act) {
    case kGelu: {
      const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
      y = x * cdf;
      dy = cdf + x * expf(-0.5f * x * x) * 0.39894228040143268f;
      break;
    }
    case kGeluTanh: {
      const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      const float s = 1.f / (1.f + expf(-2.f * u));
      y = x * s;
      dy = s + x * 2.f * s * (1.f - s) * 0.79788456080286536f * (1.f + 3.f * 0.044715f * x * x);
      break;
    }
    case kRelu:
      y = fmaxf(x, 0.f);
      dy = x > 0.f ? 1.f : 0.f;
      break;
    default:
      y = x;
      dy = 1.f;
  }
}

template <typename T, int VEC>
__global__ void bias_act_fwd_kernel(T* __restrict__ z, const T* __restrict__ bias, T* __restrict__ y, bool store_pre,
                                    int64_t total, int64_t cols, int act, uint64_t seed, uint32_t thresh, float scale,
                                    bool dropout) {
  using P = Pack<T, VEC>;
  const int64_t nvec = total / VEC;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = v * VEC;
    const P zin = *reinterpret_cast<const P*>(z + i0);
    P b;
    // cols % VEC == 0 on the vector path, so the VEC elements share one row and c0 .. c0+VEC-1 are in range
    if (bias != nullptr) b = *reinterpret_cast<const P*>(bias + i0 % cols);
    P out, pre;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float x = to_f32(zin.v[j]) + (bias != nullptr ? to_f32(b.v[j]) : 0.f);
      float a, unused;
      act_and_grad(x, act, a, unused);
      if (dropout) a = dropout_keep(seed, static_cast<uint64_t>(i0 + j), thresh) ? a * scale : 0.f;
      pre.v[j] = from_f32<T>(x);
      out.v[j] = from_f32<T>(a);
    }
    *reinterpret_cast<P*>(y + i0) = out;
    if (store_pre) *reinterpret_cast<P*>(z + i0) = pre;
  }
}

template <typename T, int VEC>
__global__ void act_bwd_kernel(T* __restrict__ g, const T* __restrict__ pre, T* __restrict__ h, int64_t total,
                               int act, uint64_t seed, uint32_t thresh, float scale, bool dropout) {
  using P = Pack<T, VEC>;
  const int64_t nvec = total / VEC;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = v * VEC;
    const P gin = *reinterpret_cast<const P*>(g + i0);
    const P pin = *reinterpret_cast<const P*>(pre + i0);
    P gout, hout;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float a, d;
      act_and_grad(to_f32(pin.v[j]), act, a, d);
      float gg = to_f32(gin.v[j]) * d;
      if (dropout) {
        const bool keep = dropout_keep(seed, static_cast<uint64_t>(i0 + j), thresh);
        gg = keep ? gg * scale : 0.f;
        a = keep ? a * scale : 0.f;
      }
      gout.v[j] = from_f32<T>(gg);
      hout.v[j] = from_f32<T>(a);
    }
    *reinterpret_cast<P*>(g + i0) = gout;
    if (h != nullptr) *reinterpret_cast<P*>(h + i0) = hout;
  }
}

bool aligned16(uintptr_t p) { return p % 16 == 0; }

unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

void check_act(int act) {
  if (act < kNone || act > kRelu) throw std::invalid_argument("fastformer._C: unknown activation code " + std::to_string(act));
}

}  // namespace

void ffn_bias_act_fwd(uintptr_t z, uintptr_t bias, uintptr_t y, int store_pre, int64_t rows, int64_t cols, int act,
                      uint64_t seed, double p, uint32_t thresh24, int dtype, uintptr_t stream) {
  check_act(act);
  const int64_t total = rows * cols;
  if (total == 0) return;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool dropout = p > 0.0;
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  FF_DISPATCH_FLOAT(dtype, T, {
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = cols % kVec == 0 && aligned16(z) && aligned16(y) && (bias == 0 || aligned16(bias));
    T* zp = reinterpret_cast<T*>(z);
    const T* bp = reinterpret_cast<const T*>(bias);
    T* yp = reinterpret_cast<T*>(y);
    if (vec) {
      bias_act_fwd_kernel<T, kVec><<<grid_for(total / kVec), kThreads, 0, s>>>(
          zp, bp, yp, store_pre != 0, total, cols, act, seed, thresh24, scale, dropout);
    } else {
      bias_act_fwd_kernel<T, 1><<<grid_for(total), kThreads, 0, s>>>(zp, bp, yp, store_pre != 0, total, cols, act,
                                                                       seed, thresh24, scale, dropout);
    }
    FF_LAUNCH_CHECK();
  });
}

void ffn_act_bwd(uintptr_t g, uintptr_t pre, uintptr_t h, int64_t rows, int64_t cols, int act, uint64_t seed, double p,
                 uint32_t thresh24, int dtype, uintptr_t stream) {
  check_act(act);
  const int64_t total = rows * cols;
  if (total == 0) return;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool dropout = p > 0.0;
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  FF_DISPATCH_FLOAT(dtype, T, {
    constexpr int kVec = 16 / sizeof(T);
    // flat contiguous buffers: only the total length and the alignment decide the vector path
    const bool vec = total % kVec == 0 && aligned16(g) && aligned16(pre) && (h == 0 || aligned16(h));
    T* gp = reinterpret_cast<T*>(g);
    const T* pp = reinterpret_cast<const T*>(pre);
    T* hp = reinterpret_cast<T*>(h);
    if (vec) {
      act_bwd_kernel<T, kVec><<<grid_for(total / kVec), kThreads, 0, s>>>(gp, pp, hp, total, act, seed, thresh24,
                                                                           scale, dropout);
    } else {
      act_bwd_kernel<T, 1><<<grid_for(total), kThreads, 0, s>>>(gp, pp, hp, total, act, seed, thresh24, scale,
                                                                 dropout);
    }
    FF_LAUNCH_CHECK();
  });
}

}  // namespace fastformer
