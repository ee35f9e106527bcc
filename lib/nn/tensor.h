// Tensor views and shapes for lib/nn.
//
// A TensorView is a non-owning view: pointer, shape, dtype, device. It never allocates, so views can be
// passed around freely in the training loop; whoever created the buffer owns it and keeps it alive.
// Shapes are small fixed-capacity arrays (no heap) for the same reason. Layouts are row-major / NCHW,
// exactly as PyTorch's contiguous tensors, so buffers are interchangeable with PyTorch.
// Thread-safety: plain values; no shared state.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <vector>

namespace dtrain::nn {

enum class DType : uint8_t { kFloat32, kInt32, kInt64 };
enum class Device : uint8_t { kCpu, kCuda };

const char* dtypeName(DType dtype);  // "float32", "int32", "int64"
size_t dtypeSize(DType dtype);

// At most 6 dimensions: a batch dimension plus a per-sample shape of rank <= 5.
inline constexpr int kMaxRank = 6;

class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  static Shape of(std::span<const int64_t> dims);

  int rank() const noexcept { return rank_; }
  int64_t operator[](int i) const noexcept { return dims_[static_cast<size_t>(i)]; }
  int64_t& operator[](int i) noexcept { return dims_[static_cast<size_t>(i)]; }
  int64_t back() const noexcept { return dims_[static_cast<size_t>(rank_ - 1)]; }
  // Product of the dimensions (1 for rank 0).
  int64_t numel() const noexcept;
  // {batch, dims...}: the batched shape of a per-sample shape.
  Shape withBatch(int64_t batch) const;
  // The shape without its first dimension.
  Shape dropFirst() const;
  std::vector<int64_t> toVector() const { return {dims_.begin(), dims_.begin() + rank_}; }
  // "[16,5,5]"; with a batch placeholder: batchStr() -> "[N,16,5,5]".
  std::string str() const;
  std::string batchStr() const;

  bool operator==(const Shape& other) const noexcept;
  bool operator!=(const Shape& other) const noexcept { return !(*this == other); }

 private:
  std::array<int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

struct TensorView {
  void* data = nullptr;
  Shape shape;
  DType dtype = DType::kFloat32;
  Device device = Device::kCpu;

  int64_t numel() const noexcept { return shape.numel(); }
  // Typed access; throws dtrain::Error when the dtype does not match (a programming error).
  float* f32() const;
  const int32_t* i32() const;
  const int64_t* i64() const;

  static TensorView f32(float* data, Shape shape) { return {data, shape, DType::kFloat32, Device::kCpu}; }
  static TensorView f32(const float* data, Shape shape) {
    return {const_cast<float*>(data), shape, DType::kFloat32, Device::kCpu};
  }
  static TensorView i32(const int32_t* data, Shape shape) {
    return {const_cast<int32_t*>(data), shape, DType::kInt32, Device::kCpu};
  }
  static TensorView i64(const int64_t* data, Shape shape) {
    return {const_cast<int64_t*>(data), shape, DType::kInt64, Device::kCpu};
  }
};

}  // namespace dtrain::nn
