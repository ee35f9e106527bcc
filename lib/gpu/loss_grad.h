// The bf16 gradient of cross-entropy ("precision": "bf16" on a GPU, docs/gpu.md "bf16"): the per-element work of
// kernels_nn.cu's crossEntropyKernel (its diff, softmax - onehot) and the per-block work of
// crossEntropyGradBf16InPlaceKernel (that diff scaled, rounded to bf16 and written over the logits it is computed
// from), as plain C++ compiled for the host and the device (no CUDA header on the host), so
// tests/gpu/test_gpu_loss_grad.cpp runs every thread's work, in the kernel's order, on the CPU.
//
// The bf16 gradient replaces three steps of the float32 path: the forward's diff stored as float32, backward's
// kernels::scale of it in place (times `factor`, a float32 product), and the GEMM's kernels::toBf16 of the result.
// Here backward recomputes the diff from the logits and the row's maximum and sum the forward kept (the same
// float32 operations in the same order, one function for both kernels), multiplies it by the same factor and
// rounds it with bf16Bits (toBf16's nearest even): the same bits, given the device computes the diff alike in both
// kernels (one inline function, one expression). The loss value itself is untouched (float32 per row, summed in
// double, as before).
//
// In place (since the out-of-place kernel of 4071a74, crossEntropyGradBf16Element below, which wrote a buffer of its
// own): the bf16 gradient of row r is written into the first half of the bytes of row r's float32 logits, so it
// is a [rows, classes] bf16 matrix with a leading dimension of 2 x classes (bf16 elements between row starts).
// Each element's value is crossEntropyGradBf16Value, as the out-of-place kernel computed it: the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lib/gpu/bf16_store.h"
#include "lib/gpu/host_device.h"

namespace dtrain::gpu {

// Element j of a row's softmax - onehot: exp(x - m) / sum - [j is the label], m the row's maximum, inv = 1 / the
// row's sum of exp(x - m) (float32, as crossEntropyKernel computes them).
DTRAIN_HOST_DEVICE inline float crossEntropyDiff(float x, float m, float inv, bool isLabel) {
  return expf(x - m) * inv - (isLabel ? 1.0f : 0.0f);
}

// What crossEntropyKernel keeps per row for the bf16 gradient (kernels::crossEntropyRows' rowStats): the row's
// maximum logit and its sum of exp(x - max), float32, two per row.
inline constexpr int kCrossEntropyStats = 2;

// One element of the bf16 gradient: bf16 of crossEntropyDiff(x, m, inv, isLabel) * factor, rounded to nearest even.
DTRAIN_HOST_DEVICE inline uint16_t crossEntropyGradBf16Value(float x, float m, float inv, bool isLabel, float factor) {
  return bf16Bits(crossEntropyDiff(x, m, inv, isLabel) * factor);
}

// Row r's label, and -1 (no column) for a label outside [0, classes): such a row has no onehot (the forward has
// already reported it).
DTRAIN_HOST_DEVICE inline int64_t crossEntropyLabelColumn(const void* labels, bool labels64, int64_t classes,
                                                         int64_t r) {
  const int64_t label = labels64 ? static_cast<const int64_t*>(labels)[r] : static_cast<const int32_t*>(labels)[r];
  return label >= 0 && label < classes ? label : -1;
}

// Element i of the [rows, classes] bf16 gradient written to a buffer of its own (4071a74's out-of-place kernel, one
// thread per element, grid-stride): the reference the in-place kernel is tested against. labels: int32 or int64
// (labels64), validated by the forward; stats: the forward's rowStats.
DTRAIN_HOST_DEVICE inline uint16_t crossEntropyGradBf16Element(const float* logits, const void* labels, bool labels64,
                                                               int64_t classes, const float* stats, float factor,
                                                               int64_t i) {
  const int64_t r = i / classes, j = i % classes;
  const float m = stats[kCrossEntropyStats * r], total = stats[kCrossEntropyStats * r + 1];
  const float inv = 1.0f / total;
  return crossEntropyGradBf16Value(logits[i], m, inv, j == crossEntropyLabelColumn(labels, labels64, classes, r),
                                   factor);
}

// The in-place kernel's chunk: the columns one pass of the block covers, one per thread (the block has this many
// threads).
inline constexpr int64_t kCrossEntropyChunk = 256;

// The in-place gradient's leading dimension: bf16 elements between the starts of consecutive rows (row r's gradient
// starts where its float32 logits start, 4 x classes bytes apart).
DTRAIN_HOST_DEVICE inline int64_t crossEntropyGradLd(int64_t classes) { return 2 * classes; }

// Loads and stores of the shared row buffer: typed on the device (one 4-byte load, one 2-byte store), by memcpy on
// the host (the emulation reads float32 and writes bf16 through the same bytes, which typed C++ accesses may not).
DTRAIN_HOST_DEVICE inline float loadLogit(const void* row, int64_t j) {
#if defined(__CUDA_ARCH__)
  return static_cast<const float*>(row)[j];
#else
  float v = 0.0f;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 4 * j, sizeof v);
  return v;
#endif
}
DTRAIN_HOST_DEVICE inline void storeGradBf16(void* row, int64_t j, uint16_t g) {
#if defined(__CUDA_ARCH__)
  static_cast<uint16_t*>(row)[j] = g;
#else
  std::memcpy(static_cast<unsigned char*>(row) + 2 * j, &g, sizeof g);
#endif
}

