// CPU kernels of the fused MixDA FFN (docs/design.md section 4, steps 0-4).
//
//   ffn_in:     pre = x w1^T + b1 (gated: [x w1^T + b1 | x w3^T + b3]);  h = act(pre) (* up half)
//   mixda_out:  p = [h w2^T + b2 | z wdown_k^T + bdown_k]_k;  g = softmax(logits)
//               s_k = g_k GELU(p_k);  y = g_K f + sum_k s_k wup_k^T + g_k bup_k   (paper)
//                                     y =     f + ...                            (residual)
//
// Token-blocked execution: the rows (tokens) are cut into blocks that at::parallel_for hands to
// the threads; each block runs its GEMMs (ATen -> MKL/oneDNN, single-threaded inside the
// parallel region) and then its epilogue while the block's activations are still in cache.
// A problem of one block runs inline, where the GEMMs use every thread. Block rows: env
// MIXDA_FAST_BLOCK_ROWS (default kDefaultBlockRows; 0 = one block, i.e. whole-matrix GEMMs).
//
// 16-bit inputs on CPUs without native bf16/fp16 dot products (no AVX512-BF16 / AMX: bf16 GEMMs
// run ~4x slower than fp32 there) compute in float32: the weights are converted once per call
// (from the live parameters, so nothing can go stale), activations per block; products of bf16
// values are exact in float32, so this is bf16 with float32 accumulation. Outputs are rounded
// to the input dtype once. Float32 weights may also be passed directly with 16-bit inputs.
//
// The epilogues call ATen's own elementwise ops on the block (gelu, silu, ...). That keeps the
// fused FFN bit-identical to the host FFN in float32 (the same GEMM calls and the same
// activation kernels), which is what makes residual mixing at initialisation the unpatched
// model exactly.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../activations.h"
#include "../checks.h"
#include "../packed_rows.h"

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <vector>

namespace mixda_fast {

namespace {

// 0 = whole-matrix GEMMs: measured fastest here (BERT-base K=4 fp32, 1 thread: 8x128 fused 0.88
// of peak with one block vs 0.74 with 64-row blocks; decode equal). Smaller blocks remain an option.
constexpr int64_t kDefaultBlockRows = 0;

int64_t block_rows(int64_t N) {
  static const int64_t env = [] {
    const char* v = std::getenv("MIXDA_FAST_BLOCK_ROWS");
    return v ? std::max<int64_t>(0, std::atoll(v)) : kDefaultBlockRows;
  }();
  return env == 0 ? std::max<int64_t>(N, 1) : env;
}

// Runs fn(begin, end) over row blocks: in parallel when there are several blocks.
template <typename Fn>
void for_row_blocks(int64_t N, Fn fn) {
  const int64_t bs = block_rows(N);
  const int64_t nblocks = (N + bs - 1) / bs;
  if (nblocks <= 1) {
    if (N > 0) fn(0, N);
    return;
  }
  // The worker threads run ATen ops: give them the caller's thread-local state (autograd
  // excluded, grad mode, ...), which OpenMP threads do not inherit.
  const at::ThreadLocalState state;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const at::ThreadLocalStateGuard tls_guard(state);
    for (int64_t b = b0; b < b1; ++b) {
      fn(b * bs, std::min(N, (b + 1) * bs));
    }
  });
}

}  // namespace

// True on CPUs with native bf16 dot products (AVX512-BF16 / AMX); also used by gate_mlp.cpp.
bool native_16bit_gemm() {
  static const bool native = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    auto has = [&](const char* k) {
      auto it = caps.find(k);
      return it != caps.end() && it->second.isBool() && it->second.toBool();
    };
    return has("avx512_bf16") || has("amx_bf16");
  }();
  return native;
}

namespace {

// The dtype GEMMs and epilogues run in for inputs of dtype t (see the file comment).
at::ScalarType compute_dtype(at::ScalarType t) {
  if (t == at::kDouble || t == at::kFloat) return t;
  return native_16bit_gemm() ? t : at::kFloat;
}

at::Tensor to_ct(const at::Tensor& t, at::ScalarType ct) {
  return t.scalar_type() == ct ? t : t.to(ct);
}

std::optional<at::Tensor> to_ct(const std::optional<at::Tensor>& t, at::ScalarType ct) {
  if (!t.has_value()) return std::nullopt;
  return to_ct(*t, ct);
}

// out = a @ w^T (+ bias), out may be a column slice of a wider row-major buffer.
void gemm_bias_out(at::Tensor out, const at::Tensor& a, const at::Tensor& w,
                const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, a, w.t());
  } else {
    at::mm_out(out, a, w.t());
  }
}

