// conv2d/maxpool2d kernels and the elementwise product of dropout (kernels.h). Like kernels_nn.cu: one thread per
// element (grid-stride) or one block per row (block-stride), bounded grids (grid.h), no float atomics. The
// backward passes gather (one thread per input element, summing what reached it) instead of scattering, which
// needs no atomics and adds in the CPU's order (layers_spatial.cpp), so they round alike.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "lib/gpu/grid.h"
#include "lib/gpu/kernels.h"
#include "lib/gpu/launch.h"

namespace dtrain::gpu::kernels {
namespace {

constexpr int kThreads = 256;  // a power of two: the tree reduction halves it

unsigned blocksFor(size_t n) { return gridFor(n, kThreads); }

#define DTRAIN_GRID_STRIDE(i, n) \
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<size_t>(blockDim.x) * gridDim.x)

// The smallest o >= 0 with o * stride >= lo (lo may be negative): the first output whose window reaches lo.
__device__ int64_t firstOutput(int64_t lo, int64_t stride) { return lo <= 0 ? 0 : (lo + stride - 1) / stride; }

__global__ void im2colKernel(const float* x, float* cols, size_t total, Window2d g) {
  const int64_t positions = g.oh * g.ow, rowsPerSample = g.c * g.kh * g.kw;
  DTRAIN_GRID_STRIDE(idx, total) {
    const int64_t e = static_cast<int64_t>(idx);
    const int64_t q = e % positions, r = (e / positions) % rowsPerSample, n = e / (positions * rowsPerSample);
    const int64_t j = r % g.kw, i = (r / g.kw) % g.kh, ci = r / (g.kw * g.kh);
    const int64_t ox = q % g.ow, oy = q / g.ow;
    const int64_t iy = oy * g.sh - g.ph + i, ix = ox * g.sw - g.pw + j;
    cols[idx] = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w ? x[((n * g.c + ci) * g.h + iy) * g.w + ix] : 0.0f;
  }
}

// Tap (i, j) of output (oy, ox) reads input (oy * sh - ph + i, ox * sw - pw + j): for input (iy, ix) and tap (i, j),
// oy = (iy + ph - i) / sh when that divides evenly and lands in [0, oh).
__global__ void col2imKernel(const float* dcols, float* dx, size_t total, Window2d g) {
  const int64_t positions = g.oh * g.ow, rowsPerSample = g.c * g.kh * g.kw;
  DTRAIN_GRID_STRIDE(idx, total) {
    const int64_t e = static_cast<int64_t>(idx);
    const int64_t ix = e % g.w, iy = (e / g.w) % g.h, ci = (e / (g.w * g.h)) % g.c, n = e / (g.w * g.h * g.c);
    const float* d = dcols + n * rowsPerSample * positions;
    float sum = 0.0f;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ty = iy + g.ph - i;
      if (ty < 0 || ty % g.sh != 0 || ty / g.sh >= g.oh) continue;
      const int64_t oy = ty / g.sh;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t tx = ix + g.pw - j;
        if (tx < 0 || tx % g.sw != 0 || tx / g.sw >= g.ow) continue;
        const int64_t ox = tx / g.sw;
        sum += d[((ci * g.kh + i) * g.kw + j) * positions + oy * g.ow + ox];
      }
    }
    dx[idx] = sum;
  }
}

__global__ void addChannelBiasKernel(float* y, const float* bias, size_t total, int64_t channels, int64_t positions) {
  DTRAIN_GRID_STRIDE(idx, total) y[idx] += bias[(static_cast<int64_t>(idx) / positions) % channels];
}

// One block per channel (block-stride over channels); its threads stride over the batch x positions values.
__global__ void channelBiasGradKernel(const float* dy, float* db, int64_t batch, int64_t channels, int64_t positions,
                                      bool accumulate) {
  __shared__ float sh[kThreads];
  for (int64_t ch = blockIdx.x; ch < channels; ch += gridDim.x) {
    float acc = 0.0f;
    for (int64_t e = threadIdx.x; e < batch * positions; e += kThreads) {
      const int64_t n = e / positions, q = e % positions;
      acc += dy[(n * channels + ch) * positions + q];
    }
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) db[ch] = (accumulate ? db[ch] : 0.0f) + sh[0];
    __syncthreads();  // sh is rewritten by the next channel
  }
}

__global__ void maxPoolForwardKernel(const float* x, float* y, int32_t* argmax, size_t total, Window2d g) {
  const int64_t positions = g.oh * g.ow;
  DTRAIN_GRID_STRIDE(idx, total) {
    const int64_t e = static_cast<int64_t>(idx);
    const int64_t plane = e / positions, ox = e % g.ow, oy = (e / g.ow) % g.oh;
    const float* in = x + plane * g.h * g.w;
    const int64_t y0 = max(oy * g.sh - g.ph, int64_t{0}), y1 = min(oy * g.sh - g.ph + g.kh, g.h);
    const int64_t x0 = max(ox * g.sw - g.pw, int64_t{0}), x1 = min(ox * g.sw - g.pw + g.kw, g.w);
    int64_t best = y0 * g.w + x0;
    float bestVal = -INFINITY;
    for (int64_t iy = y0; iy < y1; ++iy) {
      for (int64_t ix = x0; ix < x1; ++ix) {
        const float v = in[iy * g.w + ix];
        if (v > bestVal || isnan(v)) {
          bestVal = v;
          best = iy * g.w + ix;
        }
      }
    }
    y[idx] = bestVal;
    argmax[idx] = static_cast<int32_t>(best);
  }
}

// Input (iy, ix) lies in the window of output oy exactly when oy * sh - ph <= iy < oy * sh - ph + kh.
__global__ void maxPoolBackwardKernel(const float* dy, const int32_t* argmax, float* dx, size_t total, Window2d g) {
  const int64_t planeSize = g.h * g.w, positions = g.oh * g.ow;
  DTRAIN_GRID_STRIDE(idx, total) {
    const int64_t e = static_cast<int64_t>(idx);
    const int64_t plane = e / planeSize, s = e % planeSize, iy = s / g.w, ix = s % g.w;
    const float* d = dy + plane * positions;
    const int32_t* arg = argmax + plane * positions;
    const int64_t oyEnd = min((iy + g.ph) / g.sh + 1, g.oh), oxEnd = min((ix + g.pw) / g.sw + 1, g.ow);
    float sum = 0.0f;
    for (int64_t oy = firstOutput(iy + g.ph - g.kh + 1, g.sh); oy < oyEnd; ++oy) {
      for (int64_t ox = firstOutput(ix + g.pw - g.kw + 1, g.sw); ox < oxEnd; ++ox) {
        const int64_t o = oy * g.ow + ox;
        if (arg[o] == s) sum += d[o];
      }
    }
    dx[idx] = sum;
  }
}

__global__ void multiplyKernel(const float* a, const float* b, float* out, size_t n) {
  DTRAIN_GRID_STRIDE(i, n) out[i] = a[i] * b[i];
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
  channelBiasGradKernel<<<rowGrid(channels), kThreads>>>(dy, db, batch, channels, positions, accumulate);
  DTRAIN_CU_CHECK_LAUNCH("channelBiasGradKernel");
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

void multiply(const float* a, const float* b, float* out, size_t n) {
  if (n == 0) return;
  multiplyKernel<<<blocksFor(n), kThreads>>>(a, b, out, n);
  DTRAIN_CU_CHECK_LAUNCH("multiplyKernel");
}

}  // namespace dtrain::gpu::kernels
