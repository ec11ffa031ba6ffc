// The per-token gate MLP as one op (docs/design.md section 4; MixDAGate, dropout included):
//
//   d_1 = drop_1(z);  a_i = relu(d_i W_i^T + b_i), d_{i+1} = drop_{i+1}(a_i) (i < L);
//   logits = d_L W_L^T + b_L
//
// Each layer is one addmm with the ReLU and the next layer's dropout applied in place on its
// output (the epilogue), so a layer makes one pass over its activations after the GEMM. Dropout
// masks are counter-based (csrc/philox.h): a pure function of (seed, layer, element), so the
// backward recomputes the one it needs (z's) instead of storing it; the hidden activations it
// keeps, d_2 .. d_L, carry their masks as zeros. 16-bit inputs on CPUs without native bf16
// GEMMs (where a bf16 GEMM runs ~4x slower than fp32) run the whole MLP in float32 and round
// once at the end: the eager gate in bf16 spends most of its time in slow bf16 GEMMs.
// Only ATen ops besides the dropout pass, which the caller supplies for its device: the CUDA
// build registers these same functions for the CUDA key with the CUDA dropout kernel (GEMMs
// through cuBLAS, no float32 detour there).

#include "../checks.h"
#include "../gate_mlp.h"

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace mixda_fast {

// Defined in csrc/cpu/mixda_ffn.cpp.
bool native_16bit_gemm();

namespace {

at::ScalarType gate_compute_dtype(const at::Tensor& z) {
  const auto t = z.scalar_type();
  const bool is16 = t == at::kBFloat16 || t == at::kHalf;
  return is16 && z.is_cpu() && !native_16bit_gemm() ? at::kFloat : t;
}

at::Tensor as(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

uint64_t seed_of(double p, const std::optional<at::Tensor>& seed) {
  return p > 0 ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
}

// d_1 = drop_1(z) in the compute dtype ct: a new contiguous tensor (in place on the copy when
// converting z's dtype or layout already made one).
at::Tensor dropped_input(const at::Tensor& z, at::ScalarType ct, double p, uint64_t seed,
                         ReluDropoutFn drop) {
  const at::Tensor in = as(z, ct).contiguous();
  at::Tensor out = in.is_same(z) ? at::empty_like(in, at::MemoryFormat::Contiguous) : in;
  drop(in, out, /*relu=*/false, p, seed, /*layer=*/0);
  return out;
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> gate_mlp_run(
    const at::Tensor& z, at::TensorList weights, at::TensorList biases, double p,
    const std::optional<at::Tensor>& seed, ReluDropoutFn drop) {
  check_gate_mlp_args("gate_mlp", z, weights, biases, p, seed);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain ATen calls inside
  const auto dt = z.scalar_type(), ct = gate_compute_dtype(z);
  const uint64_t s = seed_of(p, seed);
  const size_t L = weights.size();
  std::vector<at::Tensor> hidden;
  hidden.reserve(L - 1);
  at::Tensor a = p > 0 ? dropped_input(z, ct, p, s, drop) : as(z, ct);
  for (size_t i = 0; i < L; ++i) {
    a = at::addmm(as(biases[i], ct), a, as(weights[i], ct).t());
    if (i + 1 < L) {
      if (p > 0) {
        drop(a, a, /*relu=*/true, p, s, static_cast<int64_t>(i + 1));  // addmm's out: contiguous
      } else {
        a.relu_();
      }
      hidden.push_back(ct == dt ? a : a.to(dt));
    }
  }
  return {ct == dt ? a : a.to(dt), hidden};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gate_mlp_backward_run(
    const at::Tensor& grad_logits, const at::Tensor& z, at::TensorList weights,
    at::TensorList hidden, double p, const std::optional<at::Tensor>& seed, bool grad_z,
    ReluDropoutFn drop) {
  check_gate_mlp_backward_args(grad_logits, z, weights, hidden, p, seed);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto ct = gate_compute_dtype(z);
  const uint64_t s = seed_of(p, seed);
  const double scale = 1.0 / (1.0 - p);
  const int64_t L = static_cast<int64_t>(weights.size());
  std::vector<at::Tensor> grad_w(L), grad_b(L);
  at::Tensor g = as(grad_logits, ct);  // dL/d(output of layer i)
  at::Tensor grad_input = at::empty({0}, z.options());
  for (int64_t i = L - 1; i >= 0; --i) {
    // d_i, the GEMM's input: recomputed for i = 0 (z's mask is a function of the seed)
    const at::Tensor in = i > 0 ? as(hidden[i - 1], ct) : p > 0 ? dropped_input(z, ct, p, s, drop) : as(z, ct);
    const auto wt = weights[i].scalar_type();
    grad_w[i] = as(at::mm(g.t(), in), wt);
    grad_b[i] = as(g.sum(0), wt);
    if (i == 0 && !grad_z) break;
    at::Tensor grad_in = at::mm(g, as(weights[i], ct));  // dL/d d_i
    if (i > 0) {
      // d_i = relu(pre) * keep / (1 - p): the derivative is 1 / (1 - p) where d_i > 0, else 0
      g = at::threshold_backward(grad_in, in, 0);
      if (p > 0) g.mul_(scale);
    } else {
      if (p > 0) drop(grad_in, grad_in, /*relu=*/false, p, s, /*layer=*/0);  // mm's out: contiguous
      grad_input = as(grad_in, z.scalar_type());
    }
  }
  return {grad_input, grad_w, grad_b};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> gate_mlp_cpu(const at::Tensor& z,
                                                             at::TensorList weights,
                                                             at::TensorList biases, double p,
                                                             const std::optional<at::Tensor>& seed) {
  return gate_mlp_run(z, weights, biases, p, seed, &relu_dropout_cpu);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gate_mlp_backward_cpu(
    const at::Tensor& grad_logits, const at::Tensor& z, at::TensorList weights,
    at::TensorList hidden, double p, const std::optional<at::Tensor>& seed, bool grad_z) {
  return gate_mlp_backward_run(grad_logits, z, weights, hidden, p, seed, grad_z, &relu_dropout_cpu);
}

TORCH_LIBRARY_IMPL(mixda_fast, CPU, m) {
  m.impl("gate_mlp", &gate_mlp_cpu);
  m.impl("gate_mlp_backward", &gate_mlp_backward_cpu);
}

}  // namespace mixda_fast