// A Python number as an ATen operand: a "wrapped number" tensor, which type promotion lets the
// op compute in its float math. A C++ Scalar (t.mul_(0.044715)) is rounded to t's dtype first, so
// in bf16 the constants of NewGELU would differ from what the host's Python formula multiplies by.
at::Tensor py_number(double v) {
  at::Tensor s = at::scalar_tensor(v, at::kDouble);
  s.unsafeGetTensorImpl()->set_wrapped_number(true);
  return s;
}

// out = act(pre), with ATen's own kernels (bit-identical to the host's activation module).
void act_forward_out(int64_t act, const at::Tensor& pre, at::Tensor out) {
  switch (static_cast<Act>(act)) {
    case Act::Identity: out.copy_(pre); break;
    case Act::Gelu: at::gelu_out(out, pre); break;
    case Act::GeluTanh: at::gelu_out(out, pre, "tanh"); break;
    case Act::GeluNew: {  // transformers' NewGELUActivation, op by op:
      // 0.5 * x * (1.0 + tanh(sqrt(2 / pi) * (x + 0.044715 * pow(x, 3.0))))
      at::Tensor t = at::pow(pre, 3.0);
      t.mul_(py_number(0.044715));
      t = at::add(pre, t);
      t.mul_(py_number(0.7978845608028654));  // math.sqrt(2.0 / math.pi)
      t.tanh_();
      t.add_(py_number(1.0));
      out.copy_(pre);
      out.mul_(py_number(0.5));
      out.mul_(t);
      break;
    }
    case Act::Silu: at::silu_out(out, pre); break;
    case Act::Relu: at::relu_out(out, pre); break;
    default: TORCH_CHECK(false, "ffn_in: unknown activation code ", act);
  }
}

at::Tensor act_backward(int64_t act, const at::Tensor& grad, const at::Tensor& pre) {
  switch (static_cast<Act>(act)) {
    case Act::Identity: return grad;
    case Act::Gelu: return at::gelu_backward(grad, pre);
    case Act::GeluTanh:
    case Act::GeluNew: return at::gelu_backward(grad, pre, "tanh");
    case Act::Silu: return at::silu_backward(grad, pre);
    case Act::Relu: return at::threshold_backward(grad, pre, 0);
    default: TORCH_CHECK(false, "ffn_in_backward: unknown activation code ", act);
  }
}

