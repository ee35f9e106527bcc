// CUDA losses (CPU twins in loss.cpp): cross_entropy over [N, C] or [N, T, C] logits, mse, bce_with_logits.
// Per-row values are computed on the device and summed there in a fixed order (kernels.h), so the returned loss is
// deterministic; forward and evaluate block to return it, as the CPU's do (PyTorch's loss.item()).
#include <fmt/format.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "lib/common/error.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/loss_grad.h"
#include "lib/nn/cuda_impl.h"
#include "lib/nn/device.h"
#include "lib/nn/loss.h"
#include "lib/nn/loss_impl.h"

namespace dtrain::nn::cuda {
namespace {

namespace k = gpu::kernels;

constexpr int32_t kNoRow = std::numeric_limits<int32_t>::max();

void checkOnDevice(const TensorView& v, Device device, const char* what) {
  DTRAIN_CHECK(v.device == device, "loss {} is on {}, but the loss runs on {}", what, v.device.str(), device.str());
}

void checkOutput(const TensorView& output, const Shape& perSample, int maxBatch) {
  DTRAIN_CHECK(output.dtype == DType::kFloat32 && output.shape.rank() >= 1 && output.shape.dropFirst() == perSample,
               "loss input is {} {}, expected float32 {}", dtypeName(output.dtype), output.shape.str(),
               perSample.batchStr());
  DTRAIN_CHECK(output.shape[0] >= 1 && output.shape[0] <= maxBatch, "loss batch {} outside [1, {}]", output.shape[0],
               maxBatch);
}

// Memory: the gradient backward() returns is the forward's diff (softmax - onehot, output - target, ...) scaled in
// place, not a second buffer of the output's size: at GPT-2-small shape (batch 8, T 1024, vocabulary 50257) that is
// 1.65 GB less. So each forward allows one backward (the trainer's and the pipeline's use); a second one throws.
void takeDiff(int lastBatch, bool& taken) {
  DTRAIN_CHECK(lastBatch > 0, "loss backward called before forward");
  DTRAIN_CHECK(!taken, "loss backward called twice for one forward (a CUDA loss scales its diff in place)");
  taken = true;
}

// Device scratch: per-row doubles and ints, the bad-row flag and the reduction partials, carved from one buffer.
struct Scratch {
  Scratch(size_t rows, Device device)
      : memory(2 * rows + rows + 2 + 2 * k::kReduceBlocks + 8, device),
        rowValue(reinterpret_cast<double*>(memory.data())),
        rowCorrect(reinterpret_cast<int32_t*>(memory.data() + 2 * rows)),
        badRow(reinterpret_cast<int32_t*>(memory.data() + 3 * rows)),
        // 8-byte aligned: cudaMalloc's base is 256-aligned and the offset is rounded to an even float count.
        partials(reinterpret_cast<double*>(memory.data() + ((3 * rows + 2 + 1) & ~size_t{1}))) {}
  DeviceFloats memory;
  double* rowValue;
  int32_t* rowCorrect;
  int32_t* badRow;
  double* partials;
};

// With a bf16 gradient (Loss::create's gradType, "precision": "bf16": the model's last layer reads it only as a bf16
// GEMM operand and its backward ignores its output) forward keeps no diff, only each row's maximum and sum (2 floats
// per row) and where the logits and labels are; backward recomputes softmax - onehot from them, scales it and writes
// it rounded to bf16 in one pass over the logits themselves (kernels::crossEntropyGradBf16InPlace, loss_grad.h: row
// r's gradient in the first half of row r's bytes, leading dimension 2 x classes): the bits the float32 path's GEMM
// converted its operand to. At GPT-2-small shape that is no buffer at all instead of the 1.65 GB float32 diff (and
// the 0.82 GB bf16 buffer 4071a74 wrote it to), and lm_head's GEMMs no longer round an 0.82 GB copy. The logits and
// labels must be unchanged between forward and backward (the model's output stays valid until its next forward;
// the batch's labels until the next batch), and backward consumes the logits: they are the gradient afterwards.
class CrossEntropy final : public Loss {
 public:
  CrossEntropy(const Shape& outputShape, int maxBatch, Device device, bool bf16Grad)
      : Loss(LossType::kCrossEntropy, outputShape, maxBatch, device),
        positions_(outputShape.rank() == 2 ? outputShape[0] : 1), classes_(outputShape.back()),
        diffDev_(bf16Grad ? 0 : static_cast<size_t>(maxBatch) * static_cast<size_t>(outputShape.numel()), device),
        rowStats_(bf16Grad ? static_cast<size_t>(gpu::kCrossEntropyStats * maxBatch * positions_) : 0, device),
        scratch_(static_cast<size_t>(maxBatch * positions_), device) {
    detail::checkCrossEntropyOutput(outputShape);
    if (bf16Grad) gradType_ = DType::kBFloat16;
  }

