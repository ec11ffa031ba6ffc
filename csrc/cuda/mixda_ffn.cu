// CUDA kernels of the fused MixDA FFN; same semantics as csrc/cpu/mixda_ffn.cpp (see there).
// GEMMs go through ATen (cuBLAS on torch's current stream, which is the `stream` the caller
// passes); the elementwise epilogues are the kernels below, computing in float (double for
// double) and rounding once to the tensor dtype.
//
// This file needs only ATen's CPU-side headers and the CUDA runtime (no c10/cuda, no
// ATen/cuda), so it compile-checks against a CPU build of torch (.ci/compile_cuda.sh). The
// caller sets the device, checks the arguments and passes the stream: see
// mixda_ffn_cuda_register.cpp. Never run: this project has no GPU (README, CUDA).

#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../activations.h"
#include "../packed_rows.h"

namespace mixda_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

template <typename acc_t>
__device__ __forceinline__ acc_t act_fwd(Act act, acc_t x) {
  const acc_t kSqrt1_2 = acc_t(0.70710678118654752440);
  const acc_t kBeta = acc_t(0.7978845608028654);  // sqrt(2 / pi)
  switch (act) {
    case Act::Gelu: return acc_t(0.5) * x * (acc_t(1) + erf(x * kSqrt1_2));
    case Act::GeluTanh:
    case Act::GeluNew: return acc_t(0.5) * x * (acc_t(1) + tanh(kBeta * (x + acc_t(0.044715) * x * x * x)));
    case Act::Silu: return x / (acc_t(1) + exp(-x));
    case Act::Relu: return x > acc_t(0) ? x : acc_t(0);
    case Act::Identity:
    default: return x;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t act_grad(Act act, acc_t x) {  // d act / dx
  const acc_t kSqrt1_2 = acc_t(0.70710678118654752440);
  const acc_t kInvSqrt2Pi = acc_t(0.3989422804014327);
  const acc_t kBeta = acc_t(0.7978845608028654);
  switch (act) {
    case Act::Gelu: return acc_t(0.5) * (acc_t(1) + erf(x * kSqrt1_2)) + x * kInvSqrt2Pi * exp(acc_t(-0.5) * x * x);
    case Act::GeluTanh:
    case Act::GeluNew: {
      const acc_t inner = kBeta * (x + acc_t(0.044715) * x * x * x);
      const acc_t t = tanh(inner);
      const acc_t dinner = kBeta * (acc_t(1) + acc_t(3 * 0.044715) * x * x);
      return acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * x * (acc_t(1) - t * t) * dinner;
    }
    case Act::Silu: {
      const acc_t s = acc_t(1) / (acc_t(1) + exp(-x));
      return s * (acc_t(1) + x * (acc_t(1) - s));
    }
    case Act::Relu: return x > acc_t(0) ? acc_t(1) : acc_t(0);
    case Act::Identity:
    default: return acc_t(1);
  }
}

// h[n, j] = act(pre[n, j]) (* pre[n, F + j] when gated); pre (N, W) contiguous, W = F or 2F.
template <typename scalar_t, typename acc_t>
__global__ void ffn_act_kernel(const scalar_t* __restrict__ pre, scalar_t* __restrict__ h,
                               int64_t N, int64_t F, int64_t W, Act act, bool gated) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N * F;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / F, j = i % F;
    acc_t v = act_fwd<acc_t>(act, static_cast<acc_t>(pre[n * W + j]));
    if (gated) v *= static_cast<acc_t>(pre[n * W + F + j]);
    h[i] = static_cast<scalar_t>(v);
  }
}

// grad_pre from grad_h (N, F): [g u act'(a) | g act(a)] gated, else g act'(a).
template <typename scalar_t, typename acc_t>
__global__ void ffn_act_backward_kernel(const scalar_t* __restrict__ grad_h,
                                        const scalar_t* __restrict__ pre,
                                        scalar_t* __restrict__ grad_pre, int64_t N, int64_t F,
                                        int64_t W, Act act, bool gated) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N * F;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / F, j = i % F;
    const acc_t g = static_cast<acc_t>(grad_h[i]);
    const acc_t a = static_cast<acc_t>(pre[n * W + j]);
    if (gated) {
      const acc_t u = static_cast<acc_t>(pre[n * W + F + j]);
      grad_pre[n * W + j] = static_cast<scalar_t>(g * u * act_grad<acc_t>(act, a));
      grad_pre[n * W + F + j] = static_cast<scalar_t>(g * act_fwd<acc_t>(act, a));
    } else {
      grad_pre[n * W + j] = static_cast<scalar_t>(g * act_grad<acc_t>(act, a));
    }
  }
}

