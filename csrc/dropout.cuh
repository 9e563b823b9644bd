// The dropout decisions of the CUDA kernels: the same scheme as the Triton kernels (kernels/dropout.py) and the
// torch reference (fastformer/ops/dropout.py), so every backend drops the same elements.
//
// Element (row, col) of a dropout matrix with row length n uses word col % 4 of Philox4x32-10 at counter
// row * ceil(n / 4) + col / 4, so one call decides four consecutive columns; it is kept when the word's top 24
// bits reach the threshold (threshold24 in Python).
#pragma once

#include <cstdint>

namespace fastformer {

// The four words of Philox4x32-10 with counter (lo(counter), hi(counter), 0, 0) and key (lo(seed), hi(seed)).
__device__ __forceinline__ uint4 philox4x32(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    // each 32x32-bit product is one wide multiply giving both halves
    const uint64_t prod_b = static_cast<uint64_t>(c2) * 0xCD9E8D57u, prod_a = static_cast<uint64_t>(c0) * 0xD2511F53u;
    c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// The Philox counter of the group of four columns holding (row, col) in a dropout matrix of row length n.
__device__ __forceinline__ uint64_t dropout_counter(int64_t row, int64_t col, int64_t n) {
  return static_cast<uint64_t>(row * ((n + 3) / 4) + col / 4);
}

// Bit t (t < 4) set when column col0 + t of `row` is kept; col0 is a multiple of 4. One Philox call.
__device__ __forceinline__ uint32_t dropout_keep4(uint64_t seed, int64_t row, int64_t col0, int64_t n,
                                                  uint32_t thresh24) {
  const uint4 w = philox4x32(seed, dropout_counter(row, col0, n));
  return static_cast<uint32_t>((w.x >> 8) >= thresh24) | static_cast<uint32_t>((w.y >> 8) >= thresh24) << 1 |
         static_cast<uint32_t>((w.z >> 8) >= thresh24) << 2 | static_cast<uint32_t>((w.w >> 8) >= thresh24) << 3;
}

}  // namespace fastformer
