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

// A CUDA layer that takes over the residual add of the in-place block before it (the block's fuseWithNext, by
// nn::residualAddFusesInto; docs/gpu.md "Fused residual + LayerNorm"): the layernorm, or a block whose first child is
// a layernorm (it hands the add to that child). *residual is the previous block's x of its last forward; that block
// then leaves f (its last child's output) in its output y, and this layer's forward, given that y as its x (the
// block: its first child, given that x first, before anything else reads it), makes it x + f in place (the previous
// block's full output, which later readers of that buffer and every backward see) and then normalises it. Returns
// false, taking nothing, when this layer cannot take it. Called once at build; the pair runs in order.
class ResidualAddTaker {
 public:
  virtual bool takeResidualAdd(const float* const* residual) = 0;

 protected:
  ~ResidualAddTaker() = default;
};

// A CUDA layer whose backward can add a residual's gradient into its dx as it stores it (llm.c's layernorm_backward,
// which accumulates into dinp; docs/gpu.md "Fused residual gradient + LayerNorm backward"): the layernorm, as a
// block's first child (the block's dx = dy + that child's dx). backwardAddingGrad is Layer::backward (x, y, dy, dx,
// batch, accumulate as there) with dx = the child's input gradient + residualGrad, the same bits as backward and then
// kernels::add(residualGrad, dx, dx); residualGrad has dx's shape and is neither dx nor dy; dx is not null.
class ResidualGradTaker {
 public:
  virtual void backwardAddingGrad(const float* x, const float* y, const float* dy, const float* residualGrad,
                                  float* dx, int batch, bool accumulate) = 0;

 protected:
  ~ResidualGradTaker() = default;
};

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

std::unique_ptr<Loss> makeLoss(const LossSpec& spec, const Shape& outputShape, int maxBatch, Device device,
                               DType gradType);
std::unique_ptr<Optimizer> makeOptimizer(const OptimizerSpec& spec, size_t numParams, Device device);

}  // namespace cuda
}  // namespace dtrain::nn
