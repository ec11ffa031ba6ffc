// CPU kernels of the gate softmax + weighted combination (docs/design.md section 4, step 4):
//
//   w = softmax(logits)                                   logits (R, E) -> w (R, E)
//   out[r, s, :] = sum_e w[r, e] * experts[e, r, s, :]     experts (E, R, S, D) -> out (R, S, D)
//
// Forward reads every expert row once and writes every output row once, with the E partial
// sums of a D-chunk kept in registers. Backward is one fused pass per (r, e) pair: it writes
// grad_experts[e, r] = w[r, e] * grad_out[r] and reduces <grad_out[r], experts[e, r]> from the
// same loads. Softmax and accumulation are in at::opmath_type (float for bf16/fp16/fp32,
// double for fp64); outputs are in the inputs' dtype.

// The vector ISA follows the compiler flags of this build (setup.py / CMakeLists.txt choose
// them). ATen's Vectorized<> picks its implementation from these CPU_CAPABILITY_* macros, which
// torch defines only for its own per-ISA kernel copies, so we define them here, before
// including it, from what the compiler was told it may use.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX512
#define MIXDA_FAST_CPU_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2
#define MIXDA_FAST_CPU_ISA "avx2"
#else
#define MIXDA_FAST_CPU_ISA "default"
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

// Read (as bytes, without loading the library) by mixda_fast/ops/_ext.py, which refuses to load a
// build whose vector ISA the running CPU lacks instead of dying with SIGILL.
extern "C" __attribute__((used)) const char mixda_fast_cpu_isa_marker[] =
    "mixda_fast_cpu_isa=" MIXDA_FAST_CPU_ISA;

namespace mixda_fast {

namespace {

using at::vec::Vectorized;

// Loads / stores Vectorized<acc_t>::size() elements of scalar_t as one vector of acc_t.
template <typename scalar_t, typename = void>
struct VecIO {  // float, double: no conversion
  using acc_t = scalar_t;
  using Vec = Vectorized<acc_t>;
  static Vec load(const scalar_t* p) { return Vec::loadu(p); }
  static void store(scalar_t* p, const Vec& v) { v.store(p); }
};

template <typename scalar_t>
struct VecIO<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using acc_t = float;  // bfloat16, float16: compute in float
  using Vec = Vectorized<float>;
  static Vec load(const scalar_t* p) {
    Vec v;
    at::vec::load_to_float<scalar_t>(p, v);
    return v;
  }
  static void store(scalar_t* p, const Vec& v) {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, Vec::size());
  }
};

template <typename acc_t>
acc_t reduce_sum(const Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t s = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) {
    s += buf[i];
  }
  return s;
}

// Rows of work handed to one task: at least ~32k elements per task (ATen's own GRAIN_SIZE), so
// small problems stay on one thread.
constexpr int64_t kGrainElems = 32768;
int64_t grain_for(int64_t elems_per_row) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_row));
}

// w[r, :] = softmax(logits[r, :]) in acc_t.
template <typename scalar_t, typename acc_t>
void softmax_rows(const scalar_t* logits, acc_t* w, int64_t R, int64_t E) {
  at::parallel_for(0, R, grain_for(E), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* l = logits + r * E;
      acc_t* wr = w + r * E;
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (int64_t e = 0; e < E; ++e) {
        mx = std::max(mx, static_cast<acc_t>(l[e]));
      }
      acc_t sum = 0;
      for (int64_t e = 0; e < E; ++e) {
        wr[e] = std::exp(static_cast<acc_t>(l[e]) - mx);
        sum += wr[e];
      }
      const acc_t inv = acc_t(1) / sum;
      for (int64_t e = 0; e < E; ++e) {
        wr[e] *= inv;
      }
    }
  });
}

// out[rs, :] = sum_e w[rs / S, e] * x[e, rs, :] for rs in [0, R * S).
template <typename scalar_t>
void combine_forward(const scalar_t* x, const typename VecIO<scalar_t>::acc_t* w, scalar_t* out,
                     int64_t R, int64_t S, int64_t D, int64_t E) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t V = Vec::size();
  const int64_t RS = R * S;
  const int64_t expert_stride = RS * D;  // elements between experts[e] and experts[e + 1]

  at::parallel_for(0, RS, grain_for(E * D), [&](int64_t begin, int64_t end) {
    for (int64_t rs = begin; rs < end; ++rs) {
      const acc_t* wr = w + (rs / S) * E;
      const scalar_t* xr = x + rs * D;  // experts[0, r, s, :]
      scalar_t* o = out + rs * D;
      int64_t d = 0;
      for (; d + 2 * V <= D; d += 2 * V) {
        const Vec w0(wr[0]);
        Vec a0 = w0 * IO::load(xr + d);
        Vec a1 = w0 * IO::load(xr + d + V);
        for (int64_t e = 1; e < E; ++e) {
          const Vec we(wr[e]);
          const scalar_t* xe = xr + e * expert_stride;
          a0 = at::vec::fmadd(we, IO::load(xe + d), a0);
          a1 = at::vec::fmadd(we, IO::load(xe + d + V), a1);
        }
        IO::store(o + d, a0);
        IO::store(o + d + V, a1);
      }
      for (; d + V <= D; d += V) {
        Vec a0 = Vec(wr[0]) * IO::load(xr + d);
        for (int64_t e = 1; e < E; ++e) {
          a0 = at::vec::fmadd(Vec(wr[e]), IO::load(xr + e * expert_stride + d), a0);
        }
        IO::store(o + d, a0);
      }
      for (; d < D; ++d) {  // tail shorter than one vector
        acc_t a = wr[0] * static_cast<acc_t>(xr[d]);
        for (int64_t e = 1; e < E; ++e) {
          a += wr[e] * static_cast<acc_t>(xr[e * expert_stride + d]);
        }
        o[d] = static_cast<scalar_t>(a);
      }
    }
  });
}

