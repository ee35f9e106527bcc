// The per-element work of the CUDA Adagrad update (kernels_optim.cu adagradKernel) and the step constants the CUDA
// optimizer (lib/nn/cuda/optimizer.cpp) passes it: plain C++ compiled for the host and the device (no CUDA header),
// so tests/gpu/test_gpu_loss_optim.cpp runs every thread of the kernel's grid on the CPU and compares with the CPU
// optimizer (lib/nn/optimizer.cpp Adagrad) bit for bit.
//
// torch.optim.Adagrad's _single_tensor_adagrad, in the CPU's operation order:
//   clr = lr / (1 + (step - 1) * lr_decay)        (double, then rounded to float, as the CPU does)
//   g' = g + weight_decay * p                      (only when weight_decay != 0)
//   sum = sum + g' * g'
//   p = p + (-clr) * (g' / (sqrt(sum) + eps))
// Each product and sum rounded on its own: kernels_optim.cu is compiled with --fmad=false and the CPU optimizer
// with -ffp-contract=off, so neither fuses a multiply-add and both give the same bits (sqrtf is correctly rounded
// on both).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "lib/gpu/host_device.h"
#include "lib/gpu/kernels.h"

namespace dtrain::gpu {

// The constants of update number `step` (1 for the first), from the optimizer's current lr and its spec.
inline kernels::AdagradStep adagradStepFor(double lr, double lrDecay, int64_t step, double weightDecay, double eps) {
  kernels::AdagradStep s;
  s.negClr = static_cast<float>(-(lr / (1.0 + static_cast<double>(step - 1) * lrDecay)));
  s.weightDecay = static_cast<float>(weightDecay);
  s.eps = static_cast<float>(eps);
  return s;
}

// Element i of the update: p[i] and sum[i] in place from g[i] (adagradKernel's thread for i).
DTRAIN_HOST_DEVICE inline void adagradElement(float* p, const float* g, float* sum, size_t i,
                                              const kernels::AdagradStep& s) {
  float grad = g[i];
  if (s.weightDecay != 0.0f) grad = grad + s.weightDecay * p[i];
  sum[i] = sum[i] + grad * grad;
  p[i] = p[i] + s.negClr * (grad / (sqrtf(sum[i]) + s.eps));
}

}  // namespace dtrain::gpu
