// CUDA optimizers (CPU twins in optimizer.cpp): sgd, adam, adamw and adagrad with the same torch.optim update rules,
// one fused elementwise kernel per parameter group over the device arena (lib/gpu/kernels_optim.cu, compiled
// without FMA contraction so the updates round like the CPU's). State lives on the device; checkpoints read and
// write it through host copies (hostStateBuffers / commitHostState).
#include <algorithm>
#include <cmath>

#include "lib/common/error.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/optim_math.h"
#include "lib/nn/cuda_impl.h"
#include "lib/nn/device.h"
#include "lib/nn/optimizer.h"

namespace dtrain::nn::cuda {
namespace {

namespace k = gpu::kernels;

// Device state buffers with host mirrors for checkpoints.
class DeviceState {
 public:
  void add(std::string name, size_t count, Device device) {
    names_.push_back(std::move(name));
    device_.emplace_back(count, device);
    host_.emplace_back();
  }
  float* data(size_t i) { return device_[i].data(); }
  std::vector<StateBuffer> deviceBuffers() {
    std::vector<StateBuffer> out;
    for (size_t i = 0; i < names_.size(); ++i) out.push_back({names_[i], device_[i].span()});
    return out;
  }
  std::vector<StateBuffer> hostBuffers() {
    std::vector<StateBuffer> out;
    for (size_t i = 0; i < names_.size(); ++i) {
      if (host_[i].size() != device_[i].size()) host_[i] = AlignedBuffer<float>(device_[i].size());
      copyBytes(host_[i].data(), Device::cpu(), device_[i].data(), device_[i].device(), device_[i].size() * sizeof(float));
      out.push_back({names_[i], host_[i].span()});
    }
    return out;
  }
  void commitHost() {
    for (size_t i = 0; i < names_.size(); ++i) {
      if (host_[i].size() != device_[i].size()) continue;  // never staged: nothing to upload
      copyBytes(device_[i].data(), device_[i].device(), host_[i].data(), Device::cpu(), device_[i].size() * sizeof(float));
    }
  }

 private:
  std::vector<std::string> names_;
  std::vector<DeviceFloats> device_;
  std::vector<AlignedBuffer<float>> host_;
};

class Sgd final : public Optimizer {
 public:
  Sgd(const OptimizerSpec& spec, size_t numParams, Device device) : Optimizer(spec, numParams) {
    if (spec.momentum != 0) state_.add("momentum_buffer", numParams, device);
  }

  void step(std::span<float> params, std::span<const float> grads) override {
    checkSizes(params, grads);
    const k::SgdStep s =
        gpu::sgdStepFor(lr_, spec_.momentum, spec_.dampening, spec_.nesterov, spec_.weightDecay, steps_ == 0);
    k::sgdStep(params.data(), grads.data(), spec_.momentum != 0 ? state_.data(0) : nullptr, numParams_, s);
    ++steps_;
  }

  std::vector<StateBuffer> stateBuffers() override { return state_.deviceBuffers(); }
  std::vector<StateBuffer> hostStateBuffers() override { return state_.hostBuffers(); }
  void commitHostState() override { state_.commitHost(); }

 private:
  DeviceState state_;
};

class Adam final : public Optimizer {
 public:
  Adam(const OptimizerSpec& spec, size_t numParams, Device device) : Optimizer(spec, numParams) {
    state_.add("exp_avg", numParams, device);
    state_.add("exp_avg_sq", numParams, device);
    if (spec.amsgrad) state_.add("max_exp_avg_sq", numParams, device);
  }