// For every (r, e): gx[e, r, :] = w[r, e] * g[r, :] and gw[r, e] = <g[r, :], x[e, r, :]>,
// rows of n = S * D elements; then gl[r, :] = w[r, :] * (gw[r, :] - <w[r, :], gw[r, :]>).
template <typename scalar_t>
void combine_backward(const scalar_t* g, const scalar_t* x,
                      const typename VecIO<scalar_t>::acc_t* w, scalar_t* gl, scalar_t* gx,
                      int64_t R, int64_t S, int64_t D, int64_t E) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t V = Vec::size();
  const int64_t n = S * D;
  std::vector<acc_t> gw(R * E);  // (R, E)

  at::parallel_for(0, R * E, grain_for(n), [&](int64_t begin, int64_t end) {
    for (int64_t re = begin; re < end; ++re) {
      const int64_t r = re / E;
      const int64_t e = re % E;
      const acc_t we = w[re];
      const Vec wv(we);
      const scalar_t* gr = g + r * n;               // grad_out[r]
      const scalar_t* xe = x + (e * R + r) * n;     // experts[e, r]
      scalar_t* gxe = gx + (e * R + r) * n;         // grad_experts[e, r]
      Vec acc0(acc_t(0));
      Vec acc1(acc_t(0));
      int64_t i = 0;
      for (; i + 2 * V <= n; i += 2 * V) {
        const Vec g0 = IO::load(gr + i);
        const Vec g1 = IO::load(gr + i + V);
        acc0 = at::vec::fmadd(g0, IO::load(xe + i), acc0);
        acc1 = at::vec::fmadd(g1, IO::load(xe + i + V), acc1);
        IO::store(gxe + i, wv * g0);
        IO::store(gxe + i + V, wv * g1);
      }
      for (; i + V <= n; i += V) {
        const Vec g0 = IO::load(gr + i);
        acc0 = at::vec::fmadd(g0, IO::load(xe + i), acc0);
        IO::store(gxe + i, wv * g0);
      }
      acc_t dot = reduce_sum<acc_t>(acc0 + acc1);
      for (; i < n; ++i) {  // tail shorter than one vector
        const acc_t gi = static_cast<acc_t>(gr[i]);
        dot += gi * static_cast<acc_t>(xe[i]);
        gxe[i] = static_cast<scalar_t>(we * gi);
      }
      gw[re] = dot;
    }
  });

  at::parallel_for(0, R, grain_for(E), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* wr = w + r * E;
      const acc_t* gwr = gw.data() + r * E;
      acc_t wdot = 0;
      for (int64_t e = 0; e < E; ++e) {
        wdot += wr[e] * gwr[e];
      }
      for (int64_t e = 0; e < E; ++e) {
        gl[r * E + e] = static_cast<scalar_t>(wr[e] * (gwr[e] - wdot));
      }
    }
  });
}

}  // namespace

at::Tensor softmax_combine_cpu(const at::Tensor& logits, const at::Tensor& experts) {
  check_softmax_combine_args("softmax_combine", logits, experts);
  const at::Tensor l = logits.contiguous();
  const at::Tensor x = experts.contiguous();
  const int64_t E = x.size(0), R = x.size(1), S = x.size(2), D = x.size(3);
  at::Tensor out = at::empty({R, S, D}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "softmax_combine_cpu", [&] {
        using acc_t = typename VecIO<scalar_t>::acc_t;
        static_assert(std::is_same_v<acc_t, at::opmath_type<scalar_t>>);
        std::vector<acc_t> w(R * E);  // (R, E)
        softmax_rows(l.const_data_ptr<scalar_t>(), w.data(), R, E);
        combine_forward(x.const_data_ptr<scalar_t>(), w.data(), out.mutable_data_ptr<scalar_t>(),
                        R, S, D, E);
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> softmax_combine_backward_cpu(const at::Tensor& grad_out,
                                                                const at::Tensor& logits,
                                                                const at::Tensor& experts) {
  check_softmax_combine_backward_args(grad_out, logits, experts);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor l = logits.contiguous();
  const at::Tensor x = experts.contiguous();
  const int64_t E = x.size(0), R = x.size(1), S = x.size(2), D = x.size(3);
  at::Tensor grad_logits = at::empty({R, E}, l.options());
  at::Tensor grad_experts = at::empty({E, R, S, D}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "softmax_combine_backward_cpu", [&] {
        using acc_t = typename VecIO<scalar_t>::acc_t;
        std::vector<acc_t> w(R * E);  // (R, E), recomputed rather than saved
        softmax_rows(l.const_data_ptr<scalar_t>(), w.data(), R, E);
        combine_backward(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.data(),
                         grad_logits.mutable_data_ptr<scalar_t>(),
                         grad_experts.mutable_data_ptr<scalar_t>(), R, S, D, E);
      });
  return {grad_logits, grad_experts};
}

TORCH_LIBRARY_IMPL(mixda_fast, CPU, m) {
  m.impl("softmax_combine", &softmax_combine_cpu);
  m.impl("softmax_combine_backward", &softmax_combine_backward_cpu);
}

}  // namespace mixda_fast
