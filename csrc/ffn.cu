// Fused elementwise kernels of the feed-forward block's `cuda` backend. The GEMMs are cuBLAS (torch.matmul
// on the Python side); these kernels do everything around them in one pass each:
//
//   ffn_bias_act_fwd: y = dropout(act(z + bias)), optionally writing pre = z + bias back over z.
//   ffn_act_bwd:      g <- g * act'(pre) * keep/(1-p) in place, optionally h = act(pre) * keep/(1-p);
//                     pre may be absent (0) when there is no activation.
//
// All tensors are contiguous (rows, cols); element (r, c) is element (r, c) of the (rows, cols) dropout matrix
// (dropout.cuh), as in the Triton kernels and the torch reference. Math is fp32. Each thread handles chunks of
// consecutive columns of one row, at least four so that one Philox call decides four elements: when cols is a
// multiple of the vector width and every pointer is 16-byte aligned, a chunk is one 16-byte load and store;
// otherwise a chunk is four elements moved one at a time. Offsets are int64 (grid-stride loops).
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

  // bit t set when column c0 + t (t < N, c0 a multiple of 4) of `row` survives dropout: one Philox call per four
  // columns (all bits without dropout)
  template <int N>
  __device__ __forceinline__ uint32_t keeps(int64_t row, int64_t c0, int64_t cols) const {
    if (!dropout) return 0xFFFFFFFFu;
    uint32_t bits = 0;
#pragma unroll
    for (int q = 0; q < N / 4; ++q) bits |= dropout_keep4(seed, row, c0 + 4 * q, cols, thresh) << (4 * q);
    return bits;
  }
};

// Columns per chunk: the vector width, and at least four (one Philox call)
template <int VEC>
constexpr int kChunk = VEC < 4 ? 4 : VEC;

// Grid-stride loop over the chunks of kChunk<VEC> consecutive columns of every row: f(i0, c0, cnt, keep) with i0
// the chunk's first element, c0 its first column, cnt its columns inside the row (kChunk<VEC> except at the end of
// a row that is not a multiple of it) and keep its dropout bits (Epilogue::keeps).
template <int VEC, typename F>
__device__ __forceinline__ void for_each_chunk(int64_t rows, int64_t cols, const Epilogue& ep, F&& f) {
  constexpr int N = kChunk<VEC>;
  const int64_t per_row = (cols + N - 1) / N;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < rows * per_row; v += step) {
    const int64_t row = v / per_row, c0 = (v - row * per_row) * N;
    f(row * cols + c0, c0, cols - c0 < N ? static_cast<int>(cols - c0) : N, ep.keeps<N>(row, c0, cols));
  }
}

// The chunk at element i: one 16-byte access on the vector path (VEC > 1, always a whole chunk), else cnt
// elements one at a time (the rest zero)
template <int VEC, typename T>
__device__ __forceinline__ Pack<T, kChunk<VEC>> load(const T* p, int64_t i, int cnt) {
  if constexpr (VEC > 1) {
    return *reinterpret_cast<const Pack<T, VEC>*>(p + i);
  } else {
    Pack<T, kChunk<VEC>> r{};
#pragma unroll
    for (int t = 0; t < kChunk<VEC>; ++t) {
      if (t < cnt) r.v[t] = p[i + t];
    }
    return r;
  }
}

template <int VEC, typename T>
__device__ __forceinline__ void store(T* p, int64_t i, int cnt, const Pack<T, kChunk<VEC>>& v) {
  if constexpr (VEC > 1) {
    *reinterpret_cast<Pack<T, VEC>*>(p + i) = v;
  } else {
#pragma unroll
    for (int t = 0; t < kChunk<VEC>; ++t) {
      if (t < cnt) p[i + t] = v.v[t];
    }
  }
}

template <typename T, int VEC>
__global__ void bias_act_fwd_kernel(T* __restrict__ z, const T* __restrict__ bias, T* __restrict__ y, bool store_pre,
                                    int64_t rows, int64_t cols, Epilogue ep) {
  constexpr int N = kChunk<VEC>;
  for_each_chunk<VEC>(rows, cols, ep, [&](int64_t i0, int64_t c0, int cnt, uint32_t keep) {
    const Pack<T, N> zin = load<VEC>(z, i0, cnt);
    const Pack<T, N> b = bias != nullptr ? load<VEC>(bias, c0, cnt) : Pack<T, N>{};
    Pack<T, N> out, pre;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float x = to_f32(zin.v[j]) + (bias != nullptr ? to_f32(b.v[j]) : 0.f);
      float a, unused;
      act_and_grad(x, ep.act, a, unused);
      pre.v[j] = from_f32<T>(x);
      out.v[j] = from_f32<T>((keep >> j) & 1u ? a * ep.scale : 0.f);
    }
    store<VEC>(y, i0, cnt, out);
    if (store_pre) store<VEC>(z, i0, cnt, pre);
  });
}

