// bf16 activation storage ("precision": "bf16" on a GPU, docs/gpu.md "bf16"): the per-thread work of the kernels
// that write an activation rounded to bfloat16 instead of float32 (kernels.h's *Bf16 functions), as plain C++
// compiled for the host and the device (no CUDA header on the host), so tests/gpu/test_gpu_bf16.cpp runs every
// thread's work on the CPU.
//
// Each such kernel is its float32 twin with only the store changed: the value is computed by the same function
// (reduce_index.h's activationValue / biasActivationValue, layerNormValue below) and then rounded, to nearest even,
// exactly as kernels::toBf16 rounds a float32 buffer (the conversion the bf16 GEMMs ran before each GEMM). So a
// GEMM that reads the stored bf16 values sees the very values it saw when the float32 activation was converted just
// before it, bit for bit (given the device computes the float32 value alike in both instantiations: one template,
// one expression).
#pragma once

#include <cstdint>
#include <cstring>

#include "lib/gpu/host_device.h"
#include "lib/gpu/reduce_index.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

namespace dtrain::gpu {

// The bfloat16 bit pattern of v rounded to nearest even. On the device it is __float2bfloat16_rn (the instruction
// kernels::toBf16 uses); on the host the same rounding in integer arithmetic: the upper 16 bits after adding
// 0x7fff plus the lowest kept bit (ties to even; a carry into the exponent gives the next power of two or inf),
// and for a NaN the quiet NaN 0x7fff, as cuda_bf16.h's own host path of __float2bfloat16_rn gives. The CPU gradient
// compression (comm::floatToBf16) keeps a NaN's sign and payload instead; every other input rounds alike in both
// (test_gpu_bf16.cpp).
DTRAIN_HOST_DEVICE inline uint16_t bf16Bits(float v) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
  uint32_t u = 0;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

// The float a bf16 bit pattern stands for (exact).
DTRAIN_HOST_DEVICE inline float bf16Value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float v = 0.0f;
#if defined(__CUDA_ARCH__)
  v = __uint_as_float(u);
#else
  std::memcpy(&v, &u, sizeof v);
#endif
  return v;
}

// Stores of an activation element: float32 as it is, or bf16 (bf16Bits). The kernels are templated on the output
// type and differ only here.
DTRAIN_HOST_DEVICE inline void storeActivation(float* y, int64_t i, float v) { y[i] = v; }
DTRAIN_HOST_DEVICE inline void storeActivation(uint16_t* y, int64_t i, float v) { y[i] = bf16Bits(v); }

// LayerNorm's output element j of a row (kernels_nn.cu's layerNormForwardKernel, after the row's mean and rstd):
// (x - mean) * rstd, times w[j] and plus b[j] where given (w == nullptr: not affine; b == nullptr: "bias": false).
DTRAIN_HOST_DEVICE inline float layerNormValue(float x, float mean, float rstd, const float* w, const float* b,
                                               int64_t j) {
  const float xhat = (x - mean) * rstd;
  return w != nullptr ? xhat * w[j] + (b != nullptr ? b[j] : 0.0f) : xhat;
}

// Element i of [rows, cols]: x[i] + bias[i % cols] (bias == nullptr: x[i]), the attention's qkv projection plus its
// bias (kernels::addBias's sum) before it is stored as bf16.
DTRAIN_HOST_DEVICE inline float biasedValue(const float* x, const float* bias, int64_t i, int64_t cols) {
  return bias != nullptr ? x[i] + bias[i % cols] : x[i];
}

}  // namespace dtrain::gpu
