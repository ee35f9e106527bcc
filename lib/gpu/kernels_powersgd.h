// Kernels of PowerSGD gradient compression on GPUs (lib/nn/powersgd_ops.h's GPU operations, for lib/train's
// PowerSgdHook), beside kernels.h and under its conventions: device pointers of the current GPU, enqueued on the
// legacy default stream (asynchronous), launch failures thrown as GpuError, deterministic (no atomics; a fixed
// order for every sum; the finiteness gate's equal stores aside), none reading a value back to the host. Their
// per-thread work is powersgd_math.h's, which the CPU runs too. No CUDA header is needed to include this.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lib/gpu/powersgd_math.h"

namespace dtrain::gpu::kernels {

// Modified Gram-Schmidt over each matrix's P^T (its rank rows, `rows` long), in place: powersgd_math.h's order, one
// block of kGramSchmidtLanes threads per matrix, one launch per kGramSchmidtBatch matrices (gsNextBatch; matrices
// without work are skipped); bit for bit nn::gramSchmidt on the CPU, matrix by matrix. The factors must not overlap.
// `matrices` is host memory, read before this returns.
void powerSgdGramSchmidt(const GsMatrix* matrices, size_t count);
// The finiteness gate (2 words, powersgd_math.h): cleared, then word 0 = q[0, nq) holds a non-finite value, word 1 =
// g[0, ng) does.
void powerSgdCheckFinite(uint32_t* gate, const float* q, size_t nq, const float* g, size_t ng);
// Gate word 0 set: q = initial (n elements).
void powerSgdRestart(float* q, const float* initial, size_t n, const uint32_t* gate);
// g = g + e; in = g (n elements).
void powerSgdAccumulate(float* g, const float* e, float* in, size_t n);
// e = in - g (n elements) while gate word 1 is clear (gate nullptr: always).
void powerSgdResidual(float* e, const float* in, const float* g, size_t n, const uint32_t* gate);
// x = x / divisor (n elements; a true division).
void powerSgdDivide(float* x, size_t n, float divisor);
// n floats device -> device (cudaMemcpyAsync on the legacy default stream).
void copyFloatsAsync(float* dst, const float* src, size_t n);

}  // namespace dtrain::gpu::kernels
