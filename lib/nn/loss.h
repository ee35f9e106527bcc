// Losses: cross_entropy (integer class labels, mean over the batch; PyTorch's nn.CrossEntropyLoss on logits),
// mse (float targets shaped like the output, mean over all elements; nn.MSELoss) and bce_with_logits (one logit
// per sample, a 0/1 label or a float target in [0, 1]; nn.BCEWithLogitsLoss, mean over the batch), whose
// evaluation also gives the ROC AUC (a click model's usual figure).
//
//   auto loss = Loss::create(parseLossSpec(job["loss"], "job.json", "/loss"), model.outputShape(), maxBatch);
//   float l = loss->forward(out, labels);      // labels: TensorView::i64(ptr, Shape{batch}) (or i32)
//   model.backward(loss->backward());          // d(mean loss)/d(output)
//
// A GPU model whose last layer reads the gradient of its output only as a bf16 GEMM operand (lm_head under
// "precision": "bf16") asks for it in bf16: create the loss with model.outputGradType(), and backward() then returns
// a bfloat16 view where the loss can give one (givesBf16Gradient; gradType() says what it returns).
//
// For evaluation across ranks, evaluate() returns sums (loss sum, element count, correct predictions) that
// add up over ranks and batches: eval_loss = sum(lossSum) / sum(lossCount), accuracy = sum(correct) /
// sum(samples). A Loss keeps the gradient buffer of the last forward (sized once for maxBatch).
// Not thread-safe.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lib/common/aligned_buffer.h"
#include "lib/common/tensor.h"

namespace dtrain::nn {

enum class LossType { kCrossEntropy, kMse, kBceWithLogits };

struct LossSpec {
  LossType type = LossType::kCrossEntropy;
};

// {"type": "cross_entropy"} or {"type": "mse"}; errors name the file and JSON path (ConfigError).
LossSpec parseLossSpec(const nlohmann::json& loss, const std::string& sourceFile,
                       const std::string& jsonPathPrefix = "/loss");
const char* lossTypeName(LossType type);
// Whether a loss of `type` on `device` returns its gradient as bf16 when created with gradType kBFloat16:
// cross_entropy on a GPU (it writes the rounded gradient directly, over its input logits, lib/gpu/loss_grad.h).
// Others return float32.
// Loss::create and dtrain check's memory estimate both follow it.
bool givesBf16Gradient(LossType type, Device device) noexcept;

// bce_with_logits: the ROC AUC from histograms of sigmoid(logit) over kAucBins equal bins of [0, 1], one for the
// positive and one for the negative samples. Histograms add up over batches and ranks (a sum all-reduce), which
// a list of scores would not; pairs in the same bin count one half (a tie), so the AUC is exact up to the bins'
// width (1/4096).
inline constexpr int kAucBins = 4096;

struct EvalSums {
  double lossSum = 0;     // sum of per-sample losses (cross_entropy) or of squared errors (mse)
  int64_t lossCount = 0;  // what lossSum divides by for the mean: samples, or elements for mse
  int64_t correct = 0;    // argmax == label (cross_entropy), (logit > 0) == label (bce_with_logits)
  int64_t samples = 0;
  std::vector<double> aucHist;  // bce_with_logits: positives' bins then negatives' (2 x kAucBins); else empty

  EvalSums& operator+=(const EvalSums& o) {
    lossSum += o.lossSum, lossCount += o.lossCount, correct += o.correct, samples += o.samples;
    if (aucHist.size() < o.aucHist.size()) aucHist.resize(o.aucHist.size(), 0.0);
    for (size_t i = 0; i < o.aucHist.size(); ++i) aucHist[i] += o.aucHist[i];
    return *this;
  }
  double meanLoss() const { return lossCount > 0 ? lossSum / static_cast<double>(lossCount) : 0.0; }
  double accuracy() const { return samples > 0 ? static_cast<double>(correct) / static_cast<double>(samples) : 0.0; }
};

class Loss {
 public:
  // outputShape: the model's per-sample output shape. Throws ConfigError when the loss cannot apply to it
  // (cross_entropy needs logits of shape [C]).
  // Its buffers live on `device`, and forward/evaluate then take device views (output and targets) and backward
  // returns one: NotBuiltError for cuda in a build without CUDA. forward and evaluate block (they return sums).
  // gradType: the dtype the caller would like backward() to return (a model's outputGradType()): kFloat32, or
  // kBFloat16, which the loss honours where givesBf16Gradient(spec.type, device) (else float32; gradType() says).
  // A bf16 gradient is d(scale * loss)/d(output) computed in float32 and rounded to nearest even (kernels::toBf16's
  // rounding): the values a bf16 GEMM would convert the float32 gradient to. The loss value stays float32.
  static std::unique_ptr<Loss> create(const LossSpec& spec, const Shape& outputShape, int maxBatch,
                                      Device device = Device::cpu(), DType gradType = DType::kFloat32);
  virtual ~Loss() = default;

