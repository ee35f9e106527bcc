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

// One block of kGramSchmidtLanes threads over one matrix: column c normalised, then removed from columns
// c + 1, ..., r - 1.
__device__ void gramSchmidtBlock(double* shared, float* pt, int r, size_t n) {
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

// Block b: matrix b of the batch (powersgd_math.h's GsBatch, in the kernel's parameters).
__global__ void gramSchmidtKernel(const GsBatch batch) {
  __shared__ double shared[kGramSchmidtLanes];
  const GsMatrix& m = batch.matrices[blockIdx.x];
  gramSchmidtBlock(shared, m.pt, m.rank, static_cast<size_t>(m.rows));
}

// Over q [0, nq) then g [0, ng).
__global__ void flagNonFiniteKernel(uint32_t* gate, const float* q, size_t nq, const float* g, size_t n) {
  DTRAIN_PSGD_STRIDE(i, n) psgdFlagNonFinite(q, nq, g, gate, i);
}

__global__ void restartKernel(float* q, const float* initial, size_t n, const uint32_t* gate) {
  DTRAIN_PSGD_STRIDE(i, n) psgdRestart(q, initial, gate, i);
}

__global__ void accumulateKernel(float* g, const float* e, float* in, size_t n) {
  DTRAIN_PSGD_STRIDE(i, n) efAccumulate(g, e, in, i);
}

__global__ void residualKernel(float* e, const float* in, const float* g, size_t n, const uint32_t* gate) {
  DTRAIN_PSGD_STRIDE(i, n) psgdGatedResidual(e, in, g, gate, i);
}

__global__ void divideKernel(float* x, size_t n, float divisor) {
  DTRAIN_PSGD_STRIDE(i, n) x[i] = x[i] / divisor;
}

}  // namespace

void powerSgdGramSchmidt(const GsMatrix* matrices, size_t count) {
  GsBatch batch;
  for (size_t next = 0; next < count;) {
    next = gsNextBatch(matrices, count, next, batch);
    if (batch.count == 0) break;
    gramSchmidtKernel<<<batch.count, kGramSchmidtLanes>>>(batch);
    DTRAIN_CU_CHECK_LAUNCH("gramSchmidtKernel");
  }
}

void powerSgdCheckFinite(uint32_t* gate, const float* q, size_t nq, const float* g, size_t ng) {
  DTRAIN_CU_CHECK(cudaMemsetAsync(gate, 0, 2 * sizeof(uint32_t), cudaStreamLegacy));
  const size_t n = nq + ng;
  if (n == 0) return;
  flagNonFiniteKernel<<<gridFor(n, kThreads), kThreads>>>(gate, q, nq, g, n);
  DTRAIN_CU_CHECK_LAUNCH("flagNonFiniteKernel");
}

void powerSgdRestart(float* q, const float* initial, size_t n, const uint32_t* gate) {
  if (n == 0) return;
  restartKernel<<<gridFor(n, kThreads), kThreads>>>(q, initial, n, gate);
  DTRAIN_CU_CHECK_LAUNCH("restartKernel");
}

void powerSgdAccumulate(float* g, const float* e, float* in, size_t n) {
  if (n == 0) return;
  accumulateKernel<<<gridFor(n, kThreads), kThreads>>>(g, e, in, n);
  DTRAIN_CU_CHECK_LAUNCH("accumulateKernel");
}

void powerSgdResidual(float* e, const float* in, const float* g, size_t n, const uint32_t* gate) {
  if (n == 0) return;
  residualKernel<<<gridFor(n, kThreads), kThreads>>>(e, in, g, n, gate);
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
