// Internal to lib/nn: how the CPU dropout layers draw their masks, as plain host functions, so the CUDA layers
// (lib/nn/cuda/layers_spatial.cpp, layers_gpt.cpp) draw the very same masks on the host and copy them to the device:
// GPU masks equal the CPU's bit for bit (CPU <-> GPU parity, bitwise resume). tests/gpu/test_gpu_window.cpp checks
// them against the CPU layers without a GPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>

#include "lib/gpu/dropout_bits.h"

namespace dtrain::nn::detail {

// splitmix64 of a seed and a small integer (layers_dense.cpp): a layer's stream is seeded mixSeed(seed, index).
uint64_t mixSeed(uint64_t seed, uint64_t salt);

// One uniform draw in [0, 1) with 24 random bits: an element is kept when it is >= p.
inline double dropoutUniform(std::mt19937_64& engine) { return static_cast<double>(engine() >> 40) * 0x1.0p-24; }

// The dropout layer (layers_dense.cpp Dropout): n draws in order; mask[i] = scale where kept, 0 where dropped.
inline void drawDropoutMask(std::mt19937_64& engine, double p, float scale, size_t n, float* mask) {
  for (size_t i = 0; i < n; ++i) mask[i] = dropoutUniform(engine) >= p ? scale : 0.0f;
}

// Attention dropout (layers_attention.cpp dropRow) over `matrices` causal [t, t] probability matrices (sample-major,
// then head): one draw per element (i, j <= i) in the CPU's order (matrix, row i, column j); mask = 1 / (1 - p)
// (rounded to float, as the CPU) where kept, 0 where dropped and above the diagonal.
inline void drawCausalDropoutMask(std::mt19937_64& engine, double p, int64_t matrices, int64_t t, float* mask) {
  const float keep = 1.0f / static_cast<float>(1.0 - p);
  for (int64_t m = 0; m < matrices; ++m) {
    for (int64_t i = 0; i < t; ++i) {
      float* row = mask + (m * t + i) * t;
      for (int64_t j = 0; j <= i; ++j) row[j] = dropoutUniform(engine) >= p ? keep : 0.0f;
      std::fill(row + i + 1, row + t, 0.0f);
    }
  }
}

// The same draws, in the same order, packed as lib/gpu/dropout_bits.h's bits (set: kept) instead of floats: what the
// CUDA attention copies to the device (1/32 of the float mask's bytes). bits holds gpu::maskWords(matrices * t * t)
// words, overwritten (the bits above the diagonal are 0).
inline void drawCausalDropoutBits(std::mt19937_64& engine, double p, int64_t matrices, int64_t t, uint32_t* bits) {
  const size_t n = static_cast<size_t>(matrices * t * t);
  std::fill(bits, bits + gpu::maskWords(n), 0u);
  for (int64_t m = 0; m < matrices; ++m) {
    for (int64_t i = 0; i < t; ++i) {
      const size_t row = static_cast<size_t>((m * t + i) * t);
      for (int64_t j = 0; j <= i; ++j)  // branch-free: the draws are random, a branch would mispredict
        gpu::maskSet(bits, row + static_cast<size_t>(j), dropoutUniform(engine) >= p);
    }
  }
}

}  // namespace dtrain::nn::detail
