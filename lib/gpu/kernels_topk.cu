// top-k's kernels (kernels_topk.h); the per-thread work is topk_select.h's. Compiled with --fmad=false
// (lib/gpu/CMakeLists.txt): the element-wise steps round like the CPU hook's (-ffp-contract=off).
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "lib/gpu/grid.h"
#include "lib/gpu/kernels_topk.h"
#include "lib/gpu/launch.h"
#include "lib/gpu/topk_select.h"

namespace dtrain::gpu::kernels {
namespace {

// A gated kernel's first line: every thread returns while the gate is closed.
#define DTRAIN_TOPK_GATED(gate) \
  if (!topkGateOpen(gate)) return

#define DTRAIN_TOPK_STRIDE(i, n) \
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<size_t>(blockDim.x) * gridDim.x)

size_t chunksOf(size_t n) { return n / kTopkChunk + (n % kTopkChunk != 0 ? 1 : 0); }

// scratch: hist[256] | state (prefix, remaining) | above[chunks] | equal[chunks] | eqBase[chunks] | outBase[chunks]
struct Scratch {
  uint32_t* hist;
  RadixState* state;
  uint32_t *above, *equal, *eqBase, *outBase;
};
Scratch layout(uint32_t* s, size_t chunks) {
  return {s, reinterpret_cast<RadixState*>(s + kRadixBuckets), s + kRadixBuckets + 2, s + kRadixBuckets + 2 + chunks,
          s + kRadixBuckets + 2 + 2 * chunks, s + kRadixBuckets + 2 + 3 * chunks};
}

__global__ void initKernel(RadixState* state, uint32_t k, const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  state->prefix = 0;
  state->remaining = k;
}

__global__ void histKernel(const float* acc, size_t n, int pass, const RadixState* state, uint32_t* hist,
                           const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  __shared__ uint32_t local[kRadixBuckets];
  for (int d = static_cast<int>(threadIdx.x); d < kRadixBuckets; d += blockDim.x) local[d] = 0;
  __syncthreads();
  const uint32_t prefix = state->prefix;
  DTRAIN_TOPK_STRIDE(i, n) {
    const uint32_t key = topkKey(acc[i]);
    if (radixCandidate(key, pass, prefix)) atomicAdd(&local[radixDigit(key, pass)], 1u);
  }
  __syncthreads();
  for (int d = static_cast<int>(threadIdx.x); d < kRadixBuckets; d += blockDim.x)
    if (local[d] != 0) atomicAdd(&hist[d], local[d]);
}

__global__ void pickKernel(const uint32_t* hist, RadixState* state, const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  RadixState s = *state;
  radixPick(hist, s);
  *state = s;
}

__global__ void countKernel(const float* acc, size_t n, const RadixState* state, uint32_t* above, uint32_t* equal,
                            const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  __shared__ uint32_t a[kTopkThreads], e[kTopkThreads];
  const int t = static_cast<int>(threadIdx.x);
  countRange(acc, threadRange(n, blockIdx.x, t), state->prefix, a[t], e[t]);
  __syncthreads();
  if (t == 0) {
    uint32_t sa = 0, se = 0;
    for (int j = 0; j < kTopkThreads; ++j) sa += a[j], se += e[j];
    above[blockIdx.x] = sa;
    equal[blockIdx.x] = se;
  }
}

__global__ void planKernel(const uint32_t* above, const uint32_t* equal, size_t chunks, const RadixState* state,
                           uint32_t* eqBase, uint32_t* outBase, const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  planChunks(above, equal, chunks, state->remaining, eqBase, outBase);
}

__global__ void writeKernel(float* acc, size_t n, const RadixState* state, const uint32_t* eqBase,
                            const uint32_t* outBase, int32_t* pairs, bool zeroTaken, const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  __shared__ uint32_t eq[kTopkThreads], tk[kTopkThreads];
  const int t = static_cast<int>(threadIdx.x);
  const size_t c = blockIdx.x;
  const uint32_t thr = state->prefix, remaining = state->remaining;
  const Range r = threadRange(n, c, t);
  uint32_t above;
  countRange(acc, r, thr, above, eq[t]);
  __syncthreads();
  if (t == 0) exclusiveScan(eq, kTopkThreads);
  __syncthreads();
  const uint32_t eqStart = eqBase[c] + eq[t];
  tk[t] = takenInRange(acc, r, thr, remaining, eqStart);
  __syncthreads();
  if (t == 0) exclusiveScan(tk, kTopkThreads);
  __syncthreads();
  writeRange(acc, r, thr, remaining, eqStart, pairs, outBase[c] + tk[t], zeroTaken);
}

// The closed gate's pairs.
__global__ void nanPairsKernel(int32_t* pairs, size_t k, const uint32_t* gate) {
  if (topkGateOpen(gate)) return;
  DTRAIN_TOPK_STRIDE(j, k) {
    pairs[2 * j] = static_cast<int32_t>(j);
    pairs[2 * j + 1] = 0x7fc00000;  // quiet NaN
  }
}

__global__ void addPairsKernel(float* g, size_t n, const int32_t* pairs, size_t k) {
  DTRAIN_TOPK_STRIDE(j, k) addPair(g, n, pairs, j);
}

__global__ void divideKernel(float* g, size_t n, float divisor) {
  DTRAIN_TOPK_STRIDE(i, n) g[i] = g[i] / divisor;
}

__global__ void accumulateKernel(float* acc, const float* g, size_t n, const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  DTRAIN_TOPK_STRIDE(i, n) acc[i] = acc[i] + g[i];
}

__global__ void zeroAtKernel(float* x, const int32_t* pairs, size_t k, const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  DTRAIN_TOPK_STRIDE(j, k) x[static_cast<uint32_t>(pairs[2 * j])] = 0.0f;
}

__global__ void momentumKernel(float* u, float* acc, const float* g, size_t n, float momentum, const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  DTRAIN_TOPK_STRIDE(i, n) gpu::topkMomentum(u, acc, g, momentum, i);
}

__global__ void plainMomentumKernel(float* u, float* g, size_t n, float momentum, const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  DTRAIN_TOPK_STRIDE(i, n) gpu::topkPlainMomentum(u, g, momentum, i);
}

__global__ void adamMomentsKernel(float* m, float* v, const float* g, size_t n, TopkAdam a, const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  DTRAIN_TOPK_STRIDE(i, n) gpu::topkAdamMoments(m, v, g, a, i);
}

__global__ void adamUpdateKernel(float* m, float* v, float* g, size_t n, TopkAdam a, const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  DTRAIN_TOPK_STRIDE(i, n) gpu::topkAdamUpdate(m, v, g, a, i);
}

// Gated by `check` (nullptr: not gated): word = 1 where x has a non-finite value.
__global__ void flagNonFiniteKernel(const float* x, size_t n, uint32_t* word, const uint32_t* check) {
  if (check != nullptr && !topkGateOpen(check)) return;
  DTRAIN_TOPK_STRIDE(i, n) topkFlagNonFinite(x, word, i);
}

__global__ void dropKernel(float* acc, float* velocity, size_t n, const uint32_t* gate) {
  DTRAIN_TOPK_STRIDE(i, n) topkDropAt(acc, velocity, gate, i);
}

__global__ void clipKernel(float* g, size_t n, const double* partials, double limit, const uint32_t* gate) {
  DTRAIN_TOPK_GATED(gate);
  const float coef = topkClipCoefficient(partials[0], limit);
  DTRAIN_TOPK_STRIDE(i, n) topkClipAt(g, coef, i);
}

}  // namespace