  void checkTargets(const Shape& perSample, DType dtype) const override {
    detail::checkCrossEntropyTargets(outputShape_, perSample, dtype);
  }

  float forward(const TensorView& output, const TensorView& targets) override {
    const int64_t n = rowsOf(output, targets);
    const bool bf16 = gradType_ == DType::kBFloat16;
    run(output, targets, n, bf16 ? nullptr : diffDev_.data(), bf16 ? rowStats_.data() : nullptr);
    lastBatch_ = static_cast<int>(output.shape[0]);
    diffTaken_ = false;
    logits_ = static_cast<float*>(output.data);
    labels_ = targets.data;
    labels64_ = targets.dtype == DType::kInt64;
    return static_cast<float>(k::sumDoubles(scratch_.rowValue, static_cast<size_t>(n), scratch_.partials) /
                              static_cast<double>(n));
  }

  TensorView backward(float scale) override {
    takeDiff(lastBatch_, diffTaken_);
    const int64_t count = lastBatch_ * outputShape_.numel();
    const float factor = scale / static_cast<float>(static_cast<int64_t>(lastBatch_) * positions_);
    if (gradType_ == DType::kBFloat16) {
      k::crossEntropyGradBf16InPlace(logits_, labels_, labels64_, lastBatch_ * positions_, classes_, rowStats_.data(),
                                     factor);
      return {logits_, outputShape_.withBatch(lastBatch_), DType::kBFloat16, device_, gpu::crossEntropyGradLd(classes_)};
    }
    k::scale(diffDev_.data(), diffDev_.data(), static_cast<size_t>(count), factor);
    return TensorView::of(diffDev_.data(), outputShape_.withBatch(lastBatch_), device_);
  }

  EvalSums evaluate(const TensorView& output, const TensorView& targets) const override {
    const int64_t n = rowsOf(output, targets);
    run(output, targets, n, nullptr, nullptr);
    EvalSums s;
    s.lossSum = k::sumDoubles(scratch_.rowValue, static_cast<size_t>(n), scratch_.partials);
    s.lossCount = n;
    s.samples = n;
    s.correct = k::sumInts(scratch_.rowCorrect, static_cast<size_t>(n), scratch_.partials);
    return s;
  }

 private:
  int64_t rowsOf(const TensorView& output, const TensorView& targets) const {
    checkOutput(output, outputShape_, maxBatch_);
    checkOnDevice(output, device_, "input");
    checkOnDevice(targets, device_, "labels");
    const int64_t n = output.shape[0] * positions_;
    DTRAIN_CHECK(targets.dtype == DType::kInt32 || targets.dtype == DType::kInt64,
                 "cross_entropy labels are {}, expected int32 or int64", dtypeName(targets.dtype));
    DTRAIN_CHECK(targets.numel() == n, "cross_entropy got {} labels for a batch of {}", targets.numel(), n);
    return n;
  }

  // Per-row losses, correct flags, (diff != nullptr) softmax - onehot and (stats != nullptr) the rows' maximum and
  // sum; a label outside [0, C) is the CPU's ConfigError, naming it.
  void run(const TensorView& output, const TensorView& targets, int64_t n, float* diff, float* stats) const {
    const bool labels64 = targets.dtype == DType::kInt64;
    copyBytes(scratch_.badRow, device_, &kNoRow, Device::cpu(), sizeof(kNoRow));
    k::crossEntropyRows(static_cast<const float*>(output.data), targets.data, labels64, n, classes_, diff,
                        scratch_.rowValue, scratch_.rowCorrect, scratch_.badRow, stats);
    const int32_t bad = k::readInt(scratch_.badRow);
    if (bad == kNoRow) return;
    int64_t label = 0;
    if (labels64) {
      copyBytes(&label, Device::cpu(), static_cast<const int64_t*>(targets.data) + bad, device_, sizeof(label));
    } else {
      int32_t l32 = 0;
      copyBytes(&l32, Device::cpu(), static_cast<const int32_t*>(targets.data) + bad, device_, sizeof(l32));
      label = l32;
    }
    throw ConfigError(fmt::format("label {} of batch row {} is outside [0, {}) (the model has {} outputs)", label, bad,
                                  classes_, classes_));
  }

