// The per-thread work of the conv2d/maxpool2d kernels (kernels_spatial.cu) and the CUDA conv2d's GEMM arguments
// (lib/nn/cuda/layers_spatial.cpp): plain C++ for the host and the device (no CUDA header), built on window_index.h's
// index maps, so tests/gpu/test_gpu_window.cpp runs every thread of each kernel's launch grid, and every GEMM through
// the column-major reference on these very arguments, against the CPU layers (lib/nn/layers_spatial.cpp).
// Each kernel is a grid-stride loop over its elements whose body is one call below. Layouts as window_index.h.
#pragma once

#include <cstdint>

#include "lib/gpu/gemm_args.h"
#include "lib/gpu/host_device.h"
#include "lib/gpu/window_index.h"

namespace dtrain::gpu {

// im2colKernel's thread for cols element e (over batch * c*kh*kw * oh*ow): the x value it reads, 0 in the padding.
DTRAIN_HOST_DEVICE inline float im2colElement(const Window2d& g, const float* x, int64_t e) {
  const int64_t from = im2colSource(g, e);
  return from >= 0 ? x[from] : 0.0f;
}

// col2imKernel's thread for dx element e (over batch * c * h * w): a gather, the dcols entries im2col read e into,
// added in col2imSources' order (the CPU col2im's).
DTRAIN_HOST_DEVICE inline float col2imElement(const Window2d& g, const float* dcols, int64_t e) {
  float sum = 0.0f;
  col2imSources(g, e, [&](int64_t k) { sum += dcols[k]; });
  return sum;
}

// addChannelBiasKernel's thread: the channel of element e of y [batch, channels, positions] (its bias index).
DTRAIN_HOST_DEVICE inline int64_t channelOf(int64_t e, int64_t channels, int64_t positions) {
  return (e / positions) % channels;
}

// maxPoolForwardKernel's thread for output e (over batch * c * oh * ow): y[e] the window's maximum, argmax[e] its
// index within the input plane (poolArgmax: the first maximum wins, NaN propagates).
DTRAIN_HOST_DEVICE inline void maxPoolForwardElement(const Window2d& g, const float* x, int64_t e, float* y,
                                                     int32_t* argmax) {
  const PoolWindow win = poolWindow(g, e);
  float value = 0.0f;
  argmax[e] = static_cast<int32_t>(poolArgmax(g, x + win.plane * g.h * g.w, win, &value));
  y[e] = value;
}

// maxPoolBackwardKernel's thread for input element e (over batch * c * h * w): a gather, the output gradients whose
// argmax e is, in increasing output order (the CPU's scatter adds them in that order).
DTRAIN_HOST_DEVICE inline float maxPoolBackwardElement(const Window2d& g, const float* dy, const int32_t* argmax,
                                                       int64_t e) {
  const int64_t planeSize = g.h * g.w, positions = g.oh * g.ow;
  const int64_t plane = e / planeSize, s = e % planeSize;
  const float* d = dy + plane * positions;
  const int32_t* arg = argmax + plane * positions;
  float sum = 0.0f;
  poolOutputsOver(g, e, [&](int64_t o) {
    if (arg[o] == s) sum += d[o];
  });
  return sum;
}

// The CUDA conv2d's GEMMs, row-major (gemm_args.h), for `out` output channels; k = c*kh*kw rows of a sample's
// columns, p = oh*ow positions.
// Forward: Y_n [out, p] = W [out, k] cols_n [k, p] for every sample n: one strided batched GEMM, W shared (stride 0).
inline RowMajorGemm convForwardGemm(const Window2d& g, int64_t out, int64_t batch) {
  const int64_t k = g.c * g.kh * g.kw, p = g.oh * g.ow;
  RowMajorGemm a;  // no designated initializers: kernels_spatial.cu is C++17
  a.m = out, a.n = p, a.k = k, a.lda = k, a.ldb = p, a.ldc = p;
  a.strideA = 0, a.strideB = k * p, a.strideC = out * p, a.batch = batch;
  return a;
}
// The weight gradient of one sample: dW [out, k] (+)= dY_n [out, p] cols_n^T [p, k]; one GEMM per sample, in order
// (operands at n * out * p and n * k * p).
inline RowMajorGemm convWeightGradGemm(const Window2d& g, int64_t out) {
  const int64_t k = g.c * g.kh * g.kw, p = g.oh * g.ow;
  RowMajorGemm a;
  a.transB = true, a.m = out, a.n = k, a.k = p, a.lda = p, a.ldb = p, a.ldc = k;
  return a;
}
// The columns' gradient: dcols_n [k, p] = W^T [k, out] dY_n [out, p] for every sample n (batched, W shared).
inline RowMajorGemm convColsGradGemm(const Window2d& g, int64_t out, int64_t batch) {
  const int64_t k = g.c * g.kh * g.kw, p = g.oh * g.ow;
  RowMajorGemm a;
  a.transA = true, a.m = k, a.n = p, a.k = out, a.lda = k, a.ldb = p, a.ldc = p;
  a.strideA = 0, a.strideB = out * p, a.strideC = k * p, a.batch = batch;
  return a;
}

}  // namespace dtrain::gpu
