// Compiled with -ffp-contract=off (lib/nn/CMakeLists.txt): PyTorch's CPU kernels do separate multiplies and
// adds, and fusing them into FMAs here would change the last bit of the updates.
#include "lib/nn/optimizer.h"

#include <algorithm>
#include <bit>

#include <fmt/format.h>

#include <cmath>

#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/nn/cuda_impl.h"
#include "lib/nn/registry.h"

namespace dtrain::nn {
namespace {

// torch.optim.SGD, _single_tensor_sgd:
//   d_p = grad + weight_decay * param
//   buf = d_p                                       (first step)
//   buf = momentum * buf + (1 - dampening) * d_p     (later steps)
//   d_p = d_p + momentum * buf  (nesterov)  or  d_p = buf
//   param = param - lr * d_p
class Sgd final : public Optimizer {
 public:
  Sgd(const OptimizerSpec& spec, size_t numParams)
      : Optimizer(spec, numParams), momentumBuffer_(spec.momentum != 0 ? numParams : 0) {}

  void step(std::span<float> params, std::span<const float> grads) override {
    checkSizes(params, grads);
    const float wd = static_cast<float>(spec_.weightDecay);
    const float momentum = static_cast<float>(spec_.momentum);
    const float keep = static_cast<float>(1.0 - spec_.dampening);
    const float negLr = static_cast<float>(-lr_);
    const bool first = steps_ == 0;
    const bool nesterov = spec_.nesterov;
    float* p = params.data();
    const float* g = grads.data();
    float* buf = momentumBuffer_.data();
    for (size_t i = 0; i < numParams_; ++i) {
      float d = g[i];
      if (wd != 0.0f) d = d + wd * p[i];
      if (momentum != 0.0f) {
        buf[i] = first ? d : buf[i] * momentum + keep * d;
        d = nesterov ? d + momentum * buf[i] : buf[i];
      }
      p[i] = p[i] + negLr * d;
    }
    ++steps_;
  }

  std::vector<StateBuffer> stateBuffers() override {
    if (momentumBuffer_.size() == 0) return {};
    return {{"momentum_buffer", momentumBuffer_.span()}};
  }

 private:
  AlignedBuffer<float> momentumBuffer_;
};

// torch.optim.Adam / AdamW, _single_tensor_adam(w):
//   AdamW: param = param * (1 - lr * weight_decay)        Adam: grad = grad + weight_decay * param
//   exp_avg = exp_avg * beta1 + (1 - beta1) * grad
//   exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
//   max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq)      (amsgrad; then used instead of exp_avg_sq)
//   denom = sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps
//   param = param + (-lr / (1 - beta1^step)) * exp_avg / denom
// Bias corrections are computed in double (Python floats in PyTorch) and rounded to float where used.
class Adam final : public Optimizer {
 public:
  Adam(const OptimizerSpec& spec, size_t numParams)
      : Optimizer(spec, numParams), expAvg_(numParams), expAvgSq_(numParams),
        maxExpAvgSq_(spec.amsgrad ? numParams : 0) {}

  void step(std::span<float> params, std::span<const float> grads) override {
    checkSizes(params, grads);
    if (updateGiven_) {
      givenStep(params, grads);
      return;
    }
    ++steps_;
    const double step = static_cast<double>(steps_);
    const double bc1 = 1.0 - std::pow(spec_.beta1, step);
    const double bc2 = 1.0 - std::pow(spec_.beta2, step);
    const bool decoupled = spec_.type == OptimizerType::kAdamW;
    const float decay = static_cast<float>(1.0 - lr_ * spec_.weightDecay);  // AdamW
    const float wd = static_cast<float>(spec_.weightDecay);                 // Adam (L2)
    const float beta1 = static_cast<float>(spec_.beta1), keep1 = static_cast<float>(1.0 - spec_.beta1);
    const float beta2 = static_cast<float>(spec_.beta2), keep2 = static_cast<float>(1.0 - spec_.beta2);
    const float negStepSize = static_cast<float>(-(lr_ / bc1));
    const float bc2Sqrt = static_cast<float>(std::sqrt(bc2));
    const float eps = static_cast<float>(spec_.eps);
    float* p = params.data();
    const float* g = grads.data();
    float* m = expAvg_.data();
    float* v = expAvgSq_.data();
    float* vmax = maxExpAvgSq_.data();
    // One elementwise pass per parameter group: segments in noDecay_ run with weight_decay 0.
    auto run = [&](size_t begin, size_t end, bool decayOn) {
      const bool applyDecay = decayOn && spec_.weightDecay != 0.0;
      for (size_t i = begin; i < end; ++i) {
        float grad = g[i];
        if (decoupled) {
          if (applyDecay) p[i] = p[i] * decay;
        } else if (applyDecay) {
          grad = grad + wd * p[i];
        }
        m[i] = m[i] * beta1 + keep1 * grad;
        v[i] = v[i] * beta2 + keep2 * grad * grad;
        float second = v[i];
        if (vmax != nullptr) {
          vmax[i] = std::max(vmax[i], v[i]);
          second = vmax[i];
        }
        const float denom = std::sqrt(second) / bc2Sqrt + eps;
        p[i] = p[i] + negStepSize * m[i] / denom;
      }
    };
    forEachDecaySegment(run);
  }

