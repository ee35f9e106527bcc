// The index arithmetic of the conv2d/maxpool2d kernels (kernels_spatial.cu): plain C++ that compiles for the host
// and the device (no CUDA header), so the kernels' per-thread index maps are unit-tested on the CPU
// (tests/gpu/test_gpu_window.cpp runs every thread's work in a loop and compares with the CPU layers), as
// gemm_args.h does for the GEMMs.
//
// Layouts (layers_spatial.cpp's): x [batch, c, h, w] (NCHW); cols [batch, c*kh*kw, oh*ow] with row r =
// (ci * kh + i) * kw + j (channel, kernel tap) and column q = oy * ow + ox (output position); pooled y and argmax
// [batch * c planes, oh * ow], argmax holding the input's index within its plane (iy * w + ix).
#pragma once

#include <cmath>
#include <cstdint>

#include "lib/gpu/host_device.h"

namespace dtrain::gpu {

// One window geometry: input [c, h, w] per sample, kernel kh x kw, stride sh x sw, padding ph x pw (zeros for
// conv2d, -inf for maxpool2d), output oh x ow positions (layers_spatial.cpp's Window).
struct Window2d {
  int64_t c = 0, h = 0, w = 0, kh = 0, kw = 0, sh = 1, sw = 1, ph = 0, pw = 0, oh = 0, ow = 0;
};

// The x element that cols element e reads (an index into x), or -1 in the padding (cols holds 0 there).
DTRAIN_HOST_DEVICE inline int64_t im2colSource(const Window2d& g, int64_t e) {
  const int64_t positions = g.oh * g.ow, rowsPerSample = g.c * g.kh * g.kw;
  const int64_t q = e % positions, r = (e / positions) % rowsPerSample, n = e / (positions * rowsPerSample);
  const int64_t j = r % g.kw, i = (r / g.kw) % g.kh, ci = r / (g.kw * g.kh);
  const int64_t ox = q % g.ow, oy = q / g.ow;
  const int64_t iy = oy * g.sh - g.ph + i, ix = ox * g.sw - g.pw + j;
  if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return -1;
  return ((n * g.c + ci) * g.h + iy) * g.w + ix;
}

// The adjoint: calls f(k) for every cols index k whose im2colSource is x element e, in increasing k within the
// sample (increasing kernel tap (i, j): the order the CPU's col2im adds them in). Tap (i, j) of output (oy, ox)
// reads (oy * sh - ph + i, ox * sw - pw + j), so for input (iy, ix) oy = (iy + ph - i) / sh when that divides
// evenly and lands in [0, oh).
template <class F>
DTRAIN_HOST_DEVICE inline void col2imSources(const Window2d& g, int64_t e, F&& f) {
  const int64_t positions = g.oh * g.ow, rowsPerSample = g.c * g.kh * g.kw;
  const int64_t ix = e % g.w, iy = (e / g.w) % g.h, ci = (e / (g.w * g.h)) % g.c, n = e / (g.w * g.h * g.c);
  const int64_t base = n * rowsPerSample * positions;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ty = iy + g.ph - i;
    if (ty < 0 || ty % g.sh != 0 || ty / g.sh >= g.oh) continue;
    const int64_t oy = ty / g.sh;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t tx = ix + g.pw - j;
      if (tx < 0 || tx % g.sw != 0 || tx / g.sw >= g.ow) continue;
      f(base + ((ci * g.kh + i) * g.kw + j) * positions + oy * g.ow + tx / g.sw);
    }
  }
}

// Output e of a max pooling (e over batch * c * oh * ow): its plane and the window clipped to the input
// (rows [y0, y1), columns [x0, x1)); the -inf padding is never read.
struct PoolWindow {
  int64_t plane, y0, y1, x0, x1;
};
DTRAIN_HOST_DEVICE inline PoolWindow poolWindow(const Window2d& g, int64_t e) {
  const int64_t plane = e / (g.oh * g.ow), ox = e % g.ow, oy = (e / g.ow) % g.oh;
  const int64_t top = oy * g.sh - g.ph, left = ox * g.sw - g.pw;
  return {plane, top > 0 ? top : 0, top + g.kh < g.h ? top + g.kh : g.h, left > 0 ? left : 0,
          left + g.kw < g.w ? left + g.kw : g.w};
}

// The maximum of `win` within its input plane (h x w floats) into *value and its index in the plane: the first
// maximum wins and a NaN propagates (PyTorch's rule, as layers_spatial.cpp's MaxPool2d: `v > best || isnan(v)`).
DTRAIN_HOST_DEVICE inline int64_t poolArgmax(const Window2d& g, const float* plane, const PoolWindow& win,
                                             float* value) {
  int64_t best = win.y0 * g.w + win.x0;
  float bestVal = -INFINITY;
  for (int64_t iy = win.y0; iy < win.y1; ++iy) {
    for (int64_t ix = win.x0; ix < win.x1; ++ix) {
      const float v = plane[iy * g.w + ix];
      if (v > bestVal || v != v) {  // v != v: NaN, written so on the host and the device alike
        bestVal = v;
        best = iy * g.w + ix;
      }
    }
  }
  *value = bestVal;
  return best;
}

// The smallest o >= 0 with o * stride >= lo (lo may be negative): the first output whose window reaches lo.
DTRAIN_HOST_DEVICE inline int64_t firstOutput(int64_t lo, int64_t stride) {
  return lo <= 0 ? 0 : (lo + stride - 1) / stride;
}

// The outputs whose (clipped) window holds input element e (e over batch * c * h * w): f(o) for each output index
// o within e's plane (o = oy * ow + ox), in increasing o. Input iy lies in output oy's window exactly when
// oy * sh - ph <= iy < oy * sh - ph + kh (the clipping only removes rows outside [0, h)).
template <class F>
DTRAIN_HOST_DEVICE inline void poolOutputsOver(const Window2d& g, int64_t e, F&& f) {
  const int64_t s = e % (g.h * g.w), iy = s / g.w, ix = s % g.w;
  const int64_t yEnd = (iy + g.ph) / g.sh + 1, xEnd = (ix + g.pw) / g.sw + 1;
  const int64_t oyEnd = yEnd < g.oh ? yEnd : g.oh, oxEnd = xEnd < g.ow ? xEnd : g.ow;
  for (int64_t oy = firstOutput(iy + g.ph - g.kh + 1, g.sh); oy < oyEnd; ++oy)
    for (int64_t ox = firstOutput(ix + g.pw - g.kw + 1, g.sw); ox < oxEnd; ++ox) f(oy * g.ow + ox);
}

}  // namespace dtrain::gpu
