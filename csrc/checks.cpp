// Definitions of the argument checks declared (and described) in csrc/checks.h: the checks shared
// by every backend of an op, so the CPU and CUDA kernels reject bad input with the same words.
// The schemas they enforce are in csrc/mixda.cpp.

#include "checks.h"

#include "activations.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace mixda_fast {

namespace {

bool is_supported_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kBFloat16 || t == c10::kHalf;
}

}  // namespace

// softmax_combine(logits (R, E), experts (E, R, S, D)) -> (R, S, D)
void check_softmax_combine_args(const char* op, const at::Tensor& logits,
                                const at::Tensor& experts) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must have shape (R, E), got a ", logits.dim(),
              "-d tensor of shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, op,
              ": logits must have shape (R, E) with at least one expert (E >= 1), got ",
              logits.sizes());
  TORCH_CHECK(experts.dim() == 4, op, ": experts must have shape (E, R, S, D), got a ",
              experts.dim(), "-d tensor of shape ", experts.sizes());
  TORCH_CHECK(experts.size(0) == logits.size(1) && experts.size(1) == logits.size(0), op,
              ": experts must have shape (E, R, S, D) with E = logits.size(1) = ", logits.size(1),
              " and R = logits.size(0) = ", logits.size(0), ", got ", experts.sizes());
  TORCH_CHECK(is_supported_float(experts.scalar_type()), op,
              ": experts must have dtype float32, float64, bfloat16 or float16, got ",
              experts.scalar_type());
  TORCH_CHECK(logits.scalar_type() == experts.scalar_type(), op,
              ": logits must have the same dtype as experts (", experts.scalar_type(), "), got ",
              logits.scalar_type());
  TORCH_CHECK(logits.device() == experts.device(), op,
              ": logits must be on the same device as experts (", experts.device(), "), got ",
              logits.device());
}

// softmax_combine_backward(grad_out (R, S, D), logits (R, E), experts (E, R, S, D))
void check_softmax_combine_backward_args(const at::Tensor& grad_out, const at::Tensor& logits,
                                         const at::Tensor& experts) {
  constexpr const char* op = "softmax_combine_backward";
  check_softmax_combine_args(op, logits, experts);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == experts.size(1) &&
                  grad_out.size(1) == experts.size(2) && grad_out.size(2) == experts.size(3),
              op, ": grad_out must have shape (R, S, D) = ", experts.sizes().slice(1),
              " (experts.shape[1:]), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == experts.scalar_type(), op,
              ": grad_out must have the same dtype as experts (", experts.scalar_type(), "), got ",
              grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == experts.device(), op,
              ": grad_out must be on the same device as experts (", experts.device(), "), got ",
              grad_out.device());
}

// ---- fused MixDA FFN (docs/design.md section 4, steps 0-4) ------------------------------------------

namespace {

const char* dtype_list = "float32, float64, bfloat16 or float16";

}  // namespace

// A weight of x's dtype, or float32 when x is 16-bit (the float32-compute path).
void check_weight_dtype(const char* op, const char* name, const at::Tensor& w, const at::Tensor& x,
                        const char* xname) {
  const bool same = w.scalar_type() == x.scalar_type();
  const bool fp32_for_16 = w.scalar_type() == c10::kFloat &&
                           (x.scalar_type() == c10::kBFloat16 || x.scalar_type() == c10::kHalf);
  TORCH_CHECK(same || fp32_for_16, op, ": ", name, " must have the dtype of ", xname, " (",
              x.scalar_type(), ", or float32 when ", xname, " is 16-bit), got ", w.scalar_type());
  TORCH_CHECK(w.device() == x.device(), op, ": ", name, " must be on the device of ", xname, " (",
              x.device(), "), got ", w.device());
}

void check_matrix(const char* op, const char* name, const at::Tensor& w, int64_t rows, int64_t cols,
                  const char* shape) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, op, ": ", name,
              " must have shape ", shape, " = [", rows, ", ", cols, "], got ", w.sizes());
}

void check_vector(const char* op, const char* name, const at::Tensor& b, int64_t n,
                  const char* shape) {
  TORCH_CHECK(b.dim() == 1 && b.size(0) == n, op, ": ", name, " must have shape ", shape, " = [", n,
              "], got ", b.sizes());
}

void check_input(const char* op, const char* name, const at::Tensor& x, const char* shape) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must have shape ", shape, ", got a ", x.dim(),
              "-d tensor of shape ", x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": ", name, " must have dtype ", dtype_list,
              ", got ", x.scalar_type());
}

