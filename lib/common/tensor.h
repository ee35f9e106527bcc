// The tensor vocabulary every module shares: element types, shapes, devices and a non-owning view.
//
// - DType: every element type dtrain reads, computes, communicates or stores. Each has one row in one table
//   (tensor.cpp): its name as users type it ("float32"), its size in bytes, and its safetensors spelling
//   ("F32", https://github.com/huggingface/safetensors). Other spellings are mappings kept at one edge each:
//   NCCL's ncclDataType_t in lib/gpu. Nothing else keeps a table.
// - Shape: dimensions in row-major (C / PyTorch contiguous) order, at most kMaxRank of them, stored inline (no
//   heap), so shapes can be copied freely in the training loop.
// - Device: cpu, or cuda:N (N = index among the visible GPUs, i.e. after CUDA_VISIBLE_DEVICES).
// - TensorView: {pointer, shape, dtype, device, ld}. Never owns or allocates; whoever created the buffer keeps it
//   alive for as long as a view of it is used. A flat buffer (collectives, gradient buckets) is a view of
//   rank 1: TensorView::flat(ptr, count, dtype, device). Packed (row-major contiguous) unless ld says otherwise:
//   ld is the leading dimension, elements between the starts of consecutive rows (a row: the last dimension), for
//   a view of rows laid out further apart (the bf16 gradient a GPU cross_entropy writes over its float32 logits:
//   ld 2 x classes). Only code that says so accepts such a view; numel()/bytes() count the values, not the span.
// Thread-safety: plain values; no shared state. Errors: dtrain::Error (a programming error: a rank above
// kMaxRank, a typed access of the wrong dtype).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace dtrain {

// The order is safetensors' (and so a stable on-disk numbering); the values are internal, never serialised.
enum class DType : uint8_t {
  kBool,
  kUInt8,
  kInt8,
  kInt16,
  kUInt16,
  kFloat16,   // IEEE 754 binary16
  kBFloat16,  // bfloat16 (the upper half of a float32)
  kInt32,
  kUInt32,
  kFloat32,
  kInt64,
  kUInt64,
  kFloat64,
};

inline constexpr DType kAllDTypes[] = {DType::kBool,    DType::kUInt8,  DType::kInt8,    DType::kInt16, DType::kUInt16,
                                       DType::kFloat16, DType::kBFloat16, DType::kInt32, DType::kUInt32, DType::kFloat32,
                                       DType::kInt64,   DType::kUInt64, DType::kFloat64};

// Size of one element in bytes.
size_t dtypeSize(DType dtype) noexcept;
// "float32", "bfloat16", "uint8", "bool", ... (PyTorch's spelling without "torch.").
std::string_view dtypeName(DType dtype) noexcept;
// "F32", "BF16", "U8", "BOOL", ... (the safetensors header spelling).
std::string_view safetensorsName(DType dtype) noexcept;
bool isFloatingPoint(DType dtype) noexcept;
// Accepts dtypeName spellings and the usual aliases, case-insensitively: float/fp32/f32, double/fp64/f64,
// half/fp16/f16, bf16, int/i32, long/i64, u8/byte, i8, i16/short, u16, u32, u64. nullopt when unknown.
std::optional<DType> parseDType(std::string_view name);
// Exactly the safetensors spellings ("F32", ...); nullopt otherwise.
std::optional<DType> parseSafetensorsDType(std::string_view name);

// The C++ type of an element, for typed access: dtypeOf<float>() == DType::kFloat32.
template <class T>
constexpr DType dtypeOf();
template <> constexpr DType dtypeOf<bool>() { return DType::kBool; }
template <> constexpr DType dtypeOf<uint8_t>() { return DType::kUInt8; }
template <> constexpr DType dtypeOf<int8_t>() { return DType::kInt8; }
template <> constexpr DType dtypeOf<int16_t>() { return DType::kInt16; }
template <> constexpr DType dtypeOf<uint16_t>() { return DType::kUInt16; }
template <> constexpr DType dtypeOf<int32_t>() { return DType::kInt32; }
template <> constexpr DType dtypeOf<uint32_t>() { return DType::kUInt32; }
template <> constexpr DType dtypeOf<float>() { return DType::kFloat32; }
template <> constexpr DType dtypeOf<int64_t>() { return DType::kInt64; }
template <> constexpr DType dtypeOf<uint64_t>() { return DType::kUInt64; }
template <> constexpr DType dtypeOf<double>() { return DType::kFloat64; }

// Room for a batch dimension plus any per-sample shape dtrain builds, and for every tensor of the checkpoints
// and pretrained files it reads (a safetensors tensor of higher rank is rejected with a CheckpointError).
inline constexpr int kMaxRank = 8;

class Shape {
 public:
  Shape() = default;
  // Throws dtrain::Error when more than kMaxRank dimensions are given.
  Shape(std::initializer_list<int64_t> dims);
  static Shape of(std::span<const int64_t> dims);

