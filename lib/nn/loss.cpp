#include "lib/nn/loss.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "lib/common/error.h"
#include "lib/common/json_fields.h"
#include "lib/nn/cuda_impl.h"
#include "lib/nn/loss_impl.h"
#include "lib/nn/registry.h"

namespace dtrain::nn {

namespace detail {

void checkCrossEntropyOutput(const Shape& outputShape) {
  if (outputShape.rank() != 1 && outputShape.rank() != 2) {
    throw ConfigError(fmt::format("cross_entropy expects model output [N, C] (class logits) or [N, T, C] (logits per "
                                  "position) but the model gives {}",
                                  outputShape.batchStr()));
  }
}

void checkCrossEntropyTargets(const Shape& outputShape, const Shape& perSample, DType dtype) {
  const bool ints = dtype == DType::kInt32 || dtype == DType::kInt64;
  if (outputShape.rank() == 2) {
    const int64_t positions = outputShape[0];
    if (!ints || perSample.numel() != positions || perSample.rank() != 1) {
      throw ConfigError(fmt::format("cross_entropy over {} positions needs {} integer labels per sample ([N, {}]), "
                                    "but the labels are {} {}",
                                    positions, positions, positions, dtypeName(dtype), perSample.batchStr()));
    }
    return;
  }
  if (!ints || perSample.numel() != 1 || perSample.rank() > 1) {
    throw ConfigError(fmt::format("cross_entropy needs one integer class label per sample, but the labels are {} {}",
                                  dtypeName(dtype), perSample.batchStr()));
  }
}

void checkMseTargets(const Shape& outputShape, const Shape& perSample, DType dtype) {
  if (dtype != DType::kFloat32 || perSample.numel() != outputShape.numel()) {
    throw ConfigError(fmt::format("mse needs float32 targets shaped like the model output {}, but the targets are "
                                  "{} {}",
                                  outputShape.batchStr(), dtypeName(dtype), perSample.batchStr()));
  }
}

void checkBceOutput(const Shape& outputShape) {
  if (outputShape.numel() != 1)
    throw ConfigError(fmt::format("bce_with_logits expects one logit per sample (model output [N, 1]) but the model "
                                  "gives {}",
                                  outputShape.batchStr()));
}

void checkBceTargets(const Shape& perSample, DType dtype) {
  const bool ok = (dtype == DType::kInt32 || dtype == DType::kInt64 || dtype == DType::kFloat32) &&
                  perSample.numel() == 1 && perSample.rank() <= 1;
  if (!ok)
    throw ConfigError(fmt::format("bce_with_logits needs one 0/1 label (or float target) per sample, but the labels "
                                  "are {} {}",
                                  dtypeName(dtype), perSample.batchStr()));
}

}  // namespace detail

namespace {

void checkOutput(const TensorView& output, const Shape& perSample, int maxBatch) {
  DTRAIN_CHECK(output.dtype == DType::kFloat32 && output.shape.rank() >= 1 && output.shape.dropFirst() == perSample,
               "loss input is {} {}, expected float32 {}", dtypeName(output.dtype), output.shape.str(),
               perSample.batchStr());
  DTRAIN_CHECK(output.shape[0] >= 1 && output.shape[0] <= maxBatch, "loss batch {} outside [1, {}]", output.shape[0],
               maxBatch);
}

int64_t labelAt(const TensorView& labels, int64_t row) {
  return labels.dtype == DType::kInt64 ? labels.i64()[row] : labels.i32()[row];
}

void checkLabels(const TensorView& labels, int64_t batch) {
  DTRAIN_CHECK(labels.dtype == DType::kInt32 || labels.dtype == DType::kInt64,
               "cross_entropy labels are {}, expected int32 or int64", dtypeName(labels.dtype));
  DTRAIN_CHECK(labels.numel() == batch, "cross_entropy got {} labels for a batch of {}", labels.numel(), batch);
}

// log-sum-exp of one row of logits, shifted by its maximum for stability (as log_softmax).
struct RowStats {
  float max;
  float logSum;  // log(sum(exp(x - max)))
};

RowStats rowStats(const float* x, int64_t c) {
  float m = x[0];
  for (int64_t j = 1; j < c; ++j) m = std::max(m, x[j]);
  float s = 0.0f;
  for (int64_t j = 0; j < c; ++j) s += std::exp(x[j] - m);
  return {m, std::log(s)};
}

class CrossEntropy final : public Loss {
 public:
  // Logits [C] per sample (one label each), or [T, C] (a sequence: one label per position, the mean over all
  // N * T positions, as F.cross_entropy on logits.view(-1, C) in nanoGPT).
  CrossEntropy(const Shape& outputShape, int maxBatch)
      : Loss(LossType::kCrossEntropy, outputShape, maxBatch),
        positions_(outputShape.rank() == 2 ? outputShape[0] : 1), classes_(outputShape.back()) {
    detail::checkCrossEntropyOutput(outputShape);
  }

