// Packed weights: MixDAFFN.pack_adapters() lays the K adapters' down-projection weights (r, Din)
// and biases (r,) out back to back in one buffer each (preceded by the host's W2 and b2 where it
// can: adapters reading h, an nn.Linear host with a bias), the parameters being views of it
// (as nn.LSTM.flatten_parameters() does with its weights). In-place updates (optimizer steps,
// .data writes, load_state_dict) then land in the packed buffer itself, so it can never be stale;
// a parameter that is replaced is no longer a view of the buffer, and the kernels see that here
// and run the unpacked GEMMs (until the layer's next eager forward packs again).
//
// Header-only: used by the CPU kernels and the CUDA launchers alike.

#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

namespace mixda_fast {

// If ts[0..K) are contiguous tensors of one dtype and one trailing shape (their first sizes may
// differ) that lie back to back in one storage (ts[k] starts where ts[k-1] ends), a contiguous
// view (sum of their first sizes, trailing shape...) over all of them; ts[0] itself for K == 1;
// otherwise nullopt.
inline std::optional<at::Tensor> packed_rows(at::TensorList ts) {
  const size_t K = ts.size();
  if (K == 0 || !ts[0].defined() || ts[0].dim() < 1 || !ts[0].is_contiguous() ||
      !ts[0].has_storage()) {
    return std::nullopt;
  }
  if (K == 1) return ts[0];
  const at::Tensor& t0 = ts[0];
  const auto trailing = t0.sizes().slice(1);
  int64_t rows = t0.size(0), next = t0.storage_offset() + t0.numel();
  for (size_t k = 1; k < K; ++k) {
    const at::Tensor& t = ts[k];
    if (!t.defined() || !t.has_storage() || !t.is_contiguous() || t.dim() != t0.dim() ||
        t.sizes().slice(1) != trailing || t.scalar_type() != t0.scalar_type() ||
        t.device() != t0.device() || !t.storage().is_alias_of(t0.storage()) ||
        t.storage_offset() != next) {
      return std::nullopt;
    }
    rows += t.size(0);
    next += t.numel();
  }
  std::vector<int64_t> sizes(t0.sizes().begin(), t0.sizes().end());
  sizes[0] = rows;
  std::vector<int64_t> strides(sizes.size(), 1);
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) {
    strides[d] = strides[d + 1] * sizes[d + 1];
  }
  return t0.as_strided(sizes, strides, t0.storage_offset());
}

// [w2 | wdown_1..K] (and [b2 | bdown_1..K]) as one (D + K r, F) matrix and (D + K r) vector when
// the layer packed the host's second projection with the adapters (MixDAFFN.pack_adapters: BERT-
// style hosts with a bias, adapters reading h); nullopt otherwise.
inline std::optional<std::pair<at::Tensor, at::Tensor>> packed_with_w2(
    const at::Tensor& w2, const std::optional<at::Tensor>& b2, at::TensorList wdown,
    at::TensorList bdown) {
  if (!b2.has_value()) return std::nullopt;
  std::vector<at::Tensor> ws{w2}, bs{*b2};
  ws.insert(ws.end(), wdown.begin(), wdown.end());
  bs.insert(bs.end(), bdown.begin(), bdown.end());
  auto w = packed_rows(ws);
  auto b = w.has_value() ? packed_rows(bs) : std::nullopt;
  if (!b.has_value()) return std::nullopt;
  return std::make_pair(*w, *b);
}

}  // namespace mixda_fast
