// pybind11 bindings of fastformer._C, and the CUDA runtime queries. Host code with no torch header:
// every function takes integers (pointers, sizes, dtype codes, stream) and raises RuntimeError on
// any CUDA error. Python (fastformer/ops/*.py) validates inputs before calling in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::vector<int64_t> dims/strides of attention

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "ops.h"

namespace ff = fastformer;

namespace {

int cuda_runtime_version() {
  int v = 0;
  const cudaError_t err = cudaRuntimeGetVersion(&v);
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastformer._C: ") + cudaGetErrorString(err));
  return v;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastformer CUDA C++ kernels (torch-free; see fastformer/ops for the Python side)";
  m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime version the module was built with");
  m.def("cuda_device_count", &cuda_device_count, "number of CUDA devices visible to the runtime");

  m.def("layer_norm_fwd", &ff::layer_norm_fwd, "LayerNorm(dropout(x) + residual) forward");
  m.def("layer_norm_bwd", &ff::layer_norm_bwd, "LayerNorm(dropout(x) + residual) backward");
  m.def("ffn_bias_act_fwd", &ff::ffn_bias_act_fwd, "y = dropout(act(z + bias)) around a cuBLAS GEMM");
  m.def("ffn_act_bwd", &ff::ffn_act_bwd, "g *= act'(pre) * dropout mask in place, optionally h = dropout(act(pre))");
  m.def("attention_fwd", &ff::attention_fwd, "fused attention forward: out and fp32 logsumexp");
  m.def("has_sm90a", &ff::has_sm90a, "whether the build holds the sm_90a (wgmma) kernels");
  m.def("attention_bwd", &ff::attention_bwd, "fused attention backward: delta, dK/dV, dQ");
}
