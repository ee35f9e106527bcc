// The fused residual + LayerNorm forward (kernels::residualLayerNormForward, docs/gpu.md "Fused residual +
// LayerNorm") emulated on the CPU (no GPU needed): every thread of its launch grid runs layernorm_rows.h (the code
// the kernel runs) and the block's halving tree, and the result is compared, bit for bit, with what it replaces:
// the residual add (addKernel: a + f) and then layerNormForwardKernel, written out here independently of the
// header, as test_gpu_bf16.cpp emulates it. The unfused kernel, which now runs layernorm_rows.h too, is emulated
// through the header as well and checked against the same independent loops. What this cannot show is the device:
// that nvcc compiles the shared expressions alike in both kernels (the `gpu` case in test_gpu_bf16_nn.cpp compares
// a GPT's steps with and without the fusion).
// The backward twin (kernels::residualLayerNormBackward: LayerNorm's dx with the residual's gradient added as it is
// stored) is emulated the same way and compared with the dx kernel's loops written out and then the block's add; and
// the backward with the weight/bias gradients' first pass folded in (layerNormBackwardParamsKernel) against
// layerNormParamGrad's kernels and the dx kernel, bit for bit. This
// file is compiled with -ffp-contract=off, so the host rounds every product and sum on its own, as the header says.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

namespace {

// layerNormDxKernel's launch (kernels::layerNormBackward's dx; with residual, kernels::residualLayerNormBackward):
// rowGrid(rows) blocks, block-stride over rows, each row's threads through the header's two passes, the tree
// between them. residual: null, or the gradient each stored dx takes on (the fused store).
void emulateDx(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
               const float* residual, float* dx, int64_t rows, int64_t d) {
  const unsigned blocks = rowGrid(rows);
  for (unsigned blk = 0; blk < blocks; ++blk) {
    for (int64_t r = blk; r < rows; r += blocks) {
      const int64_t o = r * d;
      std::vector<float> sg(kThreads), sgx(kThreads);
      for (int t = 0; t < kThreads; ++t) {
        const auto k = static_cast<size_t>(t);
        layerNormDxRowSums(x + o, w, dy + o, mean[r], rstd[r], d, t, kThreads, &sg[k], &sgx[k]);
      }
      const float meanG = treeSum(sg) / static_cast<float>(d);
      const float meanGx = treeSum(sgx) / static_cast<float>(d);
      for (int t = 0; t < kThreads; ++t)
        layerNormDxRowStore(x + o, w, dy + o, residual != nullptr ? residual + o : nullptr, dx + o, mean[r], rstd[r],
                            meanG, meanGx, d, t, kThreads);
    }
  }
}

// What the fused kernel replaces, written out without the header: layerNormDxKernel's loops as they were before it
// (thread t's columns in order, the tree, the stores) into lnDx, then the CUDA block's k::add(dy, lnDx, dx)
// (addKernel: dy[i] + lnDx[i], dy being the block's output gradient, here `residual`).
void referenceDxThenAdd(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                        const float* residual, float* lnDx, float* dx, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    const float mu = mean[r], rs = rstd[r];
    std::vector<float> sg(kThreads, 0.0f), sgx(kThreads, 0.0f);
    for (int t = 0; t < kThreads; ++t)
      for (int64_t j = t; j < d; j += kThreads) {
        const float g = w != nullptr ? dy[r * d + j] * w[j] : dy[r * d + j];
        sg[static_cast<size_t>(t)] += g;
        sgx[static_cast<size_t>(t)] += g * ((x[r * d + j] - mu) * rs);
      }
    const float meanG = treeSum(sg) / static_cast<float>(d);
    const float meanGx = treeSum(sgx) / static_cast<float>(d);
    for (int t = 0; t < kThreads; ++t)
      for (int64_t j = t; j < d; j += kThreads) {
        const float g = w != nullptr ? dy[r * d + j] * w[j] : dy[r * d + j];
        const float xhat = (x[r * d + j] - mu) * rs;
        lnDx[r * d + j] = rs * (g - meanG - xhat * meanGx);
      }
  }
  for (int64_t i = 0; i < rows * d; ++i) dx[i] = residual[i] + lnDx[i];
}