// ffn_in(x (N, d), w1 (F, d), b1 (F)?, w3 (F, d)?, b3 (F)?, act)
void check_ffn_in_args(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                       const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b3,
                       int64_t act) {
  constexpr const char* op = "ffn_in";
  check_input(op, "x", x, "(N, d)");
  const int64_t d = x.size(1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == d, op, ": w1 must have shape (F, d) with d = x.size(1) = ",
              d, ", got ", w1.sizes());
  const int64_t F = w1.size(0);
  check_weight_dtype(op, "w1", w1, x, "x");
  if (b1.has_value()) {
    check_vector(op, "b1", *b1, F, "(F,) with F = w1.size(0)");
    check_weight_dtype(op, "b1", *b1, x, "x");
    TORCH_CHECK(b1->scalar_type() == w1.scalar_type(), op, ": b1 must have the dtype of w1 (",
                w1.scalar_type(), "), got ", b1->scalar_type());
  }
  TORCH_CHECK(w3.has_value() || !b3.has_value(), op, ": b3 was given without w3");
  if (w3.has_value()) {
    check_matrix(op, "w3", *w3, F, d, "(F, d) = w1.shape");
    TORCH_CHECK(w3->scalar_type() == w1.scalar_type() && w3->device() == w1.device(), op,
                ": w3 must have the dtype and device of w1 (", w1.scalar_type(), ", ", w1.device(),
                "), got ", w3->scalar_type(), ", ", w3->device());
    if (b3.has_value()) {
      check_vector(op, "b3", *b3, F, "(F,) with F = w1.size(0)");
      TORCH_CHECK(b3->scalar_type() == w1.scalar_type() && b3->device() == w1.device(), op,
                  ": b3 must have the dtype and device of w1 (", w1.scalar_type(), ", ", w1.device(),
                  "), got ", b3->scalar_type(), ", ", b3->device());
    }
  }
  TORCH_CHECK(is_act_code(act), op, ": act must be an activation code 0..5 (0 identity, 1 gelu, ",
              "2 gelu tanh, 3 gelu_new, 4 silu, 5 relu), got ", act);
}

// ffn_in_backward(grad_h (N, F), pre (N, F) or (N, 2F) gated, act)
void check_ffn_in_backward_args(const at::Tensor& grad_h, const at::Tensor& pre, int64_t act) {
  constexpr const char* op = "ffn_in_backward";
  check_input(op, "pre", pre, "(N, F) or (N, 2F)");
  TORCH_CHECK(grad_h.dim() == 2 && grad_h.size(0) == pre.size(0) &&
                  (grad_h.size(1) == pre.size(1) || 2 * grad_h.size(1) == pre.size(1)),
              op, ": grad_h must have shape (N, F) with N = pre.size(0) = ", pre.size(0),
              " and F = pre.size(1) (or pre.size(1) / 2 for a gated FFN) = ", pre.size(1),
              ", got ", grad_h.sizes());
  TORCH_CHECK(grad_h.scalar_type() == pre.scalar_type() && grad_h.device() == pre.device(), op,
              ": grad_h must have the dtype and device of pre (", pre.scalar_type(), ", ", pre.device(),
              "), got ", grad_h.scalar_type(), ", ", grad_h.device());
  TORCH_CHECK(is_act_code(act), op, ": act must be an activation code 0..5, got ", act);
}

