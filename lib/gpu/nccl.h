// NCCL's edge of the common vocabulary, for sources that call NCCL (they include <nccl.h> and link NCCL):
// the check macro and the one mapping from dtrain::DType to ncclDataType_t.
//
//   DTRAIN_NCCL_CHECK(ncclGetUniqueId(&id));   // throws dtrain::CommError "<expression> failed: <NCCL's text>
//                                              //   (<file>:<line>)", the file from the repository root (check.h)
//
// For blocking calls only: on a non-blocking communicator ncclInProgress is not a failure, and the caller
// polls ncclCommGetAsyncError instead (see lib/comm/nccl).
#pragma once

#include <fmt/format.h>
#include <nccl.h>

#include <optional>

#include "lib/common/error.h"
#include "lib/common/tensor.h"
#include "lib/gpu/check.h"

#define DTRAIN_NCCL_CHECK_AS(ErrorType, expr)                                                              \
  do {                                                                                                     \
    const ncclResult_t dtrain_nccl_r_ = (expr);                                                            \
    if (dtrain_nccl_r_ != ncclSuccess) [[unlikely]]                                                        \
      ::dtrain::detail::throwAt<ErrorType>(__FILE__, __LINE__, ::fmt::format("{} failed: {} ({})", #expr, \
                                                                             ncclGetErrorString(dtrain_nccl_r_), \
                                                                             ::dtrain::gpu::detail::checkSite(__FILE__, __LINE__))); \
  } while (0)
#define DTRAIN_NCCL_CHECK(expr) DTRAIN_NCCL_CHECK_AS(::dtrain::CommError, expr)

namespace dtrain::gpu {

// NCCL's element type for `dtype`; nullopt for the types NCCL lacks (bool, int16, uint16).
constexpr std::optional<ncclDataType_t> ncclType(DType dtype) {
  switch (dtype) {
    case DType::kInt8: return ncclInt8;
    case DType::kUInt8: return ncclUint8;
    case DType::kInt32: return ncclInt32;
    case DType::kUInt32: return ncclUint32;
    case DType::kInt64: return ncclInt64;
    case DType::kUInt64: return ncclUint64;
    case DType::kFloat16: return ncclFloat16;
    case DType::kFloat32: return ncclFloat32;
    case DType::kFloat64: return ncclFloat64;
    case DType::kBFloat16: return ncclBfloat16;
    case DType::kBool:
    case DType::kInt16:
    case DType::kUInt16: break;
  }
  return std::nullopt;
}

}  // namespace dtrain::gpu
