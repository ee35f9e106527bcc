// Internal to lib/nn: the Eigen types the CPU layers compute with, and the per-family layer factories that
// makeLayer dispatches to. Only lib/nn/*.cpp include this; no Eigen type leaves lib/nn.
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

std::unique_ptr<Layer> makeLayerNorm(const LayerSpec& spec, int maxBatch);
std::unique_ptr<Layer> makeConv2d(const LayerSpec& spec);
std::unique_ptr<Layer> makeMaxPool2d(const LayerSpec& spec, int maxBatch);

}  // namespace dtrain::nn::detail
