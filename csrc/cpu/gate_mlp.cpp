// The per-token gate MLP as one op (DESIGN.md section 4; MixDAGate without dropout):
//
//   a_0 = z;  a_i = relu(a_{i-1} W_i^T + b_i) (i < L);  logits = a_{L-1} W_L^T + b_L
//
// Each layer is one addmm with the ReLU applied in place on its output (the epilogue), so a
// layer makes one pass over its activations after the GEMM. 16-bit inputs on CPUs without
// native bf16 GEMMs (where a bf16 GEMM runs ~4x slower than fp32) run the whole MLP in float32
// and round once at the end: the eager gate in bf16 spends most of its time in slow bf16 GEMMs.
// Only ATen ops: the CUDA build registers these same functions for the CUDA key (GEMMs through
// cuBLAS, no float32 detour there).

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace mixda_fast {

// Defined in csrc/mixda.cpp and csrc/cpu/mixda_ffn.cpp.
void check_gate_mlp_args(const char* op, const at::Tensor& z, at::TensorList weights,
                         at::TensorList biases);
void check_gate_mlp_backward_args(const at::Tensor& grad_logits, const at::Tensor& z,
                                  at::TensorList weights, at::TensorList hidden);
bool native_16bit_gemm();

namespace {

at::ScalarType gate_compute_dtype(const at::Tensor& z) {
  const auto t = z.scalar_type();
  const bool is16 = t == at::kBFloat16 || t == at::kHalf;
  return is16 && z.is_cpu() && !native_16bit_gemm() ? at::kFloat : t;
}

at::Tensor as(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> gate_mlp_impl(const at::Tensor& z,
                                                              at::TensorList weights,
                                                              at::TensorList biases) {
  check_gate_mlp_args("gate_mlp", z, weights, biases);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain ATen calls inside
  const auto dt = z.scalar_type(), ct = gate_compute_dtype(z);
  const size_t L = weights.size();
  std::vector<at::Tensor> hidden;
  hidden.reserve(L - 1);
  at::Tensor a = as(z, ct);
  for (size_t i = 0; i < L; ++i) {
    a = at::addmm(as(biases[i], ct), a, as(weights[i], ct).t());
    if (i + 1 < L) {
      a.relu_();
      hidden.push_back(ct == dt ? a : a.to(dt));
    }
  }
  return {ct == dt ? a : a.to(dt), hidden};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gate_mlp_backward_impl(
    const at::Tensor& grad_logits, const at::Tensor& z, at::TensorList weights,
    at::TensorList hidden) {
  check_gate_mlp_backward_args(grad_logits, z, weights, hidden);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto ct = gate_compute_dtype(z);
  const int64_t L = static_cast<int64_t>(weights.size());
  std::vector<at::Tensor> grad_w(L), grad_b(L);
  at::Tensor g = as(grad_logits, ct);                         // dL/d(output of layer i)
  for (int64_t i = L - 1; i >= 0; --i) {
    const at::Tensor in = as(i == 0 ? z : hidden[i - 1], ct);  // a_{i-1}
    const auto wt = weights[i].scalar_type();
    grad_w[i] = as(at::mm(g.t(), in), wt);
    grad_b[i] = as(g.sum(0), wt);
    at::Tensor grad_in = at::mm(g, as(weights[i], ct));
    // relu'(pre) = (a > 0): the post-activation carries the mask
    g = i > 0 ? at::threshold_backward(grad_in, in, 0) : grad_in;
  }
  return {as(g, z.scalar_type()), grad_w, grad_b};
}

TORCH_LIBRARY_IMPL(mixda_fast, CPU, m) {
  m.impl("gate_mlp", &gate_mlp_impl);
  m.impl("gate_mlp_backward", &gate_mlp_backward_impl);
}

}  // namespace mixda_fast