// mixda_out(h (N, F), z (N, Din), w2 (D, F), b2 (D)?, wdown K x (r, Din), bdown K x (r),
//           wup K x (D, r), bup K x (D), logits (R, E)) with N = R * S and E = K or K + 1
void check_mixda_out_args(const char* op, const at::Tensor& h, const at::Tensor& z,
                          const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                          at::TensorList wdown, at::TensorList bdown, at::TensorList wup,
                          at::TensorList bup, const at::Tensor& logits) {
  check_input(op, "h", h, "(N, F)");
  const int64_t N = h.size(0), F = h.size(1);
  TORCH_CHECK(z.dim() == 2 && z.size(0) == N, op, ": z must have shape (N, Din) with N = h.size(0) = ",
              N, ", got ", z.sizes());
  TORCH_CHECK(z.scalar_type() == h.scalar_type() && z.device() == h.device(), op,
              ": z must have the dtype and device of h (", h.scalar_type(), ", ", h.device(), "), got ",
              z.scalar_type(), ", ", z.device());
  const int64_t Din = z.size(1);
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == F, op, ": w2 must have shape (D, F) with F = h.size(1) = ",
              F, ", got ", w2.sizes());
  check_weight_dtype(op, "w2", w2, h, "h");
  const int64_t D = w2.size(0);
  const auto wt = w2.scalar_type();
  if (b2.has_value()) {
    check_vector(op, "b2", *b2, D, "(D,) with D = w2.size(0)");
    TORCH_CHECK(b2->scalar_type() == wt && b2->device() == w2.device(), op,
                ": b2 must have the dtype and device of w2 (", wt, ", ", w2.device(), "), got ",
                b2->scalar_type(), ", ", b2->device());
  }
  const int64_t K = static_cast<int64_t>(wdown.size());
  TORCH_CHECK(K >= 1, op, ": wdown must hold K >= 1 adapter down-projections (r, Din), got an empty list");
  TORCH_CHECK(static_cast<int64_t>(bdown.size()) == K && static_cast<int64_t>(wup.size()) == K &&
                  static_cast<int64_t>(bup.size()) == K,
              op, ": wdown, bdown, wup and bup must each hold K = len(wdown) = ", K,
              " tensors, got ", wdown.size(), ", ", bdown.size(), ", ", wup.size(), ", ", bup.size());
  TORCH_CHECK(wdown[0].dim() == 2, op, ": wdown[0] must have shape (r, Din), got ", wdown[0].sizes());
  const int64_t r = wdown[0].size(0);
  auto same_kind = [&](const char* name, int64_t k, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == wt && t.device() == w2.device(), op, ": ", name, "[", k,
                "] must have the dtype and device of w2 (", wt, ", ", w2.device(), "), got ",
                t.scalar_type(), ", ", t.device());
  };
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(wdown[k].dim() == 2 && wdown[k].size(0) == r && wdown[k].size(1) == Din, op,
                ": wdown[", k, "] must have shape (r, Din) = [", r, ", ", Din,
                "] (r = wdown[0].size(0), Din = z.size(1)), got ", wdown[k].sizes());
    TORCH_CHECK(bdown[k].dim() == 1 && bdown[k].size(0) == r, op, ": bdown[", k,
                "] must have shape (r,) = [", r, "], got ", bdown[k].sizes());
    TORCH_CHECK(wup[k].dim() == 2 && wup[k].size(0) == D && wup[k].size(1) == r, op, ": wup[", k,
                "] must have shape (D, r) = [", D, ", ", r, "], got ", wup[k].sizes());
    TORCH_CHECK(bup[k].dim() == 1 && bup[k].size(0) == D, op, ": bup[", k,
                "] must have shape (D,) = [", D, "], got ", bup[k].sizes());
    same_kind("wdown", k, wdown[k]);
    same_kind("bdown", k, bdown[k]);
    same_kind("wup", k, wup[k]);
    same_kind("bup", k, bup[k]);
  }
  TORCH_CHECK(logits.dim() == 2 && (logits.size(1) == K || logits.size(1) == K + 1), op,
              ": logits must have shape (R, E) with E = K (residual mixing) or K + 1 (paper mixing), K = ",
              K, ", got ", logits.sizes());
  TORCH_CHECK(logits.size(0) >= 1 && N % logits.size(0) == 0, op,
              ": logits must have shape (R, E) with R dividing N = h.size(0) = ", N,
              " (one gate row per R-th of the rows: sequences of S = N / R tokens), got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == h.scalar_type() && logits.device() == h.device(), op,
              ": logits must have the dtype and device of h (", h.scalar_type(), ", ", h.device(),
              "), got ", logits.scalar_type(), ", ", logits.device());
}

// mixda_out_backward(grad_y (N, D), p (N, D + K r), logits (R, E), wup, bup)
void check_mixda_out_backward_args(const at::Tensor& grad_y, const at::Tensor& p,
                                   const at::Tensor& logits, at::TensorList wup,
                                   at::TensorList bup) {
  constexpr const char* op = "mixda_out_backward";
  check_input(op, "p", p, "(N, D + K r)");
  const int64_t K = static_cast<int64_t>(wup.size());
  TORCH_CHECK(K >= 1 && static_cast<int64_t>(bup.size()) == K, op,
              ": wup and bup must each hold K >= 1 tensors, got ", wup.size(), " and ", bup.size());
  TORCH_CHECK(wup[0].dim() == 2, op, ": wup[0] must have shape (D, r), got ", wup[0].sizes());
  const int64_t D = wup[0].size(0), r = wup[0].size(1), N = p.size(0);
  TORCH_CHECK(p.size(1) == D + K * r, op, ": p must have shape (N, D + K r) = [", N, ", ", D + K * r,
              "], got ", p.sizes());
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == N && grad_y.size(1) == D, op,
              ": grad_y must have shape (N, D) = [", N, ", ", D, "], got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == p.scalar_type() && grad_y.device() == p.device(), op,
              ": grad_y must have the dtype and device of p (", p.scalar_type(), ", ", p.device(),
              "), got ", grad_y.scalar_type(), ", ", grad_y.device());
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(wup[k].dim() == 2 && wup[k].size(0) == D && wup[k].size(1) == r, op, ": wup[", k,
                "] must have shape (D, r) = [", D, ", ", r, "], got ", wup[k].sizes());
    TORCH_CHECK(bup[k].dim() == 1 && bup[k].size(0) == D, op, ": bup[", k,
                "] must have shape (D,) = [", D, "], got ", bup[k].sizes());
    check_weight_dtype(op, "wup[k]", wup[k], p, "p");
    check_weight_dtype(op, "bup[k]", bup[k], p, "p");
  }
  TORCH_CHECK(logits.dim() == 2 && (logits.size(1) == K || logits.size(1) == K + 1) &&
                  logits.size(0) >= 1 && N % logits.size(0) == 0,
              op, ": logits must have shape (R, E) with E = K or K + 1 = ", K, " or ", K + 1,
              " and R dividing N = ", N, ", got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == p.scalar_type() && logits.device() == p.device(), op,
              ": logits must have the dtype and device of p (", p.scalar_type(), ", ", p.device(),
              "), got ", logits.scalar_type(), ", ", logits.device());
}

