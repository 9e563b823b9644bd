// Tensor-core and asynchronous-copy primitives of the sm_80+ kernels (csrc/attention.cu), as thin PTX wrappers.
//
// Fragment layouts are those the PTX ISA gives for mma.m16n8k16 with 16-bit inputs and fp32 accumulators. With
// g = lane / 4 and t = lane % 4, and two 16-bit elements per 32-bit register (the lower index in the low half):
//   A (16 x 16, row-major)  a[0] = (g, 2t..2t+1)   a[1] = (g+8, 2t..)   a[2] = (g, 2t+8..)   a[3] = (g+8, 2t+8..)
//   B (16 x 8, k by n)      b[0] = (k 2t..2t+1, n g)   b[1] = (k 2t+8..2t+9, n g)
//   C (16 x 8, fp32)        c[0..1] = (g, 2t..2t+1)    c[2..3] = (g+8, 2t..2t+1)
// so the accumulators of two neighbouring 16 x 8 C tiles are, once packed to 16 bits, one A fragment.
//
// ldmatrix .x4 loads four 8 x 8 matrices of 16-bit elements: lanes 8m..8m+7 give the row addresses of matrix m and
// register m of lane l receives row l / 4, elements 2 (l % 4)..+1 of it (with .trans: column l / 4, rows
// 2 (l % 4)..+1).
//
// The host emulation (tests/emulation/cuda_host.h) defines FF_HOST_EMULATION and supplies these functions itself.
#pragma once

#include <cuda.h>  // CUtensorMap (types only: nothing links the driver library)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include "common.cuh"

namespace fastformer {

#ifndef FF_HOST_EMULATION

// Two fp32 values as one register of two 16-bit values, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// d += a b on the tensor cores, one m16n8k16 product (fp16 or bf16 inputs by T, fp32 accumulators)
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Four 8 x 8 matrices from shared memory; `row` is this lane's row address (see the header comment).
// The "memory" clobbers keep shared-memory accesses ordered against barriers and the async copies.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}

// 16 bytes global -> shared without passing through registers; zero-fills the destination when !full (src is then
// not read but must still be a valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool full) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(full ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// wait until at most N of this thread's committed groups are still in flight
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}


// ---- sm_90a: warpgroup MMA (wgmma) ----------------------------------------------------------------------------------
//
// wgmma.m64nNk16 is issued by a warpgroup (4 warps, 128 threads). Warp w of the group holds rows 16w..16w+15 of the
// 64 x N fp32 accumulator in the C layout above, tile by tile (d[i] is the 16 x 8 tile of columns 8i..8i+7), and, for
// an A operand in registers, rows 16w.. of the 64 x 16 A in the A layout above. Shared-memory operands are read
// through a 64-bit descriptor: start address, leading-dimension byte offset (LBO), stride byte offset (SBO), here
// always without swizzling. In that canonical layout an operand is made of core matrices of 8 x 8 16-bit elements
// stored as 128 contiguous bytes: for a K-major operand (A, or B without transpose) eight 16-byte rows along M/N
// with 8 consecutive k each; for an MN-major operand (B with transpose) eight 16-byte rows along K with 8 consecutive
// n each. Core matrices are LBO bytes apart along K and SBO bytes apart along M/N.
//
// These instructions exist only in sm_90a code (-gencode arch=compute_90a,code=sm_90a), where nvcc defines
// __CUDA_ARCH_FEAT_SM90_ALL; elsewhere the wrappers trap, and the launcher never runs them there.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FF_SM90A_DEVICE 1
#endif

// The descriptor of a no-swizzle operand starting at `smem` (16-byte aligned).
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return static_cast<uint64_t>((a >> 4) & 0x3FFF) | static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16 |
         static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32;
}

// Order this thread's register accesses before the wgmma that follows (accumulators, A fragments).
__device__ __forceinline__ void wgmma_fence() {
#ifdef FF_SM90A_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef FF_SM90A_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// wait until at most N committed wgmma groups of this warpgroup are in flight
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef FF_SM90A_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Make this thread's generic-proxy writes to shared memory (st.shared, cp.async) visible to the async proxy
// that wgmma reads operands through.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef FF_SM90A_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keep the compiler from moving accesses of an accumulator across a wgmma wait.
template <int N>
__device__ __forceinline__ void wgmma_hold(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
  }
}