  int rank() const noexcept { return rank_; }
  bool empty() const noexcept { return rank_ == 0; }
  int64_t operator[](int i) const noexcept { return dims_[static_cast<size_t>(i)]; }
  int64_t& operator[](int i) noexcept { return dims_[static_cast<size_t>(i)]; }
  int64_t back() const noexcept { return dims_[static_cast<size_t>(rank_ - 1)]; }
  const int64_t* begin() const noexcept { return dims_.data(); }
  const int64_t* end() const noexcept { return dims_.data() + rank_; }
  std::span<const int64_t> dims() const noexcept { return {dims_.data(), static_cast<size_t>(rank_)}; }
  // Appends a dimension; throws dtrain::Error past kMaxRank.
  void push_back(int64_t dim);
  // Product of the dimensions (1 for rank 0). No overflow check: use checkedNumel for untrusted shapes.
  int64_t numel() const noexcept;
  // Product of the dimensions, or nullopt when a dimension is negative or the product exceeds INT64_MAX.
  std::optional<int64_t> checkedNumel() const noexcept;
  // {batch, dims...}: the batched shape of a per-sample shape.
  Shape withBatch(int64_t batch) const;
  // The shape without its first dimension.
  Shape dropFirst() const;
  std::vector<int64_t> toVector() const { return {begin(), end()}; }
  // "[16,5,5]"; with a batch placeholder: batchStr() -> "[N,16,5,5]"; spaced() -> "[16, 5, 5]".
  std::string str() const;
  std::string batchStr() const;
  std::string spaced() const;

  bool operator==(const Shape& other) const noexcept;
  bool operator!=(const Shape& other) const noexcept { return !(*this == other); }

 private:
  std::array<int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

struct Device {
  enum class Type : uint8_t { kCpu, kCuda };
  Type type = Type::kCpu;
  int index = 0;  // the GPU's index among the visible ones (kCuda only)

  static constexpr Device cpu() { return {}; }
  static constexpr Device cuda(int index) { return {Type::kCuda, index}; }
  bool isCpu() const noexcept { return type == Type::kCpu; }
  bool isCuda() const noexcept { return type == Type::kCuda; }
  // "cpu", "cuda:0".
  std::string str() const;
  // "cpu", "cuda" (index `defaultIndex`), "cuda:N". nullopt on anything else (the caller names the field).
  static std::optional<Device> parse(std::string_view s, int defaultIndex = 0);

  bool operator==(const Device& o) const noexcept { return type == o.type && (isCpu() || index == o.index); }
  bool operator!=(const Device& o) const noexcept { return !(*this == o); }
};

struct TensorView {
  void* data = nullptr;
  Shape shape;
  DType dtype = DType::kFloat32;
  Device device;
  int64_t ld = 0;  // elements between row starts; 0: packed (the last dimension's size)

  int64_t numel() const noexcept { return shape.numel(); }
  // The row stride in elements: ld, or the last dimension's size for a packed view (1 for a scalar).
  int64_t rowStride() const noexcept { return ld != 0 ? ld : (shape.rank() > 0 ? shape.back() : 1); }
  bool packed() const noexcept { return ld == 0 || ld == (shape.rank() > 0 ? shape.back() : 1); }
  // The bytes of memory the view spans, from data to the end of its last value: numel x dtype size when packed; a
  // strided view's gaps between rows included ((rows - 1) x ld + the last dimension's size values, e.g. the bf16
  // logits' gradient read at ld 2 x vocabulary spans almost twice its values). 0 for an empty view.
  size_t bytes() const noexcept {
    const int64_t n = numel();
    if (n <= 0) return 0;
    if (packed()) return static_cast<size_t>(n) * dtypeSize(dtype);
    const int64_t cols = shape.back();
    return static_cast<size_t>((n / cols - 1) * ld + cols) * dtypeSize(dtype);
  }
  // The bytes of its values alone (numel x dtype size): what a packed copy of the view holds.
  size_t valueBytes() const noexcept { return static_cast<size_t>(numel()) * dtypeSize(dtype); }
  // Throws dtrain::Error (exit 1, an internal error: a caller handed a strided view to code that reads or writes
  // bytes() contiguously as values: copies, checkpoints, collectives) naming `what`, the shape, dtype and ld, unless
  // the view is packed.
  void requirePacked(std::string_view what) const;
  // Typed access; throws dtrain::Error when the dtype does not match (a programming error).
  template <class T>
  T* as() const {
    checkDType(dtypeOf<std::remove_const_t<T>>());
    return static_cast<T*>(data);
  }
  float* f32() const { return as<float>(); }
  const int32_t* i32() const { return as<const int32_t>(); }
  const int64_t* i64() const { return as<const int64_t>(); }

  template <class T>
  static TensorView of(T* data, Shape shape, Device device = Device::cpu()) {
    return {const_cast<std::remove_const_t<T>*>(data), shape, dtypeOf<std::remove_const_t<T>>(), device};
  }
  static TensorView f32(const float* data, Shape shape) { return of(data, shape); }
  static TensorView i32(const int32_t* data, Shape shape) { return of(data, shape); }
  static TensorView i64(const int64_t* data, Shape shape) { return of(data, shape); }
  // A flat buffer of `count` elements (rank 1).
  static TensorView flat(const void* data, size_t count, DType dtype, Device device = Device::cpu()) {
    return {const_cast<void*>(data), Shape{static_cast<int64_t>(count)}, dtype, device};
  }
  // The same with the dtype taken from the element type: TensorView::flat(grads.data(), grads.size()).
  template <class T>
  static TensorView flat(T* data, size_t count, Device device = Device::cpu()) {
    return flat(data, count, dtypeOf<std::remove_const_t<T>>(), device);
  }

 private:
  void checkDType(DType wanted) const;
};

}  // namespace dtrain
