// Internal to lib/nn: the Eigen types the CPU layers compute with and small helpers shared by the layer files.
// Only lib/nn/*.cpp include this; no Eigen type leaves lib/nn.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <memory>

#include "lib/nn/layer.h"

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

}  // namespace dtrain::nn::detail
