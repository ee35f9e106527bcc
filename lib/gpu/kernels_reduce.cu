// Column reductions: bias, LayerNorm weight/bias and position-table gradients; the embedding's token-table
// gradient over rows ordered by token; a linear's bias fused into the activation after it (kernels.h). The
// per-thread work is reduce_index.h's, shared with the CPU emulation in tests/gpu/test_gpu_reduce.cpp; this file
// only maps threads onto it and launches. Deterministic: fixed row chunks (a function of the shape only), partials
// combined in a fixed order, no float atomics.
//
// Launch limits (checked by reading, and cellGrid/gridFor are unit-tested): blocks of kColumnTile = 128 threads;
// grid x <= 2^20 column tiles, grid y <= 65535 lanes (chunks are <= 128; embedding segments may be more, the
// threads then stride); no shared memory. Partials live in reduceScratch (scratch.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "lib/gpu/bf16_store.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/launch.h"
#include "lib/gpu/reduce_index.h"
#include "lib/gpu/scratch.h"

namespace dtrain::gpu::kernels {
namespace {

#define DTRAIN_GRID_STRIDE(i, n) \
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<size_t>(blockDim.x) * gridDim.x)

__global__ void columnSumChunkKernel(ColumnChunks p, CellGrid g, int64_t cols, const float* v, float* out,
                                     float* partials, bool accumulate) {
  forEachCell(g, blockIdx.x, blockIdx.y, threadIdx.x, p.chunks, cols,
              [&](int64_t k, int64_t c) { columnSumChunk(p, k, c, cols, v, out, partials, accumulate); });
}

__global__ void columnSumCombineKernel(ColumnChunks p, int64_t cols, const float* partials, float* out,
                                       bool accumulate) {
  DTRAIN_GRID_STRIDE(c, static_cast<size_t>(cols)) {
    columnSumCombine(p, static_cast<int64_t>(c), cols, partials, out, accumulate);
  }
}

__global__ void layerNormParamChunkKernel(ColumnChunks p, CellGrid g, int64_t d, const float* x, const float* mean,
                                          const float* rstd, const float* dy, float* dw, float* db, float* partials,
                                          bool accumulate) {
  forEachCell(g, blockIdx.x, blockIdx.y, threadIdx.x, p.chunks, d, [&](int64_t k, int64_t j) {
    layerNormParamChunk(p, k, j, d, x, mean, rstd, dy, dw, db, partials, accumulate);
  });
}

// Out: float, or uint16_t for bf16 storage (only the store differs: bf16_store.h).
template <class Out>
__global__ void biasActivationForwardKernel(Activation f, const float* xw, const float* bias, Out* y, size_t n,
                                            int64_t cols) {
  DTRAIN_GRID_STRIDE(i, n) {
    const auto e = static_cast<int64_t>(i);
    storeActivation(y, e, biasActivationValue(f, xw, bias, e, cols));
  }
}

__global__ void biasActivationBackwardChunkKernel(Activation f, ColumnChunks p, CellGrid g, int64_t cols,
                                                  const float* xw, const float* bias, const float* y, const float* dy,
                                                  float* dx, float* db, float* partials, bool accumulate) {
  forEachCell(g, blockIdx.x, blockIdx.y, threadIdx.x, p.chunks, cols, [&](int64_t k, int64_t c) {
    biasActivationBackwardChunk(f, p, k, c, cols, xw, bias, y, dy, dx, db, partials, accumulate);
  });
}

__global__ void embeddingTokenGradKernel(CellGrid g, int64_t segments, int64_t c, const int32_t* order,
                                         const int32_t* start, const int32_t* tok, const float* dy, float* gwte) {
  forEachCell(g, blockIdx.x, blockIdx.y, threadIdx.x, segments, c,
              [&](int64_t s, int64_t j) { embeddingTokenSegment(s, j, c, order, start, tok, dy, gwte); });
}

dim3 cells(const CellGrid& g) { return dim3(g.x, g.y); }

// Pass 2 of a plan with several chunks (nothing to do with one: pass 1 wrote out).
void combine(const ColumnChunks& p, int64_t cols, const float* partials, float* out, bool accumulate) {
  if (p.chunks == 1) return;
  columnSumCombineKernel<<<gridFor(static_cast<size_t>(cols), kColumnTile), kColumnTile>>>(p, cols, partials, out,
                                                                                         accumulate);
  DTRAIN_CU_CHECK_LAUNCH("columnSumCombineKernel");
}

float* partialsFor(const ColumnChunks& p, int64_t cols, int perColumn) {
  const int64_t n = partialCount(p, cols) * perColumn;
  return n > 0 ? reduceScratch(static_cast<size_t>(n)) : nullptr;
}

}  // namespace