  int64_t positions_, classes_;
  DeviceFloats diffDev_;  // float32 gradient: the last forward's diff, scaled in place into the gradient by backward
  DeviceFloats rowStats_;  // bf16 gradient: the last forward's row maxima and sums (loss_grad.h)
  float* logits_ = nullptr;  // bf16 gradient: the last forward's logits (overwritten by backward) and labels
  const void* labels_ = nullptr;
  bool labels64_ = false;
  bool diffTaken_ = false;
  mutable Scratch scratch_;
};

class Mse final : public Loss {
 public:
  Mse(const Shape& outputShape, int maxBatch, Device device)
      : Loss(LossType::kMse, outputShape, maxBatch, device),
        diffDev_(static_cast<size_t>(maxBatch) * static_cast<size_t>(outputShape.numel()), device),
        scratch_(diffDev_.size(), device) {}

  void checkTargets(const Shape& perSample, DType dtype) const override {
    detail::checkMseTargets(outputShape_, perSample, dtype);
  }

  float forward(const TensorView& output, const TensorView& targets) override {
    const size_t count = countOf(output, targets);
    k::mseRows(static_cast<const float*>(output.data), static_cast<const float*>(targets.data), diffDev_.data(),
               scratch_.rowValue, count);
    lastBatch_ = static_cast<int>(output.shape[0]);
    diffTaken_ = false;
    return static_cast<float>(k::sumDoubles(scratch_.rowValue, count, scratch_.partials) / static_cast<double>(count));
  }

  TensorView backward(float scale) override {
    takeDiff(lastBatch_, diffTaken_);
    const int64_t count = lastBatch_ * outputShape_.numel();
    k::scale(diffDev_.data(), diffDev_.data(), static_cast<size_t>(count), 2.0f * scale / static_cast<float>(count));
    return TensorView::of(diffDev_.data(), outputShape_.withBatch(lastBatch_), device_);
  }

  EvalSums evaluate(const TensorView& output, const TensorView& targets) const override {
    const size_t count = countOf(output, targets);
    k::mseRows(static_cast<const float*>(output.data), static_cast<const float*>(targets.data), nullptr,
               scratch_.rowValue, count);
    EvalSums s;
    s.lossSum = k::sumDoubles(scratch_.rowValue, count, scratch_.partials);
    s.lossCount = static_cast<int64_t>(count);
    s.samples = output.shape[0];
    return s;
  }

 private:
  size_t countOf(const TensorView& output, const TensorView& targets) const {
    checkOutput(output, outputShape_, maxBatch_);
    checkOnDevice(output, device_, "input");
    checkOnDevice(targets, device_, "targets");
    DTRAIN_CHECK(targets.dtype == DType::kFloat32 && targets.numel() == output.numel(),
                 "mse targets are {} {}, expected float32 with the output's {} values", dtypeName(targets.dtype),
                 targets.shape.str(), output.numel());
    return static_cast<size_t>(output.numel());
  }

  DeviceFloats diffDev_;  // the last forward's diff, scaled in place into the gradient by backward
  bool diffTaken_ = false;
  mutable Scratch scratch_;
};

// nn.BCEWithLogitsLoss (mean), loss.cpp's BceWithLogits: one logit per sample; 0/1 int32/int64 labels or float32
// targets in [0, 1]. Per-sample values in double on the device, summed in a fixed order; evaluate() also fills the
// AUC histograms (integer counts: exact). A target outside its domain is the CPU's ConfigError, naming it.
class BceWithLogits final : public Loss {
 public:
  BceWithLogits(const Shape& outputShape, int maxBatch, Device device)
      : Loss(LossType::kBceWithLogits, outputShape, maxBatch, device), diffDev_(static_cast<size_t>(maxBatch), device),
        scratch_(diffDev_.size(), device), hist_(2 * kAucBins, device) {
    detail::checkBceOutput(outputShape);
  }

  void checkTargets(const Shape& perSample, DType dtype) const override { detail::checkBceTargets(perSample, dtype); }

  float forward(const TensorView& output, const TensorView& targets) override {
    const size_t n = run(output, targets, diffDev_.data(), nullptr);
    lastBatch_ = static_cast<int>(n);
    diffTaken_ = false;
    return static_cast<float>(k::sumDoubles(scratch_.rowValue, n, scratch_.partials) / static_cast<double>(n));
  }

  TensorView backward(float scale) override {
    takeDiff(lastBatch_, diffTaken_);
    k::scale(diffDev_.data(), diffDev_.data(), static_cast<size_t>(lastBatch_), scale / static_cast<float>(lastBatch_));
    return TensorView::of(diffDev_.data(), outputShape_.withBatch(lastBatch_), device_);
  }

