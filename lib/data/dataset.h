// Datasets: a sample is a feature tensor (float32 after conversion) and a label (a class index or a float
// target vector). Implementations keep the file's raw bytes in memory (uint8 images stay uint8) and convert
// to float32 per batch in fetch(), applying the dataset's scale/normalisation: Fashion-MNIST's training set
// costs 47 MB per worker this way instead of 188 MB of floats.
//
// Thread-safety: a loaded Dataset is immutable; fetch() and every accessor may be called from several threads
// at once (the batch loader's prefetch thread runs beside the trainer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lib/common/tensor.h"
#include "lib/data/byte_buffer.h"

namespace dtrain::data {

// Shapes and element types are lib/common's (tensor.h); messages print shapes as Shape::spaced(),
// "[60000, 28, 28]", and element types as dtypeName(), "uint8". Raw arrays hold one of the types the readers
// produce: uint8, int8, int16, uint16, int32, int64, float32, float64.

// A dense C-order array as read from a file: shape[0] is the sample dimension.
struct RawArray {
  DType type = DType::kUInt8;
  Shape shape;
  ByteBuffer bytes;  // shape.numel() * dtypeSize(type), native byte order; empty when probed
  // Only the header was read (ReadMode::kHeader): shape and type are the file's, `bytes` is empty. A dataset
  // built on it answers every question about shapes, counts and labels but cannot fetch samples.
  bool probed = false;
  // The bytes are a read-only mapping of the data cache (formats.cpp), or - probed - would be once read: the
  // processes of a node that read the same file share its page-cache pages, so a memory estimate counts them once
  // per node, not once per worker (lib/train/check.h).
  bool shared = false;
};

enum class LabelKind : uint8_t {
  kClass,   // int32 class index per sample; fetch writes int32_t labels
  kTarget,  // float target tensor of labelShape() per sample; fetch writes float labels
};
const char* labelKindName(LabelKind kind);  // "class" / "target"
// The element type fetch() writes labels in: int32 for kClass, float32 for kTarget.
constexpr DType labelDType(LabelKind kind) { return kind == LabelKind::kClass ? DType::kInt32 : DType::kFloat32; }

class Dataset {
 public:
  virtual ~Dataset() = default;

  virtual int64_t size() const = 0;
  // Shape of one sample's features (without the sample dimension), e.g. [28, 28] or [1, 28, 28] for IDX.
  virtual const Shape& featureShape() const = 0;
  virtual LabelKind labelKind() const = 0;
  // Shape of one sample's label: [] for class labels, e.g. [1] for a scalar regression target.
  virtual const Shape& labelShape() const = 0;
  // Number of classes for class labels when known (given in the spec or max label + 1); nullopt for targets.
  virtual std::optional<int64_t> numClasses() const = 0;
  // Class names when the labels were strings in the file (CSV), index = class id; empty otherwise.
  virtual const std::vector<std::string>& classNames() const = 0;
  // One line for logs: "idx train-images-idx3-ubyte.gz: 60000 x [28, 28] uint8, 10 classes".
  virtual std::string describe() const = 0;

  // Converts the samples `indices` (each in [0, size())) into caller buffers: `features` receives
  // indices.size() * featureSize() floats, `labels` indices.size() * labelSize() int32_t (kClass: labelShape is []
  // for one class per sample, [T] for sequences) or
  // indices.size() * labelSize() floats (kTarget). Throws std::out_of_range naming a bad index.
  virtual void fetch(std::span<const int64_t> indices, float* features, void* labels) const = 0;

  int64_t featureSize() const { return featureShape().numel(); }
  int64_t labelSize() const { return labelShape().numel(); }
};

// Per-feature affine conversion applied in fetch(): out = raw * scale, then (out - mean) / std. mean/std have
// one value, one per channel (the first feature dimension when the shape has two or more), or one per feature.
struct Transform {
  double scale = 1.0;
  std::vector<double> mean;  // empty: no normalisation
  std::vector<double> std;
};

// Labels of an in-memory dataset, one of the two kinds.
struct Labels {
  LabelKind kind = LabelKind::kClass;
  std::vector<int32_t> classes;  // kClass: one per sample
  std::vector<float> targets;    // kTarget: shape.numel() per sample
  Shape shape;                   // kTarget: per-sample shape ([1] for a scalar)
  std::optional<int64_t> numClasses;
  std::vector<std::string> classNames;
};

// The one Dataset implementation every file format loads into: raw features plus labels.
// Throws ConfigError when the pieces disagree (label count != sample count, a class out of range, a
// transform whose mean/std length fits neither channels nor features); `origin` prefixes those messages.
class ArrayDataset final : public Dataset {
 public:
  ArrayDataset(RawArray features, Labels labels, Transform transform, std::string description,
               const std::string& origin = "");

  int64_t size() const override { return size_; }
  const Shape& featureShape() const override { return featureShape_; }
  LabelKind labelKind() const override { return labels_.kind; }
  const Shape& labelShape() const override { return labels_.shape; }
  std::optional<int64_t> numClasses() const override { return labels_.numClasses; }
  const std::vector<std::string>& classNames() const override { return labels_.classNames; }
  std::string describe() const override { return description_; }
  void fetch(std::span<const int64_t> indices, float* features, void* labels) const override;

  // Replaces the per-sample feature shape by one with the same number of elements (e.g. [784] -> [1,28,28]).
  void reshape(const Shape& featureShape, const std::string& origin);
  // Keeps only the first n samples (n <= size()); for smoke tests and quick runs.
  void truncate(int64_t n);
  DType rawType() const { return raw_.type; }
  // Bytes the features take in memory (for a probed dataset: what they would take once read).
  size_t rawBytes() const { return static_cast<size_t>(raw_.shape.numel()) * dtypeSize(raw_.type); }
  // The features are (or would be) mapped from the data cache and shared by a node's processes (RawArray::shared).
  bool rawShared() const { return raw_.shared; }

 private:
  void buildAffine(const std::string& origin);

  RawArray raw_;
  Labels labels_;
  Transform transform_;
  std::string description_;
  int64_t size_ = 0;
  Shape featureShape_;
  // out[j] = raw[j] * mul_[j] + add_[j]; identity_ skips the arithmetic when there is no transform.
  std::vector<float> mul_;
  std::vector<float> add_;
  bool identity_ = true;
};

}  // namespace dtrain::data