// s[n, k r + j] = g[n, k] * GELU(p[n, D + k r + j]); p (N, P) contiguous, g (N, E) acc_t.
template <typename scalar_t, typename acc_t>
__global__ void adapter_scale_kernel(const scalar_t* __restrict__ p, const acc_t* __restrict__ g,
                                     acc_t* __restrict__ s, int64_t N, int64_t P, int64_t D,
                                     int64_t r, int64_t K, int64_t E) {
  const int64_t Kr = K * r;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N * Kr;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / Kr, c = i % Kr;
    s[i] = g[n * E + c / r] * act_fwd<acc_t>(Act::Gelu, static_cast<acc_t>(p[n * P + D + c]));
  }
}

// grad_p[n, D + c] = gs[n, c] * g[n, c / r] * GELU'(p[n, D + c]) and
// gsa[n, c] = gs[n, c] * GELU(p[n, D + c]) (summed over each adapter's r columns afterwards).
template <typename scalar_t, typename acc_t>
__global__ void adapter_scale_backward_kernel(const acc_t* __restrict__ gs,
                                              const scalar_t* __restrict__ p,
                                              const acc_t* __restrict__ g,
                                              scalar_t* __restrict__ grad_p,
                                              acc_t* __restrict__ gsa, int64_t N, int64_t P,
                                              int64_t D, int64_t r, int64_t K, int64_t E) {
  const int64_t Kr = K * r;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N * Kr;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / Kr, c = i % Kr;
    const acc_t x = static_cast<acc_t>(p[n * P + D + c]);
    grad_p[n * P + D + c] = static_cast<scalar_t>(gs[i] * g[n * E + c / r] * act_grad<acc_t>(Act::Gelu, x));
    gsa[i] = gs[i] * act_fwd<acc_t>(Act::Gelu, x);
  }
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void gemm_bias_out(at::Tensor out, const at::Tensor& a, const at::Tensor& w,
                   const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, a, w.t());
  } else {
    at::mm_out(out, a, w.t());
  }
}

at::Tensor as(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

at::Tensor row_gates(const at::Tensor& logits, int64_t N, at::ScalarType acc) {
  const at::Tensor g = at::softmax(as(logits, acc), 1);
  const int64_t S = N / logits.size(0);
  return (S == 1 ? g : g.repeat_interleave(S, 0)).contiguous();
}

}  // namespace

// Arguments checked by the caller (check_ffn_in_args); weights are cast to x's dtype here.
std::tuple<at::Tensor, at::Tensor> ffn_in_cuda_launch(const at::Tensor& x, const at::Tensor& w1,
                                                      const std::optional<at::Tensor>& b1,
                                                      const std::optional<at::Tensor>& w3,
                                                      const std::optional<at::Tensor>& b3,
                                                      int64_t act, cudaStream_t stream) {
  const auto dt = x.scalar_type();
  const int64_t N = x.size(0), F = w1.size(0);
  const bool gated = w3.has_value();
  const int64_t W = gated ? 2 * F : F;
  at::Tensor pre = at::empty({N, W}, x.options());
  at::Tensor h = at::empty({N, F}, x.options());
  if (N == 0) return {h, pre};
  auto cast = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value()) return std::nullopt;
    return as(*t, dt);
  };
  gemm_bias_out(pre.narrow(1, 0, F), x, as(w1, dt), cast(b1));
  if (gated) gemm_bias_out(pre.narrow(1, F, F), x, as(*w3, dt), cast(b3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "ffn_in_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ffn_act_kernel<scalar_t, acc_t><<<blocks_for(N * F), kThreads, 0, stream>>>(
        pre.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(), N, F, W,
        static_cast<Act>(act), gated);
    check_launch("ffn_in");
  });
  return {h, pre};
}

at::Tensor ffn_in_backward_cuda_launch(const at::Tensor& grad_h, const at::Tensor& pre,
                                       int64_t act, cudaStream_t stream) {
  const at::Tensor g = grad_h.contiguous();
  const at::Tensor pc = pre.contiguous();
  const int64_t N = pc.size(0), W = pc.size(1), F = g.size(1);
  at::Tensor grad_pre = at::empty({N, W}, pc.options());
  if (N * F == 0) return grad_pre;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pc.scalar_type(), "ffn_in_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ffn_act_backward_kernel<scalar_t, acc_t><<<blocks_for(N * F), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(),
        grad_pre.mutable_data_ptr<scalar_t>(), N, F, W, static_cast<Act>(act), W == 2 * F);
    check_launch("ffn_in_backward");
  });
  return grad_pre;
}

