#include "lib/comm/types.h"

#include <string>

namespace dtrain::comm {

std::string_view dtypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "?";
}

std::optional<DType> parseDType(std::string_view s) {
  std::string v(s);
  for (auto& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (v == "float32" || v == "float" || v == "fp32" || v == "f32") return DType::kFloat32;
  if (v == "float64" || v == "double" || v == "fp64" || v == "f64") return DType::kFloat64;
  if (v == "int32" || v == "int" || v == "i32") return DType::kInt32;
  if (v == "int64" || v == "long" || v == "i64") return DType::kInt64;
  if (v == "bfloat16" || v == "bf16") return DType::kBFloat16;
  if (v == "float16" || v == "half" || v == "fp16" || v == "f16") return DType::kFloat16;
  return std::nullopt;
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
