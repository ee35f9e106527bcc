// The bf16 gradient of cross-entropy ("precision": "bf16" on a GPU, docs/gpu.md "bf16"): the per-element work of
// kernels_nn.cu's crossEntropyKernel (its diff, softmax - onehot) and crossEntropyGradBf16Kernel (that diff scaled
// and rounded to bf16), as plain C++ compiled for the host and the device (no CUDA header on the host), so
// tests/gpu/test_gpu_loss_grad.cpp runs every thread's work on the CPU.
//
// The bf16 gradient replaces three steps of the float32 path: the forward's diff stored as float32, backward's
// kernels::scale of it in place (times `factor`, a float32 product), and the GEMM's kernels::toBf16 of the result.
// Here backward recomputes the diff from the logits and the row's maximum and sum the forward kept (the same
// float32 operations in the same order, one function for both kernels), multiplies it by the same factor and
// rounds it with bf16Bits (toBf16's nearest even): the same bits, given the device computes the diff alike in both
// kernels (one inline function, one expression). The loss value itself is untouched (float32 per row, summed in
// double, as before).
#pragma once

#include <cmath>
#include <cstdint>

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

// Element i of the [rows, classes] bf16 gradient (one thread per element, grid-stride): bf16 of
// crossEntropyDiff(logit i) * factor. labels: int32 or int64 (labels64), validated by the forward; stats: the
// forward's rowStats.
DTRAIN_HOST_DEVICE inline uint16_t crossEntropyGradBf16Element(const float* logits, const void* labels, bool labels64,
                                                               int64_t classes, const float* stats, float factor,
                                                               int64_t i) {
  const int64_t r = i / classes, j = i % classes;
  const int64_t label = labels64 ? static_cast<const int64_t*>(labels)[r] : static_cast<const int32_t*>(labels)[r];
  const float m = stats[kCrossEntropyStats * r], total = stats[kCrossEntropyStats * r + 1];
  const float inv = 1.0f / total;
  const bool valid = label >= 0 && label < classes;
  return bf16Bits(crossEntropyDiff(logits[i], m, inv, valid && j == label) * factor);
}

}  // namespace dtrain::gpu