std::tuple<at::Tensor, at::Tensor> mixda_out_cuda_launch(
    const at::Tensor& h, const at::Tensor& z, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, at::TensorList wdown, at::TensorList bdown,
    at::TensorList wup, at::TensorList bup, const at::Tensor& logits, cudaStream_t stream) {
  const auto dt = h.scalar_type();
  const auto acc = acc_dtype(dt);
  const int64_t N = h.size(0), D = w2.size(0), K = static_cast<int64_t>(wdown.size());
  const int64_t r = wdown[0].size(0), P = D + K * r, E = logits.size(1);
  const bool paper = E == K + 1;
  at::Tensor p = at::empty({N, P}, h.options());
  at::Tensor y = at::empty({N, D}, h.options());
  if (N == 0) return {y, p};
  const auto w2_pack = z.is_same(h) ? packed_with_w2(w2, b2, wdown, bdown) : std::nullopt;
  const std::optional<at::Tensor> wd_all = packed_rows(wdown), bd_all = packed_rows(bdown);
  if (w2_pack) {  // [W2 | Wdown_1..K] packed by the layer: one GEMM (packed_rows.h)
    gemm_bias_out(p, h, as(w2_pack->first, dt), as(w2_pack->second, dt));
  } else {
    gemm_bias_out(p.narrow(1, 0, D), h, as(w2, dt),
                  b2.has_value() ? std::optional<at::Tensor>(as(*b2, dt)) : std::nullopt);
  }
  if (!w2_pack && wd_all.has_value() && bd_all.has_value()) {  // packed adapters: one GEMM
    gemm_bias_out(p.narrow(1, D, K * r), z, as(*wd_all, dt), as(*bd_all, dt));
  } else if (!w2_pack) {
    for (int64_t k = 0; k < K; ++k) {
      gemm_bias_out(p.narrow(1, D + k * r, r), z, as(wdown[k], dt), as(bdown[k], dt));
    }
  }
  const at::Tensor g = row_gates(logits, N, acc);                    // (N, E) in acc
  at::Tensor s = at::empty({N, K * r}, h.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "mixda_out_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    adapter_scale_kernel<scalar_t, acc_t><<<blocks_for(N * K * r), kThreads, 0, stream>>>(
        p.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(), s.mutable_data_ptr<acc_t>(), N,
        P, D, r, K, E);
    check_launch("mixda_out");
  });
  const at::Tensor f = as(p.narrow(1, 0, D), acc);
  at::Tensor ya = paper ? f * g.narrow(1, K, 1) : f.clone();
  ya.addmm_(g.narrow(1, 0, K), as(at::stack(bup), acc));
  for (int64_t k = 0; k < K; ++k) {
    ya.addmm_(s.narrow(1, k * r, r), as(wup[k], acc).t());
  }
  y.copy_(ya);
  return {y, p};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixda_out_backward_cuda_launch(
    const at::Tensor& grad_y, const at::Tensor& p, const at::Tensor& logits, at::TensorList wup,
    at::TensorList bup, cudaStream_t stream) {
  const auto dt = p.scalar_type();
  const auto acc = acc_dtype(dt);
  const at::Tensor pc = p.contiguous();
  const int64_t N = pc.size(0), K = static_cast<int64_t>(wup.size());
  const int64_t D = wup[0].size(0), r = wup[0].size(1), P = pc.size(1), R = logits.size(0);
  const int64_t E = logits.size(1);
  const bool paper = E == K + 1;
  const at::Tensor gy = as(grad_y, acc);
  const at::Tensor g = row_gates(logits, N, acc);
  at::Tensor gs = at::empty({N, K * r}, gy.options());
  for (int64_t k = 0; k < K; ++k) {
    at::Tensor out = gs.narrow(1, k * r, r);
    at::mm_out(out, gy, as(wup[k], acc));
  }
  at::Tensor grad_p = at::empty({N, P}, pc.options());
  at::Tensor gsa = at::empty({N, K * r}, gy.options());
  if (N * K * r > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "mixda_out_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      adapter_scale_backward_kernel<scalar_t, acc_t><<<blocks_for(N * K * r), kThreads, 0, stream>>>(
          gs.const_data_ptr<acc_t>(), pc.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(),
          grad_p.mutable_data_ptr<scalar_t>(), gsa.mutable_data_ptr<acc_t>(), N, P, D, r, K, E);
      check_launch("mixda_out_backward");
    });
  }
  const at::Tensor f = as(pc.narrow(1, 0, D), acc);
  grad_p.narrow(1, 0, D).copy_(paper ? gy * g.narrow(1, K, 1) : gy);
  const at::Tensor Bu = as(at::stack(bup), acc);
  at::Tensor grad_g = at::empty({N, E}, gy.options());
  grad_g.narrow(1, 0, K).copy_(gsa.view({N, K, r}).sum(2) + at::mm(gy, Bu.t()));
  if (paper) grad_g.narrow(1, K, 1).copy_((gy * f).sum(1, true));
  const at::Tensor gr = at::softmax(as(logits, acc), 1);
  const at::Tensor ggr = grad_g.view({R, N / R, E}).sum(1);
  const at::Tensor grad_logits = (gr * (ggr - (gr * ggr).sum(1, true))).to(logits.scalar_type());
  const at::Tensor gk = g.narrow(1, 0, K);
  const at::Tensor s = (at::gelu(as(pc.narrow(1, D, K * r), acc)).view({N, K, r}) * gk.unsqueeze(2))
                           .view({N, K * r}).to(dt);
  return {grad_p, grad_logits, s, at::mm(gk.t(), gy).to(dt)};
}

}  // namespace mixda_fast
