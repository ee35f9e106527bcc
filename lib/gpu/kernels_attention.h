// Kernels of the CUDA causal_self_attention's dropout (lib/nn/cuda/layers_gpt.cpp), beside kernels.h and under its
// conventions: device pointers of the current GPU, enqueued on the legacy default stream, launch failures thrown
// as GpuError, deterministic. The mask is computed from the counter by lib/gpu/philox.h's per-thread function
// (plain C++, CPU-tested by emulation in tests/gpu/test_gpu_attention.cpp). No CUDA header is needed to include
// this.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lib/gpu/philox.h"

namespace dtrain::gpu::kernels {

// Attention dropout on elements [first, first + n) of `draw`: out[e] = in[e] * draw.scale where element first + e
// is kept, 0 where dropped (philox.h's kSelect form; in == out allowed). `first` is the element of in[0] in the
// draw's numbering (a sample's [H, T, T] square starts at sample * H * T * T, not necessarily on a Philox block).
// One Philox block per thread (philox.h dropoutQuad); no mask is read or kept.
void dropoutSelect(const float* in, const DropoutDraw& draw, uint64_t first, float* out, size_t n);

}  // namespace dtrain::gpu::kernels
