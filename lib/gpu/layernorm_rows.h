// LayerNorm forward, one block of threads per row (kernels_nn.cu's layerNormForwardKernel and its fusion with a
// residual add, residualLayerNormForwardKernel): each thread's share of the row's two sums, as plain C++ compiled
// for the host and the device, so tests/gpu/test_gpu_residual_ln.cpp runs every thread's work on the CPU.
//
// Thread t of `threads` visits the row's columns t, t + threads, t + 2 threads, ... in that order; the block then
// adds the threads' partials by a fixed halving tree (kernels_nn.cu blockSum). The fused kernel (llm.c's
// fused_residual_forward) first forms each element of the residual sum a + f, the float addition kernels::add
// makes, stores it in place of f (the block's output: the residual stream) and sums it; everything after that
// reads the stored sums exactly as the unfused kernel reads its input, so the row's mean, rstd and outputs are the
// unfused add-then-LayerNorm's, bit for bit (same values, same order, same expressions).
#pragma once

#include <cstdint>

#include "lib/gpu/host_device.h"

namespace dtrain::gpu {

// Thread t's partial sum of row xr [d]: the first pass of layerNormForwardKernel.
DTRAIN_HOST_DEVICE inline float layerNormRowSum(const float* xr, int64_t d, int64_t t, int64_t threads) {
  float s = 0.0f;
  for (int64_t j = t; j < d; j += threads) s += xr[j];
  return s;
}

// The fused kernel's first pass: fr[j] = ar[j] + fr[j] (the residual sum, kernels::add's a + b) for thread t's
// columns, stored in place, and their partial sum as layerNormRowSum sums them.
DTRAIN_HOST_DEVICE inline float residualRowSum(const float* ar, float* fr, int64_t d, int64_t t, int64_t threads) {
  float s = 0.0f;
  for (int64_t j = t; j < d; j += threads) {
    const float v = ar[j] + fr[j];
    fr[j] = v;
    s += v;
  }
  return s;
}

// Thread t's partial sum of squared deviations from the row's mean: the second pass (both kernels).
DTRAIN_HOST_DEVICE inline float layerNormRowSquares(const float* xr, float mu, int64_t d, int64_t t,
                                                    int64_t threads) {
  float v = 0.0f;
  for (int64_t j = t; j < d; j += threads) v += (xr[j] - mu) * (xr[j] - mu);
  return v;
}

}  // namespace dtrain::gpu