  void step(std::span<float> params, std::span<const float> grads) override {
    checkSizes(params, grads);
    if (updateGiven_) {
      givenStep(params, grads);
      return;
    }
    ++steps_;
    k::AdamStep s = gpu::adamStepFor(spec_.type == OptimizerType::kAdamW, lr_, spec_.beta1, spec_.beta2, spec_.eps,
                                     spec_.weightDecay, steps_);
    float* vmax = spec_.amsgrad ? state_.data(2) : nullptr;
    // One launch per parameter group segment: segments in noDecay_ run with weight_decay 0 (as optimizer.cpp).
    auto run = [&](size_t begin, size_t end, bool decayOn) {
      if (end <= begin) return;
      s.applyDecay = decayOn && spec_.weightDecay != 0.0;
      k::adamStep(params.data() + begin, grads.data() + begin, state_.data(0) + begin, state_.data(1) + begin,
                  vmax != nullptr ? vmax + begin : nullptr, end - begin, s);
    };
    forEachDecaySegment(run);
  }

  std::vector<StateBuffer> stateBuffers() override { return state_.deviceBuffers(); }
  std::vector<StateBuffer> hostStateBuffers() override { return state_.hostBuffers(); }
  void commitHostState() override { state_.commitHost(); }

 private:
  void setUpdateGiven(bool given) override { updateGiven_ = given; }

  // top-k's local_adam (Efficient-Adam's server step, optimizer.cpp's givenStep): the gradient is the averaged
  // update direction; param = param * (1 - lr x weight_decay) (AdamW, per decay segment), then param -= lr x
  // direction; the moments stay as they are. The same two roundings as the CPU loop: the decay by the scale
  // kernel (one multiply), the step by the SGD kernel without momentum or weight decay (p + negLr x g, no FMA).
  void givenStep(std::span<float> params, std::span<const float> grads) {
    ++steps_;
    const bool decoupled = spec_.type == OptimizerType::kAdamW;
    const auto decay = static_cast<float>(1.0 - lr_ * spec_.weightDecay);
    k::SgdStep s;
    s.negLr = static_cast<float>(-lr_);
    auto run = [&](size_t begin, size_t end, bool decayOn) {
      if (end <= begin) return;
      if (decoupled && decayOn && spec_.weightDecay != 0.0) k::scale(params.data() + begin, params.data() + begin, end - begin, decay);
      k::sgdStep(params.data() + begin, grads.data() + begin, nullptr, end - begin, s);
    };
    forEachDecaySegment(run);
  }

  DeviceState state_;
};

// torch.optim.Adagrad (optimizer.cpp's Adagrad): one state buffer "sum", filled with initial_accumulator_value;
// weight decay applies to every parameter (Adagrad has no parameter groups here, as on the CPU).
class Adagrad final : public Optimizer {
 public:
  Adagrad(const OptimizerSpec& spec, size_t numParams, Device device) : Optimizer(spec, numParams) {
    state_.add("sum", numParams, device);
    if (spec.initialAccumulator != 0) k::fill(state_.data(0), numParams, static_cast<float>(spec.initialAccumulator));
  }

  void step(std::span<float> params, std::span<const float> grads) override {
    checkSizes(params, grads);
    ++steps_;
    const k::AdagradStep s = gpu::adagradStepFor(lr_, spec_.lrDecay, steps_, spec_.weightDecay, spec_.eps);
    k::adagradStep(params.data(), grads.data(), state_.data(0), numParams_, s);
  }

  std::vector<StateBuffer> stateBuffers() override { return state_.deviceBuffers(); }
  std::vector<StateBuffer> hostStateBuffers() override { return state_.hostBuffers(); }
  void commitHostState() override { state_.commitHost(); }

 private:
  DeviceState state_;
};

}  // namespace

std::unique_ptr<Optimizer> makeOptimizer(const OptimizerSpec& spec, size_t numParams, Device device) {
  if (spec.type == OptimizerType::kSgd) return std::make_unique<Sgd>(spec, numParams, device);
  if (spec.type == OptimizerType::kAdam || spec.type == OptimizerType::kAdamW)
    return std::make_unique<Adam>(spec, numParams, device);
  if (spec.type == OptimizerType::kAdagrad) return std::make_unique<Adagrad>(spec, numParams, device);
  DTRAIN_THROW(NotBuiltError, "device {}: optimizer '{}' has no CUDA implementation", device.str(),
               optimizerTypeName(spec.type));
}

}  // namespace dtrain::nn::cuda
