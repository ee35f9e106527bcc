// The attention-dropout kernel (kernels_attention.h): one Philox block (4 elements) per thread, grid-stride,
// bounded grid (grid.h); the per-thread work is philox.h's dropoutQuad, the function the CPU tests emulate.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "lib/gpu/grid.h"
#include "lib/gpu/kernels_attention.h"
#include "lib/gpu/launch.h"
#include "lib/gpu/philox.h"

namespace dtrain::gpu::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void dropoutSelectKernel(const float* in, DropoutDraw draw, uint64_t first, float* out, size_t n,
                                    size_t quads) {
  for (size_t q = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; q < quads;
       q += static_cast<size_t>(blockDim.x) * gridDim.x)
    dropoutQuad(draw, DropoutForm::kSelect, first, q, in, out, n);
}

}  // namespace

void dropoutSelect(const float* in, const DropoutDraw& draw, uint64_t first, float* out, size_t n) {
  if (n == 0) return;
  const size_t quads = dropoutQuads(first, n);
  dropoutSelectKernel<<<gridFor(quads, kThreads), kThreads>>>(in, draw, first, out, n, quads);
  DTRAIN_CU_CHECK_LAUNCH("dropoutSelectKernel");
}

}  // namespace dtrain::gpu::kernels