  std::vector<StateBuffer> stateBuffers() override {
    std::vector<StateBuffer> out{{"exp_avg", expAvg_.span()}, {"exp_avg_sq", expAvgSq_.span()}};
    if (maxExpAvgSq_.size() != 0) out.push_back({"max_exp_avg_sq", maxExpAvgSq_.span()});
    return out;
  }

 private:
  void setUpdateGiven(bool given) override { updateGiven_ = given; }

  // Efficient-Adam's server step (Optimizer::setUpdateGiven): the gradient is the averaged update
  // direction; param = param * (1 - lr x weight_decay) (AdamW), then param -= lr x direction. A separate loop, so
  // the plain one is unchanged.
  void givenStep(std::span<float> params, std::span<const float> grads) {
    ++steps_;
    const bool decoupled = spec_.type == OptimizerType::kAdamW;
    const float decay = static_cast<float>(1.0 - lr_ * spec_.weightDecay);
    const float negLr = static_cast<float>(-lr_);
    float* p = params.data();
    const float* g = grads.data();
    auto run = [&](size_t begin, size_t end, bool decayOn) {
      const bool applyDecay = decoupled && decayOn && spec_.weightDecay != 0.0;
      for (size_t i = begin; i < end; ++i) {
        if (applyDecay) p[i] = p[i] * decay;
        p[i] = p[i] + negLr * g[i];
      }
    };
    forEachDecaySegment(run);
  }

  AlignedBuffer<float> expAvg_, expAvgSq_, maxExpAvgSq_;
};

// torch.optim.Adagrad, _single_tensor_adagrad:
//   grad = grad + weight_decay * param;  clr = lr / (1 + (step - 1) * lr_decay)
//   sum = sum + grad * grad;  param = param - clr * grad / (sqrt(sum) + eps)
// (its sparse variant for embeddings on parameter servers is lib/train/ps_sparse.h's kAdagrad).
class Adagrad final : public Optimizer {
 public:
  Adagrad(const OptimizerSpec& spec, size_t numParams) : Optimizer(spec, numParams), sum_(numParams) {
    std::fill(sum_.data(), sum_.data() + numParams, static_cast<float>(spec.initialAccumulator));
  }

  void step(std::span<float> params, std::span<const float> grads) override {
    checkSizes(params, grads);
    ++steps_;
    const float negClr = static_cast<float>(-(lr_ / (1.0 + static_cast<double>(steps_ - 1) * spec_.lrDecay)));
    const float wd = static_cast<float>(spec_.weightDecay);
    const float eps = static_cast<float>(spec_.eps);
    float* p = params.data();
    const float* g = grads.data();
    float* sum = sum_.data();
    for (size_t i = 0; i < numParams_; ++i) {
      float grad = g[i];
      if (wd != 0.0f) grad = grad + wd * p[i];
      sum[i] = sum[i] + grad * grad;
      p[i] = p[i] + negClr * (grad / (std::sqrt(sum[i]) + eps));
    }
  }

  std::vector<StateBuffer> stateBuffers() override { return {{"sum", sum_.span()}}; }

