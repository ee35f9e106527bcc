// Element types and reduction operators of the collectives, with their names as users type them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace dtrain::comm {

// bf16 and fp16 travel as 16-bit values and are reduced in float32 (each pairwise step rounds back to 16 bits).
enum class DType : uint8_t { kFloat32, kFloat64, kInt32, kInt64, kBFloat16, kFloat16 };

// kAvg is a sum divided by the group size at the end (integer types: truncating division).
enum class ReduceOp : uint8_t { kSum, kAvg, kMin, kMax };

inline constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64,  DType::kInt32,
                                       DType::kInt64,   DType::kBFloat16, DType::kFloat16};
inline constexpr ReduceOp kAllReduceOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax};

constexpr size_t dtypeSize(DType t) {
  switch (t) {
    case DType::kFloat64:
    case DType::kInt64: return 8;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kBFloat16:
    case DType::kFloat16: return 2;
  }
  return 0;
}

// "float32", "float64", "int32", "int64", "bfloat16", "float16".
std::string_view dtypeName(DType t);
// Also accepts the usual aliases: float/fp32/f32, double/fp64, int/i32, long/i64, bf16, half/fp16.
std::optional<DType> parseDType(std::string_view s);

// "sum", "avg", "min", "max".
std::string_view reduceOpName(ReduceOp op);
std::optional<ReduceOp> parseReduceOp(std::string_view s);

}  // namespace dtrain::comm
