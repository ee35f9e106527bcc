// Internal to lib/nn: the Eigen types the CPU layers compute with and small helpers shared by the layer files.
// Only lib/nn/*.cpp include this; no Eigen type leaves lib/nn.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "lib/nn/layer.h"

namespace dtrain {
class JsonFields;
}  // namespace dtrain

namespace dtrain::nn::detail {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatMap = Eigen::Map<RowMat>;
using ConstMatMap = Eigen::Map<const RowMat>;
using ArrMap = Eigen::Map<Eigen::ArrayXf>;
using ConstArrMap = Eigen::Map<const Eigen::ArrayXf>;

// Mixes a seed with a small integer (layer index) into an independent-looking 64-bit seed (splitmix64).
uint64_t mixSeed(uint64_t seed, uint64_t salt);

// Range checks for JsonFields::integer.
inline bool positive(int64_t v) { return v >= 1; }
inline bool nonNegative(int64_t v) { return v >= 0; }
// Sizes (out, kernel, stride, padding, in) are bounded by kMaxSampleNumel so that no shape arithmetic can
// overflow (spec.h): ConfigError "<field>: 4294967296 is more than the supported 1073741824" past it.
void checkSizes(const JsonFields& f, std::string_view key, const std::vector<int64_t>& values);
// Draws a full [rows, cols] matrix from draw() in row-major order (the unsplit layer's initialisation stream) and
// keeps the block rows [r0, r0 + nr) x columns [c0, c0 + nc) in dst, row-major [nr, nc]: a tensor-parallel
// shard starts from exactly the unsplit layer's values.
template <class Draw>
void drawBlock(float* dst, int64_t rows, int64_t cols, int64_t r0, int64_t nr, int64_t c0, int64_t nc, Draw&& draw) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float v = draw();
      if (r >= r0 && r < r0 + nr && c >= c0 && c < c0 + nc) dst[(r - r0) * nc + (c - c0)] = v;
    }
}

// A transformer layer's "init_std"-style field: a number >= 0, 0 (the default) meaning PyTorch's initialisation.
// Throws ConfigError naming the field otherwise. (layers_gpt.cpp)
double initStdField(const JsonFields& f, std::string_view key);
// ConfigError unless the layer's input is a sequence [T, C] (per sample), naming `type`. (layers_gpt.cpp)
void requireSequence(const JsonFields& f, const LayerSpec& l, const char* type);

inline int64_t checkSize(const JsonFields& f, std::string_view key, int64_t value) {
  checkSizes(f, key, {value});
  return value;
}

}  // namespace dtrain::nn::detail
