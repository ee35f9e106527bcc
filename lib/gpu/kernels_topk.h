// Kernels of top-k gradient compression on GPUs (lib/nn/topk_ops.h, for lib/train's TopKHook), beside kernels.h and
// under its conventions: device pointers of the current GPU, enqueued on the legacy default stream (asynchronous),
// launch failures thrown as GpuError, deterministic (integer counts only; no float atomics). Their per-thread work is
// topk_select.h's. No CUDA header is needed to include this.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lib/gpu/topk_select.h"

namespace dtrain::gpu::kernels {

// `gate`: 2 words of device memory (topk_select.h's topkGateOpen); a gated launch's threads return at once while it
// is closed. Nothing here reads a value back to the host.

// 32-bit words of scratch topkSelect needs for a slice of n elements.
size_t topkScratchWords(size_t n);
// Gate open: the k (1 <= k <= n) elements of acc[0, n) of largest |acc|, ties to the smaller index, written to pairs
// (2k int32: index, value bits) in ascending index order; with zeroTaken they are set to 0 in acc; acc finite. Gate
// closed: k pairs (j, NaN), what a rank with a non-finite gradient sends. scratch: topkScratchWords(n) words of device
// memory.
void topkSelect(float* acc, size_t n, size_t k, int32_t* pairs, bool zeroTaken, uint32_t* scratch,
                const uint32_t* gate);
// Gated: x[index] = 0 for each of k pairs (DGC's momentum factor masking of the pairs just selected).
void topkZeroAt(float* x, const int32_t* pairs, size_t k, const uint32_t* gate);
// gate = {x has a non-finite value, 0}.
void topkOpenGate(uint32_t* gate, const float* x, size_t n);
// Gated: gate[1] = acc has a non-finite value; then acc and velocity (nullptr: none) zeroed where gate[1] is set.
void topkDropNonFinite(float* acc, float* velocity, size_t n, uint32_t* gate);
// Gated: g = g * coef when coef = topkClipCoefficient(partials[0], limit) < 1; partials: kernels.h's
// sumSquaresOnDevice of g, enqueued before.
void topkClip(float* g, size_t n, const double* partials, double limit, const uint32_t* gate);
// g = 0; g[index] += value for each of `ranks` x k pairs, rank by rank in order; g = g / ranks.
void topkDecompress(float* g, size_t n, const int32_t* pairs, size_t k, int ranks);
// Gated: topk_select.h's element-wise steps, one thread per element.
void topkAccumulate(float* acc, const float* g, size_t n, const uint32_t* gate);
void topkMomentum(float* u, float* acc, const float* g, size_t n, float momentum, const uint32_t* gate);
void topkPlainMomentum(float* u, float* g, size_t n, float momentum, const uint32_t* gate);
void topkAdamMoments(float* m, float* v, const float* g, size_t n, const TopkAdam& a, const uint32_t* gate);
void topkAdamUpdate(float* m, float* v, float* g, size_t n, const TopkAdam& a, const uint32_t* gate);

}  // namespace dtrain::gpu::kernels
