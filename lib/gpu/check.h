// The CUDA runtime check macro, for the CUDA target's own sources (it needs <cuda_runtime.h>, included here).
//
//   DTRAIN_CUDA_CHECK(cudaMalloc(&p, n));              // throws dtrain::gpu::GpuError
//   DTRAIN_CUDA_CHECK_AS(CommError, cudaSetDevice(d));  // the same with the caller's error type
//
// On failure the message is "<expression> failed: <cudaGetErrorString>", where() is the file:line of the
// check, and CUDA's last-error slot is cleared (cudaGetLastError), so a later, unrelated check does not see a
// stale error. Sticky errors (a kernel fault) stay: every later call fails, as CUDA specifies.
#pragma once

#include <cuda_runtime.h>
#include <fmt/format.h>

#include "lib/common/error.h"
#include "lib/gpu/device.h"

#define DTRAIN_CUDA_CHECK_AS(ErrorType, expr)                                                             \
  do {                                                                                                    \
    const cudaError_t dtrain_cuda_e_ = (expr);                                                            \
    if (dtrain_cuda_e_ != cudaSuccess) [[unlikely]] {                                                     \
      cudaGetLastError();                                                                                 \
      ::dtrain::detail::throwAt<ErrorType>(__FILE__, __LINE__,                                            \
                                           ::fmt::format("{} failed: {}", #expr,                          \
                                                         cudaGetErrorString(dtrain_cuda_e_)));            \
    }                                                                                                     \
  } while (0)
#define DTRAIN_CUDA_CHECK(expr) DTRAIN_CUDA_CHECK_AS(::dtrain::gpu::GpuError, expr)
