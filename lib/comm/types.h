// What the collectives reduce and with which operators. Element types are the common dtrain::DType
// (lib/common/tensor.h); this header only says which of them the collectives accept, and names ReduceOp.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "lib/common/tensor.h"

namespace dtrain::comm {

// The element types every backend reduces and moves: float32, float64, int32, int64, bfloat16, float16.
// bf16 and fp16 travel as 16-bit values and are reduced in float32 (each pairwise step rounds back to 16 bits).
// Any other DType given to a collective is a UsageError naming it (send/recv move bytes of any dtype).
inline constexpr DType kSupportedDTypes[] = {DType::kFloat32, DType::kFloat64,  DType::kInt32,
                                             DType::kInt64,   DType::kBFloat16, DType::kFloat16};
constexpr bool isSupported(DType t) {
  for (DType s : kSupportedDTypes)
    if (s == t) return true;
  return false;
}
// Throws UsageError "<what>: dtype <name> is not supported by the collectives (...)" unless isSupported(t).
void checkSupported(DType t, std::string_view what);

// kAvg is a sum divided by the group size at the end (integer types: truncating division).
enum class ReduceOp : uint8_t { kSum, kAvg, kMin, kMax };

inline constexpr ReduceOp kAllReduceOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax};

// "sum", "avg", "min", "max".
std::string_view reduceOpName(ReduceOp op);
// Also accepts "mean" for avg.
std::optional<ReduceOp> parseReduceOp(std::string_view s);

}  // namespace dtrain::comm
