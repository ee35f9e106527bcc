// Checks for the CUDA sources (.cu) of lib/gpu. They avoid fmt (nvcc need not parse it), so the message is built
// by a host function compiled as C++ (device.cpp). Same meaning as DTRAIN_CUDA_CHECK (check.h): on failure a
// GpuError "<expression> failed: <CUDA's text>" with the file:line of the check.
//
//   myKernel<<<grid, block>>>(...);
//   DTRAIN_CU_CHECK_LAUNCH("myKernel");            // "launch of myKernel failed: invalid configuration argument"
//   DTRAIN_CU_CHECK(cudaMemcpy(...));
#pragma once

namespace dtrain::gpu::detail {
// Clears CUDA's last-error slot and throws GpuError "<what> failed: <cudaGetErrorString(error)> (<file>:<line>)"
// (check.h's checkSite) with where() file:line.
[[noreturn]] void cudaFailed(const char* what, int error, const char* file, int line);
}  // namespace dtrain::gpu::detail

#define DTRAIN_CU_CHECK(expr)                                                                               \
  do {                                                                                                      \
    const cudaError_t dtrain_cu_e_ = (expr);                                                                \
    if (dtrain_cu_e_ != cudaSuccess) ::dtrain::gpu::detail::cudaFailed(#expr, static_cast<int>(dtrain_cu_e_), \
                                                                       __FILE__, __LINE__);                  \
  } while (0)

#define DTRAIN_CU_CHECK_LAUNCH(kernel)                                                                      \
  do {                                                                                                      \
    const cudaError_t dtrain_cu_e_ = cudaGetLastError();                                                    \
    if (dtrain_cu_e_ != cudaSuccess)                                                                        \
      ::dtrain::gpu::detail::cudaFailed("launch of " kernel, static_cast<int>(dtrain_cu_e_), __FILE__, __LINE__); \
  } while (0)