// One row of crossEntropyGradBf16InPlaceKernel, as its block of kCrossEntropyChunk threads runs it: `row` points at
// the row's float32 logits (row r of the [rows, classes] logits: byte r x 4 x classes) and receives its bf16
// gradient in its first 2 x classes bytes; m, total: the row's statistics (the forward's rowStats, computed from the
// float32 logits before any of them is overwritten); labelColumn: crossEntropyLabelColumn.
//
// Block: what the threads share. block.each(f) runs f(t, held) for every thread t of the block, held being thread t's
// own uint16_t (a register on the device), in an unspecified order and interleaving; block.sync() is the barrier
// (__syncthreads on the device): every thread's work before it completes before any thread's work after it. The
// device's Block (kernels_nn.cu) runs f for its own thread; the tests' emulates the block on one CPU thread
// (test_gpu_loss_grad.cpp), running the threads between barriers in an adversarial order.
//
// Order and why nothing is overwritten before it is read. Chunk k covers columns j in [256k, 256k + 256), thread t
// taking j = 256k + t. Each thread reads its float32 logit and computes its bf16 value, the block synchronises, then
// each thread stores its value; chunks go in increasing k. bf16 element j occupies bytes [2j, 2j + 2) of the row,
// which lie inside float32 element floor(2j / 4) = floor(j / 2) <= j of the row (bytes [4 floor(j/2), +4)), so:
// (a) a store of chunk k touches float32 elements <= (256k + 255) / 2 < 256k + 256, i.e. only elements of chunks
//     <= k, all of which were read before chunk k's barrier (chunks < k: before their own barriers, which precede
//     it; chunk k: before it, by every thread);
// (b) a read of chunk k' > k (float32 elements >= 256k') is disjoint from every store of chunks <= k' - 1 (float32
//     elements <= 128k' - 1 < 256k') and may run while a slow thread still stores chunk k' - 1: no second barrier;
// (c) the row's bytes stay the row's: its last bf16 element, classes - 1, ends at byte 2 x classes <= 4 x classes;
//     rows never share bytes, so blocks (rows) need no ordering among themselves. The labels and statistics are
//     other buffers.
// The barrier of chunk 0 is the one that matters: thread t's store hits float32 element t / 2, which thread t / 2
// reads in the same chunk (t = 255 hits element 127). Chunk k >= 1's stores land in elements [128k, 128k + 128),
// of chunks < k, already read before the previous barrier; the kernel keeps one barrier per chunk all the same, so
// that (a) is the whole rule. test_gpu_loss_grad.cpp runs the threads between barriers in adversarial orders and
// fails when the barrier is removed or a store moved before the reads.
template <class Block>
DTRAIN_HOST_DEVICE inline void crossEntropyGradBf16InPlaceRow(Block& block, void* row, int64_t classes, float m,
                                                              float total, int64_t labelColumn, float factor) {
  const float inv = 1.0f / total;
  for (int64_t c0 = 0; c0 < classes; c0 += kCrossEntropyChunk) {
    block.each([=](int64_t t, uint16_t& held) {
      const int64_t j = c0 + t;
      if (j < classes) held = crossEntropyGradBf16Value(loadLogit(row, j), m, inv, j == labelColumn, factor);
    });
    block.sync();
    block.each([=](int64_t t, uint16_t& held) {
      const int64_t j = c0 + t;
      if (j < classes) storeGradBf16(row, j, held);
    });
  }
}

}  // namespace dtrain::gpu
