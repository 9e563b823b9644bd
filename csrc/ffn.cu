// Fused elementwise kernels of the feed-forward block's `cuda` backend. The GEMMs are cuBLAS (torch.matmul
// on the Python side); these kernels do everything around them in one pass each:
//
//   ffn_bias_act_fwd: y = dropout(act(z + bias)), optionally writing pre = z + bias back over z.
//   ffn_act_bwd:      g <- g * act'(pre) * keep/(1-p) in place, optionally h = act(pre) * keep/(1-p);
//                     pre may be absent (0) when there is no activation.
//
// All tensors are contiguous (rows, cols); the dropout counter of element (r, c) is the flat offset
// r * cols + c, as in the Triton kernels and the torch reference. Math is fp32. When cols is a multiple of
// the vector width and every pointer is 16-byte aligned, each thread moves 16 bytes per load and store;
// otherwise the same kernel runs with one element per thread. Offsets are int64 (grid-stride loops).
#include "common.cuh"
#include "dropout.cuh"
#include "ops.h"

#include <initializer_list>
#include <type_traits>

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

// The activation and dropout settings of one launch, shared by both passes.
struct Epilogue {
  int act;
  uint64_t seed;
  uint32_t thresh;  // 24-bit keep threshold
  float scale;      // 1 / (1 - p): exactly 1 without dropout
  bool dropout;

  // whether element i survives dropout (always, without dropout)
  __device__ __forceinline__ bool keeps(int64_t i) const {
    return !dropout || dropout_keep(seed, static_cast<uint64_t>(i), thresh);
  }
};

// Grid-stride loop: f(i0) for the first element i0 of every VEC-element chunk this thread owns.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_chunk(int64_t total, F&& f) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total / VEC; v += step) {
    f(v * VEC);
  }
}

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p + i);
}

template <int VEC, typename T>
__device__ __forceinline__ void store(T* p, int64_t i, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p + i) = v;
}

template <typename T, int VEC>
__global__ void bias_act_fwd_kernel(T* __restrict__ z, const T* __restrict__ bias, T* __restrict__ y, bool store_pre,
                                    int64_t total, int64_t cols, Epilogue ep) {
  for_each_chunk<VEC>(total, [&](int64_t i0) {
    const Pack<T, VEC> zin = load<VEC>(z, i0);
    Pack<T, VEC> b{}, out, pre;
    // cols % VEC == 0 on the vector path, so the VEC elements share one row and c0 .. c0+VEC-1 are in range
    if (bias != nullptr) b = load<VEC>(bias, i0 % cols);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float x = to_f32(zin.v[j]) + (bias != nullptr ? to_f32(b.v[j]) : 0.f);
      float a, unused;
      act_and_grad(x, ep.act, a, unused);
      pre.v[j] = from_f32<T>(x);
      out.v[j] = from_f32<T>(ep.keeps(i0 + j) ? a * ep.scale : 0.f);
    }
    store<VEC>(y, i0, out);
    if (store_pre) store<VEC>(z, i0, pre);
  });
}

// pre is nullptr when there is no activation (act' = 1): only the gradient and the mask are read
template <typename T, int VEC>
__global__ void act_bwd_kernel(T* __restrict__ g, const T* __restrict__ pre, T* __restrict__ h, int64_t total,
                               Epilogue ep) {
  for_each_chunk<VEC>(total, [&](int64_t i0) {
    const Pack<T, VEC> gin = load<VEC>(g, i0);
    const Pack<T, VEC> pin = pre != nullptr ? load<VEC>(pre, i0) : Pack<T, VEC>{};
    Pack<T, VEC> gout, hout;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float a, d;
      act_and_grad(to_f32(pin.v[j]), ep.act, a, d);
      const bool keep = ep.keeps(i0 + j);
      gout.v[j] = from_f32<T>(keep ? to_f32(gin.v[j]) * d * ep.scale : 0.f);
      hout.v[j] = from_f32<T>(keep ? a * ep.scale : 0.f);
    }
    store<VEC>(g, i0, gout);
    if (h != nullptr) store<VEC>(h, i0, hout);
  });
}

bool aligned16(uintptr_t p) { return p % 16 == 0; }

void check_act(int act) {
  if (act < kNone || act > kRelu) {
    throw std::invalid_argument("fastformer._C: unknown activation code " + std::to_string(act));
  }
}

unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// One elementwise pass over `total` elements: calls launch(tag, vec, grid, stream, ep) with `tag` a null const T*
// of the dtype's type and vec.value the elements per thread: 16 bytes' worth when `unit` (the length a vector must
// not cross) is a multiple of it and every pointer in `ptrs` is 16-byte aligned (0, an absent buffer, is), else 1.
template <typename Launch>
void launch_elementwise(int64_t total, int64_t unit, std::initializer_list<uintptr_t> ptrs, int act, uint64_t seed,
                        double p, uint32_t thresh24, int dtype, uintptr_t stream, Launch launch) {
  if (total == 0) return;
  const Epilogue ep{act, seed, thresh24, static_cast<float>(1.0 / (1.0 - p)), p > 0.0};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_FLOAT(dtype, T, {
    constexpr int kVec = 16 / sizeof(T);
    bool vec = unit % kVec == 0;
    for (const uintptr_t q : ptrs) vec = vec && aligned16(q);
    const T* tag = nullptr;
    if (vec) {
      launch(tag, std::integral_constant<int, kVec>{}, grid_for(total / kVec), s, ep);
    } else {
      launch(tag, std::integral_constant<int, 1>{}, grid_for(total), s, ep);
    }
    FF_LAUNCH_CHECK();
  });
}

template <typename Tag>
using Elem = std::remove_const_t<std::remove_pointer_t<Tag>>;

}  // namespace

void ffn_bias_act_fwd(uintptr_t z, uintptr_t bias, uintptr_t y, int store_pre, int64_t rows, int64_t cols, int act,
                      uint64_t seed, double p, uint32_t thresh24, int dtype, uintptr_t stream) {
  check_act(act);
  // the bias is indexed by column: a vector must not cross a row
  launch_elementwise(rows * cols, cols, {z, bias, y}, act, seed, p, thresh24, dtype, stream,
                     [&](auto tag, auto vec, unsigned grid, cudaStream_t s, const Epilogue& ep) {
                       using T = Elem<decltype(tag)>;
                       bias_act_fwd_kernel<T, decltype(vec)::value><<<grid, kThreads, 0, s>>>(
                           reinterpret_cast<T*>(z), reinterpret_cast<const T*>(bias), reinterpret_cast<T*>(y),
                           store_pre != 0, rows * cols, cols, ep);
                     });
}

void ffn_act_bwd(uintptr_t g, uintptr_t pre, uintptr_t h, int64_t rows, int64_t cols, int act, uint64_t seed, double p,
                 uint32_t thresh24, int dtype, uintptr_t stream) {
  check_act(act);
  if (pre == 0 && act != kNone) throw std::invalid_argument("fastformer._C: ffn_act_bwd needs pre for an activation");
  // flat contiguous buffers: only the total length and the alignment decide the vector path
  launch_elementwise(rows * cols, rows * cols, {g, pre, h}, act, seed, p, thresh24, dtype, stream,
                     [&](auto tag, auto vec, unsigned grid, cudaStream_t s, const Epilogue& ep) {
                       using T = Elem<decltype(tag)>;
                       act_bwd_kernel<T, decltype(vec)::value><<<grid, kThreads, 0, s>>>(
                           reinterpret_cast<T*>(g), reinterpret_cast<const T*>(pre), reinterpret_cast<T*>(h),
                           rows * cols, ep);
                     });
}

}  // namespace fastformer
