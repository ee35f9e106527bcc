#include "lib/comm/types.h"

#include "lib/common/error.h"

namespace dtrain::comm {

void checkSupported(DType t, std::string_view what) {
  DTRAIN_CHECK_AS(UsageError, isSupported(t),
                  "{}: dtype {} is not supported by the collectives (float32, float64, int32, int64, bfloat16, "
                  "float16)",
                  what, dtypeName(t));
}

std::string_view reduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMin: return "min";
    case ReduceOp::kMax: return "max";
  }
  return "?";
}

std::optional<ReduceOp> parseReduceOp(std::string_view s) {
  if (s == "sum") return ReduceOp::kSum;
  if (s == "avg" || s == "mean") return ReduceOp::kAvg;
  if (s == "min") return ReduceOp::kMin;
  if (s == "max") return ReduceOp::kMax;
  return std::nullopt;
}

}  // namespace dtrain::comm
