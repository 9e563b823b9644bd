// Shared by every fastformer CUDA kernel: error checks, dtype dispatch, fp32 conversions and warp
// reductions. Torch-free: kernels see raw pointers and sizes only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace fastformer {

// dtype codes passed from Python (fastformer/utils.py: DTYPE_CODE)
enum DTypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastformer._C: ") + what + " failed (" + file + ":" + std::to_string(line) +
                             "): " + cudaGetErrorString(err));
  }
}

#define FF_CUDA_CHECK(expr) ::fastformer::check_cuda((expr), #expr, __FILE__, __LINE__)
#define FF_LAUNCH_CHECK() ::fastformer::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// Runs the statement list with T bound to the C++ type of a dtype code.
#define FF_DISPATCH_FLOAT(code, T, ...)                                              \
  switch (code) {                                                                    \
    case ::fastformer::kF32: { using T = float; __VA_ARGS__; break; }                \
    case ::fastformer::kF16: { using T = __half; __VA_ARGS__; break; }               \
    case ::fastformer::kBF16: { using T = __nv_bfloat16; __VA_ARGS__; break; }       \
    default: throw std::invalid_argument("fastformer._C: unknown dtype code " + std::to_string(code)); \
  }

// fp32 conversions of the storage types: one specialisation per type, two directions each
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
__device__ __forceinline__ float to_f32(T x) {
  return Convert<T>::to(x);
}
template <typename T>
__device__ __forceinline__ T from_f32(float x) {
  return Convert<T>::from(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

#ifndef FF_HOST_EMULATION  // the host emulation (tests/emulation/cuda_host.h) supplies its own

// x, hidden from the optimiser: an epilogue that recomputes a value the prologue also computed would otherwise get
// the prologue's copy kept alive (in a register, or spilled) across the whole main loop.
__device__ __forceinline__ int64_t opaque(int64_t x) {
  asm volatile("" : "+l"(x));
  return x;
}

// One 16-byte global store of four words. In PTX: NVVM splits a plain uint4 store into four 4-byte ones inside
// some loops; the memory clobber keeps later loads of the same address after the store.
__device__ __forceinline__ void store_global16(void* p, uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w0), "r"(w1), "r"(w2), "r"(w3) : "memory");
}

// The block's dynamic shared memory, 16-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char ff_dynamic_smem[];
  return ff_dynamic_smem;
}

// kernel<<<grid, block, smem, stream>>>(args...), raising on a launch error; opts in to more than 48 KiB of dynamic
// shared memory when asked (the attribute is per kernel and cheap to set again).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
            Args&&... args) {
  if (smem > 48 * 1024) {
    FF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
  FF_LAUNCH_CHECK();
}

#endif  // FF_HOST_EMULATION

}  // namespace fastformer
