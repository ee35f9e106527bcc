// conv2d/maxpool2d kernels and the dropout layer's (kernels.h). Like kernels_nn.cu: one thread per
// element (grid-stride) or one block per row (block-stride), bounded grids (grid.h), no float atomics. The
// backward passes gather (one thread per input element, summing what reached it) instead of scattering, which
// needs no atomics and adds in the CPU's order (layers_spatial.cpp), so they round alike.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "lib/gpu/grid.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/launch.h"
#include "lib/gpu/philox.h"
#include "lib/gpu/reduce_index.h"
#include "lib/gpu/scratch.h"
#include "lib/gpu/window_index.h"
#include "lib/gpu/window_kernels.h"

namespace dtrain::gpu::kernels {
namespace {

constexpr int kThreads = 256;

unsigned blocksFor(size_t n) { return gridFor(n, kThreads); }

#define DTRAIN_GRID_STRIDE(i, n) \
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<size_t>(blockDim.x) * gridDim.x)

// Each element-wise kernel's body is one call of window_kernels.h, the functions tests/gpu emulates.
__global__ void im2colKernel(const float* x, float* cols, size_t total, Window2d g) {
  DTRAIN_GRID_STRIDE(idx, total) cols[idx] = im2colElement(g, x, static_cast<int64_t>(idx));
}

// A gather: each dx element sums the dcols elements im2col read it into, in the CPU's order.
__global__ void col2imKernel(const float* dcols, float* dx, size_t total, Window2d g) {
  DTRAIN_GRID_STRIDE(idx, total) dx[idx] = col2imElement(g, dcols, static_cast<int64_t>(idx));
}

__global__ void addChannelBiasKernel(float* y, const float* bias, size_t total, int64_t channels, int64_t positions) {
  DTRAIN_GRID_STRIDE(idx, total) y[idx] += bias[channelOf(static_cast<int64_t>(idx), channels, positions)];
}

// Pass 1 of a per-channel sum (reduce_index.h's channelChunks): one block per (channel, chunk), block-strided over
// both; its threads' sums (channelThreadSum) halved by a fixed tree in shared memory (channelBlockSum's pairs).
__global__ void channelBiasGradKernel(ColumnChunks p, const float* dy, float* db, float* partials, int64_t channels,
                                      int64_t positions, bool accumulate) {
  __shared__ float sh[kChannelThreads];
  for (int64_t ch = blockIdx.x; ch < channels; ch += gridDim.x) {
    for (int64_t k = blockIdx.y; k < p.chunks; k += gridDim.y) {
      sh[threadIdx.x] = channelThreadSum(p, k, ch, threadIdx.x, dy, channels, positions);
      __syncthreads();
      for (unsigned s = kChannelThreads / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
      }
      if (threadIdx.x == 0) {
        if (p.chunks == 1) {
          db[ch] = (accumulate ? db[ch] : 0.0f) + sh[0];
        } else {
          partials[k * channels + ch] = sh[0];
        }
      }
      __syncthreads();  // sh is rewritten by the next cell
    }
  }
}

__global__ void channelCombineKernel(ColumnChunks p, const float* partials, float* db, int64_t channels, bool accumulate) {
  DTRAIN_GRID_STRIDE(ch, static_cast<size_t>(channels)) {
    columnSumCombine(p, static_cast<int64_t>(ch), channels, partials, db, accumulate);
  }
}

__global__ void maxPoolForwardKernel(const float* x, float* y, int32_t* argmax, size_t total, Window2d g) {
  DTRAIN_GRID_STRIDE(idx, total) maxPoolForwardElement(g, x, static_cast<int64_t>(idx), y, argmax);
}

// A gather: each input element sums the output gradients whose argmax it is, in increasing output order.
__global__ void maxPoolBackwardKernel(const float* dy, const int32_t* argmax, float* dx, size_t total, Window2d g) {
  DTRAIN_GRID_STRIDE(idx, total) dx[idx] = maxPoolBackwardElement(g, dy, argmax, static_cast<int64_t>(idx));
}

// One Philox block (4 elements) per thread: philox.h's per-thread work, the function tests/gpu emulates.
__global__ void dropoutKernel(const float* in, DropoutDraw draw, float* out, size_t n, size_t quads) {
  DTRAIN_GRID_STRIDE(q, quads) dropoutQuad(draw, DropoutForm::kMultiply, 0, q, in, out, n);
}

size_t count(int64_t batch, int64_t perSample) { return static_cast<size_t>(batch) * static_cast<size_t>(perSample); }

}  // namespace

