// Internal to lib/nn: the CUDA implementations' factories (lib/nn/cuda/*.cpp, compiled only when
// DTRAIN_WITH_CUDA), which the registry entries, Loss::create and Optimizer::create reach through
// DTRAIN_NN_CUDA(f): `&f` in a CUDA build, nullptr (no CUDA implementation) otherwise.
#pragma once

#include <cstddef>
#include <memory>

#include "lib/common/config.h"
#include "lib/nn/registry.h"

namespace dtrain::nn {

class Layer;
class Loss;
class Optimizer;
struct LossSpec;
struct OptimizerSpec;

#if DTRAIN_WITH_CUDA
#define DTRAIN_NN_CUDA(f) &::dtrain::nn::cuda::f
#else
#define DTRAIN_NN_CUDA(f) nullptr
#endif

namespace cuda {

// Layers: same spec, parameters (bound to device arenas) and math as the CPU ones; activations on the device.
std::unique_ptr<Layer> makeLinear(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeRelu(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeGelu(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeTanh(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeSigmoid(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeFlatten(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeLayerNorm(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeEmbedding(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeAttention(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeLmHead(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeBlock(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeConv2d(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeMaxPool2d(const LayerSpec& spec, const LayerBuild& build);
std::unique_ptr<Layer> makeDropout(const LayerSpec& spec, const LayerBuild& build);

std::unique_ptr<Loss> makeLoss(const LossSpec& spec, const Shape& outputShape, int maxBatch, Device device);
std::unique_ptr<Optimizer> makeOptimizer(const OptimizerSpec& spec, size_t numParams, Device device);

}  // namespace cuda
}  // namespace dtrain::nn
