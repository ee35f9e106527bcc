// The compact attention-dropout kernel (kernels_attention.h): one thread per element, grid-stride, bounded grid
// (grid.h); the per-element rule is dropout_bits.h's, the function the CPU tests emulate.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "lib/gpu/dropout_bits.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/kernels_attention.h"
#include "lib/gpu/launch.h"

namespace dtrain::gpu::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void dropoutBitsKernel(const float* in, const uint32_t* bits, size_t first, float keep, float* out,
                                  size_t n) {
  for (size_t e = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<size_t>(blockDim.x) * gridDim.x)
    out[e] = maskApply(bits, first + e, in[e], keep);
}

}  // namespace

void dropoutBits(const float* in, const uint32_t* bits, size_t first, float keep, float* out, size_t n) {
  if (n == 0) return;
  dropoutBitsKernel<<<gridFor(n, kThreads), kThreads>>>(in, bits, first, keep, out, n);
  DTRAIN_CU_CHECK_LAUNCH("dropoutBitsKernel");
}

}  // namespace dtrain::gpu::kernels
