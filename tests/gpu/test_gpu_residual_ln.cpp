// The fused residual + LayerNorm forward (kernels::residualLayerNormForward, docs/gpu.md "Fused residual +
// LayerNorm") emulated on the CPU (no GPU needed): every thread of its launch grid runs layernorm_rows.h (the code
// the kernel runs) and the block's halving tree, and the result is compared, bit for bit, with what it replaces:
// the residual add (addKernel: a + f) and then layerNormForwardKernel, written out here independently of the
// header, as test_gpu_bf16.cpp emulates it. The unfused kernel, which now runs layernorm_rows.h too, is emulated
// through the header as well and checked against the same independent loops. What this cannot show is the device:
// that nvcc compiles the shared expressions alike in both kernels (the `gpu` case in test_gpu_bf16_nn.cpp compares
// a GPT's steps with and without the fusion).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "lib/gpu/bf16_store.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/layernorm_rows.h"
#include "tests/gpu/host_values.h"

using namespace dtrain;
using namespace dtrain::gpu;
using namespace dtrain::gputest;

namespace {

constexpr int kThreads = 256;  // kernels_nn.cu's block size

// kernels_nn.cu blockSum: the threads' values added by a halving tree.
float treeSum(std::vector<float> sh) {
  for (int s = kThreads / 2; s > 0; s >>= 1)
    for (int t = 0; t < s; ++t) sh[static_cast<size_t>(t)] += sh[static_cast<size_t>(t + s)];
  return sh[0];
}

// The launch of either LayerNorm kernel: rowGrid(rows) blocks, block-stride over rows (DTRAIN_ROW_STRIDE), each
// row's threads through the header's passes (a block's threads run a pass, then meet in blockSum). fused:
// residualRowSum(a, x) first (x then holds the sums).
template <class Out>
void emulateKernel(bool fused, const float* a, float* x, const float* w, const float* b, Out* y, float* mean,
                   float* rstd, int64_t rows, int64_t d, float eps) {
  const unsigned blocks = rowGrid(rows);
  for (unsigned blk = 0; blk < blocks; ++blk) {
    for (int64_t r = blk; r < rows; r += blocks) {
      float* xr = x + r * d;
      std::vector<float> sh(kThreads);
      for (int t = 0; t < kThreads; ++t)
        sh[static_cast<size_t>(t)] = fused ? residualRowSum(a + r * d, xr, d, t, kThreads)
                                           : layerNormRowSum(xr, d, t, kThreads);
      const float mu = treeSum(sh) / static_cast<float>(d);
      for (int t = 0; t < kThreads; ++t) sh[static_cast<size_t>(t)] = layerNormRowSquares(xr, mu, d, t, kThreads);
      const float var = treeSum(sh) / static_cast<float>(d);
      const float rs = 1.0f / std::sqrt(var + eps);
      mean[r] = mu, rstd[r] = rs;
      for (int t = 0; t < kThreads; ++t)
        for (int64_t j = t; j < d; j += kThreads) storeActivation(y, r * d + j, layerNormValue(xr[j], mu, rs, w, b, j));
    }
  }
}

// The unfused path written out without the header: x = a + x element by element, then layerNormForwardKernel's
// loops (thread t's columns in order, the tree, the stores).
template <class Out>
void referenceAddThenLayerNorm(const float* a, float* x, const float* w, const float* b, Out* y, float* mean,
                               float* rstd, int64_t rows, int64_t d, float eps) {
  for (int64_t i = 0; i < rows * d; ++i) x[i] = a[i] + x[i];
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    std::vector<float> sh(kThreads, 0.0f);
    for (int t = 0; t < kThreads; ++t)
      for (int64_t j = t; j < d; j += kThreads) sh[static_cast<size_t>(t)] += xr[j];
    const float mu = treeSum(sh) / static_cast<float>(d);
    std::fill(sh.begin(), sh.end(), 0.0f);
    for (int t = 0; t < kThreads; ++t)
      for (int64_t j = t; j < d; j += kThreads) sh[static_cast<size_t>(t)] += (xr[j] - mu) * (xr[j] - mu);
    const float var = treeSum(sh) / static_cast<float>(d);
    const float rs = 1.0f / std::sqrt(var + eps);
    mean[r] = mu, rstd[r] = rs;
    for (int t = 0; t < kThreads; ++t)
      for (int64_t j = t; j < d; j += kThreads) {
        const float xhat = (xr[j] - mu) * rs;
        const float v = w != nullptr ? xhat * w[j] + (b != nullptr ? b[j] : 0.0f) : xhat;
        storeActivation(y, r * d + j, v);
      }
  }
}

