// The bf16 gradient of cross-entropy ("precision": "bf16", docs/gpu.md "bf16") emulated on the CPU (no GPU needed):
// 4071a74's out-of-place kernel (crossEntropyGradBf16Element, every thread of its launch grid) from the row
// statistics crossEntropyKernel keeps is compared bit for bit with the three steps it replaced: crossEntropyKernel's
// float32 diff (emulated block by block: the per-thread maxima and sums, the halving trees), kernels::scale of it by
// the same factor, and toBf16's rounding. The float32 diff is compared with lib/nn's CPU cross-entropy. The kernel the
// loss runs, crossEntropyGradBf16InPlaceKernel, writes that gradient over the logits: its rows
// (crossEntropyGradBf16InPlaceRow, the code the kernel runs) are emulated on one buffer, the block's threads between
// barriers in adversarial orders, and compared bit for bit with the out-of-place kernel. What this cannot show is
// the device itself (that nvcc computes the diff alike in both kernels, and the device's expf): the `gpu` case in
// test_gpu_bf16_nn.cpp compares whole steps with and without the bf16 gradient.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <array>
#include <cstring>
#include <functional>
#include <vector>

#include "lib/gpu/bf16_store.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/loss_grad.h"
#include "lib/nn/loss.h"
#include "tests/gpu/host_values.h"

using namespace dtrain;
using namespace dtrain::gpu;
using namespace dtrain::gputest;

namespace {

constexpr int kThreads = 256;

int64_t labelOf(const void* labels, bool labels64, int64_t r) {
  return labels64 ? static_cast<const int64_t*>(labels)[r] : static_cast<const int32_t*>(labels)[r];
}

// crossEntropyKernel, block by block (one block of 256 threads per row): each thread's maximum over its columns
// j = t, t + 256, ..., the tree taking the larger (argmax ties aside: only the value matters here), the per-thread
// sums of exp(x - m), the halving tree (blockSum), then diff (crossEntropyDiff, the kernel's store) and the row's
// statistics.
void emulateForward(const float* x, const void* labels, bool labels64, int64_t rows, int64_t classes, float* diff,
                    float* stats) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * classes;
    const int64_t label = labelOf(labels, labels64, r);
    const bool valid = label >= 0 && label < classes;
    std::vector<float> best(kThreads, -INFINITY);
    std::vector<int64_t> at(kThreads, classes);
    for (int t = 0; t < kThreads; ++t)
      for (int64_t j = t; j < classes; j += kThreads)
        if (xr[j] > best[static_cast<size_t>(t)] || at[static_cast<size_t>(t)] == classes)
          best[static_cast<size_t>(t)] = xr[j], at[static_cast<size_t>(t)] = j;
    for (int s = kThreads / 2; s > 0; s >>= 1)
      for (int t = 0; t < s; ++t) {
        const auto a = static_cast<size_t>(t), o = static_cast<size_t>(t + s);
        if (at[o] < classes && (at[a] == classes || best[o] > best[a] || (best[o] == best[a] && at[o] < at[a])))
          best[a] = best[o], at[a] = at[o];
      }
    const float m = best[0];
    std::vector<float> sh(kThreads, 0.0f);
    for (int t = 0; t < kThreads; ++t)
      for (int64_t j = t; j < classes; j += kThreads) sh[static_cast<size_t>(t)] += expf(xr[j] - m);
    for (int s = kThreads / 2; s > 0; s >>= 1)
      for (int t = 0; t < s; ++t) sh[static_cast<size_t>(t)] += sh[static_cast<size_t>(t + s)];
    const float total = sh[0];
    const float inv = 1.0f / total;
    for (int64_t j = 0; j < classes; ++j) diff[r * classes + j] = crossEntropyDiff(xr[j], m, inv, valid && j == label);
    stats[kCrossEntropyStats * r] = m;
    stats[kCrossEntropyStats * r + 1] = total;
  }
}

struct Case {
  int64_t batch, positions, classes;
  bool labels64;
  float scale;  // Loss::backward's scale (1 / micro-batches)
};

}  // namespace

