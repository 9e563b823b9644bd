// The dropout decision of the CUDA kernels: the same Philox stream as tl.randint (kernels/dropout.py)
// and the torch reference (fastformer/ops/dropout.py), so every backend drops the same elements.
#pragma once

#include <cstdint>

namespace fastformer {

// First word of Philox4x32-10 with counter (lo(offset), hi(offset), 0, 0) and key (lo(seed), hi(seed)).
__device__ __forceinline__ uint32_t philox_first(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi_b = __umulhi(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = __umulhi(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Dropout keeps an element when the top 24 of its 32 random bits reach the threshold (threshold24 in Python).
__device__ __forceinline__ bool dropout_keep(uint64_t seed, uint64_t offset, uint32_t thresh24) {
  return (philox_first(seed, offset) >> 8) >= thresh24;
}

}  // namespace fastformer