template <class T>
bool sameBits(const std::vector<T>& p, const std::vector<T>& q) {
  return p.size() == q.size() && std::memcmp(p.data(), q.data(), p.size() * sizeof(T)) == 0;
}

template <class Out>
void checkShape(int64_t rows, int64_t d, bool affine, bool bias) {
  CAPTURE(rows);
  CAPTURE(d);
  CAPTURE(affine);
  CAPTURE(bias);
  const auto n = static_cast<size_t>(rows * d);
  // A residual stream of large values plus a small branch: the sum rounds, so a different add would show.
  std::vector<float> a = randomVector(n, 11, -40.0f, 40.0f);
  const std::vector<float> f = randomVector(n, 12, -0.5f, 0.5f);
  const std::vector<float> w = randomVector(static_cast<size_t>(d), 13, 0.5f, 1.5f);
  const std::vector<float> b = randomVector(static_cast<size_t>(d), 14);
  const float* wp = affine ? w.data() : nullptr;
  const float* bp = affine && bias ? b.data() : nullptr;
  const auto rs = static_cast<size_t>(rows);
  std::vector<float> sumRef = f, meanRef(rs), rstdRef(rs);
  std::vector<Out> yRef(n);
  referenceAddThenLayerNorm(a.data(), sumRef.data(), wp, bp, yRef.data(), meanRef.data(), rstdRef.data(), rows, d,
                            1e-5f);
  // The fused kernel: the sums land in f's buffer, the LayerNorm's output, mean and rstd as the reference's.
  std::vector<float> sum = f, mean(rs), rstd(rs);
  std::vector<Out> y(n);
  emulateKernel(true, a.data(), sum.data(), wp, bp, y.data(), mean.data(), rstd.data(), rows, d, 1e-5f);
  CHECK(sameBits(sum, sumRef));
  CHECK(sameBits(y, yRef));
  CHECK(sameBits(mean, meanRef));
  CHECK(sameBits(rstd, rstdRef));
  // The unfused kernel through the header, on the stored sums: the same bits as the independent loops.
  std::vector<float> mean2(rs), rstd2(rs);
  std::vector<Out> y2(n);
  std::vector<float> sum2 = sumRef;
  emulateKernel(false, nullptr, sum2.data(), wp, bp, y2.data(), mean2.data(), rstd2.data(), rows, d, 1e-5f);
  CHECK(sameBits(y2, yRef));
  CHECK(sameBits(mean2, meanRef));
  CHECK(sameBits(rstd2, rstdRef));
  // The sums did round (a + f is not exact everywhere), so the check would see an add done otherwise.
  int64_t inexact = 0;
  for (size_t i = 0; i < n; ++i)
    inexact += static_cast<double>(sumRef[i]) != static_cast<double>(a[i]) + static_cast<double>(f[i]) ? 1 : 0;
  if (n >= 100) CHECK(inexact > 0);
}

}  // namespace

TEST_CASE("fused residual + LayerNorm emulated over its grid: the add then LayerNorm's bits (float32 and bf16 out)") {
  // GPT-2's width (768: three columns per thread), widths below, at and just above one block's 256 threads, an
  // odd width and a single column (most threads add nothing).
  for (const auto& [rows, d] : std::vector<std::pair<int64_t, int64_t>>{{6, 768}, {5, 37}, {3, 256}, {4, 257}, {2, 1}}) {
    checkShape<float>(rows, d, true, true);
    checkShape<uint16_t>(rows, d, true, true);
    checkShape<float>(rows, d, true, false);
    checkShape<float>(rows, d, false, false);
  }
}