  void checkTargets(const Shape& perSample, DType dtype) const override {
    detail::checkCrossEntropyTargets(outputShape_, perSample, dtype);
  }

  float forward(const TensorView& output, const TensorView& targets) override {
    checkOutput(output, outputShape_, maxBatch_);
    const int64_t n = output.shape[0] * positions_, c = classes_;
    checkLabels(targets, n);
    const float* x = output.f32();
    float* d = diff_.data();
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t label = checkedLabel(targets, i, c);
      const float* row = x + i * c;
      float* drow = d + i * c;
      // One exp per logit: the shifted exponentials are kept and normalised in place.
      float m = row[0];
      for (int64_t j = 1; j < c; ++j) m = std::max(m, row[j]);
      float total = 0.0f;
      for (int64_t j = 0; j < c; ++j) {
        drow[j] = std::exp(row[j] - m);
        total += drow[j];
      }
      sum += static_cast<double>(m + std::log(total) - row[label]);
      const float inv = 1.0f / total;
      for (int64_t j = 0; j < c; ++j) drow[j] *= inv;
      drow[label] -= 1.0f;
    }
    lastBatch_ = static_cast<int>(output.shape[0]);
    return static_cast<float>(sum / static_cast<double>(n));
  }

  TensorView backward(float scale) override {
    return scaledGrad(scale / static_cast<float>(static_cast<int64_t>(lastBatch_) * positions_));
  }

  EvalSums evaluate(const TensorView& output, const TensorView& targets) const override {
    checkOutput(output, outputShape_, maxBatch_);
    const int64_t n = output.shape[0] * positions_, c = classes_;
    checkLabels(targets, n);
    EvalSums s;
    const float* x = output.f32();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t label = checkedLabel(targets, i, c);
      RowStats st = rowStats(x + i * c, c);
      s.lossSum += static_cast<double>(st.max + st.logSum - x[i * c + label]);
    }
    s.lossCount = n;
    s.samples = n;  // positions: accuracy is per predicted token for sequences
    s.correct = countCorrect(TensorView::f32(output.f32(), Shape{n, c}), targets);
    return s;
  }

 private:
  int64_t positions_, classes_;

  static int64_t checkedLabel(const TensorView& labels, int64_t row, int64_t classes) {
    int64_t label = labelAt(labels, row);
    if (label < 0 || label >= classes) [[unlikely]] {
      throw ConfigError(fmt::format("label {} of batch row {} is outside [0, {}) (the model has {} outputs)", label,
                                    row, classes, classes));
    }
    return label;
  }

  TensorView scaledGrad(float factor) {
    const int64_t count = lastBatch_ * outputShape_.numel();
    DTRAIN_CHECK(lastBatch_ > 0, "loss backward called before forward");
    for (int64_t i = 0; i < count; ++i) grad_.data()[i] = diff_.data()[i] * factor;
    return TensorView::of(grad_.data(), outputShape_.withBatch(lastBatch_), device_);
  }
};