void checkBackwardShape(int64_t rows, int64_t d, bool affine) {
  CAPTURE(rows);
  CAPTURE(d);
  CAPTURE(affine);
  const auto n = static_cast<size_t>(rows * d);
  const auto rs = static_cast<size_t>(rows);
  // The LayerNorm's statistics from its forward (the unfused kernel's emulation) over x.
  std::vector<float> x = randomVector(n, 21, -3.0f, 3.0f);
  const std::vector<float> w = randomVector(static_cast<size_t>(d), 22, 0.5f, 1.5f);
  const float* wp = affine ? w.data() : nullptr;
  std::vector<float> mean(rs), rstd(rs), y(n);
  emulateKernel(false, nullptr, x.data(), wp, nullptr, y.data(), mean.data(), rstd.data(), rows, d, 1e-5f);
  // The LayerNorm's output gradient and the block's output gradient (the residual's), of dx's magnitude: the
  // sums round, and an add fused into the product before it (an FMA) would round them otherwise.
  const std::vector<float> dy = randomVector(n, 23, -0.5f, 0.5f);
  const std::vector<float> res = randomVector(n, 24, -1.0f, 1.0f);
  std::vector<float> lnDxRef(n), dxRef(n);
  referenceDxThenAdd(x.data(), wp, mean.data(), rstd.data(), dy.data(), res.data(), lnDxRef.data(), dxRef.data(), rows,
                     d);
  // Fused: one kernel stores the sum.
  std::vector<float> dx(n);
  emulateDx(x.data(), wp, mean.data(), rstd.data(), dy.data(), res.data(), dx.data(), rows, d);
  CHECK(sameBits(dx, dxRef));
  // Unfused, through the header: the plain dx as the independent loops compute it.
  std::vector<float> lnDx(n);
  emulateDx(x.data(), wp, mean.data(), rstd.data(), dy.data(), nullptr, lnDx.data(), rows, d);
  CHECK(sameBits(lnDx, lnDxRef));
  // The sums did round, so a store that skipped or moved the add would show.
  int64_t inexact = 0;
  for (size_t i = 0; i < n; ++i)
    inexact += static_cast<double>(dxRef[i]) != static_cast<double>(res[i]) + static_cast<double>(lnDxRef[i]) ? 1 : 0;
  if (n >= 100) CHECK(inexact > 0);
}

}  // namespace

TEST_CASE("fused residual gradient + LayerNorm backward emulated over its grid: the dx then the add's bits") {
  for (const auto& [rows, d] : std::vector<std::pair<int64_t, int64_t>>{{6, 768}, {5, 37}, {3, 256}, {4, 257}, {2, 1}}) {
    checkBackwardShape(rows, d, true);
    checkBackwardShape(rows, d, false);
  }
}

// --- LayerNorm backward with its weight/bias gradients' first pass folded in (layerNormBackwardParamsKernel) ---
// Emulated block by block against what it replaces: kernels::layerNormParamGrad (every (chunk, column) thread of
// layerNormParamChunkKernel, then pass 2) and the dx kernel (emulateDx above), through the same headers as those
// kernels. dx, dw and db (and the partials pass 2 reads) must be theirs bit for bit.

