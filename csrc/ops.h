// Host launchers exported by the .cu files and bound in bindings.cpp. Plain C++ types only: the
// binding unit (host code) includes no kernel and no torch header. Pointers arrive as
// integers (tensor.data_ptr()), the stream as an integer cudaStream_t, dtypes as DTypeCode.
#pragma once

#include <cstdint>
#include <vector>

namespace fastformer {

// layer_norm.cu: y = LayerNorm(dropout(x) + residual) over rows of length n.
void layer_norm_fwd(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y,
                    uintptr_t res_out, uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t n,
                    int64_t stride_x, int64_t stride_r, double eps, uint64_t seed, double p, uint32_t thresh24,
                    int dtype, uintptr_t stream);
void layer_norm_bwd(uintptr_t dy, uintptr_t dres_out, uintptr_t s, uintptr_t weight, uintptr_t mean,
                    uintptr_t rstd, uintptr_t dx, uintptr_t dres, uintptr_t dw_partial, uintptr_t db_partial,
                    int64_t rows, int64_t n, int64_t partial_rows, uint64_t seed, double p, uint32_t thresh24,
                    int dtype, uintptr_t stream);

// ffn.cu: fused elementwise passes around cuBLAS GEMMs, on contiguous (rows, cols) buffers.
// y = dropout(act(z + bias)); with store_pre, z becomes z + bias in place. act: 0 none, 1 gelu, 2 gelu_tanh, 3 relu.
void ffn_bias_act_fwd(uintptr_t z, uintptr_t bias, uintptr_t y, int store_pre, int64_t rows, int64_t cols, int act,
                      uint64_t seed, double p, uint32_t thresh24, int dtype, uintptr_t stream);
// g <- g * act'(pre) * keep/(1-p) in place; if h != 0, h = act(pre) * keep/(1-p). pre may be 0 when act is 0 (none).
void ffn_act_bwd(uintptr_t g, uintptr_t pre, uintptr_t h, int64_t rows, int64_t cols, int act, uint64_t seed, double p,
                 uint32_t thresh24, int dtype, uintptr_t stream);

// attention.cu: fused attention (layout and conventions in fastformer/ops/attention/).
// dims = [B, H, Hkv, Sq, Sk, D, drop_stride, varlen, tokens_q, tokens_k] (Sq/Sk are maxima when varlen, tokens_q/k
// the rows of q and k along their token dimension: Sq/Sk dense, the packed totals varlen); strides = (b, s, h) triples of
// q, k, v, then lse (b, h), mask (b, k), then out (forward) or do, out, dq, dk, dv (backward).
// mask: uint8 (B, Sk) or 0; cu_q/cu_k: int32 (B + 1) or 0.
// wgmma: run the sm_90a forward (an sm_90 device and a build with sm_90a code, else std::invalid_argument).
void attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t mask,
                   uintptr_t cu_q, uintptr_t cu_k, const std::vector<int64_t>& dims,
                   const std::vector<int64_t>& strides, bool causal, double scale, uint64_t seed, double p,
                   uint32_t thresh24, int dtype, bool wgmma, uintptr_t stream);
// whether the build holds the sm_90a kernels (FASTFORMER_CUDA_ARCHS with 90a)
bool has_sm90a();
void attention_bwd(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                   uintptr_t delta, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t mask, uintptr_t cu_q,
                   uintptr_t cu_k, const std::vector<int64_t>& dims, const std::vector<int64_t>& strides, bool causal,
                   double scale, uint64_t seed, double p, uint32_t thresh24, int dtype, uintptr_t stream);

}  // namespace fastformer