class Mse final : public Loss {
 public:
  Mse(const Shape& outputShape, int maxBatch) : Loss(LossType::kMse, outputShape, maxBatch) {}

  void checkTargets(const Shape& perSample, DType dtype) const override {
    detail::checkMseTargets(outputShape_, perSample, dtype);
  }

  float forward(const TensorView& output, const TensorView& targets) override {
    checkOutput(output, outputShape_, maxBatch_);
    const int64_t count = checkTargetView(output, targets);
    const float* y = output.f32();
    const float* t = targets.f32();
    double sum = 0.0;
    for (int64_t i = 0; i < count; ++i) {
      const float d = y[i] - t[i];
      diff_.data()[i] = d;
      sum += static_cast<double>(d) * static_cast<double>(d);
    }
    lastBatch_ = static_cast<int>(output.shape[0]);
    return static_cast<float>(sum / static_cast<double>(count));
  }

  // d/dy mean((y - t)^2) = 2 (y - t) / count.
  TensorView backward(float scale) override {
    DTRAIN_CHECK(lastBatch_ > 0, "loss backward called before forward");
    const int64_t count = lastBatch_ * outputShape_.numel();
    const float factor = 2.0f * scale / static_cast<float>(count);
    for (int64_t i = 0; i < count; ++i) grad_.data()[i] = diff_.data()[i] * factor;
    return TensorView::of(grad_.data(), outputShape_.withBatch(lastBatch_), device_);
  }

  EvalSums evaluate(const TensorView& output, const TensorView& targets) const override {
    checkOutput(output, outputShape_, maxBatch_);
    const int64_t count = checkTargetView(output, targets);
    EvalSums s;
    const float* y = output.f32();
    const float* t = targets.f32();
    for (int64_t i = 0; i < count; ++i) {
      const double d = static_cast<double>(y[i] - t[i]);
      s.lossSum += d * d;
    }
    s.lossCount = count;
    s.samples = output.shape[0];
    return s;
  }

 private:
  static int64_t checkTargetView(const TensorView& output, const TensorView& targets) {
    DTRAIN_CHECK(targets.dtype == DType::kFloat32 && targets.numel() == output.numel(),
                 "mse targets are {} {}, expected float32 with the output's {} values", dtypeName(targets.dtype),
                 targets.shape.str(), output.numel());
    return output.numel();
  }
};

// nn.BCEWithLogitsLoss (mean): per sample max(x, 0) - x t + log(1 + exp(-|x|)) (the stable form); the gradient is
// (sigmoid(x) - t) / N. Targets: one 0/1 class label per sample (int32/int64), or a float32 target in [0, 1].
class BceWithLogits final : public Loss {
 public:
  BceWithLogits(const Shape& outputShape, int maxBatch) : Loss(LossType::kBceWithLogits, outputShape, maxBatch) {
    detail::checkBceOutput(outputShape);
  }

  void checkTargets(const Shape& perSample, DType dtype) const override { detail::checkBceTargets(perSample, dtype); }

