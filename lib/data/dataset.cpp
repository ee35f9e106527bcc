#include "lib/data/dataset.h"

#include <fmt/format.h>

#include <cstring>
#include <stdexcept>

#include "lib/common/error.h"

namespace dtrain::data {

const char* labelKindName(LabelKind kind) { return kind == LabelKind::kClass ? "class" : "target"; }

namespace {

std::string prefixed(const std::string& origin, const std::string& message) {
  return origin.empty() ? message : origin + ": " + message;
}

// One sample's conversion, instantiated per raw element type so the inner loop vectorises.
template <typename T>
void convertRow(const std::byte* src, int64_t n, const float* mul, const float* add, bool identity, float* out) {
  const T* s = reinterpret_cast<const T*>(src);
  if (identity) {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(s[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(s[j]) * mul[j] + add[j];
  }
}

using RowFn = void (*)(const std::byte*, int64_t, const float*, const float*, bool, float*);

// Throws dtrain::Error for a type no reader produces (a programming error).
RowFn rowFunction(DType type) {
  switch (type) {
    case DType::kUInt8: return convertRow<uint8_t>;
    case DType::kInt8: return convertRow<int8_t>;
    case DType::kInt16: return convertRow<int16_t>;
    case DType::kUInt16: return convertRow<uint16_t>;
    case DType::kInt32: return convertRow<int32_t>;
    case DType::kInt64: return convertRow<int64_t>;
    case DType::kFloat32: return convertRow<float>;
    case DType::kFloat64: return convertRow<double>;
    default: DTRAIN_THROW(Error, "raw features of type {} cannot be converted", dtypeName(type));
  }
}

}  // namespace

ArrayDataset::ArrayDataset(RawArray features, Labels labels, Transform transform, std::string description,
                           const std::string& origin)
    : raw_(std::move(features)), labels_(std::move(labels)), transform_(std::move(transform)),
      description_(std::move(description)) {
  DTRAIN_CHECK_AS(ConfigError, !raw_.shape.empty(), "{}", prefixed(origin, "features have no sample dimension"));
  size_ = raw_.shape[0];
  featureShape_ = raw_.shape.dropFirst();
  DTRAIN_CHECK(raw_.probed || raw_.bytes.size() == static_cast<size_t>(raw_.shape.numel()) * dtypeSize(raw_.type),
               "raw feature bytes do not match shape {}", raw_.shape.spaced());
  rowFunction(raw_.type);  // rejects a raw type fetch() could not convert, here rather than per batch
  if (labels_.kind == LabelKind::kClass) {
    auto count = static_cast<int64_t>(labels_.classes.size());
    DTRAIN_CHECK_AS(ConfigError, count == size_, "{}",
                    prefixed(origin, fmt::format("{} labels for {} samples (expected one label per sample)",
                                                 count, size_)));
    labels_.shape = Shape{};
    int32_t maxLabel = -1;
    for (int64_t i = 0; i < count; ++i) {
      int32_t c = labels_.classes[static_cast<size_t>(i)];
      DTRAIN_CHECK_AS(ConfigError, c >= 0, "{}",
                      prefixed(origin, fmt::format("sample {} has class label {} (expected >= 0)", i, c)));
      if (labels_.numClasses) {
        DTRAIN_CHECK_AS(ConfigError, c < *labels_.numClasses, "{}",
                        prefixed(origin, fmt::format("sample {} has class label {} (expected < num_classes {})", i,
                                                     c, *labels_.numClasses)));
      }
      maxLabel = std::max(maxLabel, c);
    }
    if (!labels_.numClasses) labels_.numClasses = static_cast<int64_t>(maxLabel) + 1;
  } else {
    if (labels_.shape.empty()) labels_.shape = Shape{1};
    auto per = labels_.shape.numel();
    auto count = per > 0 ? static_cast<int64_t>(labels_.targets.size()) / per : 0;
    DTRAIN_CHECK_AS(ConfigError, count == size_ && count * per == static_cast<int64_t>(labels_.targets.size()), "{}",
                    prefixed(origin, fmt::format("{} targets of shape {} for {} samples (expected one per sample)",
                                                 labels_.targets.size(), labels_.shape.spaced(), size_)));
    labels_.numClasses.reset();
  }
  buildAffine(origin);
}

void ArrayDataset::buildAffine(const std::string& origin) {
  const int64_t n = featureSize();
  mul_.assign(static_cast<size_t>(n), static_cast<float>(transform_.scale));
  add_.assign(static_cast<size_t>(n), 0.0f);
  identity_ = transform_.scale == 1.0 && transform_.mean.empty();
  if (transform_.mean.empty()) return;
  const auto& mean = transform_.mean;
  const auto& stdv = transform_.std;
  DTRAIN_CHECK_AS(ConfigError, mean.size() == stdv.size(), "{}",
                  prefixed(origin, fmt::format("normalize has {} means and {} stds (expected the same count)",
                                               mean.size(), stdv.size())));
  for (double s : stdv)
    DTRAIN_CHECK_AS(ConfigError, s > 0, "{}", prefixed(origin, fmt::format("normalize std {} (expected > 0)", s)));
  const auto values = static_cast<int64_t>(mean.size());
  const int64_t channels = featureShape_.rank() >= 2 ? featureShape_[0] : n;
  // Which mean/std applies to feature j: one for all, per channel (contiguous blocks in C order), per feature.
  int64_t block = 0;
  if (values == 1) block = n;
  else if (values == channels) block = n / channels;
  else if (values == n) block = 1;
  DTRAIN_CHECK_AS(ConfigError, block > 0, "{}",
                  prefixed(origin, fmt::format("normalize has {} values for features of shape {} (expected 1, {} "
                                               "channels or {} features)",
                                               values, featureShape_.spaced(), channels, n)));
  for (int64_t j = 0; j < n; ++j) {
    auto k = static_cast<size_t>(values == 1 ? 0 : j / block);
    mul_[static_cast<size_t>(j)] = static_cast<float>(transform_.scale / stdv[k]);
    add_[static_cast<size_t>(j)] = static_cast<float>(-mean[k] / stdv[k]);
  }
}

void ArrayDataset::reshape(const Shape& featureShape, const std::string& origin) {
  DTRAIN_CHECK_AS(ConfigError, featureShape.numel() == featureSize(), "{}",
                  prefixed(origin, fmt::format("shape {} has {} elements, the samples have {} ({})",
                                               featureShape.spaced(), featureShape.numel(), featureSize(),
                                               featureShape_.spaced())));
  featureShape_ = featureShape;
  raw_.shape = featureShape.withBatch(size_);
  buildAffine(origin);
}

void ArrayDataset::truncate(int64_t n) {
  if (n >= size_) return;
  DTRAIN_CHECK(n >= 0, "truncate to {} samples", n);
  size_ = n;
  raw_.shape[0] = n;
  if (!raw_.probed) {
    raw_.bytes.truncate(static_cast<size_t>(n * featureSize()) * dtypeSize(raw_.type), /*release=*/true);
  }
  if (labels_.kind == LabelKind::kClass) labels_.classes.resize(static_cast<size_t>(n));
  else labels_.targets.resize(static_cast<size_t>(n * labelSize()));
}

void ArrayDataset::fetch(std::span<const int64_t> indices, float* features, void* labels) const {
  DTRAIN_CHECK(!raw_.probed, "fetch from a dataset whose data was not read (ReadMode::kHeader)");
  const int64_t n = featureSize();
  const size_t rowBytes = static_cast<size_t>(n) * dtypeSize(raw_.type);
  const RowFn convert = rowFunction(raw_.type);
  const int64_t per = labelSize();
  for (size_t b = 0; b < indices.size(); ++b) {
    const int64_t i = indices[b];
    if (i < 0 || i >= size_)
      throw std::out_of_range(fmt::format("sample index {} out of range [0, {})", i, size_));
    convert(raw_.bytes.data() + static_cast<size_t>(i) * rowBytes, n, mul_.data(), add_.data(), identity_,
            features + static_cast<int64_t>(b) * n);
    if (labels_.kind == LabelKind::kClass) {
      static_cast<int32_t*>(labels)[b] = labels_.classes[static_cast<size_t>(i)];
    } else {
      std::memcpy(static_cast<float*>(labels) + static_cast<int64_t>(b) * per,
                  labels_.targets.data() + i * per, static_cast<size_t>(per) * sizeof(float));
    }
  }
}

}  // namespace dtrain::data
