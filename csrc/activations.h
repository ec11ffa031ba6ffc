// The activation codes of the ffn_in / ffn_in_backward ops (the `int act` of their schemas in
// csrc/mixda.cpp): the one C++ spelling of them. The Python side spells the same codes in
// mixda_fast/ops/reference.py (ACTIVATIONS); the enum below stays on one line so a test can
// parse it and compare the two.
//
//   Identity  x
//   Gelu      GELU with erf
//   GeluTanh  GELU, tanh approximation
//   GeluNew   transformers' NewGELUActivation (the tanh formula, op by op)
//   Silu      x * sigmoid(x)
//   Relu      max(x, 0)
//
// Header-only, no torch: included by the argument checks, the CPU kernels and the CUDA kernels.

#pragma once

#include <cstdint>

namespace mixda_fast {

enum class Act : int64_t { Identity = 0, Gelu = 1, GeluTanh = 2, GeluNew = 3, Silu = 4, Relu = 5 };

// The first and last valid codes.
inline constexpr Act kFirstAct = Act::Identity;
inline constexpr Act kLastAct = Act::Relu;

// Whether `code` (an op's `int act` argument) names an activation: codes are contiguous.
constexpr bool is_act_code(int64_t code) {
  return code >= static_cast<int64_t>(kFirstAct) && code <= static_cast<int64_t>(kLastAct);
}

}  // namespace mixda_fast