void im2col(const float* x, float* cols, int64_t batch, const Window2d& g) {
  const size_t total = count(batch, g.c * g.kh * g.kw * g.oh * g.ow);
  if (total == 0) return;
  im2colKernel<<<blocksFor(total), kThreads>>>(x, cols, total, g);
  DTRAIN_CU_CHECK_LAUNCH("im2colKernel");
}

void col2im(const float* dcols, float* dx, int64_t batch, const Window2d& g) {
  const size_t total = count(batch, g.c * g.h * g.w);
  if (total == 0) return;
  col2imKernel<<<blocksFor(total), kThreads>>>(dcols, dx, total, g);
  DTRAIN_CU_CHECK_LAUNCH("col2imKernel");
}

void addChannelBias(float* y, const float* bias, int64_t batch, int64_t channels, int64_t positions) {
  const size_t total = count(batch, channels * positions);
  if (total == 0) return;
  addChannelBiasKernel<<<blocksFor(total), kThreads>>>(y, bias, total, channels, positions);
  DTRAIN_CU_CHECK_LAUNCH("addChannelBiasKernel");
}

void channelBiasGrad(const float* dy, float* db, int64_t batch, int64_t channels, int64_t positions, bool accumulate) {
  if (channels == 0) return;
  const ColumnChunks p = channelChunks(batch, positions);
  float* partials = p.chunks > 1 ? reduceScratch(static_cast<size_t>(p.chunks * channels)) : nullptr;
  const dim3 grid(rowGrid(channels), static_cast<unsigned>(p.chunks));  // chunks <= 128: within gridDim.y
  channelBiasGradKernel<<<grid, kChannelThreads>>>(p, dy, db, partials, channels, positions, accumulate);
  DTRAIN_CU_CHECK_LAUNCH("channelBiasGradKernel");
  if (p.chunks > 1) {
    channelCombineKernel<<<blocksFor(static_cast<size_t>(channels)), kThreads>>>(p, partials, db, channels, accumulate);
    DTRAIN_CU_CHECK_LAUNCH("channelCombineKernel");
  }
}

void maxPoolForward(const float* x, float* y, int32_t* argmax, int64_t batch, const Window2d& g) {
  const size_t total = count(batch, g.c * g.oh * g.ow);
  if (total == 0) return;
  maxPoolForwardKernel<<<blocksFor(total), kThreads>>>(x, y, argmax, total, g);
  DTRAIN_CU_CHECK_LAUNCH("maxPoolForwardKernel");
}

void maxPoolBackward(const float* dy, const int32_t* argmax, float* dx, int64_t batch, const Window2d& g) {
  const size_t total = count(batch, g.c * g.h * g.w);
  if (total == 0) return;
  maxPoolBackwardKernel<<<blocksFor(total), kThreads>>>(dy, argmax, dx, total, g);
  DTRAIN_CU_CHECK_LAUNCH("maxPoolBackwardKernel");
}

void dropout(const float* in, const DropoutDraw& draw, float* out, size_t n) {
  if (n == 0) return;
  const size_t quads = dropoutQuads(0, n);
  dropoutKernel<<<blocksFor(quads), kThreads>>>(in, draw, out, n, quads);
  DTRAIN_CU_CHECK_LAUNCH("dropoutKernel");
}

}  // namespace dtrain::gpu::kernels