size_t topkScratchWords(size_t n) { return kRadixBuckets + 2 + 4 * chunksOf(n); }

void topkSelect(float* acc, size_t n, size_t k, int32_t* pairs, bool zeroTaken, uint32_t* scratch,
                const uint32_t* gate) {
  if (n == 0 || k == 0) return;
  const size_t chunks = chunksOf(n);
  const Scratch s = layout(scratch, chunks);
  initKernel<<<1, 1>>>(s.state, static_cast<uint32_t>(k), gate);
  DTRAIN_CU_CHECK_LAUNCH("topk initKernel");
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    DTRAIN_CU_CHECK(cudaMemsetAsync(s.hist, 0, kRadixBuckets * sizeof(uint32_t), cudaStreamLegacy));
    histKernel<<<gridFor(n, kTopkThreads), kTopkThreads>>>(acc, n, pass, s.state, s.hist, gate);
    DTRAIN_CU_CHECK_LAUNCH("topk histKernel");
    pickKernel<<<1, 1>>>(s.hist, s.state, gate);
    DTRAIN_CU_CHECK_LAUNCH("topk pickKernel");
  }
  countKernel<<<static_cast<unsigned>(chunks), kTopkThreads>>>(acc, n, s.state, s.above, s.equal, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk countKernel");
  planKernel<<<1, 1>>>(s.above, s.equal, chunks, s.state, s.eqBase, s.outBase, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk planKernel");
  writeKernel<<<static_cast<unsigned>(chunks), kTopkThreads>>>(acc, n, s.state, s.eqBase, s.outBase, pairs, zeroTaken,
                                                                 gate);
  DTRAIN_CU_CHECK_LAUNCH("topk writeKernel");
  nanPairsKernel<<<gridFor(k, kTopkThreads), kTopkThreads>>>(pairs, k, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk nanPairsKernel");
}

void topkOpenGate(uint32_t* gate, const float* x, size_t n) {
  DTRAIN_CU_CHECK(cudaMemsetAsync(gate, 0, 2 * sizeof(uint32_t), cudaStreamLegacy));
  if (n == 0) return;
  flagNonFiniteKernel<<<gridFor(n, kTopkThreads), kTopkThreads>>>(x, n, gate, nullptr);
  DTRAIN_CU_CHECK_LAUNCH("topk flagNonFiniteKernel");
}

void topkDropNonFinite(float* acc, float* velocity, size_t n, uint32_t* gate) {
  if (n == 0) return;
  flagNonFiniteKernel<<<gridFor(n, kTopkThreads), kTopkThreads>>>(acc, n, gate + 1, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk flagNonFiniteKernel");
  dropKernel<<<gridFor(n, kTopkThreads), kTopkThreads>>>(acc, velocity, n, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk dropKernel");
}

void topkClip(float* g, size_t n, const double* partials, double limit, const uint32_t* gate) {
  if (n == 0) return;
  clipKernel<<<gridFor(n, kTopkThreads), kTopkThreads>>>(g, n, partials, limit, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk clipKernel");
}

void topkDecompress(float* g, size_t n, const int32_t* pairs, size_t k, int ranks) {
  if (n == 0) return;
  DTRAIN_CU_CHECK(cudaMemsetAsync(g, 0, n * sizeof(float), cudaStreamLegacy));
  for (int r = 0; r < ranks; ++r) {  // rank by rank: the CPU hook's order of additions
    addPairsKernel<<<gridFor(k, kTopkThreads), kTopkThreads>>>(g, n, pairs + 2 * k * static_cast<size_t>(r), k);
    DTRAIN_CU_CHECK_LAUNCH("topk addPairsKernel");
  }
  divideKernel<<<gridFor(n, kTopkThreads), kTopkThreads>>>(g, n, static_cast<float>(ranks));
  DTRAIN_CU_CHECK_LAUNCH("topk divideKernel");
}

void topkAccumulate(float* acc, const float* g, size_t n, const uint32_t* gate) {
  if (n == 0) return;
  accumulateKernel<<<gridFor(n, kTopkThreads), kTopkThreads>>>(acc, g, n, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk accumulateKernel");
}

void topkZeroAt(float* x, const int32_t* pairs, size_t k, const uint32_t* gate) {
  if (k == 0) return;
  zeroAtKernel<<<gridFor(k, kTopkThreads), kTopkThreads>>>(x, pairs, k, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk zeroAtKernel");
}

void topkMomentum(float* u, float* acc, const float* g, size_t n, float momentum, const uint32_t* gate) {
  if (n == 0) return;
  momentumKernel<<<gridFor(n, kTopkThreads), kTopkThreads>>>(u, acc, g, n, momentum, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk momentumKernel");
}

void topkPlainMomentum(float* u, float* g, size_t n, float momentum, const uint32_t* gate) {
  if (n == 0) return;
  plainMomentumKernel<<<gridFor(n, kTopkThreads), kTopkThreads>>>(u, g, n, momentum, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk plainMomentumKernel");
}

void topkAdamMoments(float* m, float* v, const float* g, size_t n, const TopkAdam& a, const uint32_t* gate) {
  if (n == 0) return;
  adamMomentsKernel<<<gridFor(n, kTopkThreads), kTopkThreads>>>(m, v, g, n, a, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk adamMomentsKernel");
}

void topkAdamUpdate(float* m, float* v, float* g, size_t n, const TopkAdam& a, const uint32_t* gate) {
  if (n == 0) return;
  adamUpdateKernel<<<gridFor(n, kTopkThreads), kTopkThreads>>>(m, v, g, n, a, gate);
  DTRAIN_CU_CHECK_LAUNCH("topk adamUpdateKernel");
}

}  // namespace dtrain::gpu::kernels
