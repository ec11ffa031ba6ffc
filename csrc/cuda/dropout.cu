// CUDA kernel of the gate MLP's dropout: out = [relu](in) * keep / (1 - p), the same counter-based
// masks as the CPU kernel (csrc/philox.h, csrc/cpu/dropout.cpp): one thread per 4 elements (one
// Philox call), grid-stride. Needs only ATen's CPU-side headers and the CUDA runtime; the caller
// passes the stream and has set the device (csrc/cuda/mixda_ffn_cuda_register.cpp).

#include "../philox.h"

#include <cuda_runtime.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace mixda_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename scalar_t, typename acc_t>
__global__ void relu_dropout_kernel(const scalar_t* in, scalar_t* out, int64_t n, bool relu,
                                    uint32_t threshold, acc_t scale, uint64_t seed, int64_t layer) {
  const int64_t blocks4 = (n + 3) / 4;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks4;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t keep = dropout_keep4(seed, layer, static_cast<uint64_t>(b), threshold);
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * b + j;
      if (e >= n) break;
      acc_t v = static_cast<acc_t>(in[e]);
      if (relu) v = v < acc_t(0) ? acc_t(0) : v;  // NaN stays NaN, as torch.relu
      // times 0 rather than a select: a dropped inf or NaN gives NaN, as nn.Dropout and the CPU kernel
      out[e] = static_cast<scalar_t>(v * ((keep >> j) & 1u ? scale : acc_t(0)));
    }
  }
}

}  // namespace

void relu_dropout_cuda_launch(const at::Tensor& in, const at::Tensor& out, bool relu, double p,
                              uint64_t seed, int64_t layer, cudaStream_t stream) {
  TORCH_CHECK(in.is_contiguous() && out.is_contiguous() && in.numel() == out.numel() &&
                  in.scalar_type() == out.scalar_type(),
              "relu_dropout_cuda: in and out must be contiguous with one dtype and size");
  TORCH_CHECK(p >= 0 && p < 1, "relu_dropout_cuda: p must be in [0, 1), got ", p);
  const int64_t n = in.numel();
  if (n == 0) return;
  const unsigned int blocks = static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>(((n + 3) / 4 + kThreads - 1) / kThreads, kMaxBlocks)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "relu_dropout_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    relu_dropout_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, relu,
        dropout_threshold(p), static_cast<acc_t>(1.0 / (1.0 - p)), seed, layer);
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "gate_mlp: CUDA kernel launch failed: ", cudaGetErrorString(err));
  });
}

}  // namespace mixda_fast
