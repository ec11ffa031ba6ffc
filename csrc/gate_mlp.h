// The gate MLP op's device-independent driver (csrc/cpu/gate_mlp.cpp), shared by the CPU
// registration there and the CUDA one (csrc/cuda/mixda_ffn_cuda_register.cpp): GEMMs through
// ATen, the ReLU + dropout epilogue through the device's kernel passed in.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace mixda_fast {

// out = [relu](in) * keep(seed, layer, e) / (1 - p) for every element e (csrc/philox.h); in and
// out contiguous with one dtype and numel, out may be in.
using ReluDropoutFn = void (*)(const at::Tensor& in, const at::Tensor& out, bool relu, double p,
                               uint64_t seed, int64_t layer);

void relu_dropout_cpu(const at::Tensor& in, const at::Tensor& out, bool relu, double p,
                      uint64_t seed, int64_t layer);

// gate_mlp / gate_mlp_backward (schemas in csrc/mixda.cpp) with the dropout kernel `drop`.
std::tuple<at::Tensor, std::vector<at::Tensor>> gate_mlp_run(
    const at::Tensor& z, at::TensorList weights, at::TensorList biases, double p,
    const std::optional<at::Tensor>& seed, ReluDropoutFn drop);

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gate_mlp_backward_run(
    const at::Tensor& grad_logits, const at::Tensor& z, at::TensorList weights,
    at::TensorList hidden, double p, const std::optional<at::Tensor>& seed, bool grad_z,
    ReluDropoutFn drop);

}  // namespace mixda_fast
