// Counter-based dropout masks for the gate MLP (csrc/cpu/gate_mlp.cpp): Philox4x32-10
// (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the generator of
// cuRAND, JAX and torch's CUDA RNG). Whether element e of a layer's (N, W) activation is kept
// is a pure function of (seed, layer, e), so
//   - the backward recomputes a mask instead of storing it,
//   - the result is the same for any thread count, block split or device, and
//   - mixda_fast/ops/reference.py (philox4x32_10, dropout_keep) reproduces the masks bit for bit.
//
// Element e uses word e % 4 of philox(counter = (lo32(e / 4), hi32(e / 4), layer, 0),
// key = (lo32(seed), hi32(seed))), and is kept when that word >= dropout_threshold(p):
// probability 1 - p up to 2^-32. Kept elements are scaled by 1 / (1 - p), as nn.Dropout does.
//
// Header-only and __host__ __device__: used by the CPU kernel and the CUDA kernel alike.

#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MIXDA_HD __host__ __device__ __forceinline__
#else
#define MIXDA_HD inline __attribute__((always_inline))
#endif

namespace mixda_fast {

struct Philox4 {
  uint32_t w[4];
};

// Philox4x32 with 10 rounds (Random123's philox4x32_R(10, ctr, key)); known answer:
// counter 0, key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
MIXDA_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return {{c0, c1, c2, c3}};
}

// Words >= this are kept: floor(p * 2^32), for 0 <= p < 1.
MIXDA_HD uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// The 4 keep decisions of elements 4 b .. 4 b + 3 of layer `layer` (bit j: element 4 b + j kept).
MIXDA_HD uint32_t dropout_keep4(uint64_t seed, int64_t layer, uint64_t b, uint32_t threshold) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32),
                                  static_cast<uint32_t>(layer), 0u, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  return static_cast<uint32_t>(r.w[0] >= threshold) | static_cast<uint32_t>(r.w[1] >= threshold) << 1 |
         static_cast<uint32_t>(r.w[2] >= threshold) << 2 | static_cast<uint32_t>(r.w[3] >= threshold) << 3;
}

}  // namespace mixda_fast