// pre is nullptr when there is no activation (act' = 1): only the gradient and the mask are read
template <typename T, int VEC>
__global__ void act_bwd_kernel(T* __restrict__ g, const T* __restrict__ pre, T* __restrict__ h, int64_t rows,
                               int64_t cols, Epilogue ep) {
  for_each_chunk<VEC>(rows, cols, ep, [&](int64_t i0, int64_t /*c0*/, int cnt, uint32_t keep) {
    constexpr int N = kChunk<VEC>;
    const Pack<T, N> gin = load<VEC>(g, i0, cnt);
    const Pack<T, N> pin = pre != nullptr ? load<VEC>(pre, i0, cnt) : Pack<T, N>{};
    Pack<T, N> gout, hout;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float a, d;
      act_and_grad(to_f32(pin.v[j]), ep.act, a, d);
      const bool kept = (keep >> j) & 1u;
      gout.v[j] = from_f32<T>(kept ? to_f32(gin.v[j]) * d * ep.scale : 0.f);
      hout.v[j] = from_f32<T>(kept ? a * ep.scale : 0.f);
    }
    store<VEC>(g, i0, cnt, gout);
    if (h != nullptr) store<VEC>(h, i0, cnt, hout);
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

// One elementwise pass over (rows, cols): calls run(tag, vec, grid, stream, ep) with `tag` a null const T* of
// the dtype's type and vec.value the elements per vector access: 16 bytes' worth when cols (a vector must not
// cross a row: dropout and the bias are indexed by column) is a multiple of it and every pointer in `ptrs` is
// 16-byte aligned (0, an absent buffer, is), else 1 (chunks of four elements then).
template <typename Run>
void launch_elementwise(int64_t rows, int64_t cols, std::initializer_list<uintptr_t> ptrs, int act, uint64_t seed,
                        double p, uint32_t thresh24, int dtype, uintptr_t stream, Run run) {
  if (rows * cols == 0) return;
  const Epilogue ep{act, seed, thresh24, static_cast<float>(1.0 / (1.0 - p)), p > 0.0};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_FLOAT(dtype, T, {
    constexpr int kVec = 16 / sizeof(T);
    bool vec = cols % kVec == 0;
    for (const uintptr_t q : ptrs) vec = vec && aligned16(q);
    const T* tag = nullptr;
    if (vec) {
      run(tag, std::integral_constant<int, kVec>{}, grid_for(rows * (cols / kVec)), s, ep);
    } else {
      run(tag, std::integral_constant<int, 1>{}, grid_for(rows * ((cols + 3) / 4)), s, ep);
    }
  });
}

template <typename Tag>
using Elem = std::remove_const_t<std::remove_pointer_t<Tag>>;

}  // namespace

void ffn_bias_act_fwd(uintptr_t z, uintptr_t bias, uintptr_t y, int store_pre, int64_t rows, int64_t cols, int act,
                      uint64_t seed, double p, uint32_t thresh24, int dtype, uintptr_t stream) {
  check_act(act);
  launch_elementwise(rows, cols, {z, bias, y}, act, seed, p, thresh24, dtype, stream,
                     [&](auto tag, auto vec, unsigned grid, cudaStream_t s, const Epilogue& ep) {
                       using T = Elem<decltype(tag)>;
                       launch(bias_act_fwd_kernel<T, decltype(vec)::value>, grid, kThreads, 0, s,
                              reinterpret_cast<T*>(z), reinterpret_cast<const T*>(bias), reinterpret_cast<T*>(y),
                              store_pre != 0, rows, cols, ep);
                     });
}

void ffn_act_bwd(uintptr_t g, uintptr_t pre, uintptr_t h, int64_t rows, int64_t cols, int act, uint64_t seed, double p,
                 uint32_t thresh24, int dtype, uintptr_t stream) {
  check_act(act);
  if (pre == 0 && act != kNone) throw std::invalid_argument("fastformer._C: ffn_act_bwd needs pre for an activation");
  launch_elementwise(rows, cols, {g, pre, h}, act, seed, p, thresh24, dtype, stream,
                     [&](auto tag, auto vec, unsigned grid, cudaStream_t s, const Epilogue& ep) {
                       using T = Elem<decltype(tag)>;
                       launch(act_bwd_kernel<T, decltype(vec)::value>, grid, kThreads, 0, s, reinterpret_cast<T*>(g),
                              reinterpret_cast<const T*>(pre), reinterpret_cast<T*>(h), rows, cols, ep);
                     });
}

}  // namespace fastformer