  EvalSums evaluate(const TensorView& output, const TensorView& targets) const override {
    int32_t* hist = reinterpret_cast<int32_t*>(hist_.data());
    k::fill(hist_.data(), hist_.size(), 0.0f);  // all-zero bits: int32 0
    const size_t n = run(output, targets, nullptr, hist);
    EvalSums s;
    s.lossSum = k::sumDoubles(scratch_.rowValue, n, scratch_.partials);
    s.correct = k::sumInts(scratch_.rowCorrect, n, scratch_.partials);
    s.lossCount = s.samples = static_cast<int64_t>(n);
    std::vector<int32_t> counts(2 * kAucBins);
    copyBytes(counts.data(), Device::cpu(), hist, device_, counts.size() * sizeof(int32_t));
    s.aucHist.assign(counts.begin(), counts.end());
    return s;
  }

 private:
  // Per-sample losses (and diff, or the correct flags and histograms when hist != nullptr); returns the batch.
  size_t run(const TensorView& output, const TensorView& targets, float* diff, int32_t* hist) const {
    checkOutput(output, outputShape_, maxBatch_);
    checkOnDevice(output, device_, "input");
    checkOnDevice(targets, device_, "targets");
    const int64_t n = output.shape[0];
    DTRAIN_CHECK(targets.numel() == n, "bce_with_logits got {} targets for a batch of {}", targets.numel(), n);
    DTRAIN_CHECK(targets.dtype == DType::kFloat32 || targets.dtype == DType::kInt32 || targets.dtype == DType::kInt64,
                 "bce_with_logits targets are {}, expected float32, int32 or int64", dtypeName(targets.dtype));
    const k::TargetKind kind = targets.dtype == DType::kFloat32 ? k::TargetKind::kFloat32
                               : targets.dtype == DType::kInt64 ? k::TargetKind::kInt64
                                                                : k::TargetKind::kInt32;
    copyBytes(scratch_.badRow, device_, &kNoRow, Device::cpu(), sizeof(kNoRow));
    k::bceWithLogitsRows(static_cast<const float*>(output.data), targets.data, kind, static_cast<size_t>(n), diff,
                         scratch_.rowValue, hist != nullptr ? scratch_.rowCorrect : nullptr, hist, kAucBins,
                         scratch_.badRow);
    const int32_t bad = k::readInt(scratch_.badRow);
    if (bad != kNoRow) throwBadTarget(targets, bad);
    return static_cast<size_t>(n);
  }

  // The CPU's messages for the first bad target (loss.cpp BceWithLogits::target).
  [[noreturn]] void throwBadTarget(const TensorView& targets, int32_t row) const {
    if (targets.dtype == DType::kFloat32) {
      float t = 0;
      copyBytes(&t, Device::cpu(), static_cast<const float*>(targets.data) + row, device_, sizeof(t));
      DTRAIN_THROW(ConfigError, "bce_with_logits target {} outside [0, 1]", t);
    }
    int64_t label = 0;
    if (targets.dtype == DType::kInt64) {
      copyBytes(&label, Device::cpu(), static_cast<const int64_t*>(targets.data) + row, device_, sizeof(label));
    } else {
      int32_t l32 = 0;
      copyBytes(&l32, Device::cpu(), static_cast<const int32_t*>(targets.data) + row, device_, sizeof(l32));
      label = l32;
    }
    DTRAIN_THROW(ConfigError, "bce_with_logits label {} (expected 0 or 1)", label);
  }

  DeviceFloats diffDev_;  // the last forward's diff, scaled in place into the gradient by backward
  bool diffTaken_ = false;
  mutable Scratch scratch_;
  mutable DeviceFloats hist_;  // 2 x kAucBins int32 counts: positives' bins, then negatives'
};

}  // namespace

std::unique_ptr<Loss> makeLoss(const LossSpec& spec, const Shape& outputShape, int maxBatch, Device device,
                               DType gradType) {
  if (spec.type == LossType::kCrossEntropy)
    return std::make_unique<CrossEntropy>(outputShape, maxBatch, device,
                                          gradType == DType::kBFloat16 && givesBf16Gradient(spec.type, device));
  if (spec.type == LossType::kMse) return std::make_unique<Mse>(outputShape, maxBatch, device);
  if (spec.type == LossType::kBceWithLogits) return std::make_unique<BceWithLogits>(outputShape, maxBatch, device);
  DTRAIN_THROW(NotBuiltError, "device {}: loss '{}' has no CUDA implementation", device.str(), lossTypeName(spec.type));
}

}  // namespace dtrain::nn::cuda
