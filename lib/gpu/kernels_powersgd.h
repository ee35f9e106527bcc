// Kernels of PowerSGD gradient compression on GPUs (lib/nn/powersgd_ops.h's GPU operations, for lib/train's
// PowerSgdHook), beside kernels.h and under its conventions: device pointers of the current GPU, enqueued on the
// legacy default stream (asynchronous), launch failures thrown as GpuError, deterministic (no atomics; a fixed
// order for every sum). Their per-thread work is powersgd_math.h's, which the CPU runs too. No CUDA header is
// needed to include this.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dtrain::gpu::kernels {

// Modified Gram-Schmidt over the r rows (length `rows`) of pt, in place: powersgd_math.h's order, one block of
// kGramSchmidtLanes threads (bit for bit nn::gramSchmidt on the CPU).
void powerSgdGramSchmidt(float* pt, int r, int64_t rows);
// g = g + e; in = g (n elements).
void powerSgdAccumulate(float* g, const float* e, float* in, size_t n);
// e = in - g (n elements).
void powerSgdResidual(float* e, const float* in, const float* g, size_t n);
// x = x / divisor (n elements; a true division).
void powerSgdDivide(float* x, size_t n, float divisor);
// n floats device -> device (cudaMemcpyAsync on the legacy default stream).
void copyFloatsAsync(float* dst, const float* src, size_t n);

}  // namespace dtrain::gpu::kernels
