// Registers the CUDA kernels of csrc/cuda/mixda_ffn.cu. Built only with a CUDA build of torch
// (setup.py / CMakeLists.txt): the one file of the fused FFN that needs c10/cuda, to set the
// device and find torch's current stream, which it hands to the launchers. Never run: this
// project has no GPU (README, CUDA).

#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../gate_mlp.h"

#include <cuda_runtime_api.h>

#include <optional>
#include <tuple>
#include <vector>

namespace mixda_fast {

// Defined in csrc/cuda/mixda_ffn.cu.
std::tuple<at::Tensor, at::Tensor> ffn_in_cuda_launch(const at::Tensor& x, const at::Tensor& w1,
                                                      const std::optional<at::Tensor>& b1,
                                                      const std::optional<at::Tensor>& w3,
                                                      const std::optional<at::Tensor>& b3,
                                                      int64_t act, cudaStream_t stream);
at::Tensor ffn_in_backward_cuda_launch(const at::Tensor& grad_h, const at::Tensor& pre,
                                       int64_t act, cudaStream_t stream);
std::tuple<at::Tensor, at::Tensor> mixda_out_cuda_launch(
    const at::Tensor& h, const at::Tensor& z, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, at::TensorList wdown, at::TensorList bdown,
    at::TensorList wup, at::TensorList bup, const at::Tensor& logits, cudaStream_t stream);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixda_out_backward_cuda_launch(
    const at::Tensor& grad_y, const at::Tensor& p, const at::Tensor& logits, at::TensorList wup,
    at::TensorList bup, cudaStream_t stream);

// Defined in csrc/cuda/dropout.cu.
void relu_dropout_cuda_launch(const at::Tensor& in, const at::Tensor& out, bool relu, double p,
                              uint64_t seed, int64_t layer, cudaStream_t stream);

namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void relu_dropout_cuda(const at::Tensor& in, const at::Tensor& out, bool relu, double p,
                       uint64_t seed, int64_t layer) {
  relu_dropout_cuda_launch(in, out, relu, p, seed, layer, current_stream(in));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ffn_in_cuda(const at::Tensor& x, const at::Tensor& w1,
                                               const std::optional<at::Tensor>& b1,
                                               const std::optional<at::Tensor>& w3,
                                               const std::optional<at::Tensor>& b3, int64_t act) {
  check_ffn_in_args(x, w1, b1, w3, b3, act);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return ffn_in_cuda_launch(x, w1, b1, w3, b3, act, current_stream(x));
}

at::Tensor ffn_in_backward_cuda(const at::Tensor& grad_h, const at::Tensor& pre, int64_t act) {
  check_ffn_in_backward_args(grad_h, pre, act);
  const c10::cuda::CUDAGuard guard(pre.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return ffn_in_backward_cuda_launch(grad_h, pre, act, current_stream(pre));
}

std::tuple<at::Tensor, at::Tensor> mixda_out_cuda(const at::Tensor& h, const at::Tensor& z,
                                                  const at::Tensor& w2,
                                                  const std::optional<at::Tensor>& b2,
                                                  at::TensorList wdown, at::TensorList bdown,
                                                  at::TensorList wup, at::TensorList bup,
                                                  const at::Tensor& logits) {
  check_mixda_out_args("mixda_out", h, z, w2, b2, wdown, bdown, wup, bup, logits);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return mixda_out_cuda_launch(h, z, w2, b2, wdown, bdown, wup, bup, logits, current_stream(h));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixda_out_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& p, const at::Tensor& logits, at::TensorList wup,
    at::TensorList bup) {
  check_mixda_out_backward_args(grad_y, p, logits, wup, bup);
  const c10::cuda::CUDAGuard guard(p.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return mixda_out_backward_cuda_launch(grad_y, p, logits, wup, bup, current_stream(p));
}

// gate_mlp: GEMMs through ATen (cuBLAS), the ReLU + dropout epilogue by csrc/cuda/dropout.cu.
std::tuple<at::Tensor, std::vector<at::Tensor>> gate_mlp_cuda(const at::Tensor& z,
                                                              at::TensorList weights,
                                                              at::TensorList biases, double p,
                                                              const std::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(z.device());
  return gate_mlp_run(z, weights, biases, p, seed, &relu_dropout_cuda);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gate_mlp_backward_cuda(
    const at::Tensor& grad_logits, const at::Tensor& z, at::TensorList weights,
    at::TensorList hidden, double p, const std::optional<at::Tensor>& seed, bool grad_z) {
  const c10::cuda::CUDAGuard guard(z.device());
  return gate_mlp_backward_run(grad_logits, z, weights, hidden, p, seed, grad_z, &relu_dropout_cuda);
}

TORCH_LIBRARY_IMPL(mixda_fast, CUDA, m) {
  m.impl("ffn_in", &ffn_in_cuda);
  m.impl("ffn_in_backward", &ffn_in_backward_cuda);
  m.impl("mixda_out", &mixda_out_cuda);
  m.impl("mixda_out_backward", &mixda_out_backward_cuda);
  m.impl("gate_mlp", &gate_mlp_cuda);
  m.impl("gate_mlp_backward", &gate_mlp_backward_cuda);
}

}  // namespace mixda_fast