TEST_CASE("the bf16 cross-entropy gradient equals the float32 diff scaled and rounded, thread by thread") {
  const Case cases[] = {{3, 1, 5, false, 1.0f},      {2, 7, 300, true, 1.0f},    {1, 1, 1, false, 1.0f},
                        {2, 5, 256, false, 0.25f},   {1, 3, 50257, true, 0.5f},  {4, 9, 257, true, 1.0f / 3.0f}};
  for (const Case& c : cases) {
    CAPTURE(c.batch);
    CAPTURE(c.positions);
    CAPTURE(c.classes);
    CAPTURE(c.labels64);
    const int64_t rows = c.batch * c.positions;
    const auto n = static_cast<size_t>(rows * c.classes);
    // Logits of a trained model's spread, one row peaked (a large gap: underflowing exponentials) and one with ties.
    std::vector<float> x = randomVector(n, static_cast<uint32_t>(n + 7), -6, 6);
    if (rows > 1) x[static_cast<size_t>(c.classes)] = 40.0f;
    if (c.classes > 3)
      for (int64_t j = 0; j < 3; ++j) x[static_cast<size_t>(j)] = 2.5f;
    std::vector<int32_t> l32(static_cast<size_t>(rows));
    std::vector<int64_t> l64(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      l32[static_cast<size_t>(r)] = static_cast<int32_t>((r * 37 + 1) % c.classes);
      l64[static_cast<size_t>(r)] = l32[static_cast<size_t>(r)];
    }
    const void* labels = c.labels64 ? static_cast<const void*>(l64.data()) : static_cast<const void*>(l32.data());

    std::vector<float> diff(n), stats(static_cast<size_t>(kCrossEntropyStats * rows));
    emulateForward(x.data(), labels, c.labels64, rows, c.classes, diff.data(), stats.data());
    // The float32 path: lib/nn/cuda/loss.cpp's factor, kernels::scale in place, then toBf16 (before each GEMM).
    const float factor = c.scale / static_cast<float>(rows);
    std::vector<uint16_t> expected(n);
    gridStride(n, [&](size_t i) { diff[i] = diff[i] * factor; });
    gridStride(n, [&](size_t i) { expected[i] = bf16Bits(diff[i]); });
    // The bf16 path: every thread of crossEntropyGradBf16Kernel's grid; elements nobody writes stay poisoned.
    std::vector<uint16_t> got(n, 0x7fc1);
    gridStride(n, [&](size_t i) {
      got[i] = crossEntropyGradBf16Element(x.data(), labels, c.labels64, c.classes, stats.data(), factor,
                                           static_cast<int64_t>(i));
    });
    CHECK(std::memcmp(got.data(), expected.data(), n * sizeof(uint16_t)) == 0);

    // The emulated float32 gradient is cross-entropy's: lib/nn's CPU loss on the same logits and labels.
    const Shape perSample = c.positions > 1 ? Shape{c.positions, c.classes} : Shape{c.classes};
    auto cpu = nn::Loss::create({nn::LossType::kCrossEntropy}, perSample, static_cast<int>(c.batch));
    const Shape labelShape = c.positions > 1 ? Shape{c.batch, c.positions} : Shape{c.batch};
    cpu->forward(TensorView::of(x.data(), perSample.withBatch(c.batch)),
                 c.labels64 ? TensorView::of(l64.data(), labelShape) : TensorView::of(l32.data(), labelShape));
    const TensorView g = cpu->backward(c.scale);
    const std::vector<float> cpuGrad(g.f32(), g.f32() + n);
    CHECK(maxDiff(cpuGrad, diff) < 1e-6);
  }
}

TEST_CASE("the bf16 cross-entropy gradient rounds to nearest even and keeps a row's statistics per row") {
  // One row of two classes whose diff lands between two bf16 values: the statistics of another row must not leak
  // in (row r reads stats[2r], stats[2r + 1]), and the product with the factor is rounded once.
  const float x[4] = {0.0f, 0.0f, 1.0f, -1.0f};
  const int32_t labels[2] = {0, 1};
  float stats[4];
  float diff[4];
  emulateForward(x, labels, false, 2, 2, diff, stats);
  CHECK(stats[0] == 0.0f);
  CHECK(stats[1] == 2.0f);
  CHECK(stats[2] == 1.0f);
  const float factor = 1.0f / 3.0f;
  for (int64_t i = 0; i < 4; ++i) {
    const uint16_t got = crossEntropyGradBf16Element(x, labels, false, 2, stats, factor, i);
    CHECK(got == bf16Bits(diff[i] * factor));
    CHECK(std::fabs(bf16Value(got) - diff[i] * factor) <= std::fabs(diff[i] * factor) * 0x1p-8f);
  }
  CHECK(bf16Value(crossEntropyGradBf16Element(x, labels, false, 2, stats, factor, 0)) ==
        bf16Value(bf16Bits(-0.5f / 3.0f)));
}

namespace {

// loss_grad.h's Block on one CPU thread: each() queues the work every thread does until the next barrier; sync()
// (and the kernel's end, flush()) runs it for the block's kCrossEntropyChunk threads in `order`: thread by thread
// (descending or ascending: one thread runs all its work up to the barrier before the next starts, the legal
// interleaving that lets a store overtake another thread's read), or phase by phase (every thread's first step, then
// every thread's second). honourBarriers false makes sync() a no-op: the block without its barrier, which the
// emulation must catch.
enum class Order { kThreadsDescending, kThreadsAscending, kPhases };

struct HostBlock {
  Order order = Order::kThreadsDescending;
  bool honourBarriers = true;
  std::vector<std::function<void(int64_t, uint16_t&)>> pending;
  std::array<uint16_t, kCrossEntropyChunk> held{};

