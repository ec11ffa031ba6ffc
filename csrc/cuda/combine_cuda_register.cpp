// Registers the CUDA kernels of csrc/cuda/combine.cu. Built only with a CUDA build of torch
// (setup.py / CMakeLists.txt): this is the one file that needs c10/cuda, to set the device and
// find torch's current stream, which it hands to the launchers.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

#include <cuda_runtime_api.h>

#include <tuple>

namespace mixda_fast {

// Defined in csrc/cuda/combine.cu.
at::Tensor softmax_combine_cuda_launch(const at::Tensor& logits, const at::Tensor& experts,
                                       cudaStream_t stream);
std::tuple<at::Tensor, at::Tensor> softmax_combine_backward_cuda_launch(
    const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& experts,
    cudaStream_t stream);

namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

}  // namespace

at::Tensor softmax_combine_cuda(const at::Tensor& logits, const at::Tensor& experts) {
  check_softmax_combine_args("softmax_combine", logits, experts);
  const c10::cuda::CUDAGuard guard(experts.device());
  return softmax_combine_cuda_launch(logits, experts, current_stream(experts));
}

std::tuple<at::Tensor, at::Tensor> softmax_combine_backward_cuda(const at::Tensor& grad_out,
                                                                 const at::Tensor& logits,
                                                                 const at::Tensor& experts) {
  check_softmax_combine_backward_args(grad_out, logits, experts);
  const c10::cuda::CUDAGuard guard(experts.device());
  return softmax_combine_backward_cuda_launch(grad_out, logits, experts, current_stream(experts));
}

TORCH_LIBRARY_IMPL(mixda_fast, CUDA, m) {
  m.impl("softmax_combine", &softmax_combine_cuda);
  m.impl("softmax_combine_backward", &softmax_combine_backward_cuda);
}

}  // namespace mixda_fast
