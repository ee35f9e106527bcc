// The per-element work of the CUDA bce_with_logits loss (kernels_nn.cu bceKernel, kernels::bceWithLogitsRows):
// plain C++ compiled for the host and the device (no CUDA header), so tests/gpu/test_gpu_loss_optim.cpp runs
// every thread of the kernel's grid on the CPU against the CPU loss (lib/nn/loss.cpp BceWithLogits). Only the two
// atomics stay in the kernel: the smallest bad row (atomicMin) and the histogram count (atomicAdd on integers,
// exact whatever the order).
//
// In double, as loss.cpp: loss = max(x, 0) - x t + log1p(exp(-|x|)) (the stable form), diff = float(sigmoid(x) - t),
// correct = ((x > 0) == (t >= 0.5)), the AUC bin floor(sigmoid(x) * bins) with the last bin closed and a NaN logit
// in bin 0, positives' bins first, then negatives'. exp and log1p are the platform's: glibc's on the host (the CPU
// loss's too), CUDA's on the device, which may differ in the last bit (docs/gpu.md: a value on a bin edge could
// land in the neighbouring bin).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "lib/gpu/host_device.h"
#include "lib/gpu/kernels.h"

namespace dtrain::gpu {

// Element i: writes rowLoss[i], and diff[i] / rowCorrect[i] where those are not nullptr, and returns the histogram
// cell to count (bin, or bins + bin for a negative sample). A target outside its domain (a float not in [0, 1],
// NaN included; a label not 0 or 1) writes zeros and returns -1: the caller records i as a bad row.
DTRAIN_HOST_DEVICE inline int64_t bceElement(const float* x, const void* targets, kernels::TargetKind kind, size_t i,
                                             float* diff, double* rowLoss, int32_t* rowCorrect, int bins) {
  double t = 0.0;
  bool ok = false;
  if (kind == kernels::TargetKind::kFloat32) {
    const float tf = static_cast<const float*>(targets)[i];
    ok = tf >= 0.0f && tf <= 1.0f;  // false for NaN, as the CPU's check
    t = tf;
  } else {
    const int64_t label = kind == kernels::TargetKind::kInt64 ? static_cast<const int64_t*>(targets)[i]
                                                              : static_cast<const int32_t*>(targets)[i];
    ok = label == 0 || label == 1;
    t = static_cast<double>(label);
  }
  if (!ok) {
    rowLoss[i] = 0.0;
    if (diff != nullptr) diff[i] = 0.0f;
    if (rowCorrect != nullptr) rowCorrect[i] = 0;
    return -1;
  }
  const double v = x[i];
  // std::max(v, 0.0) keeps a NaN v (fmax would not): the loss of a NaN logit is NaN, as on the CPU.
  rowLoss[i] = (v < 0.0 ? 0.0 : v) - v * t + log1p(exp(-fabs(v)));
  const double sigmoid = 1.0 / (1.0 + exp(-v));
  if (diff != nullptr) diff[i] = static_cast<float>(sigmoid - t);
  const bool positive = t >= 0.5;
  if (rowCorrect != nullptr) rowCorrect[i] = (x[i] > 0.0f) == positive ? 1 : 0;
  // loss.cpp's aucBin: floor(sigmoid * bins), the last bin closed; a NaN logit goes to bin 0 (compared before any
  // conversion: NaN to an integer is undefined).
  const double scaled = sigmoid * bins;
  const int64_t bin = !(scaled >= 1.0) ? 0 : scaled < bins - 1 ? static_cast<int64_t>(scaled) : bins - 1;
  return (positive ? 0 : bins) + bin;
}

}  // namespace dtrain::gpu
