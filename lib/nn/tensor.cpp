#include "lib/nn/tensor.h"

#include <fmt/format.h>

#include "lib/common/error.h"

namespace dtrain::nn {

const char* dtypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
  }
  return "?";
}

size_t dtypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
  }
  return 0;
}

Shape::Shape(std::initializer_list<int64_t> dims) {
  DTRAIN_CHECK(dims.size() <= kMaxRank, "shape of rank {} exceeds the maximum rank {}", dims.size(), kMaxRank);
  for (int64_t d : dims) dims_[static_cast<size_t>(rank_++)] = d;
}

Shape Shape::of(std::span<const int64_t> dims) {
  DTRAIN_CHECK(dims.size() <= kMaxRank, "shape of rank {} exceeds the maximum rank {}", dims.size(), kMaxRank);
  Shape s;
  for (int64_t d : dims) s.dims_[static_cast<size_t>(s.rank_++)] = d;
  return s;
}

int64_t Shape::numel() const noexcept {
  int64_t n = 1;
  for (int i = 0; i < rank_; ++i) n *= dims_[static_cast<size_t>(i)];
  return n;
}

Shape Shape::withBatch(int64_t batch) const {
  DTRAIN_CHECK(rank_ < kMaxRank, "shape {} has no room for a batch dimension (maximum rank {})", str(), kMaxRank);
  Shape s;
  s.rank_ = rank_ + 1;
  s.dims_[0] = batch;
  for (int i = 0; i < rank_; ++i) s.dims_[static_cast<size_t>(i + 1)] = dims_[static_cast<size_t>(i)];
  return s;
}

Shape Shape::dropFirst() const {
  Shape s;
  if (rank_ == 0) return s;
  s.rank_ = rank_ - 1;
  for (int i = 1; i < rank_; ++i) s.dims_[static_cast<size_t>(i - 1)] = dims_[static_cast<size_t>(i)];
  return s;
}

std::string Shape::str() const {
  return fmt::format("[{}]", fmt::join(dims_.begin(), dims_.begin() + rank_, ","));
}

std::string Shape::batchStr() const {
  if (rank_ == 0) return "[N]";
  return fmt::format("[N,{}]", fmt::join(dims_.begin(), dims_.begin() + rank_, ","));
}

bool Shape::operator==(const Shape& other) const noexcept {
  if (rank_ != other.rank_) return false;
  for (int i = 0; i < rank_; ++i) {
    if (dims_[static_cast<size_t>(i)] != other.dims_[static_cast<size_t>(i)]) return false;
  }
  return true;
}

float* TensorView::f32() const {
  DTRAIN_CHECK(dtype == DType::kFloat32, "tensor is {}, not float32", dtypeName(dtype));
  return static_cast<float*>(data);
}

const int32_t* TensorView::i32() const {
  DTRAIN_CHECK(dtype == DType::kInt32, "tensor is {}, not int32", dtypeName(dtype));
  return static_cast<const int32_t*>(data);
}

const int64_t* TensorView::i64() const {
  DTRAIN_CHECK(dtype == DType::kInt64, "tensor is {}, not int64", dtypeName(dtype));
  return static_cast<const int64_t*>(data);
}

}  // namespace dtrain::nn
