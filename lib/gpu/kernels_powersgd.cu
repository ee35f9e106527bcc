// PowerSGD's kernels (kernels_powersgd.h). Compiled with --fmad=false (lib/gpu/CMakeLists.txt): Gram-Schmidt's
// `rest - f x col` rounds the product before the difference, as the CPU's (powersgd_math.h), so both agree bit for bit.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "lib/gpu/grid.h"
#include "lib/gpu/kernels_powersgd.h"
#include "lib/gpu/launch.h"
#include "lib/gpu/powersgd_math.h"

namespace dtrain::gpu::kernels {
namespace {

constexpr int kThreads = 256;

#define DTRAIN_PSGD_STRIDE(i, n) \
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<size_t>(blockDim.x) * gridDim.x)

// The sum over the block of each lane's partial (gsLanePartial), by powersgd_math.h's tree; every thread returns it.
__device__ double blockSum(double* shared, double mine) {
  const int l = static_cast<int>(threadIdx.x);
  shared[l] = mine;
  __syncthreads();
  for (int s = kGramSchmidtLanes / 2; s > 0; s /= 2) {
    gsTreeStep(shared, l, s);
    __syncthreads();
  }
  const double sum = shared[0];
  __syncthreads();  // everyone has read it before the next sum overwrites shared[]
  return sum;
}

// One block of kGramSchmidtLanes threads: column c normalised, then removed from columns c + 1, ..., r - 1.
__global__ void gramSchmidtKernel(float* pt, int r, size_t n) {
  __shared__ double shared[kGramSchmidtLanes];
  const int l = static_cast<int>(threadIdx.x);
  for (int c = 0; c < r; ++c) {
    float* col = pt + static_cast<size_t>(c) * n;
    const float inv = gsInverse(blockSum(shared, gsLanePartial(col, col, n, l)));
    for (size_t i = static_cast<size_t>(l); i < n; i += kGramSchmidtLanes) col[i] = col[i] * inv;
    __syncthreads();  // the scaled column is read by every lane below
    for (int d = c + 1; d < r; ++d) {
      float* rest = pt + static_cast<size_t>(d) * n;
      const auto f = static_cast<float>(blockSum(shared, gsLanePartial(col, rest, n, l)));
      for (size_t i = static_cast<size_t>(l); i < n; i += kGramSchmidtLanes) rest[i] = gsSubtract(rest[i], f, col[i]);
      __syncthreads();  // `rest` is final before it becomes a column (or its next dot product is read)
    }
  }
}

__global__ void accumulateKernel(float* g, const float* e, float* in, size_t n) {
  DTRAIN_PSGD_STRIDE(i, n) efAccumulate(g, e, in, i);
}

__global__ void residualKernel(float* e, const float* in, const float* g, size_t n) {
  DTRAIN_PSGD_STRIDE(i, n) efResidual(e, in, g, i);
}

__global__ void divideKernel(float* x, size_t n, float divisor) {
  DTRAIN_PSGD_STRIDE(i, n) x[i] = x[i] / divisor;
}

}  // namespace

void powerSgdGramSchmidt(float* pt, int r, int64_t rows) {
  if (r <= 0 || rows <= 0) return;
  gramSchmidtKernel<<<1, kGramSchmidtLanes>>>(pt, r, static_cast<size_t>(rows));
  DTRAIN_CU_CHECK_LAUNCH("gramSchmidtKernel");
}

void powerSgdAccumulate(float* g, const float* e, float* in, size_t n) {
  if (n == 0) return;
  accumulateKernel<<<gridFor(n, kThreads), kThreads>>>(g, e, in, n);
  DTRAIN_CU_CHECK_LAUNCH("accumulateKernel");
}

void powerSgdResidual(float* e, const float* in, const float* g, size_t n) {
  if (n == 0) return;
  residualKernel<<<gridFor(n, kThreads), kThreads>>>(e, in, g, n);
  DTRAIN_CU_CHECK_LAUNCH("residualKernel");
}

void powerSgdDivide(float* x, size_t n, float divisor) {
  if (n == 0) return;
  divideKernel<<<gridFor(n, kThreads), kThreads>>>(x, n, divisor);
  DTRAIN_CU_CHECK_LAUNCH("divideKernel");
}

void copyFloatsAsync(float* dst, const float* src, size_t n) {
  if (n == 0) return;
  DTRAIN_CU_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, cudaStreamLegacy));
}

}  // namespace dtrain::gpu::kernels