void biasGrad(const float* dy, float* db, int64_t rows, int64_t cols, bool accumulate) {
  if (cols == 0) return;
  const ColumnChunks p = columnChunks(rows);
  const CellGrid g = cellGrid(cols, p.chunks);
  float* partials = partialsFor(p, cols, 1);
  columnSumChunkKernel<<<cells(g), kColumnTile>>>(p, g, cols, dy, db, partials, accumulate);
  DTRAIN_CU_CHECK_LAUNCH("columnSumChunkKernel");
  combine(p, cols, partials, db, accumulate);
}

void layerNormParamGrad(const float* x, const float* mean, const float* rstd, const float* dy, float* dw, float* db,
                        int64_t rows, int64_t d, bool accumulate) {
  if (d == 0) return;
  const ColumnChunks p = columnChunks(rows);
  const CellGrid g = cellGrid(d, p.chunks);
  float* partials = partialsFor(p, d, 2);
  layerNormParamChunkKernel<<<cells(g), kColumnTile>>>(p, g, d, x, mean, rstd, dy, dw, db, partials, accumulate);
  DTRAIN_CU_CHECK_LAUNCH("layerNormParamChunkKernel");
  layerNormParamCombine(partials, dw, db, rows, d, accumulate);
}

float* layerNormParamPartials(int64_t rows, int64_t d) { return partialsFor(columnChunks(rows), d, 2); }

void layerNormParamCombine(const float* partials, float* dw, float* db, int64_t rows, int64_t d, bool accumulate) {
  const ColumnChunks p = columnChunks(rows);
  if (p.chunks == 1 || d == 0) return;
  combine(p, d, partials, dw, accumulate);
  if (db != nullptr) combine(p, d, partials + p.chunks * d, db, accumulate);
}

void biasActivationForward(Activation f, const float* xw, const float* bias, float* y, int64_t rows, int64_t cols) {
  const size_t n = static_cast<size_t>(rows * cols);
  if (n == 0) return;
  biasActivationForwardKernel<<<gridFor(n, 256), 256>>>(f, xw, bias, y, n, cols);
  DTRAIN_CU_CHECK_LAUNCH("biasActivationForwardKernel");
}

void biasActivationForwardBf16(Activation f, const float* xw, const float* bias, uint16_t* y, int64_t rows,
                               int64_t cols) {
  const size_t n = static_cast<size_t>(rows * cols);
  if (n == 0) return;
  biasActivationForwardKernel<<<gridFor(n, 256), 256>>>(f, xw, bias, y, n, cols);
  DTRAIN_CU_CHECK_LAUNCH("biasActivationForwardKernel<bf16>");
}

void biasActivationBackward(Activation f, const float* xw, const float* bias, const float* y, const float* dy,
                            float* dx, float* db, int64_t rows, int64_t cols, bool accumulate) {
  if (cols == 0) return;
  const ColumnChunks p = columnChunks(rows);
  const CellGrid g = cellGrid(cols, p.chunks);
  float* partials = partialsFor(p, cols, 1);
  biasActivationBackwardChunkKernel<<<cells(g), kColumnTile>>>(f, p, g, cols, xw, bias, y, dy, dx, db, partials,
                                                               accumulate);
  DTRAIN_CU_CHECK_LAUNCH("biasActivationBackwardChunkKernel");
  combine(p, cols, partials, db, accumulate);
}

void embeddingTokenGrad(const int32_t* order, const int32_t* start, const int32_t* tok, int64_t segments,
                        const float* dy, float* gwte, int64_t c) {
  if (segments == 0 || c == 0) return;
  const CellGrid g = cellGrid(c, segments);
  embeddingTokenGradKernel<<<cells(g), kColumnTile>>>(g, segments, c, order, start, tok, dy, gwte);
  DTRAIN_CU_CHECK_LAUNCH("embeddingTokenGradKernel");
}

}  // namespace dtrain::gpu::kernels
