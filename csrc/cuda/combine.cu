// CUDA kernels of the gate softmax + weighted combination; same semantics as
// csrc/cpu/combine.cpp (see there):
//
//   w = softmax(logits)                                   logits (R, E) -> w (R, E)
//   out[r, s, :] = sum_e w[r, e] * experts[e, r, s, :]     experts (E, R, S, D) -> out (R, S, D)
//
// This file needs only ATen's CPU-side headers and the CUDA runtime (no c10/cuda, no
// ATen/cuda), so it compile-checks against a CPU build of torch (.ci/compile_cuda.sh). The
// caller passes the stream and has set the device: see combine_cuda_register.cpp, which also
// validates the arguments.

#include <cuda_runtime.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace mixda_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;           // grid-stride loops cover the rest
constexpr int64_t kMinElemsPerBlock = 4 * 1024;  // backward: elements of one (r, e) row per block
constexpr int64_t kMaxSplits = 1024;

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

// w[r, :] = softmax(logits[r, :]); one thread per row (E is small: the number of experts).
template <typename scalar_t, typename acc_t>
__global__ void softmax_rows_kernel(const scalar_t* __restrict__ logits, acc_t* __restrict__ w,
                                    int64_t R, int64_t E) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < R;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const scalar_t* l = logits + r * E;
    acc_t* wr = w + r * E;
    acc_t mx = static_cast<acc_t>(l[0]);
    for (int64_t e = 1; e < E; ++e) {
      const acc_t v = static_cast<acc_t>(l[e]);
      mx = v > mx ? v : mx;
    }
    acc_t sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      wr[e] = exp_acc(static_cast<acc_t>(l[e]) - mx);
      sum += wr[e];
    }
    const acc_t inv = acc_t(1) / sum;
    for (int64_t e = 0; e < E; ++e) {
      wr[e] *= inv;
    }
  }
}

// out[i] = sum_e w[r(i), e] * x[e, i] over the flat (R, S, D) index i; n_out = R * S * D.
template <typename scalar_t, typename acc_t>
__global__ void combine_forward_kernel(const scalar_t* __restrict__ x,
                                       const acc_t* __restrict__ w, scalar_t* __restrict__ out,
                                       int64_t n_out, int64_t SD, int64_t E) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_out;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t* wr = w + (i / SD) * E;
    acc_t a = 0;
    for (int64_t e = 0; e < E; ++e) {
      a += wr[e] * static_cast<acc_t>(x[e * n_out + i]);
    }
    out[i] = static_cast<scalar_t>(a);
  }
}

// Block (re, split) with re = r * E + e covers a chunk of the n = S * D elements of row (r, e):
// gx[e, r, :] = w[r, e] * g[r, :] and partial[re, split] = <g[r, :], x[e, r, :]> over the chunk.
template <typename scalar_t, typename acc_t>
__global__ void combine_backward_kernel(const scalar_t* __restrict__ g,
                                        const scalar_t* __restrict__ x,
                                        const acc_t* __restrict__ w, scalar_t* __restrict__ gx,
                                        acc_t* __restrict__ partial, int64_t R, int64_t E,
                                        int64_t n, int64_t chunk) {
  __shared__ acc_t smem[kThreads];
  const int64_t re = blockIdx.x;
  const int64_t r = re / E;
  const int64_t e = re % E;
  const acc_t we = w[re];
  const scalar_t* gr = g + r * n;
  const int64_t row = (e * R + r) * n;
  const int64_t begin = blockIdx.y * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  acc_t dot = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const acc_t gi = static_cast<acc_t>(gr[i]);
    dot += gi * static_cast<acc_t>(x[row + i]);
    gx[row + i] = static_cast<scalar_t>(we * gi);
  }
  smem[threadIdx.x] = dot;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      smem[threadIdx.x] += smem[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partial[re * gridDim.y + blockIdx.y] = smem[0];
  }
}

