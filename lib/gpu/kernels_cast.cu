// fp16/bf16 casts of gradient buckets (kernels_cast.h): one thread per element, grid-stride, bounded grid (grid.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "lib/gpu/grid.h"
#include "lib/gpu/kernels_cast.h"
#include "lib/gpu/launch.h"

namespace dtrain::gpu::kernels {
namespace {

constexpr int kThreads = 256;

#define DTRAIN_CAST_STRIDE(i, n) \
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<size_t>(blockDim.x) * gridDim.x)

__global__ void toHalfKernel(const float* g, uint16_t* h, size_t n, float divisor, bool fp16) {
  DTRAIN_CAST_STRIDE(i, n) {
    const float v = g[i] / divisor;  // a true division, as the CPU's (not a multiplication by 1 / divisor)
    h[i] = fp16 ? __half_as_ushort(__float2half_rn(v)) : __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

__global__ void fromHalfKernel(const uint16_t* h, float* g, size_t n, bool fp16) {
  DTRAIN_CAST_STRIDE(i, n) {
    g[i] = fp16 ? __half2float(__ushort_as_half(h[i])) : __bfloat162float(__ushort_as_bfloat16(h[i]));
  }
}

}  // namespace

void toHalf(const float* g, uint16_t* h, size_t n, float divisor, bool fp16) {
  if (n == 0) return;
  toHalfKernel<<<gridFor(n, kThreads), kThreads>>>(g, h, n, divisor, fp16);
  DTRAIN_CU_CHECK_LAUNCH("toHalfKernel");
}

void fromHalf(const uint16_t* h, float* g, size_t n, bool fp16) {
  if (n == 0) return;
  fromHalfKernel<<<gridFor(n, kThreads), kThreads>>>(h, g, n, fp16);
  DTRAIN_CU_CHECK_LAUNCH("fromHalfKernel");
}

}  // namespace dtrain::gpu::kernels