// Gate weights per row: softmax(logits) (R, E) in ct, repeated over the S = N / R rows of a group.
at::Tensor row_gates(const at::Tensor& logits, int64_t N, at::ScalarType ct) {
  const at::Tensor g = at::softmax(to_ct(logits, ct), 1);
  const int64_t S = N / logits.size(0);
  return S == 1 ? g.contiguous() : g.repeat_interleave(S, 0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ffn_in_cpu(const at::Tensor& x, const at::Tensor& w1,
                                              const std::optional<at::Tensor>& b1,
                                              const std::optional<at::Tensor>& w3,
                                              const std::optional<at::Tensor>& b3, int64_t act) {
  check_ffn_in_args(x, w1, b1, w3, b3, act);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain ATen calls inside
  const int64_t N = x.size(0), F = w1.size(0);
  const bool gated = w3.has_value();
  const at::ScalarType dt = x.scalar_type(), ct = compute_dtype(dt);
  const bool convert = ct != dt;
  const at::Tensor W1 = to_ct(w1, ct);
  const std::optional<at::Tensor> B1 = to_ct(b1, ct), W3 = to_ct(w3, ct), B3 = to_ct(b3, ct);
  at::Tensor h = at::empty({N, F}, x.options());
  at::Tensor pre = at::empty({N, gated ? 2 * F : F}, x.options());

  for_row_blocks(N, [&](int64_t r0, int64_t r1) {
    const int64_t n = r1 - r0;
    const at::Tensor xb = to_ct(x.narrow(0, r0, n), ct);
    at::Tensor pb = convert ? at::empty({n, pre.size(1)}, x.options().dtype(ct)) : pre.narrow(0, r0, n);
    at::Tensor hb = convert ? at::empty({n, F}, x.options().dtype(ct)) : h.narrow(0, r0, n);
    if (gated) {
      // Each half in a contiguous buffer of its own, as the host computes them, so that the
      // activation kernel sees the same layout (vector/scalar tails) as the host's.
      at::Tensor ab = at::empty({n, F}, xb.options());
      at::Tensor ub = at::empty({n, F}, xb.options());
      gemm_bias_out(ab, xb, W1, B1);
      gemm_bias_out(ub, xb, *W3, B3);
      act_forward_out(act, ab, hb);
      hb.mul_(ub);
      pb.narrow(1, 0, F).copy_(ab);
      pb.narrow(1, F, F).copy_(ub);
    } else {
      gemm_bias_out(pb, xb, W1, B1);
      act_forward_out(act, pb, hb);
    }
    if (convert) {
      pre.narrow(0, r0, n).copy_(pb);
      h.narrow(0, r0, n).copy_(hb);
    }
  });
  return {h, pre};
}

at::Tensor ffn_in_backward_cpu(const at::Tensor& grad_h, const at::Tensor& pre, int64_t act) {
  check_ffn_in_backward_args(grad_h, pre, act);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain ATen calls inside
  const at::ScalarType dt = pre.scalar_type(), ct = compute_dtype(dt);
  const at::Tensor g = to_ct(grad_h, ct);
  const at::Tensor pc = to_ct(pre, ct);
  const int64_t F = grad_h.size(1);
  if (pre.size(1) == F) {
    return act_backward(act, g, pc).to(dt);
  }
  const at::Tensor gp = pc.narrow(1, 0, F), up = pc.narrow(1, F, F);
  at::Tensor a = at::empty_like(gp, at::MemoryFormat::Contiguous);
  act_forward_out(act, gp, a);
  at::Tensor out = at::empty({pre.size(0), 2 * F}, pre.options());
  out.narrow(1, 0, F).copy_(act_backward(act, g * up, gp));
  out.narrow(1, F, F).copy_(g * a);
  return out;
}

std::tuple<at::Tensor, at::Tensor> mixda_out_cpu(const at::Tensor& h, const at::Tensor& z,
                                                 const at::Tensor& w2,
                                                 const std::optional<at::Tensor>& b2,
                                                 at::TensorList wdown, at::TensorList bdown,
                                                 at::TensorList wup, at::TensorList bup,
                                                 const at::Tensor& logits) {
  check_mixda_out_args("mixda_out", h, z, w2, b2, wdown, bdown, wup, bup, logits);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain ATen calls inside
  const int64_t N = h.size(0), D = w2.size(0), K = static_cast<int64_t>(wdown.size());
  const int64_t r = wdown[0].size(0), P = D + K * r;
  const bool paper = logits.size(1) == K + 1;
  const bool z_is_h = z.is_same(h);
  const at::ScalarType dt = h.scalar_type(), ct = compute_dtype(dt);
  const bool convert = ct != dt;
  const auto copt = h.options().dtype(ct);

  // Packed weights (see packed_rows.h): one GEMM for [W2 | Wdown_1..K] when the adapters read h
  // and the layer packed W2 with them; else one GEMM for W2 and one for all K adapters; else one each.
  const auto w2_pack = z_is_h ? packed_with_w2(w2, b2, wdown, bdown) : std::nullopt;
  const at::Tensor W2 = w2_pack ? to_ct(w2_pack->first, ct) : to_ct(w2, ct);
  const std::optional<at::Tensor> B2 =
      w2_pack ? std::optional<at::Tensor>(to_ct(w2_pack->second, ct)) : to_ct(b2, ct);
  const std::optional<at::Tensor> wd_all = packed_rows(wdown), bd_all = packed_rows(bdown);
  std::vector<at::Tensor> Wd, Bd, Wu;      // the down GEMMs after W2's: none, one or K of them
  if (!w2_pack && wd_all.has_value() && bd_all.has_value()) {
    Wd.push_back(to_ct(*wd_all, ct));
    Bd.push_back(to_ct(*bd_all, ct));
  } else if (!w2_pack) {
    for (int64_t k = 0; k < K; ++k) {
      Wd.push_back(to_ct(wdown[k], ct));
      Bd.push_back(to_ct(bdown[k], ct));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    Wu.push_back(to_ct(wup[k], ct));
  }
  // [Wup_1 .. Wup_K] (D, K r): sum_k s_k wup_k^T is one GEMM, accumulated in float32 inside it and
  // rounded once (K accumulating GEMMs rounded y to a 16-bit dtype K times: 2 ulps off at K = 8).
  const at::Tensor Wu_all = K == 1 ? Wu[0] : at::cat(Wu, 1);
  const at::Tensor Bu = at::stack(bup).to(ct);          // (K, D)
  const at::Tensor g = row_gates(logits, N, ct);        // (N, E)
  at::Tensor y = at::empty({N, D}, h.options());
  at::Tensor p = at::empty({N, P}, h.options());

  for_row_blocks(N, [&](int64_t r0, int64_t r1) {
    const int64_t n = r1 - r0;
    const at::Tensor hb = to_ct(h.narrow(0, r0, n), ct);
    const at::Tensor zb = z_is_h ? hb : to_ct(z.narrow(0, r0, n), ct);
    at::Tensor pb = convert ? at::empty({n, P}, copt) : p.narrow(0, r0, n);
    at::Tensor yb = convert ? at::empty({n, D}, copt) : y.narrow(0, r0, n);
    const at::Tensor f = pb.narrow(1, 0, D);
    gemm_bias_out(w2_pack ? pb : f, hb, W2, B2);    // f = h w2^T + b2 (and, packed, the adapters)
    const int64_t rw = Wd.empty() ? 0 : K * r / static_cast<int64_t>(Wd.size());  // rows per down GEMM
    for (size_t k = 0; k < Wd.size(); ++k) {
      gemm_bias_out(pb.narrow(1, D + k * rw, rw), zb, Wd[k], Bd[k]);        // adapter pre-activations
    }
    const at::Tensor gb = g.narrow(0, r0, n);                             // (n, E)
    const at::Tensor gk = gb.narrow(1, 0, K);                             // (n, K)
    at::Tensor s = at::gelu(pb.narrow(1, D, K * r));                      // (n, K r), contiguous
    s.view({n, K, r}).mul_(gk.unsqueeze(2));                              // s_k = g_k GELU(p_k)
    if (paper) {
      at::mul_out(yb, f, gb.narrow(1, K, 1));                             // g_{K+1} f
    } else {
      yb.copy_(f);
    }
    yb.addmm_(gk, Bu);                                                    // + sum_k g_k bup_k
    yb.addmm_(s, Wu_all.t());                                             // + sum_k s_k wup_k^T
    if (convert) {
      p.narrow(0, r0, n).copy_(pb);
      y.narrow(0, r0, n).copy_(yb);
    }
  });
  return {y, p};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixda_out_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& p, const at::Tensor& logits, at::TensorList wup,
    at::TensorList bup) {
  check_mixda_out_backward_args(grad_y, p, logits, wup, bup);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain ATen calls inside
  const int64_t N = p.size(0), K = static_cast<int64_t>(wup.size());
  const int64_t D = wup[0].size(0), r = wup[0].size(1), R = logits.size(0), E = logits.size(1);
  const bool paper = E == K + 1;
  const at::ScalarType dt = p.scalar_type(), ct = compute_dtype(dt);
  const auto copt = p.options().dtype(ct);

  const at::Tensor gy = to_ct(grad_y, ct);                                // (N, D)
  const at::Tensor pc = to_ct(p, ct);
  const at::Tensor f = pc.narrow(1, 0, D), pa = pc.narrow(1, D, K * r);
  const at::Tensor gr = at::softmax(to_ct(logits, ct), 1);                // (R, E)
  const at::Tensor g = row_gates(logits, N, ct);                          // (N, E)
  const at::Tensor gk = g.narrow(1, 0, K);
  const at::Tensor Bu = at::stack(bup).to(ct);                            // (K, D)

  at::Tensor gs = at::empty({N, K * r}, copt);                            // dL/ds = grad_y wup_k
  for (int64_t k = 0; k < K; ++k) {
    at::Tensor out = gs.narrow(1, k * r, r);
    at::mm_out(out, gy, to_ct(wup[k], ct));
  }
  const at::Tensor a = at::gelu(pa);                                      // (N, K r)
  at::Tensor grad_g = at::empty({N, E}, copt);                            // dL/dg per row
  grad_g.narrow(1, 0, K).copy_((gs * a).view({N, K, r}).sum(2) + at::mm(gy, Bu.t()));
  if (paper) {
    grad_g.narrow(1, K, 1).copy_((gy * f).sum(1, true));
  }
  at::Tensor grad_p = at::empty({N, D + K * r}, p.options());
  const at::Tensor gsk = (gs.view({N, K, r}) * gk.unsqueeze(2)).view({N, K * r});
  grad_p.narrow(1, D, K * r).copy_(at::gelu_backward(gsk, pa));
  grad_p.narrow(1, 0, D).copy_(paper ? gy * g.narrow(1, K, 1) : gy);

  const at::Tensor ggr = grad_g.view({R, N / R, E}).sum(1);               // (R, E)
  const at::Tensor grad_logits = (gr * (ggr - (gr * ggr).sum(1, true))).to(logits.scalar_type());
  const at::Tensor s = (a.view({N, K, r}) * gk.unsqueeze(2)).view({N, K * r}).to(dt);
  const at::Tensor grad_bup = at::mm(gk.t(), gy).to(dt);                  // (K, D)
  return {grad_p, grad_logits, s, grad_bup};
}

TORCH_LIBRARY_IMPL(mixda_fast, CPU, m) {
  m.impl("ffn_in", &ffn_in_cpu);
  m.impl("ffn_in_backward", &ffn_in_backward_cpu);
  m.impl("mixda_out", &mixda_out_cpu);
  m.impl("mixda_out_backward", &mixda_out_backward_cpu);
}

}  // namespace mixda_fast