 private:
  AlignedBuffer<float> sum_;
};

bool positiveNumber(double v) { return v > 0.0; }
bool nonNegativeNumber(double v) { return v >= 0.0; }
bool unitInterval(double v) { return v >= 0.0 && v <= 1.0; }
bool betaRange(double v) { return v >= 0.0 && v < 1.0; }

}  // namespace

const char* optimizerTypeName(OptimizerType type) {
  switch (type) {
    case OptimizerType::kSgd: return "sgd";
    case OptimizerType::kAdam: return "adam";
    case OptimizerType::kAdamW: return "adamw";
    case OptimizerType::kAdagrad: return "adagrad";
  }
  return "?";
}

void Optimizer::setUpdateGiven(bool given) {
  DTRAIN_CHECK(!given, "optimizer '{}' cannot take an update direction (local_adam): only Adam/AdamW do",
               optimizerTypeName(spec_.type));
}

void Optimizer::checkSizes(std::span<float> params, std::span<const float> grads) const {
  DTRAIN_CHECK(params.size() == numParams_ && grads.size() == numParams_,
               "optimizer built for {} parameters got {} parameters and {} gradients", numParams_, params.size(),
               grads.size());
}

std::unique_ptr<Optimizer> Optimizer::create(const OptimizerSpec& spec, size_t numParams, Device device) {
  if (device.isCuda()) {
    std::unique_ptr<Optimizer> (*factory)(const OptimizerSpec&, size_t, Device) = DTRAIN_NN_CUDA(makeOptimizer);
    if (factory == nullptr) requireCpu(device, fmt::format("optimizer '{}'", optimizerTypeName(spec.type)));
    return factory(spec, numParams, device);
  }
  if (spec.type == OptimizerType::kSgd) return std::make_unique<Sgd>(spec, numParams);
  if (spec.type == OptimizerType::kAdagrad) return std::make_unique<Adagrad>(spec, numParams);
  return std::make_unique<Adam>(spec, numParams);
}

OptimizerSpec parseOptimizerSpec(const nlohmann::json& optimizer, const std::string& sourceFile,
                                 const std::string& jsonPathPrefix) {
  JsonFields f(optimizer, sourceFile, jsonPathPrefix, "the optimizer");
  OptimizerSpec s;
  std::string type = f.choice("type", {"sgd", "adam", "adamw", "adagrad"}, "optimizer");
  const char* kClip = "clip_grad_norm";
  if (type == "sgd") {
    f.allowOnly({"type", "lr", "momentum", "dampening", "nesterov", "weight_decay", kClip});
    s.type = OptimizerType::kSgd;
    s.lr = f.number("lr", "a number > 0", positiveNumber);
    s.momentum = f.number("momentum", 0.0, "a number in [0, 1]", unitInterval);
    s.dampening = f.number("dampening", 0.0, "a number in [0, 1]", unitInterval);
    s.nesterov = f.boolean("nesterov", false);
    s.weightDecay = f.number("weight_decay", 0.0, "a number >= 0", nonNegativeNumber);
    // torch.optim.SGD raises the same.
    if (s.nesterov && (s.momentum <= 0.0 || s.dampening != 0.0)) {
      f.failAt("nesterov", "nesterov momentum requires a momentum > 0 and zero dampening");
    }
  } else if (type == "adagrad") {
    f.allowOnly({"type", "lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", kClip});
    s.type = OptimizerType::kAdagrad;
    s.lr = f.number("lr", 1e-2, "a number > 0", positiveNumber);
    s.lrDecay = f.number("lr_decay", 0.0, "a number >= 0", nonNegativeNumber);
    s.weightDecay = f.number("weight_decay", 0.0, "a number >= 0", nonNegativeNumber);
    s.initialAccumulator = f.number("initial_accumulator_value", 0.0, "a number >= 0", nonNegativeNumber);
    s.eps = f.number("eps", 1e-10, "a number > 0", positiveNumber);
  } else {
    f.allowOnly({"type", "lr", "betas", "eps", "weight_decay", "amsgrad", "weight_decay_on", kClip});
    s.type = type == "adam" ? OptimizerType::kAdam : OptimizerType::kAdamW;
    s.lr = f.number("lr", 1e-3, "a number > 0", positiveNumber);
    if (f.has("betas")) {
      const auto& betas = f.at("betas");
      if (!betas.is_array() || betas.size() != 2 || !betas[0].is_number() || !betas[1].is_number() ||
          !betaRange(betas[0].get<double>()) || !betaRange(betas[1].get<double>())) {
        f.failAt("betas",
                 fmt::format("expected two numbers in [0, 1) such as [0.9, 0.999], got {}", jsonSnippet(betas)));
      }
      s.beta1 = betas[0].get<double>();
      s.beta2 = betas[1].get<double>();
    }
    s.eps = f.number("eps", 1e-8, "a number > 0", positiveNumber);
    s.weightDecay = f.number("weight_decay", s.type == OptimizerType::kAdamW ? 1e-2 : 0.0, "a number >= 0",
                             nonNegativeNumber);
    s.amsgrad = f.boolean("amsgrad", false);
    s.decayMatricesOnly = f.choice("weight_decay_on", {"all", "matrices"}, "weight_decay_on value", "all") == "matrices";
  }
  s.clipGradNorm = f.number(kClip, 0.0, "a number >= 0 (0 turns clipping off)", nonNegativeNumber);
  return s;
}

float gradNorm(std::span<const float> grads) {
  double sum = 0.0;
  for (float g : grads) sum += static_cast<double>(g) * static_cast<double>(g);
  return static_cast<float>(std::sqrt(sum));
}

bool allFinite(std::span<const float> values) {
  // A float is NaN or +-inf exactly when its exponent bits are all ones. The largest exponent field over the
  // span is an integer max reduction, which the compiler vectorises (a float sum would be one serial add
  // chain: it cost ~15% of the main job's step time when run over the gradients and weights every step).
  constexpr uint32_t kExponent = 0x7f800000u;
  uint32_t widest = 0;
  for (float v : values) widest = std::max(widest, std::bit_cast<uint32_t>(v) & kExponent);
  return widest != kExponent;
}

float clipGradNorm(std::span<float> grads, double maxNorm) {
  const float norm = gradNorm(grads);
  // PyTorch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1 (a factor of 1 changes nothing).
  const float coef = static_cast<float>(maxNorm / (static_cast<double>(norm) + 1e-6));
  if (coef < 1.0f) {
    for (float& g : grads) g *= coef;
  }
  return norm;
}

}  // namespace dtrain::nn
