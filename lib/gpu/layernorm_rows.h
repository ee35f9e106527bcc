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
//
// LayerNorm backward's dx (layerNormDxKernel) likewise: two passes per thread around the block's two sums; its fused
// form (llm.c's layernorm_backward, which accumulates into dinp) adds a residual's gradient to each value as it
// stores it, with addRounded (reduce_index.h), so its bits are the plain dx's and then kernels::add's.
#pragma once

#include <cstdint>

#include "lib/gpu/host_device.h"
#include "lib/gpu/reduce_index.h"

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

// --- Backward (layerNormDxKernel, kernels::layerNormBackward and residualLayerNormBackward): one block per row ---
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w (dy itself without w), xhat = (x - mean) * rstd.

// Thread t's partial sums of g and of g * xhat over row r (xr, dyr: the row's x and dy): the kernel's first pass.
DTRAIN_HOST_DEVICE inline void layerNormDxRowSums(const float* xr, const float* w, const float* dyr, float mu,
                                                  float rs, int64_t d, int64_t t, int64_t threads, float* sg,
                                                  float* sgx) {
  float a = 0.0f, b = 0.0f;
  for (int64_t j = t; j < d; j += threads) {
    const float g = w != nullptr ? dyr[j] * w[j] : dyr[j];
    a += g;
    b += g * ((xr[j] - mu) * rs);
  }
  *sg = a, *sgx = b;
}

// Thread t's stores of dx over row r, given the row's means of g and g * xhat (the block's sums / d). With rr (the
// row of a residual's gradient; null: none) each stored value is that dx plus rr[j] (llm.c's layernorm_backward,
// which accumulates into dinp): the block's dx = dy + g of its first child, a layernorm. The add is addRounded
// (__fadd_rn on the device: never contracted with the product before it), so the stored bits are the plain dx's
// and then kernels::add's, whatever the operands' order (a float addition is commutative).
DTRAIN_HOST_DEVICE inline void layerNormDxRowStore(const float* xr, const float* w, const float* dyr,
                                                   const float* rr, float* dxr, float mu, float rs, float meanG,
                                                   float meanGx, int64_t d, int64_t t, int64_t threads) {
  for (int64_t j = t; j < d; j += threads) {
    const float g = w != nullptr ? dyr[j] * w[j] : dyr[j];
    const float xhat = (xr[j] - mu) * rs;
    const float v = rs * (g - meanG - xhat * meanGx);
    dxr[j] = rr != nullptr ? addRounded(v, rr[j]) : v;
  }
}

}  // namespace dtrain::gpu
