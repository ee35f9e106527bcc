// Kernels of the fp16/bf16 gradient compression on GPUs (lib/train's CastHook through lib/nn/device.h), beside
// kernels.h and under its conventions: device pointers of the current GPU, enqueued on the legacy default stream,
// launch failures thrown as GpuError, deterministic. No CUDA header is needed to include this.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dtrain::gpu::kernels {

// h[i] = 16-bit float of g[i] / divisor, rounded to nearest even (fp16: __float2half_rn, overflow to inf; bf16:
// __float2bfloat16_rn): the CPU hook's toFp16/toBf16 (lib/train/compression_hooks.cpp), which divide in float32
// and then round, bit for bit for every finite value. h holds n 2-byte values.
void toHalf(const float* g, uint16_t* h, size_t n, float divisor, bool fp16);
// g[i] = float(h[i]) (exact).
void fromHalf(const uint16_t* h, float* g, size_t n, bool fp16);

}  // namespace dtrain::gpu::kernels
