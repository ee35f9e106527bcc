#include "lib/common/tensor.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cctype>
#include <limits>

#include "lib/common/error.h"

namespace dtrain {

namespace {

struct DTypeRow {
  DType dtype;
  std::string_view name;
  size_t size;
  std::string_view safetensors;
  bool floating;
};

// The one table of element types (see tensor.h).
constexpr DTypeRow kDTypes[] = {
    {DType::kBool, "bool", 1, "BOOL", false},          {DType::kUInt8, "uint8", 1, "U8", false},
    {DType::kInt8, "int8", 1, "I8", false},            {DType::kInt16, "int16", 2, "I16", false},
    {DType::kUInt16, "uint16", 2, "U16", false},       {DType::kFloat16, "float16", 2, "F16", true},
    {DType::kBFloat16, "bfloat16", 2, "BF16", true},   {DType::kInt32, "int32", 4, "I32", false},
    {DType::kUInt32, "uint32", 4, "U32", false},       {DType::kFloat32, "float32", 4, "F32", true},
    {DType::kInt64, "int64", 8, "I64", false},         {DType::kUInt64, "uint64", 8, "U64", false},
    {DType::kFloat64, "float64", 8, "F64", true},
};

const DTypeRow& row(DType d) noexcept { return kDTypes[static_cast<size_t>(d)]; }

struct Alias {
  std::string_view alias;
  DType dtype;
};
constexpr Alias kAliases[] = {
    {"float", DType::kFloat32},  {"fp32", DType::kFloat32},   {"f32", DType::kFloat32},
    {"double", DType::kFloat64}, {"fp64", DType::kFloat64},   {"f64", DType::kFloat64},
    {"half", DType::kFloat16},   {"fp16", DType::kFloat16},   {"f16", DType::kFloat16},
    {"bf16", DType::kBFloat16},  {"int", DType::kInt32},      {"i32", DType::kInt32},
    {"long", DType::kInt64},     {"i64", DType::kInt64},      {"u8", DType::kUInt8},
    {"byte", DType::kUInt8},     {"i8", DType::kInt8},        {"i16", DType::kInt16},
    {"short", DType::kInt16},    {"u16", DType::kUInt16},     {"u32", DType::kUInt32},
    {"u64", DType::kUInt64},
};

}  // namespace

size_t dtypeSize(DType dtype) noexcept { return row(dtype).size; }
std::string_view dtypeName(DType dtype) noexcept { return row(dtype).name; }
std::string_view safetensorsName(DType dtype) noexcept { return row(dtype).safetensors; }
bool isFloatingPoint(DType dtype) noexcept { return row(dtype).floating; }

std::optional<DType> parseDType(std::string_view name) {
  std::string v(name);
  for (auto& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const auto& r : kDTypes)
    if (r.name == v) return r.dtype;
  for (const auto& a : kAliases)
    if (a.alias == v) return a.dtype;
  return std::nullopt;
}

std::optional<DType> parseSafetensorsDType(std::string_view name) {
  for (const auto& r : kDTypes)
    if (r.safetensors == name) return r.dtype;
  return std::nullopt;
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

void Shape::push_back(int64_t dim) {
  DTRAIN_CHECK(rank_ < kMaxRank, "shape {} cannot grow past the maximum rank {}", str(), kMaxRank);
  dims_[static_cast<size_t>(rank_++)] = dim;
}

int64_t Shape::numel() const noexcept {
  int64_t n = 1;
  for (int64_t d : *this) n *= d;
  return n;
}

std::optional<int64_t> Shape::checkedNumel() const noexcept {
  int64_t n = 1;
  for (int64_t d : *this) {
    if (d < 0) return std::nullopt;
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) return std::nullopt;
    n *= d;
  }
  return n;
}

Shape Shape::withBatch(int64_t batch) const {
  DTRAIN_CHECK(rank_ < kMaxRank, "shape {} has no room for a batch dimension (maximum rank {})", str(), kMaxRank);
  Shape s;
  s.push_back(batch);
  for (int64_t d : *this) s.push_back(d);
  return s;
}

Shape Shape::dropFirst() const {
  Shape s;
  for (int i = 1; i < rank_; ++i) s.push_back(dims_[static_cast<size_t>(i)]);
  return s;
}

std::string Shape::str() const { return fmt::format("[{}]", fmt::join(begin(), end(), ",")); }

std::string Shape::batchStr() const {
  if (rank_ == 0) return "[N]";
  return fmt::format("[N,{}]", fmt::join(begin(), end(), ","));
}

std::string Shape::spaced() const { return fmt::format("[{}]", fmt::join(begin(), end(), ", ")); }

bool Shape::operator==(const Shape& other) const noexcept {
  if (rank_ != other.rank_) return false;
  for (int i = 0; i < rank_; ++i)
    if (dims_[static_cast<size_t>(i)] != other.dims_[static_cast<size_t>(i)]) return false;
  return true;
}

std::string Device::str() const { return isCpu() ? "cpu" : fmt::format("cuda:{}", index); }

std::optional<Device> Device::parse(std::string_view s, int defaultIndex) {
  if (s == "cpu") return cpu();
  if (s == "cuda") return cuda(defaultIndex);
  if (s.substr(0, 5) != "cuda:" || s.size() == 5 || s.size() > 9) return std::nullopt;
  int n = 0;
  for (char c : s.substr(5)) {
    if (c < '0' || c > '9') return std::nullopt;
    n = n * 10 + (c - '0');
  }
  return cuda(n);
}

void TensorView::requirePacked(std::string_view what) const {
  DTRAIN_CHECK(packed(),
               "internal error: {} needs a packed tensor, but got a strided view: {} {} with rows {} elements apart "
               "(ld), not {}",
               what, dtypeName(dtype), shape.spaced(), ld, shape.rank() > 0 ? shape.back() : 1);
}

void TensorView::checkDType(DType wanted) const {
  DTRAIN_CHECK(dtype == wanted, "tensor is {}, not {}", dtypeName(dtype), dtypeName(wanted));
}

}  // namespace dtrain
