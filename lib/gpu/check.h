// The CUDA runtime check macro, for the CUDA target's own sources (it needs <cuda_runtime.h>, included here).
//
//   DTRAIN_CUDA_CHECK(cudaMalloc(&p, n));              // throws dtrain::gpu::GpuError
//   DTRAIN_CUDA_CHECK_AS(CommError, cudaSetDevice(d));  // the same with the caller's error type
//
// On failure the message is "<expression> failed: <cudaGetErrorString> (<file>:<line>)", the file from the
// repository root (so a worker's one-line error names the call site without a debug log); where() is the same
// file:line as the compiler spelled it. CUDA's last-error slot is cleared (cudaGetLastError), so a later, unrelated check does not see a
// stale error. Sticky errors (a kernel fault) stay: every later call fails, as CUDA specifies.
#pragma once

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <string>

#include "lib/common/error.h"
#include "lib/common/source_site.h"
#include "lib/gpu/device.h"

namespace dtrain::gpu::detail {

// "lib/gpu/memory.cpp:31" from __FILE__ and __LINE__: lib/common/source_site.h's sourceSite (the path from the
// last lib/, apps/ or tests/ folder, whatever directory the build ran in; a path without one is kept as given).
inline std::string checkSite(const char* file, int line) { return ::dtrain::detail::sourceSite(file, line); }

}  // namespace dtrain::gpu::detail

#define DTRAIN_CUDA_CHECK_AS(ErrorType, expr)                                                             \
  do {                                                                                                    \
    const cudaError_t dtrain_cuda_e_ = (expr);                                                            \
    if (dtrain_cuda_e_ != cudaSuccess) [[unlikely]] {                                                     \
      cudaGetLastError();                                                                                 \
      ::dtrain::detail::throwAt<ErrorType>(__FILE__, __LINE__,                                            \
                                           ::fmt::format("{} failed: {} ({})", #expr,                     \
                                                         cudaGetErrorString(dtrain_cuda_e_),              \
                                                         ::dtrain::gpu::detail::checkSite(__FILE__, __LINE__))); \
    }                                                                                                     \
  } while (0)
#define DTRAIN_CUDA_CHECK(expr) DTRAIN_CUDA_CHECK_AS(::dtrain::gpu::GpuError, expr)
