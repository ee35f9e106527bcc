// The compact attention-dropout mask: one bit per element of the [matrices, t, t] probabilities (1: kept, 0:
// dropped or above the diagonal), packed little-endian in 32-bit words (element e is bit e % 32 of word e / 32).
// Plain C++ for the host and the device (no CUDA header): the host packs the CPU's draws into it
// (lib/nn/dropout_mask.h drawCausalDropoutBits), the CUDA kernels (kernels_attention.cu) read it through these
// very functions, and tests/gpu/test_gpu_window.cpp runs every thread's work on the CPU against the CPU layer.
//
// Why bits: a float mask of GPT-2-small's attention (batch 8, 12 heads, T 1024) is 403 MB per layer on the host
// and as much again on the device, plus the dropped probabilities; the bits are 12.6 MB, and the dropped
// probabilities are recomputed from the (recomputed) P and these bits when backward needs them (docs/gpu.md).
#pragma once

#include <cstddef>
#include <cstdint>

#include "lib/gpu/host_device.h"

namespace dtrain::gpu {

inline constexpr int kMaskWordBits = 32;

// 32-bit words holding the bits of n elements.
DTRAIN_HOST_DEVICE inline size_t maskWords(size_t n) { return (n + kMaskWordBits - 1) / kMaskWordBits; }

// Whether element e is kept.
DTRAIN_HOST_DEVICE inline bool maskKept(const uint32_t* bits, size_t e) {
  return ((bits[e / kMaskWordBits] >> (e % kMaskWordBits)) & 1u) != 0;
}

// The host side: marks element e kept when `kept` (the words start zeroed).
inline void maskSet(uint32_t* bits, size_t e, bool kept) {
  bits[e / kMaskWordBits] |= static_cast<uint32_t>(kept) << (e % kMaskWordBits);
}

// The value dropout gives element e of v: v * keep where kept, 0 where dropped. A select, as the CPU layer's
// (layers_attention.cpp dropRow: `kept ? p * keep : 0`), applied to P in forward (and to the recomputed P in
// backward, giving the forward's dropped P bit for bit) and to dP in backward (the gradient through the dropout).
DTRAIN_HOST_DEVICE inline float maskApply(const uint32_t* bits, size_t e, float v, float keep) {
  return maskKept(bits, e) ? v * keep : 0.0f;
}

}  // namespace dtrain::gpu
