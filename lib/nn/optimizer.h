// Optimizers with torch.optim's update rules (PyTorch 1.13, single-tensor path), over the flat arenas.
//
// SGD, Adam and AdamW update every element of the parameter arena the way torch.optim updates each parameter
// tensor, with the same float32 operation order, so the same weights and gradients give the same result
// (up to how the compiler vectorises float ops). Each update is elementwise, so one pass over the arena equals
// PyTorch's loop over parameters; all parameters share one step count since they all step together.
//
// State (momentum_buffer; exp_avg, exp_avg_sq, max_exp_avg_sq) lives in arenas parallel to the parameters
// (same offsets as Model::paramTable()), exposed as named buffers so a checkpoint can save and restore them
// bit-exactly, together with steps(). SGD's first step copies the gradient into the momentum buffer, as torch
// does when the buffer is still None; steps() == 0 plays the role of "None".
//
// Learning-rate schedules set the rate per step with setLr(). Gradient clipping is clipGradNorm().
// Not thread-safe.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "lib/common/aligned_buffer.h"
#include "lib/common/tensor.h"

namespace dtrain::nn {

enum class OptimizerType { kSgd, kAdam, kAdamW, kAdagrad };
const char* optimizerTypeName(OptimizerType type);

// Defaults are torch.optim's: SGD(momentum=0, dampening=0, nesterov=False, weight_decay=0), Adam(lr=1e-3,
// betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False), AdamW(same, weight_decay=1e-2), Adagrad(lr=1e-2,
// lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10).
struct OptimizerSpec {
  OptimizerType type = OptimizerType::kSgd;
  double lr = 1e-3;
  double momentum = 0;
  double dampening = 0;
  bool nesterov = false;
  double weightDecay = 0;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  bool amsgrad = false;
  double lrDecay = 0;             // Adagrad
  double initialAccumulator = 0;  // Adagrad's initial_accumulator_value
  double clipGradNorm = 0;  // "clip_grad_norm": max global L2 norm of the gradients; 0 = no clipping
  // "weight_decay_on": "all" (torch.optim's default: every parameter) or "matrices" (nanoGPT's configure_optimizers:
  // parameters with >= 2 dimensions decay, biases, LayerNorm weights and other vectors do not). Adam/AdamW only.
  bool decayMatricesOnly = false;
};

// {"type": "sgd", "lr": 0.05, "momentum": 0.9, ...}; every error is a ConfigError naming file, JSON path and
// the expected values, e.g. "job.json: /optimizer/type: unknown optimizer 'sgdd' (expected sgd, adam, adamw,
// adagrad)".
// SGD requires "lr"; Adam/AdamW default it to 1e-3. Unknown fields are rejected.
OptimizerSpec parseOptimizerSpec(const nlohmann::json& optimizer, const std::string& sourceFile,
                                 const std::string& jsonPathPrefix = "/optimizer");

// A named optimizer state buffer, numParams floats parallel to the parameter arena.
struct StateBuffer {
  std::string name;  // "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"
  std::span<float> data;
};

class Optimizer {
 public:
  // Its state lives on `device`, beside the arenas it updates (step() then takes device spans): NotBuiltError
  // for cuda in a build without CUDA.
  static std::unique_ptr<Optimizer> create(const OptimizerSpec& spec, size_t numParams, Device device = Device::cpu());
  virtual ~Optimizer() = default;

  // One update of params from grads (both numParams floats). Throws dtrain::Error on a size mismatch.
  virtual void step(std::span<float> params, std::span<const float> grads) = 0;

  const OptimizerSpec& spec() const noexcept { return spec_; }
  double lr() const noexcept { return lr_; }
  void setLr(double lr) noexcept { lr_ = lr; }
  // Updates done so far (torch's state['step']); restore it together with the state buffers.
  int64_t steps() const noexcept { return steps_; }
  void setSteps(int64_t steps) noexcept { steps_ = steps; }
  // For top-k's "local_adam" (lib/train/compression.h), set by the trainer before each step from the compression
  // hook (whose step count checkpoints restore): `given` means the next step()'s gradient is already Adam's update
  // direction m_hat / (sqrt(v_hat) + eps), computed by every rank from its own gradients and averaged by the hook
  // (Efficient-Adam). Adam/AdamW then do param -= lr x grad (AdamW's decoupled weight decay still applies first),
  // leave exp_avg and exp_avg_sq as they are, and count the step. Other optimizers: Error for `given`. The CUDA Adam/AdamW do the same (lib/nn/cuda/optimizer.cpp).
  virtual void setUpdateGiven(bool given);
  bool updateGiven() const noexcept { return updateGiven_; }
  // The state arenas on the optimizer's device (device memory for cuda): write into the spans to restore. Empty
  // for plain SGD.
  virtual std::vector<StateBuffer> stateBuffers() = 0;
  // The same as host memory, for checkpoints: the arenas themselves on the CPU; for cuda a host copy made now
  // (blocking). After writing into these spans (a resume), commitHostState() copies them to the device.
  virtual std::vector<StateBuffer> hostStateBuffers() { return stateBuffers(); }
  virtual void commitHostState() {}
  // Arena ranges [offset, offset + count) that get no weight decay (a second parameter group with
  // weight_decay 0, as nanoGPT builds for 1-D parameters). Ranges must be sorted and disjoint.
  void setNoDecayRanges(std::vector<std::pair<size_t, size_t>> ranges) { noDecay_ = std::move(ranges); }

 protected:
  Optimizer(const OptimizerSpec& spec, size_t numParams) : spec_(spec), lr_(spec.lr), numParams_(numParams) {}
  void checkSizes(std::span<float> params, std::span<const float> grads) const;
  // Calls run(begin, end, decayOn) over [0, numParams_) in order, cut at the no-decay ranges (setNoDecayRanges):
  // decayOn is false inside them. Empty pieces are passed too (run skips them or loops zero times).
  template <typename Run>
  void forEachDecaySegment(Run&& run) const {
    size_t at = 0;
    for (const auto& [offset, count] : noDecay_) {
      run(at, std::min(offset, numParams_), true);
      run(std::min(offset, numParams_), std::min(offset + count, numParams_), false);
      at = std::min(offset + count, numParams_);
    }
    run(at, numParams_, true);
  }

  OptimizerSpec spec_;
  double lr_;
  size_t numParams_;
  int64_t steps_ = 0;
  bool updateGiven_ = false;
  std::vector<std::pair<size_t, size_t>> noDecay_;  // (offset, count), sorted
};

// torch.nn.utils.clip_grad_norm_(max_norm, norm_type=2): scales grads by max_norm / (norm + 1e-6) when that is
// below 1 and returns the global L2 norm before clipping (accumulated in double).
float clipGradNorm(std::span<float> grads, double maxNorm);
// The global L2 norm of the gradients, without clipping.
float gradNorm(std::span<const float> grads);
// True when no value is NaN or infinite (one pass, no early exit so it vectorises).
bool allFinite(std::span<const float> values);

}  // namespace dtrain::nn
