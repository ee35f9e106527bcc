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
#include <string_view>

#include "lib/common/error.h"
#include "lib/gpu/device.h"

namespace dtrain::gpu::detail {

// "lib/gpu/memory.cpp:31" from __FILE__ and __LINE__: the path from the last lib/, apps/ or tests/ folder, whatever
// directory the build ran in (absolute or ../ paths); a path without one is kept as given.
inline std::string checkSite(const char* file, int line) {
  std::string_view f(file);
  size_t from = std::string_view::npos;
  for (std::string_view root : {"/lib/", "/apps/", "/tests/"})
    if (const size_t at = f.rfind(root); at != std::string_view::npos && (from == std::string_view::npos || at > from))
      from = at;
  if (from != std::string_view::npos) f.remove_prefix(from + 1);
  return ::fmt::format("{}:{}", f, line);
}

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