  template <class F>
  void each(F&& f) {
    pending.emplace_back(std::forward<F>(f));
  }
  void sync() {
    if (honourBarriers) flush();
  }
  void flush() {
    const auto threads = static_cast<int64_t>(held.size());
    if (order == Order::kPhases) {
      for (auto& f : pending)
        for (int64_t t = 0; t < threads; ++t) f(t, held[static_cast<size_t>(t)]);
    } else {
      for (int64_t i = 0; i < threads; ++i) {
        const int64_t t = order == Order::kThreadsDescending ? threads - 1 - i : i;
        for (auto& f : pending) f(t, held[static_cast<size_t>(t)]);
      }
    }
    pending.clear();
  }
};

// crossEntropyGradBf16InPlaceKernel over `logits` ([rows, classes] float32, overwritten): one block per row (rows
// share no bytes, so the blocks' order does not matter; last row first here), each row through
// crossEntropyGradBf16InPlaceRow as the kernel calls it.
void emulateInPlace(float* logits, const void* labels, bool labels64, int64_t rows, int64_t classes,
                    const float* stats, float factor, Order order, bool honourBarriers) {
  for (int64_t r = rows - 1; r >= 0; --r) {
    HostBlock block{.order = order, .honourBarriers = honourBarriers};
    crossEntropyGradBf16InPlaceRow(block, logits + r * classes, classes, stats[kCrossEntropyStats * r],
                                   stats[kCrossEntropyStats * r + 1],
                                   crossEntropyLabelColumn(labels, labels64, classes, r), factor);
    block.flush();  // the kernel's end: every thread's last stores
  }
}

// The in-place gradient as a [rows, classes] bf16 matrix with leading dimension crossEntropyGradLd(classes) over the
// logits' bytes.
std::vector<uint16_t> readInPlace(const std::vector<float>& buf, int64_t rows, int64_t classes) {
  std::vector<uint16_t> out(static_cast<size_t>(rows * classes));
  const auto* bytes = reinterpret_cast<const unsigned char*>(buf.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < classes; ++j)
      std::memcpy(&out[static_cast<size_t>(r * classes + j)], bytes + 2 * (r * crossEntropyGradLd(classes) + j), 2);
  return out;
}

}  // namespace

TEST_CASE("the bf16 cross-entropy gradient written over the logits equals the out-of-place kernel, bit for bit") {
  // Widths around the 256-column chunk and GPT-2's vocabulary; a label outside [0, C) (the forward throws for it,
  // the kernels give no onehot) in one case.
  const Case cases[] = {{1, 3, 50257, true, 0.5f}, {2, 2, 257, false, 1.0f},  {3, 1, 256, true, 0.25f},
                        {1, 4, 255, false, 1.0f},  {2, 3, 1, false, 1.0f},    {1, 2, 513, true, 1.0f / 3.0f}};
  CHECK(crossEntropyGradLd(50257) == 100514);
  for (const Case& c : cases) {
    CAPTURE(c.classes);
    CAPTURE(c.labels64);
    const int64_t rows = c.batch * c.positions;
    const auto n = static_cast<size_t>(rows * c.classes);
    std::vector<float> x = randomVector(n, static_cast<uint32_t>(n + 11), -6, 6);
    if (rows > 1) x[static_cast<size_t>(c.classes)] = 40.0f;
    std::vector<int32_t> l32(static_cast<size_t>(rows));
    std::vector<int64_t> l64(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      l32[static_cast<size_t>(r)] = static_cast<int32_t>((r * 37 + 2) % c.classes);
      l64[static_cast<size_t>(r)] = l32[static_cast<size_t>(r)];
    }
    if (c.classes == 257) l32[1] = 257;  // outside [0, 257)
    const void* labels = c.labels64 ? static_cast<const void*>(l64.data()) : static_cast<const void*>(l32.data());
    std::vector<float> diff(n), stats(static_cast<size_t>(kCrossEntropyStats * rows));
    emulateForward(x.data(), labels, c.labels64, rows, c.classes, diff.data(), stats.data());
    const float factor = c.scale / static_cast<float>(rows);
    std::vector<uint16_t> expected(n);
    gridStride(n, [&](size_t i) {
      expected[i] = crossEntropyGradBf16Element(x.data(), labels, c.labels64, c.classes, stats.data(), factor,
                                                static_cast<int64_t>(i));
    });
    for (Order order : {Order::kThreadsDescending, Order::kThreadsAscending, Order::kPhases}) {
      CAPTURE(static_cast<int>(order));
      std::vector<float> buf = x;
      emulateInPlace(buf.data(), labels, c.labels64, rows, c.classes, stats.data(), factor, order, true);
      CHECK(readInPlace(buf, rows, c.classes) == expected);
    }
    // Without the barrier a thread's store overtakes another thread's read (thread 255 of chunk 0 writes into
    // float32 element 127 before thread 127 reads it): the emulation sees it wherever a row has two columns or more.
    std::vector<float> buf = x;
    emulateInPlace(buf.data(), labels, c.labels64, rows, c.classes, stats.data(), factor, Order::kThreadsDescending,
                   false);
    CHECK((readInPlace(buf, rows, c.classes) == expected) == (c.classes < 2));
  }
}