// The wgmma instructions, TY the input type (f16 or bf16): 64 x N fp32 accumulators d[N / 8][4], scale-d from
// `accumulate` (false: d = A B).
#define FF_WGMMA_SS_N64(TY)                                                                                            \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                                      \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                         \
      " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                             \
      "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                                                  \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),                      \
        "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                      \
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),                      \
        "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                      \
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),                      \
        "+f"(d[7][2]), "+f"(d[7][3])                                                                                   \
      : "l"(da), "l"(db), "r"(static_cast<int>(accumulate)))

#define FF_WGMMA_RS_N64(TY)                                                                                            \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                                      \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                         \
      " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                             \
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                                    \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),                      \
        "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                      \
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),                      \
        "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                      \
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),                      \
        "+f"(d[7][2]), "+f"(d[7][3])                                                                                   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(static_cast<int>(accumulate)))

#define FF_WGMMA_RS_N128(TY)                                                                                           \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                                                     \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                         \
      " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                               \
      " %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                               \
      " %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                             \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                                                    \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),                      \
        "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                      \
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),                      \
        "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                      \
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),                      \
        "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                      \
        "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]),                    \
        "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),                \
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]),                \
        "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),                \
        "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])                                                 \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(static_cast<int>(accumulate)))

// d (64 x 64) (+)= A (64 x 16, K-major in shared memory) B^T (B: 64 x 16, K-major in shared memory)
template <typename T>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], uint64_t da, uint64_t db, bool accumulate) {
#ifdef FF_SM90A_DEVICE
  if constexpr (std::is_same_v<T, __half>) {
    FF_WGMMA_SS_N64("f16");
  } else {
    FF_WGMMA_SS_N64("bf16");
  }
#else
  __trap();
#endif
}

// d (64 x N) (+)= A (64 x 16, registers) B (16 x N, MN-major in shared memory)
template <typename T>
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db,
                                             bool accumulate) {
#ifdef FF_SM90A_DEVICE
  if constexpr (std::is_same_v<T, __half>) {
    FF_WGMMA_RS_N64("f16");
  } else {
    FF_WGMMA_RS_N64("bf16");
  }
#else
  __trap();
#endif
}

template <typename T>
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db,
                                             bool accumulate) {
#ifdef FF_SM90A_DEVICE
  if constexpr (std::is_same_v<T, __half>) {
    FF_WGMMA_RS_N128("f16");
  } else {
    FF_WGMMA_RS_N128("bf16");
  }
#else
  __trap();
#endif
}

// ---- sm_90a: the tensor memory accelerator (TMA) and mbarriers ------------------------------------------------------
//
// A TMA copy moves a box of a tensor described by a CUtensorMap (encoded on the host, passed as a __grid_constant__
// kernel parameter) from global into shared memory and reports its bytes to an mbarrier; elements outside the
// tensor arrive as zeros. An mbarrier completes a phase when its expected arrivals have arrived and its expected
// transaction bytes have landed; waiting on parity P returns once the phase of parity P has completed (so waiting on
// parity 1 of a fresh barrier returns at once).

// Start copying the box at coordinates c (innermost first) of a rank-5 tensor map into shared memory at dst.
__device__ __forceinline__ void tma_load_5d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3, int c4,
                                            uint64_t* bar) {
#ifdef FF_SM90A_DEVICE
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
      "%6}], [%7];\n" ::"r"(d),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(b)
      : "memory");
#endif
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#ifdef FF_SM90A_DEVICE
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(b), "r"(count) : "memory");
#endif
}
// Make initialised mbarriers visible to the async proxy (the TMA unit) and to the other threads (with a barrier).
__device__ __forceinline__ void mbar_init_fence() {
#ifdef FF_SM90A_DEVICE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#ifdef FF_SM90A_DEVICE
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(b) : "memory");
#endif
}
// Arrive and expect `bytes` more transaction bytes in the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef FF_SM90A_DEVICE
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#ifdef FF_SM90A_DEVICE
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(b),
      "r"(parity)
      : "memory");
#endif
}

// Give this warpgroup's registers back to the pool (producer) or take more (consumers); all 128 threads execute it.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#ifdef FF_SM90A_DEVICE
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#ifdef FF_SM90A_DEVICE
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

#endif  // FF_HOST_EMULATION

}  // namespace fastformer