  LossType type() const noexcept { return type_; }
  Device device() const noexcept { return device_; }
  // The dtype of backward()'s view: kFloat32, or kBFloat16 (2-byte values) when created so (see create).
  DType gradType() const noexcept { return gradType_; }
  // Whether evaluate() counts correct predictions (classification).
  bool hasAccuracy() const noexcept { return type_ != LossType::kMse; }
  // Whether evaluate() fills EvalSums::aucHist (bce_with_logits).
  bool hasAuc() const noexcept { return type_ == LossType::kBceWithLogits; }
  // Checks at setup that targets of this per-sample shape and dtype fit (ConfigError naming both), so the
  // training loop never meets a mismatch: cross_entropy wants one int32/int64 label per sample (shape [] or
  // [1]), mse wants float32 with as many values per sample as the output (e.g. [] or [1] for an output [1]).
  virtual void checkTargets(const Shape& perSampleShape, DType dtype) const = 0;

  // The mean loss over the batch (output is [batch, ...]); keeps d(loss)/d(output) for backward().
  // A label outside [0, C) throws ConfigError.
  virtual float forward(const TensorView& output, const TensorView& targets) = 0;
  // d(scale * loss)/d(output) of the last forward; scale = 1/k when accumulating k micro-batches; of gradType().
  // The view stays valid until the next forward. A bf16 gradient is recomputed from the forward's output and
  // targets, which must be unchanged until then, and is written over that output (GPU cross_entropy,
  // kernels::crossEntropyGradBf16InPlace): the view points at the output's memory, row r's gradient in the first
  // half of row r's float32 bytes, so its ld (TensorView::ld) is 2 x classes, and the output no longer holds the
  // logits afterwards. A caller asking for bf16 (a model's outputGradType(): its last layer's backward ignores its
  // output) passes the model's own output to forward and reads the gradient with that stride. A float32 gradient
  // is packed (ld 0).
  virtual TensorView backward(float scale = 1.0f) = 0;
  // Sums for evaluation; needs no backward and keeps no state.
  virtual EvalSums evaluate(const TensorView& output, const TensorView& targets) const = 0;

 protected:
  // CPU losses get diff_ and grad_ (maxBatch * outputShape.numel() floats); other devices keep their own.
  Loss(LossType type, const Shape& outputShape, int maxBatch, Device device = Device::cpu());

  LossType type_;
  Device device_;  // where the buffers (and the views forward/backward take and return) live
  DType gradType_ = DType::kFloat32;  // what backward() returns (a device loss sets kBFloat16 when it gives that)
  Shape outputShape_;
  int maxBatch_;
  AlignedBuffer<float> diff_;  // maxBatch * outputShape.numel(): softmax - onehot, or output - target
  AlignedBuffer<float> grad_;  // what backward() returns: diff_ scaled to d(scale * mean loss)/d(output)
  int lastBatch_ = 0;
};

// The ROC AUC of EvalSums::aucHist (positives' bins, then negatives'): the probability that a random positive
// scores above a random negative, ties one half. nullopt when either class is absent.
std::optional<double> aucFromHistogram(std::span<const double> hist);
// The exact ROC AUC of scores against 0/1 labels (ties one half, by ranks): baselines and tests.
std::optional<double> rocAuc(std::span<const double> scores, std::span<const int> labels);

// Number of rows whose argmax (first maximum, as torch.argmax) equals the label. logits [N, C]; labels [N].
int64_t countCorrect(const TensorView& logits, const TensorView& labels);

}  // namespace dtrain::nn