  float forward(const TensorView& output, const TensorView& targets) override {
    checkOutput(output, outputShape_, maxBatch_);
    const int64_t n = output.shape[0];
    const float* x = output.f32();
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double t = target(targets, i, n);
      sum += lossOf(x[i], t);
      diff_.data()[i] = static_cast<float>(sigmoid(x[i]) - t);
    }
    lastBatch_ = static_cast<int>(n);
    return static_cast<float>(sum / static_cast<double>(n));
  }

  TensorView backward(float scale) override {
    DTRAIN_CHECK(lastBatch_ > 0, "loss backward called before forward");
    const float factor = scale / static_cast<float>(lastBatch_);
    for (int64_t i = 0; i < lastBatch_; ++i) grad_.data()[i] = diff_.data()[i] * factor;
    return TensorView::of(grad_.data(), outputShape_.withBatch(lastBatch_), device_);
  }

  EvalSums evaluate(const TensorView& output, const TensorView& targets) const override {
    checkOutput(output, outputShape_, maxBatch_);
    const int64_t n = output.shape[0];
    const float* x = output.f32();
    EvalSums s;
    s.aucHist.assign(2 * kAucBins, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const double t = target(targets, i, n);
      s.lossSum += lossOf(x[i], t);
      const bool positive = t >= 0.5;
      s.correct += (x[i] > 0) == positive ? 1 : 0;
      s.aucHist[static_cast<size_t>((positive ? 0 : kAucBins) + aucBin(sigmoid(x[i])))] += 1;
    }
    s.lossCount = s.samples = n;
    return s;
  }

 private:
  static double sigmoid(float x) { return 1.0 / (1.0 + std::exp(-static_cast<double>(x))); }
  // The AUC bin of a sigmoid in [0, 1]: floor(s * kAucBins), the last bin closed. A NaN logit (a diverged model)
  // goes to bin 0: converting NaN to an integer is undefined (x86 gives INT64_MIN, which indexed the histogram far
  // out of bounds). The CUDA loss (lib/gpu/kernels_nn.cu bceKernel) bins the same way.
  static int64_t aucBin(double s) {
    const double scaled = s * kAucBins;
    if (!(scaled >= 1.0)) return 0;  // also NaN
    return scaled < kAucBins - 1 ? static_cast<int64_t>(scaled) : kAucBins - 1;
  }
  static double lossOf(float x, double t) {
    const double v = x;
    return std::max(v, 0.0) - v * t + std::log1p(std::exp(-std::abs(v)));
  }
  static double target(const TensorView& targets, int64_t i, int64_t n) {
    DTRAIN_CHECK(targets.numel() == n, "bce_with_logits got {} targets for a batch of {}", targets.numel(), n);
    if (targets.dtype == DType::kFloat32) {
      const float t = targets.f32()[i];
      DTRAIN_CHECK_AS(ConfigError, t >= 0 && t <= 1, "bce_with_logits target {} outside [0, 1]", t);
      return t;
    }
    const int64_t label = labelAt(targets, i);
    DTRAIN_CHECK_AS(ConfigError, label == 0 || label == 1, "bce_with_logits label {} (expected 0 or 1)", label);
    return static_cast<double>(label);
  }
};

}  // namespace

Loss::Loss(LossType type, const Shape& outputShape, int maxBatch, Device device)
    : type_(type), device_(device), outputShape_(outputShape), maxBatch_(maxBatch) {
  DTRAIN_CHECK_AS(ConfigError, maxBatch >= 1, "maximum batch size must be >= 1, got {}", maxBatch);
  // The CPU losses' buffers; a CUDA loss keeps its own on the device.
  if (device.isCpu()) {
    diff_ = AlignedBuffer<float>(static_cast<size_t>(maxBatch) * static_cast<size_t>(outputShape.numel()));
    grad_ = AlignedBuffer<float>(static_cast<size_t>(maxBatch) * static_cast<size_t>(outputShape.numel()));
  }
}

bool givesBf16Gradient(LossType type, Device device) noexcept {
  return device.isCuda() && type == LossType::kCrossEntropy;
}

