// Packed adapter weights: MixDAFFN.pack_adapters() lays the K adapters' down-projection weights
// (r, Din) and biases (r,) out back to back in one buffer each, the parameters being views of it
// (as nn.LSTM.flatten_parameters() does with its weights). In-place updates (optimizer steps,
// .data writes, load_state_dict) then land in the packed buffer itself, so it can never be stale;
// a parameter that is replaced is no longer a view of the buffer, and the kernels see that here
// and fall back to one GEMM per adapter until the layer packs again.
//
// Header-only: used by the CPU kernels and the CUDA launchers alike.

#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace mixda_fast {

// If ts[0..K) are contiguous tensors of one shape and dtype that lie back to back in one storage
// (ts[k] starts where ts[k-1] ends), a contiguous view (K * ts[0].size(0), ...) over all of them;
// ts[0] itself for K == 1; otherwise nullopt.
inline std::optional<at::Tensor> packed_rows(at::TensorList ts) {
  const size_t K = ts.size();
  if (K == 0 || !ts[0].defined() || ts[0].dim() < 1 || !ts[0].is_contiguous() ||
      !ts[0].has_storage()) {
    return std::nullopt;
  }
  if (K == 1) return ts[0];
  const at::Tensor& t0 = ts[0];
  const int64_t numel = t0.numel();
  for (size_t k = 1; k < K; ++k) {
    const at::Tensor& t = ts[k];
    if (!t.defined() || !t.has_storage() || !t.is_contiguous() || t.sizes() != t0.sizes() ||
        t.scalar_type() != t0.scalar_type() || t.device() != t0.device() ||
        !t.storage().is_alias_of(t0.storage()) ||
        t.storage_offset() != t0.storage_offset() + static_cast<int64_t>(k) * numel) {
      return std::nullopt;
    }
  }
  std::vector<int64_t> sizes(t0.sizes().begin(), t0.sizes().end());
  sizes[0] *= static_cast<int64_t>(K);
  std::vector<int64_t> strides(sizes.size(), 1);
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) {
    strides[d] = strides[d + 1] * sizes[d + 1];
  }
  return t0.as_strided(sizes, strides, t0.storage_offset());
}

}  // namespace mixda_fast
