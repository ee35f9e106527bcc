// The per-element work of the CUDA optimizer updates (kernels_optim.cu sgdKernel, adamKernel, adagradKernel) and
// the step constants the CUDA optimizers (lib/nn/cuda/optimizer.cpp) pass them: plain C++ compiled for the host and
// the device (no CUDA header), so tests/gpu/test_gpu_loss_optim.cpp runs every thread of the kernels' grids on the
// CPU and compares with the CPU optimizers (lib/nn/optimizer.cpp) bit for bit. SGD and Adam/AdamW are
// optimizer.cpp's loops element for element (torch.optim's _single_tensor_sgd / _single_tensor_adam(w)); Adam's
// bias corrections are computed in double and rounded once, as there.
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

// SGD's constants for the optimizer's current lr; `first`: no update has been done yet (the momentum buffer starts
// as the gradient).
inline kernels::SgdStep sgdStepFor(double lr, double momentum, double dampening, bool nesterov, double weightDecay,
                                   bool first) {
  kernels::SgdStep s;
  s.weightDecay = static_cast<float>(weightDecay);
  s.momentum = static_cast<float>(momentum);
  s.keep = static_cast<float>(1.0 - dampening);
  s.negLr = static_cast<float>(-lr);
  s.first = first;
  s.nesterov = nesterov;
  return s;
}

// Element i of an SGD update (sgdKernel's thread): buf may be nullptr when momentum is 0.
DTRAIN_HOST_DEVICE inline void sgdElement(float* p, const float* g, float* buf, size_t i, const kernels::SgdStep& s) {
  float d = g[i];
  if (s.weightDecay != 0.0f) d = d + s.weightDecay * p[i];
  if (s.momentum != 0.0f) {
    buf[i] = s.first ? d : buf[i] * s.momentum + s.keep * d;
    d = s.nesterov ? d + s.momentum * buf[i] : buf[i];
  }
  p[i] = p[i] + s.negLr * d;
}

// Adam's (adamw: decoupled) constants of update number `step` (1 for the first), from the optimizer's current lr;
// applyDecay is set per parameter group segment by the caller (weight decay on, and not 0).
inline kernels::AdamStep adamStepFor(bool decoupled, double lr, double beta1, double beta2, double eps,
                                     double weightDecay, int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  kernels::AdamStep s;
  s.decoupled = decoupled;
  s.decay = static_cast<float>(1.0 - lr * weightDecay);
  s.wd = static_cast<float>(weightDecay);
  s.beta1 = static_cast<float>(beta1), s.keep1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2), s.keep2 = static_cast<float>(1.0 - beta2);
  s.negStepSize = static_cast<float>(-(lr / bc1));
  s.bc2Sqrt = static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(eps);
  return s;
}

// Element i of an Adam/AdamW update (adamKernel's thread): vmax nullptr without amsgrad. fmaxf where the CPU has
// std::max: they differ only for a NaN vmax, which cannot arise (vmax starts at 0 and a NaN v leaves it as it was
// in both).
DTRAIN_HOST_DEVICE inline void adamElement(float* p, const float* g, float* m, float* v, float* vmax, size_t i,
                                           const kernels::AdamStep& s) {
  float grad = g[i];
  if (s.decoupled) {
    if (s.applyDecay) p[i] = p[i] * s.decay;
  } else if (s.applyDecay) {
    grad = grad + s.wd * p[i];
  }
  m[i] = m[i] * s.beta1 + s.keep1 * grad;
  v[i] = v[i] * s.beta2 + s.keep2 * grad * grad;
  float second = v[i];
  if (vmax != nullptr) {
    vmax[i] = fmaxf(vmax[i], v[i]);
    second = vmax[i];
  }
  const float denom = sqrtf(second) / s.bc2Sqrt + s.eps;
  p[i] = p[i] + s.negStepSize * m[i] / denom;
}

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
