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
//
// The weight and bias gradients' first pass folded into the dx kernel (layerNormBackwardParamsKernel, docs/gpu.md
// "LayerNorm backward with its parameter gradients"): reduce_index.h's chunked two-pass column sums give each
// (chunk k, column j) to one thread that adds the chunk's rows in row order (layerNormParamChunk). The fused kernel
// runs one block of groups x threads per chunk: each pass over the chunk takes `groups` consecutive rows, group g
// computing row g's dx exactly as the dx kernel's block does (its own `threads` threads, the same two passes, the
// same tree over them, so the same dx bits); between the groups' sums and their stores (a barrier after it, so dx
// may share dy's or x's memory as the dx kernel allows), every thread T of the block adds the rows of that pass, in
// row order, to its columns' running sums (columns T, T + groups x threads, ...; accW[j], accB[j] in the block's
// shared memory, each element touched by its one thread only), reading x and dy again (from the cache: the groups
// just read them). So every column's sums see the chunk's rows in row order from the same start, through
// layerNormParamChunk's expressions (layerNormParamTerm; xhat = (x - mean) * rstd): its partials (or, with one
// chunk, dw and db) bit for bit; pass 2 (columnSumCombine) is unchanged. The sums need only x, dy, mean and rstd,
// never dx.
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

// --- The fused kernel's chunk (layerNormBackwardParamsKernel): thread T of `all` (= groups x threads) threads;
// accW, accB: d floats each, the block's shared memory ---

// Thread T's sums at the start of chunk k, as layerNormParamChunk starts them: dw[j], db[j] with a single chunk and
// accumulate (db may be null), else 0.
DTRAIN_HOST_DEVICE inline void layerNormParamChunkStart(const ColumnChunks& p, const float* dw, const float* db,
                                                        bool accumulate, float* accW, float* accB, int64_t d,
                                                        int64_t T, int64_t all) {
  const bool direct = p.chunks == 1;
  for (int64_t j = T; j < d; j += all) {
    accW[j] = direct && accumulate ? dw[j] : 0.0f;
    accB[j] = direct && accumulate && db != nullptr ? db[j] : 0.0f;
  }
}

// Row r's terms added to thread T's columns' sums (xr, dyr: the row's x and dy; mu, rs: mean[r], rstd[r]):
// layerNormParamChunk's loop body for one row.
DTRAIN_HOST_DEVICE inline void layerNormParamRowAdd(const float* xr, const float* dyr, float mu, float rs, int64_t d,
                                                    int64_t T, int64_t all, float* accW, float* accB) {
  for (int64_t j = T; j < d; j += all) {
    const float g = dyr[j];
    accW[j] = layerNormParamTerm(accW[j], g, (xr[j] - mu) * rs);
    accB[j] += g;
  }
}

// Thread T's sums at the end of chunk k, stored where layerNormParamChunk stores them: dw and db (db may be null)
// with a single chunk, else partials[k * d + j] (dw's) and partials[(chunks + k) * d + j] (db's).
DTRAIN_HOST_DEVICE inline void layerNormParamChunkStore(const ColumnChunks& p, int64_t k, const float* accW,
                                                        const float* accB, float* dw, float* db, float* partials,
                                                        int64_t d, int64_t T, int64_t all) {
  for (int64_t j = T; j < d; j += all) {
    if (p.chunks == 1) {
      dw[j] = accW[j];
      if (db != nullptr) db[j] = accB[j];
    } else {
      partials[k * d + j] = accW[j];
      partials[(p.chunks + k) * d + j] = accB[j];
    }
  }
}

}  // namespace dtrain::gpu