// p in [0, 1); with p > 0 a seed: one int64 on the CPU (drawn from torch's generator by
// mixda_fast.ops.gate_mlp), the key of the counter-based masks (csrc/philox.h).
void check_dropout_args(const char* op, double p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(p >= 0 && p < 1, op, ": p (the dropout probability) must be in [0, 1), got ", p);
  if (p == 0) return;
  TORCH_CHECK(seed.has_value() && seed->defined(), op, ": seed must be given when p > 0 (p = ", p, ")");
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->is_cpu(), op,
              ": seed must be one int64 on the CPU, got ", seed->sizes(), " ", seed->scalar_type(),
              " on ", seed->device());
}

// gate_mlp(z (N, Din), weights [(H_1, Din), (H_2, H_1), .., (E, H_{L-1})], biases [(H_i,)])
void check_gate_mlp_args(const char* op, const at::Tensor& z, at::TensorList weights,
                         at::TensorList biases, double p, const std::optional<at::Tensor>& seed) {
  check_input(op, "z", z, "(N, Din)");
  check_dropout_args(op, p, seed);
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(biases.size()) == L, op,
              ": weights and biases must each hold L >= 1 tensors (one per Linear layer), got ",
              weights.size(), " and ", biases.size());
  int64_t width = z.size(1);
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == width, op, ": weights[", i, "] must have shape (out, ", width,
                ") (its input width: ", i == 0 ? "z.size(1)" : "the previous layer's out", "), got ",
                w.sizes());
    const std::string wname = "weights[" + std::to_string(i) + "]", bname = "biases[" + std::to_string(i) + "]";
    check_weight_dtype(op, wname.c_str(), w, z, "z");
    check_vector(op, bname.c_str(), biases[i], w.size(0), "(out,) with out = weights[i].size(0)");
    TORCH_CHECK(biases[i].scalar_type() == w.scalar_type() && biases[i].device() == w.device(), op,
                ": biases[", i, "] must have the dtype and device of weights[", i, "] (", w.scalar_type(),
                ", ", w.device(), "), got ", biases[i].scalar_type(), ", ", biases[i].device());
    width = w.size(0);
  }
}

// gate_mlp_backward(grad_logits (N, E), z (N, Din), weights, hidden [(N, H_i)] x (L - 1))
void check_gate_mlp_backward_args(const at::Tensor& grad_logits, const at::Tensor& z,
                                  at::TensorList weights, at::TensorList hidden, double p,
                                  const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "gate_mlp_backward";
  check_input(op, "z", z, "(N, Din)");
  check_dropout_args(op, p, seed);
  const int64_t L = static_cast<int64_t>(weights.size()), N = z.size(0);
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(hidden.size()) == L - 1, op,
              ": hidden must hold L - 1 = ", L - 1, " tensors (one per layer but the last), got ",
              hidden.size());
  for (int64_t i = 0; i < L; ++i) {
    TORCH_CHECK(weights[i].dim() == 2, op, ": weights[", i, "] must be 2-d, got ", weights[i].sizes());
    check_weight_dtype(op, ("weights[" + std::to_string(i) + "]").c_str(), weights[i], z, "z");
    const at::Tensor& out = i + 1 < L ? hidden[i] : grad_logits;
    TORCH_CHECK(out.dim() == 2 && out.size(0) == N && out.size(1) == weights[i].size(0), op, ": ",
                i + 1 < L ? "hidden[i]" : "grad_logits", " (i = ", i, ") must have shape (N, out) = [", N,
                ", ", weights[i].size(0), "], got ", out.sizes());
    TORCH_CHECK(out.scalar_type() == z.scalar_type() && out.device() == z.device(), op, ": ",
                i + 1 < L ? "hidden[i]" : "grad_logits", " must have the dtype and device of z (",
                z.scalar_type(), ", ", z.device(), "), got ", out.scalar_type(), ", ", out.device());
  }
}

}  // namespace mixda_fast