std::unique_ptr<Loss> Loss::create(const LossSpec& spec, const Shape& outputShape, int maxBatch, Device device,
                                   DType gradType) {
  DTRAIN_CHECK(gradType == DType::kFloat32 || gradType == DType::kBFloat16,
               "loss gradient dtype {} (expected float32 or bfloat16)", dtypeName(gradType));
  if (device.isCuda()) {
    std::unique_ptr<Loss> (*factory)(const LossSpec&, const Shape&, int, Device, DType) = DTRAIN_NN_CUDA(makeLoss);
    if (factory == nullptr) requireCpu(device, fmt::format("loss '{}'", lossTypeName(spec.type)));
    return factory(spec, outputShape, maxBatch, device, gradType);
  }
  if (spec.type == LossType::kCrossEntropy) return std::make_unique<CrossEntropy>(outputShape, maxBatch);
  if (spec.type == LossType::kBceWithLogits) return std::make_unique<BceWithLogits>(outputShape, maxBatch);
  return std::make_unique<Mse>(outputShape, maxBatch);
}

const char* lossTypeName(LossType type) {
  switch (type) {
    case LossType::kCrossEntropy: return "cross_entropy";
    case LossType::kBceWithLogits: return "bce_with_logits";
    case LossType::kMse: return "mse";
  }
  return "?";
}

std::optional<double> aucFromHistogram(std::span<const double> hist) {
  DTRAIN_CHECK(hist.size() == 2 * kAucBins, "AUC histogram of {} bins (expected {})", hist.size(), 2 * kAucBins);
  const std::span<const double> pos = hist.first(kAucBins), neg = hist.subspan(kAucBins);
  const double p = std::accumulate(pos.begin(), pos.end(), 0.0), n = std::accumulate(neg.begin(), neg.end(), 0.0);
  if (p == 0 || n == 0) return std::nullopt;
  // Over the bins in ascending score: each positive beats the negatives of the lower bins, ties the same bin's.
  double below = 0, wins = 0;
  for (size_t b = 0; b < pos.size(); ++b) {
    wins += pos[b] * (below + 0.5 * neg[b]);
    below += neg[b];
  }
  return wins / (p * n);
}

std::optional<double> rocAuc(std::span<const double> scores, std::span<const int> labels) {
  DTRAIN_CHECK(scores.size() == labels.size(), "rocAuc: {} scores, {} labels", scores.size(), labels.size());
  std::vector<size_t> order(scores.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return scores[a] < scores[b]; });
  // Mann-Whitney U: the sum of the positives' (mid)ranks.
  double rankSum = 0, positives = 0;
  for (size_t i = 0; i < order.size();) {
    size_t j = i;
    while (j < order.size() && scores[order[j]] == scores[order[i]]) ++j;
    const double midRank = 0.5 * static_cast<double>(i + 1 + j);
    for (size_t k = i; k < j; ++k)
      if (labels[order[k]] != 0) rankSum += midRank, positives += 1;
    i = j;
  }
  const double negatives = static_cast<double>(scores.size()) - positives;
  if (positives == 0 || negatives == 0) return std::nullopt;
  return (rankSum - positives * (positives + 1) / 2) / (positives * negatives);
}

LossSpec parseLossSpec(const nlohmann::json& loss, const std::string& sourceFile, const std::string& jsonPathPrefix) {
  JsonFields f(loss, sourceFile, jsonPathPrefix, "the loss");
  f.allowOnly({"type"});
  std::string type = f.choice("type", {"cross_entropy", "mse", "bce_with_logits"}, "loss");
  if (type == "bce_with_logits") return {LossType::kBceWithLogits};
  return {type == "cross_entropy" ? LossType::kCrossEntropy : LossType::kMse};
}

int64_t countCorrect(const TensorView& logits, const TensorView& labels) {
  DTRAIN_CHECK(logits.dtype == DType::kFloat32 && logits.shape.rank() == 2, "countCorrect wants float32 [N, C] logits");
  const int64_t n = logits.shape[0], c = logits.shape[1];
  checkLabels(labels, n);
  const float* x = logits.f32();
  int64_t correct = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* row = x + i * c;
    int64_t best = 0;
    for (int64_t j = 1; j < c; ++j) {
      if (row[j] > row[best]) best = j;
    }
    correct += best == labelAt(labels, i) ? 1 : 0;
  }
  return correct;
}

}  // namespace dtrain::nn
