// C entry points of the emulated kernels for ctypes (tests/test_cuda_emulated.py): the launchers of csrc/ops.h with
// vectors as (pointer, length) pairs, no stream, and any exception as a message in `err` (empty on success).
#include <cstring>
#include <exception>
#include <vector>

#include "ops.h"

namespace {

std::vector<int64_t> vec(const int64_t* p, int n) { return std::vector<int64_t>(p, p + n); }

template <class F>
void guarded(char* err, F&& f) {
  try {
    f();
    err[0] = 0;
  } catch (const std::exception& e) {
    std::strncpy(err, e.what(), 511);
    err[511] = 0;
  }
}

}  // namespace

extern "C" {

void emu_attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t mask,
                       uintptr_t cu_q, uintptr_t cu_k, const int64_t* dims, int n_dims, const int64_t* strides,
                       int n_strides, int causal, double scale, uint64_t seed, double p, uint32_t thresh24, int dtype,
                       int wgmma, char* err) {
  guarded(err, [&] {
    fastformer::attention_fwd(q, k, v, out, lse, mask, cu_q, cu_k, vec(dims, n_dims), vec(strides, n_strides),
                              causal != 0, scale, seed, p, thresh24, dtype, wgmma != 0, 0);
  });
}

void emu_attention_bwd(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                       uintptr_t delta, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t mask, uintptr_t cu_q,
                       uintptr_t cu_k, const int64_t* dims, int n_dims, const int64_t* strides, int n_strides,
                       int causal, double scale, uint64_t seed, double p, uint32_t thresh24, int dtype, char* err) {
  guarded(err, [&] {
    fastformer::attention_bwd(dout, q, k, v, out, lse, delta, dq, dk, dv, mask, cu_q, cu_k, vec(dims, n_dims),
                              vec(strides, n_strides), causal != 0, scale, seed, p, thresh24, dtype, 0);
  });
}

void emu_layer_norm_fwd(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y,
                        uintptr_t res_out, uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t n, int64_t stride_x,
                        int64_t stride_r, double eps, uint64_t seed, double p, uint32_t thresh24, int dtype, char* err) {
  guarded(err, [&] {
    fastformer::layer_norm_fwd(x, residual, weight, bias, y, res_out, mean, rstd, rows, n, stride_x, stride_r, eps,
                               seed, p, thresh24, dtype, 0);
  });
}

void emu_layer_norm_bwd(uintptr_t dy, uintptr_t dres_out, uintptr_t s, uintptr_t weight, uintptr_t mean,
                        uintptr_t rstd, uintptr_t dx, uintptr_t dres, uintptr_t dw_partial, uintptr_t db_partial,
                        int64_t rows, int64_t n, int64_t partial_rows, uint64_t seed, double p, uint32_t thresh24,
                        int dtype, char* err) {
  guarded(err, [&] {
    fastformer::layer_norm_bwd(dy, dres_out, s, weight, mean, rstd, dx, dres, dw_partial, db_partial, rows, n,
                               partial_rows, seed, p, thresh24, dtype, 0);
  });
}

void emu_ffn_bias_act_fwd(uintptr_t z, uintptr_t bias, uintptr_t y, int store_pre, int64_t rows, int64_t cols,
                          int act, uint64_t seed, double p, uint32_t thresh24, int dtype, char* err) {
  guarded(err, [&] { fastformer::ffn_bias_act_fwd(z, bias, y, store_pre, rows, cols, act, seed, p, thresh24, dtype, 0); });
}

void emu_ffn_act_bwd(uintptr_t g, uintptr_t pre, uintptr_t h, int64_t rows, int64_t cols, int act, uint64_t seed,
                     double p, uint32_t thresh24, int dtype, char* err) {
  guarded(err, [&] { fastformer::ffn_act_bwd(g, pre, h, rows, cols, act, seed, p, thresh24, dtype, 0); });
}
}