namespace {

constexpr int kParamsGroups = 4;  // kernels_nn.cu's rows in flight per block of the fused backward

// layerNormBackwardParamsKernel's launch: p.chunks blocks (grid-stride over chunks: one pass here) of kParamsGroups x
// kThreads threads. Block k takes its chunk's rows kParamsGroups at a time: group g's 256 threads run row r0 + g's
// first pass and meet in the tree; then every thread T of the block adds the pass's rows to its columns' sums, in
// row order (order -1: in reverse, only to show the check sees the order); then the groups store dx. The shared sums
// and the partials start as NaN, so one read before it is written shows. Then pass 2 (layerNormParamCombine:
// columnSumCombine per column).
void emulateFusedParams(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                        const float* residual, float* dx, float* dw, float* db, int64_t rows, int64_t d,
                        bool accumulate, int order = 1) {
  const ColumnChunks p = columnChunks(rows);
  const int all = kParamsGroups * kThreads;
  std::vector<float> partials(static_cast<size_t>(2 * partialCount(p, d)), std::numeric_limits<float>::quiet_NaN());
  for (int64_t k = 0; k < p.chunks; ++k) {
    std::vector<float> acc(static_cast<size_t>(2 * d), std::numeric_limits<float>::quiet_NaN());
    float* accW = acc.data();
    float* accB = acc.data() + d;
    for (int T = 0; T < all; ++T) layerNormParamChunkStart(p, dw, db, accumulate, accW, accB, d, T, all);
    for (int64_t r0 = p.begin(k); r0 < p.end(k); r0 += kParamsGroups) {
      const int64_t last = std::min(r0 + kParamsGroups, p.end(k));
      std::vector<float> meanG(kParamsGroups), meanGx(kParamsGroups);
      for (int64_t r = r0; r < last; ++r) {
        std::vector<float> sg(kThreads), sgx(kThreads);
        for (int t = 0; t < kThreads; ++t) {
          const auto u = static_cast<size_t>(t);
          layerNormDxRowSums(x + r * d, w, dy + r * d, mean[r], rstd[r], d, t, kThreads, &sg[u], &sgx[u]);
        }
        meanG[static_cast<size_t>(r - r0)] = treeSum(sg) / static_cast<float>(d);
        meanGx[static_cast<size_t>(r - r0)] = treeSum(sgx) / static_cast<float>(d);
      }
      for (int T = 0; T < all; ++T)
        for (int64_t i = 0; i < last - r0; ++i) {
          const int64_t q = order > 0 ? r0 + i : last - 1 - i;
          layerNormParamRowAdd(x + q * d, dy + q * d, mean[q], rstd[q], d, T, all, accW, accB);
        }
      for (int64_t r = r0; r < last; ++r)
        for (int t = 0; t < kThreads; ++t)
          layerNormDxRowStore(x + r * d, w, dy + r * d, residual != nullptr ? residual + r * d : nullptr, dx + r * d,
                              mean[r], rstd[r], meanG[static_cast<size_t>(r - r0)],
                              meanGx[static_cast<size_t>(r - r0)], d, t, kThreads);
    }
    for (int T = 0; T < all; ++T) layerNormParamChunkStore(p, k, accW, accB, dw, db, partials.data(), d, T, all);
  }
  if (p.chunks == 1) return;
  for (int64_t j = 0; j < d; ++j) columnSumCombine(p, j, d, partials.data(), dw, accumulate);
  if (db != nullptr)
    for (int64_t j = 0; j < d; ++j) columnSumCombine(p, j, d, partials.data() + p.chunks * d, db, accumulate);
}

// kernels::layerNormParamGrad as its kernels run it (layerNormParamChunkKernel covers every (chunk, column) once;
// the order of threads does not matter: each writes its own cell), then pass 2.
void emulateParamGrad(const float* x, const float* mean, const float* rstd, const float* dy, float* dw, float* db,
                      int64_t rows, int64_t d, bool accumulate) {
  const ColumnChunks p = columnChunks(rows);
  std::vector<float> partials(static_cast<size_t>(2 * partialCount(p, d)), std::numeric_limits<float>::quiet_NaN());
  for (int64_t k = 0; k < p.chunks; ++k)
    for (int64_t j = 0; j < d; ++j) layerNormParamChunk(p, k, j, d, x, mean, rstd, dy, dw, db, partials.data(), accumulate);
  if (p.chunks == 1) return;
  for (int64_t j = 0; j < d; ++j) columnSumCombine(p, j, d, partials.data(), dw, accumulate);
  if (db != nullptr)
    for (int64_t j = 0; j < d; ++j) columnSumCombine(p, j, d, partials.data() + p.chunks * d, db, accumulate);
}

void checkParamsShape(int64_t rows, int64_t d, bool withBias, bool accumulate, bool residual) {
  CAPTURE(rows);
  CAPTURE(d);
  CAPTURE(withBias);
  CAPTURE(accumulate);
  CAPTURE(residual);
  const auto n = static_cast<size_t>(rows * d);
  const auto rs = static_cast<size_t>(rows);
  const auto ds = static_cast<size_t>(d);
  std::vector<float> x = randomVector(n, 31, -3.0f, 3.0f);
  const std::vector<float> w = randomVector(ds, 32, 0.5f, 1.5f);
  std::vector<float> mean(rs), rstd(rs), y(n);
  emulateKernel(false, nullptr, x.data(), w.data(), nullptr, y.data(), mean.data(), rstd.data(), rows, d, 1e-5f);
  const std::vector<float> dy = randomVector(n, 33, -0.5f, 0.5f);
  const std::vector<float> res = randomVector(n, 34, -1.0f, 1.0f);
  const float* rp = residual ? res.data() : nullptr;
  // What the gradients held before (a second micro-batch accumulates onto them).
  const std::vector<float> dw0 = accumulate ? randomVector(ds, 35, -2.0f, 2.0f) : std::vector<float>(ds, 0.0f);
  const std::vector<float> db0 = accumulate ? randomVector(ds, 36, -2.0f, 2.0f) : std::vector<float>(ds, 0.0f);
  // The current launches: layerNormParamGrad, then the dx kernel.
  std::vector<float> dxRef(n), dwRef = dw0, dbRef = db0;
  emulateParamGrad(x.data(), mean.data(), rstd.data(), dy.data(), dwRef.data(), withBias ? dbRef.data() : nullptr,
                   rows, d, accumulate);
  emulateDx(x.data(), w.data(), mean.data(), rstd.data(), dy.data(), rp, dxRef.data(), rows, d);
  // The fused kernel.
  std::vector<float> dx(n), dwF = dw0, dbF = db0;
  emulateFusedParams(x.data(), w.data(), mean.data(), rstd.data(), dy.data(), rp, dx.data(), dwF.data(),
                     withBias ? dbF.data() : nullptr, rows, d, accumulate);
  CHECK(sameBits(dx, dxRef));
  CHECK(sameBits(dwF, dwRef));
  CHECK(sameBits(dbF, dbRef));
  // dx in dy's memory (the dx kernel allows it; CUDA LayerNorm::backward does not exclude it): each pass's sums read
  // dy before the pass's stores overwrite it, so the same bits.
  if (!residual) {
    std::vector<float> inPlace = dy, dwI = dw0, dbI = db0;
    emulateFusedParams(x.data(), w.data(), mean.data(), rstd.data(), inPlace.data(), nullptr, inPlace.data(),
                       dwI.data(), withBias ? dbI.data() : nullptr, rows, d, accumulate);
    CHECK(sameBits(inPlace, dxRef));
    CHECK(sameBits(dwI, dwRef));
    CHECK(sameBits(dbI, dbRef));
  }
  // The order is what keeps the bits: each pass's rows added in reverse give other sums (they round), so a kernel
  // that added them otherwise would fail the checks above.
  if (rows >= 8 && d >= 16) {
    std::vector<float> dxR(n), dwR = dw0, dbR = db0;
    emulateFusedParams(x.data(), w.data(), mean.data(), rstd.data(), dy.data(), rp, dxR.data(), dwR.data(),
                       dbR.data(), rows, d, accumulate, -1);
    CHECK(sameBits(dxR, dxRef));  // dx is per row: the order of rows does not touch it
    CHECK_FALSE(sameBits(dwR, dwRef));
  }
}

}  // namespace

TEST_CASE("LayerNorm backward with its weight/bias gradients' first pass in the dx kernel: the two launches' bits") {
  // Rows: one chunk (<= 64: pass 1 writes dw, db itself, onto them when accumulating), a few chunks with a short
  // last one (200: 64-row chunks, 4 of them), and past the 128-chunk cap (8229: 65-row chunks, 127 of them). Widths
  // as the tests above (GPT-2's 768: three columns per thread; below, at and just above 256; odd; one column).
  const std::vector<std::pair<int64_t, int64_t>> shapes{{6, 768}, {64, 37}, {200, 257}, {200, 256}, {130, 768},
                                                        {8229, 5}, {3, 1}};
  for (const auto& [rows, d] : shapes)
    for (const bool accumulate : {false, true}) {
      checkParamsShape(rows, d, true, accumulate, false);
      checkParamsShape(rows, d, true, accumulate, true);
      checkParamsShape(rows, d, false, accumulate, false);
    }
}
