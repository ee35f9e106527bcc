// Kernels of the CUDA causal_self_attention's compact dropout (lib/nn/cuda/layers_gpt.cpp), beside kernels.h and
// under its conventions: device pointers of the current GPU, enqueued on the legacy default stream, launch
// failures thrown as GpuError, deterministic. The mask layout and the per-element rule are lib/gpu/dropout_bits.h's
// (plain C++, CPU-tested by emulation in tests/gpu/test_gpu_window.cpp). No CUDA header is needed to include this.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dtrain::gpu::kernels {

// out[e] = maskApply(bits, first + e, in[e], keep) for e < n: in * keep where the bit is set, 0 where it is clear
// (in == out allowed). `first` is the bit of in[0] (a sample's bits need not start on a word boundary); bits holds
// at least maskWords(first + n) words.
void dropoutBits(const float* in, const uint32_t* bits, size_t first, float keep, float* out, size_t n);

}  // namespace dtrain::gpu::kernels
