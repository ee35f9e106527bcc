// Kernels of top-k gradient compression on GPUs (lib/nn/topk_ops.h, for lib/train's TopKHook), beside kernels.h and
// under its conventions: device pointers of the current GPU, enqueued on the legacy default stream (asynchronous),
// launch failures thrown as GpuError, deterministic (integer counts only; no float atomics). Their per-thread work is
// topk_select.h's. No CUDA header is needed to include this.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lib/gpu/topk_select.h"

namespace dtrain::gpu::kernels {

// 32-bit words of scratch topkSelect needs for a slice of n elements.
size_t topkScratchWords(size_t n);
// The k (1 <= k <= n) elements of acc[0, n) of largest |acc|, ties to the smaller index, written to pairs (2k int32:
// index, value bits) in ascending index order; with zeroTaken they are set to 0 in acc. acc must be finite. scratch:
// topkScratchWords(n) words of device memory.
void topkSelect(float* acc, size_t n, size_t k, int32_t* pairs, bool zeroTaken, uint32_t* scratch);
// x[index] = 0 for each of k pairs (DGC's momentum factor masking of the pairs just selected).
void topkZeroAt(float* x, const int32_t* pairs, size_t k);
// k pairs (j, NaN): what a rank with a non-finite gradient sends.
void topkNanPairs(int32_t* pairs, size_t k);
// g = 0; g[index] += value for each of `ranks` x k pairs, rank by rank in order; g = g / ranks.
void topkDecompress(float* g, size_t n, const int32_t* pairs, size_t k, int ranks);
// topk_select.h's element-wise steps, one thread per element.
void topkAccumulate(float* acc, const float* g, size_t n);
void topkMomentum(float* u, float* acc, const float* g, size_t n, float momentum);
void topkPlainMomentum(float* u, float* g, size_t n, float momentum);
void topkAdamMoments(float* m, float* v, const float* g, size_t n, const TopkAdam& a);
void topkAdamUpdate(float* m, float* v, float* g, size_t n, const TopkAdam& a);

}  // namespace dtrain::gpu::kernels
