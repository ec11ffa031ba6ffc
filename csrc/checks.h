// Argument checks of the mixda_fast ops (schemas in csrc/mixda.cpp), defined in csrc/checks.cpp.
// Every backend of an op calls the same check first, so the CPU and CUDA kernels reject bad input
// with the same words (TORCH_CHECK, i.e. a RuntimeError in Python; mixda_fast/ops/reference.py
// raises the same messages for the pure-torch path, and the tests match on them).
//
// `op` is the op name the messages start with.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace mixda_fast {

// ---- building blocks of the op checks below ---------------------------------------------------

// w has x's dtype, or float32 when x is 16-bit (the float32-compute path), and x's device.
void check_weight_dtype(const char* op, const char* name, const at::Tensor& w, const at::Tensor& x,
                        const char* xname);

// w is 2-d of shape [rows, cols]; `shape` spells it for the message, e.g. "(F, d) = w1.shape".
void check_matrix(const char* op, const char* name, const at::Tensor& w, int64_t rows, int64_t cols,
                  const char* shape);

// b is 1-d of shape [n]; `shape` spells it for the message.
void check_vector(const char* op, const char* name, const at::Tensor& b, int64_t n,
                  const char* shape);

// x is 2-d (`shape` spells it for the message) of a supported float dtype.
void check_input(const char* op, const char* name, const at::Tensor& x, const char* shape);

// p in [0, 1); with p > 0 a seed: one int64 on the CPU.
void check_dropout_args(const char* op, double p, const std::optional<at::Tensor>& seed);

// ---- one per op ---------------------------------------------------------------------------------

// softmax_combine(logits (R, E), experts (E, R, S, D)).
void check_softmax_combine_args(const char* op, const at::Tensor& logits,
                                const at::Tensor& experts);

// softmax_combine_backward(grad_out (R, S, D), logits (R, E), experts (E, R, S, D)).
void check_softmax_combine_backward_args(const at::Tensor& grad_out, const at::Tensor& logits,
                                         const at::Tensor& experts);

// ffn_in(x (N, d), w1 (F, d), b1 (F)?, w3 (F, d)?, b3 (F)?, act); act: csrc/activations.h.
void check_ffn_in_args(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                       const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b3,
                       int64_t act);

// ffn_in_backward(grad_h (N, F), pre (N, F) or (N, 2F) gated, act); act as for ffn_in.
void check_ffn_in_backward_args(const at::Tensor& grad_h, const at::Tensor& pre, int64_t act);

// mixda_out(h (N, F), z (N, Din), w2 (D, F), b2 (D)?, wdown K x (r, Din), bdown K x (r),
//           wup K x (D, r), bup K x (D), logits (R, E)) with N = R * S and E = K or K + 1.
void check_mixda_out_args(const char* op, const at::Tensor& h, const at::Tensor& z,
                          const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                          at::TensorList wdown, at::TensorList bdown, at::TensorList wup,
                          at::TensorList bup, const at::Tensor& logits);

// mixda_out_backward(grad_y (N, D), p (N, D + K r), logits (R, E), wup, bup).
void check_mixda_out_backward_args(const at::Tensor& grad_y, const at::Tensor& p,
                                   const at::Tensor& logits, at::TensorList wup,
                                   at::TensorList bup);

// gate_mlp(z (N, Din), weights [(H_1, Din), (H_2, H_1), .., (E, H_{L-1})], biases [(H_i,)], p, seed).
void check_gate_mlp_args(const char* op, const at::Tensor& z, at::TensorList weights,
                         at::TensorList biases, double p, const std::optional<at::Tensor>& seed);

// gate_mlp_backward(grad_logits (N, E), z (N, Din), weights, hidden [(N, H_i)] x (L - 1), p, seed).
void check_gate_mlp_backward_args(const at::Tensor& grad_logits, const at::Tensor& z,
                                  at::TensorList weights, at::TensorList hidden, double p,
                                  const std::optional<at::Tensor>& seed);

}  // namespace mixda_fast