// gw[r, e] = sum of partial[r * E + e, :]; gl[r, :] = w[r, :] * (gw[r, :] - <w[r, :], gw[r, :]>).
template <typename scalar_t, typename acc_t>
__global__ void grad_logits_kernel(const acc_t* __restrict__ w, const acc_t* __restrict__ partial,
                                   scalar_t* __restrict__ gl, int64_t R, int64_t E,
                                   int64_t splits) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < R;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t wdot = 0;
    for (int64_t e = 0; e < E; ++e) {
      const acc_t* p = partial + (r * E + e) * splits;
      acc_t gw = 0;
      for (int64_t k = 0; k < splits; ++k) {
        gw += p[k];
      }
      wdot += w[r * E + e] * gw;
    }
    for (int64_t e = 0; e < E; ++e) {
      const acc_t* p = partial + (r * E + e) * splits;
      acc_t gw = 0;
      for (int64_t k = 0; k < splits; ++k) {
        gw += p[k];
      }
      gl[r * E + e] = static_cast<scalar_t>(w[r * E + e] * (gw - wdot));
    }
  }
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

// Arguments are checked by the caller (check_softmax_combine_args); `stream` must belong to
// the current device, which must be experts.device().
at::Tensor softmax_combine_cuda_launch(const at::Tensor& logits, const at::Tensor& experts,
                                       cudaStream_t stream) {
  const at::Tensor l = logits.contiguous();
  const at::Tensor x = experts.contiguous();
  const int64_t E = x.size(0), R = x.size(1), S = x.size(2), D = x.size(3);
  at::Tensor out = at::empty({R, S, D}, x.options());
  if (R == 0) {
    return out;
  }
  at::Tensor w = at::empty({R, E}, x.options().dtype(acc_dtype(x.scalar_type())));
  const int64_t n_out = R * S * D;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "softmax_combine_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        softmax_rows_kernel<scalar_t, acc_t><<<blocks_for(R), kThreads, 0, stream>>>(
            l.const_data_ptr<scalar_t>(), w.mutable_data_ptr<acc_t>(), R, E);
        check_launch("softmax_combine");
        if (n_out > 0) {
          combine_forward_kernel<scalar_t, acc_t><<<blocks_for(n_out), kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
              out.mutable_data_ptr<scalar_t>(), n_out, S * D, E);
          check_launch("softmax_combine");
        }
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> softmax_combine_backward_cuda_launch(
    const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& experts,
    cudaStream_t stream) {
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor l = logits.contiguous();
  const at::Tensor x = experts.contiguous();
  const int64_t E = x.size(0), R = x.size(1), S = x.size(2), D = x.size(3);
  at::Tensor grad_logits = at::empty({R, E}, l.options());
  at::Tensor grad_experts = at::empty({E, R, S, D}, x.options());
  if (R == 0) {
    return {grad_logits, grad_experts};
  }
  const int64_t n = S * D;
  const int64_t splits =
      std::clamp<int64_t>((n + kMinElemsPerBlock - 1) / kMinElemsPerBlock, 1, kMaxSplits);
  const int64_t chunk = (n + splits - 1) / splits;
  const auto acc_options = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor w = at::empty({R, E}, acc_options);
  at::Tensor partial = at::empty({R * E, splits}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "softmax_combine_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        softmax_rows_kernel<scalar_t, acc_t><<<blocks_for(R), kThreads, 0, stream>>>(
            l.const_data_ptr<scalar_t>(), w.mutable_data_ptr<acc_t>(), R, E);
        check_launch("softmax_combine_backward");
        const dim3 grid(static_cast<unsigned int>(R * E), static_cast<unsigned int>(splits));
        combine_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            w.const_data_ptr<acc_t>(), grad_experts.mutable_data_ptr<scalar_t>(),
            partial.mutable_data_ptr<acc_t>(), R, E, n, chunk);
        check_launch("softmax_combine_backward");
        grad_logits_kernel<scalar_t, acc_t><<<blocks_for(R), kThreads, 0, stream>>>(
            w.const_data_ptr<acc_t>(), partial.const_data_ptr<acc_t>(),
            grad_logits.mutable_data_ptr<scalar_t>(), R, E, splits);
        check_launch("softmax_combine_backward");
      });
  return {grad_logits, grad_experts};
}

}  // namespace mixda_fast
