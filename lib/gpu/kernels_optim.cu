// Optimizer updates and deterministic reductions (kernels.h). Compiled with --fmad=false (lib/gpu/CMakeLists.txt):
// the CPU optimizers (optimizer.cpp, -ffp-contract=off) and PyTorch's kernels multiply and add separately, and
// an FMA would change the last bit of the updates.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "lib/gpu/grid.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/launch.h"
#include "lib/gpu/optim_math.h"

namespace dtrain::gpu::kernels {
namespace {

constexpr int kThreads = 256;

unsigned blocksFor(size_t n) { return gridFor(n, kThreads); }  // grid-stride loops: grid.h

#define DTRAIN_GRID_STRIDE(i, n) \
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<size_t>(blockDim.x) * gridDim.x)

// optim_math.h's sgdElement / adamElement: optimizer.cpp's loops element for element, the functions tests/gpu
// emulates.
__global__ void sgdKernel(float* p, const float* g, float* buf, size_t n, SgdStep s) {
  DTRAIN_GRID_STRIDE(i, n) sgdElement(p, g, buf, i, s);
}

__global__ void adamKernel(float* p, const float* g, float* m, float* v, float* vmax, size_t n, AdamStep s) {
  DTRAIN_GRID_STRIDE(i, n) adamElement(p, g, m, v, vmax, i, s);
}

// torch.optim.Adagrad's _single_tensor_adagrad, as optimizer.cpp: the same operations in the same order
// (optim_math.h's adagradElement, the function tests/gpu emulates).
__global__ void adagradKernel(float* p, const float* g, float* sum, size_t n, AdagradStep s) {
  DTRAIN_GRID_STRIDE(i, n) adagradElement(p, g, sum, i, s);
}

// Reductions: each of kReduceBlocks blocks sums a fixed strided subset into partials[block] (tree order in shared
// memory), then one block sums the partials the same way. Fixed orders: the result is the same on every run.
struct Identity {
  __device__ double operator()(double x) const { return x; }
};
struct IntValue {
  __device__ double operator()(int32_t x) const { return static_cast<double>(x); }
};
struct Square {
  __device__ double operator()(float x) const { return static_cast<double>(x) * static_cast<double>(x); }
};
struct NonFinite {
  __device__ double operator()(float x) const { return isfinite(x) ? 0.0 : 1.0; }
};

__device__ double blockSumDouble(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  return sh[0];
}

template <class T, class F>
__global__ void partialSums(const T* v, size_t n, double* partials, F f) {
  __shared__ double sh[kThreads];
  double acc = 0.0;
  for (size_t i = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<size_t>(kThreads) * gridDim.x)
    acc += f(v[i]);
  const double total = blockSumDouble(acc, sh);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void finalSum(double* partials, int count) {
  __shared__ double sh[kThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += kThreads) acc += partials[i];
  const double total = blockSumDouble(acc, sh);
  __syncthreads();
  if (threadIdx.x == 0) partials[0] = total;
}

// The sum into partials[0], on the device (n > 0).
template <class T, class F>
void reduceOnDevice(const T* v, size_t n, double* partials, F f) {
  partialSums<<<kReduceBlocks, kThreads>>>(v, n, partials, f);
  DTRAIN_CU_CHECK_LAUNCH("partialSums");
  finalSum<<<1, kThreads>>>(partials, kReduceBlocks);
  DTRAIN_CU_CHECK_LAUNCH("finalSum");
}

template <class T, class F>
double reduce(const T* v, size_t n, double* partials, F f) {
  if (n == 0) return 0.0;
  reduceOnDevice(v, n, partials, f);
  double out = 0.0;
  DTRAIN_CU_CHECK(cudaMemcpy(&out, partials, sizeof(double), cudaMemcpyDeviceToHost));
  return out;
}

}  // namespace

double sumDoubles(const double* v, size_t n, double* partials) { return reduce(v, n, partials, Identity{}); }
int64_t sumInts(const int32_t* v, size_t n, double* partials) {
  return static_cast<int64_t>(reduce(v, n, partials, IntValue{}));
}
double sumSquares(const float* v, size_t n, double* partials) { return reduce(v, n, partials, Square{}); }
bool allFinite(const float* v, size_t n, double* partials) { return reduce(v, n, partials, NonFinite{}) == 0.0; }
void sumSquaresOnDevice(const float* v, size_t n, double* partials) {
  if (n == 0) {
    DTRAIN_CU_CHECK(cudaMemsetAsync(partials, 0, sizeof(double), cudaStreamLegacy));
    return;
  }
  reduceOnDevice(v, n, partials, Square{});
}

int32_t readInt(const int32_t* p) {
  int32_t out = 0;
  DTRAIN_CU_CHECK(cudaMemcpy(&out, p, sizeof(out), cudaMemcpyDeviceToHost));
  return out;
}

float readFloat(const float* p) {
  float out = 0;
  DTRAIN_CU_CHECK(cudaMemcpy(&out, p, sizeof(out), cudaMemcpyDeviceToHost));
  return out;
}

void sgdStep(float* p, const float* g, float* momentumBuffer, size_t n, const SgdStep& s) {
  if (n == 0) return;
  sgdKernel<<<blocksFor(n), kThreads>>>(p, g, momentumBuffer, n, s);
  DTRAIN_CU_CHECK_LAUNCH("sgdKernel");
}

void adamStep(float* p, const float* g, float* m, float* v, float* vmax, size_t n, const AdamStep& s) {
  if (n == 0) return;
  adamKernel<<<blocksFor(n), kThreads>>>(p, g, m, v, vmax, n, s);
  DTRAIN_CU_CHECK_LAUNCH("adamKernel");
}

void adagradStep(float* p, const float* g, float* sum, size_t n, const AdagradStep& s) {
  if (n == 0) return;
  adagradKernel<<<blocksFor(n), kThreads>>>(p, g, sum, n, s);
  DTRAIN_CU_CHECK_LAUNCH("adagradKernel");
}

}  // namespace dtrain::gpu::kernels
