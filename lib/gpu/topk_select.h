// The per-thread work of top-k gradient compression's device kernels (kernels_topk.cu): plain C++ compiled for the
// host and the device (no CUDA header), so tests/gpu/test_gpu_topk.cpp runs every thread's work of the real launch
// grids on the CPU against the CPU hook (lib/train/compression_hooks.cpp TopKHook), as reduce_index.h does.
//
// Selection (the CPU hook's: the k elements of largest |x|, ties to the smaller index, sent in ascending index order),
// made exact and deterministic without sorting:
//   key(x) = the bits of |x| (for finite x the order of the keys is the order of the magnitudes; -0 and +0 tie).
//   1. Radix select, most significant byte first, 4 passes: pass p histograms byte p of the keys whose higher bytes
//      equal the prefix found so far (integer counts: atomics give the same counts in any order), and one thread
//      walks the histogram from 255 down (radixPick) to the byte where the k-th largest key lies. After 4 passes the
//      prefix is T, the k-th largest key, and `remaining` says how many of the keys equal to T are taken: the first
//      `remaining` of them in index order (the CPU's tie-break); every key above T is taken.
//   2. Compaction in index order: the arena slice is cut into chunks of kTopkChunk elements, one block of
//      kTopkThreads threads per chunk, thread t owning kTopkChunk / kTopkThreads consecutive elements. Kernel 1 counts
//      each chunk's keys above T and equal to T; one thread (planChunks) turns the counts into each chunk's first
//      equal-key rank and first output slot; kernel 2 runs a block-wide exclusive scan (in thread order) of the
//      threads' equal-key counts and then of their taken counts, and each thread writes its taken elements' pairs
//      (int32 index, float32 value bits) at their slots, in index order, zeroing them in the residual when asked.
// Decompression (the CPU hook's order): g = 0, then rank 0's pairs added, then rank 1's, ... (one launch per rank:
// the indices of one rank are distinct, so its threads never touch the same element), then g = g / ranks.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "lib/gpu/host_device.h"

namespace dtrain::gpu {

inline constexpr int kTopkThreads = 256;                  // threads per block
inline constexpr size_t kTopkChunk = 4096;                // elements per block in the compaction
inline constexpr size_t kTopkPerThread = kTopkChunk / kTopkThreads;
inline constexpr int kRadixPasses = 4;                    // 8 bits each, most significant first
inline constexpr int kRadixBuckets = 256;

DTRAIN_HOST_DEVICE inline uint32_t topkKey(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u & 0x7fffffffu;
}

// Whether `key` is still a candidate in pass `pass` (its higher bytes equal `prefix`), and its byte there.
DTRAIN_HOST_DEVICE inline bool radixCandidate(uint32_t key, int pass, uint32_t prefix) {
  return pass == 0 || (key >> (32 - 8 * pass)) == prefix;
}
DTRAIN_HOST_DEVICE inline uint32_t radixDigit(uint32_t key, int pass) { return (key >> (24 - 8 * pass)) & 0xffu; }

// The radix select's state: the bytes of T found so far, and how many of the keys that share them are still to
// take (at first k; at the end how many keys equal to T are taken).
struct RadixState {
  uint32_t prefix = 0;
  uint32_t remaining = 0;
};

// One pass's pick (one thread): the byte holding the `remaining`-th largest candidate.
DTRAIN_HOST_DEVICE inline void radixPick(const uint32_t* hist, RadixState& s) {
  for (int d = kRadixBuckets - 1; d >= 0; --d) {
    if (hist[d] >= s.remaining) {
      s.prefix = (s.prefix << 8) | static_cast<uint32_t>(d);
      return;
    }
    s.remaining -= hist[d];
  }
  // Unreachable for 1 <= k <= n: the candidates of each pass number at least `remaining`.
  s.prefix = (s.prefix << 8);
}

// Thread t's elements of chunk c in a slice of n: [begin, end) (empty past the end).
struct Range {
  size_t begin = 0, end = 0;
};
DTRAIN_HOST_DEVICE inline Range threadRange(size_t n, size_t chunk, int t) {
  size_t b = chunk * kTopkChunk + static_cast<size_t>(t) * kTopkPerThread;
  size_t e = b + kTopkPerThread;
  if (b > n) b = n;
  if (e > n) e = n;
  return {b, e};
}

// Keys above and equal to T among acc[begin, end).
DTRAIN_HOST_DEVICE inline void countRange(const float* acc, Range r, uint32_t t, uint32_t& above, uint32_t& equal) {
  above = equal = 0;
  for (size_t i = r.begin; i < r.end; ++i) {
    const uint32_t key = topkKey(acc[i]);
    above += key > t ? 1u : 0u;
    equal += key == t ? 1u : 0u;
  }
}

// One thread over the chunks' counts: eqBase[c] = keys equal to T before chunk c, outBase[c] = its first output slot.
DTRAIN_HOST_DEVICE inline void planChunks(const uint32_t* above, const uint32_t* equal, size_t chunks, uint32_t remaining,
                                          uint32_t* eqBase, uint32_t* outBase) {
  uint32_t eq = 0, out = 0;
  for (size_t c = 0; c < chunks; ++c) {
    const uint32_t left = remaining > eq ? remaining - eq : 0u;
    const uint32_t taken = equal[c] < left ? equal[c] : left;
    eqBase[c] = eq;
    outBase[c] = out;
    out += above[c] + taken;
    eq += equal[c];
  }
}

// Whether element i (key `key`, the eqRank-th key equal to T so far) is taken.
DTRAIN_HOST_DEVICE inline bool taken(uint32_t key, uint32_t t, uint32_t eqRank, uint32_t remaining) {
  return key > t || (key == t && eqRank < remaining);
}

// Thread's taken count, its equal keys ranked from eqStart.
DTRAIN_HOST_DEVICE inline uint32_t takenInRange(const float* acc, Range r, uint32_t t, uint32_t remaining,
                                                uint32_t eqStart) {
  uint32_t count = 0, eq = eqStart;
  for (size_t i = r.begin; i < r.end; ++i) {
    const uint32_t key = topkKey(acc[i]);
    count += taken(key, t, eq, remaining) ? 1u : 0u;
    eq += key == t ? 1u : 0u;
  }
  return count;
}

// Writes the thread's taken elements as pairs (index, value bits) from slot outStart, zeroing them in acc when
// zeroTaken (error feedback: what was sent leaves the residual).
DTRAIN_HOST_DEVICE inline void writeRange(float* acc, Range r, uint32_t t, uint32_t remaining, uint32_t eqStart,
                                          int32_t* pairs, uint32_t outStart, bool zeroTaken) {
  uint32_t slot = outStart, eq = eqStart;
  for (size_t i = r.begin; i < r.end; ++i) {
    const uint32_t key = topkKey(acc[i]);
    if (taken(key, t, eq, remaining)) {
      int32_t bits;
      memcpy(&bits, &acc[i], sizeof bits);
      pairs[2 * static_cast<size_t>(slot)] = static_cast<int32_t>(i);
      pairs[2 * static_cast<size_t>(slot) + 1] = bits;
      if (zeroTaken) acc[i] = 0.0f;
      ++slot;
    }
    eq += key == t ? 1u : 0u;
  }
}

// Exclusive scan of per-thread counts in thread order (one thread of the block runs it).
DTRAIN_HOST_DEVICE inline void exclusiveScan(uint32_t* v, int count) {
  uint32_t sum = 0;
  for (int i = 0; i < count; ++i) {
    const uint32_t x = v[i];
    v[i] = sum;
    sum += x;
  }
}

// Decompression: one rank's pair j added into g (indices outside [0, n) are skipped: peers run this code, so none
// come; the CPU hook checks them).
DTRAIN_HOST_DEVICE inline void addPair(float* g, size_t n, const int32_t* pairs, size_t j) {
  const auto i = static_cast<size_t>(static_cast<uint32_t>(pairs[2 * j]));
  float v;
  memcpy(&v, &pairs[2 * j + 1], sizeof v);
  if (i < n) g[i] = g[i] + v;
}

}  // namespace dtrain::gpu

namespace dtrain::gpu {

// The element-wise steps of top-k's options, one element per thread on a GPU and the CPU hook's loops on the CPU:
// each product rounded before its sum (kernels_topk.cu is compiled with --fmad=false, lib/nn/topk_ops.cpp with
// -ffp-contract=off), so both sides give the same bits.
struct TopkAdam {
  float beta1 = 0, keep1 = 0, beta2 = 0, keep2 = 0;  // beta and 1 - beta, as floats
  float invBc1 = 1, bc2Sqrt = 1, eps = 0;            // 1 / (1 - beta1^t), sqrt(1 - beta2^t)
};
// local_adam before start_step: this rank's moments follow its gradient.
DTRAIN_HOST_DEVICE inline void topkAdamMoments(float* m, float* v, const float* g, const TopkAdam& a, size_t i) {
  const float mg = a.keep1 * g[i];
  const float m1 = m[i] * a.beta1;
  m[i] = m1 + mg;
  const float vg = a.keep2 * g[i];
  const float vg2 = vg * g[i];
  const float v1 = v[i] * a.beta2;
  v[i] = v1 + vg2;
}
// local_adam from start_step: the moments advance and g becomes Adam's update direction m_hat / (sqrt(v_hat) + eps).
DTRAIN_HOST_DEVICE inline void topkAdamUpdate(float* m, float* v, float* g, const TopkAdam& a, size_t i) {
  topkAdamMoments(m, v, g, a, i);
  const float num = a.invBc1 * m[i];
  const float den = sqrtf(v[i]) / a.bc2Sqrt + a.eps;
  g[i] = num / den;
}
// momentum_correction with error feedback: u = m u + g, acc = acc + u.
DTRAIN_HOST_DEVICE inline void topkMomentum(float* u, float* acc, const float* g, float momentum, size_t i) {
  const float mu = momentum * u[i];
  u[i] = mu + g[i];
  acc[i] = acc[i] + u[i];
}
// momentum_correction before start_step (on the averaged gradient): g = u = m u + g.
DTRAIN_HOST_DEVICE inline void topkPlainMomentum(float* u, float* g, float momentum, size_t i) {
  const float mu = momentum * u[i];
  u[i] = mu + g[i];
  g[i] = u[i];
}

// A bucket's gate (nn::TopKOps): the CPU hook's decisions about a bucket, kept on the device. Word 0 is set when
// the bucket's gradient holds a non-finite value (openGate: every thread that finds one stores 1, a benign race of
// equal stores), word 1 when the error-feedback sum does (dropNonFinite, only while word 0 is clear). Open: both 0.
// Every gated kernel's threads return at once while it is closed; the NaN pairs' kernel only runs then.
DTRAIN_HOST_DEVICE inline bool topkGateOpen(const uint32_t* gate) { return (gate[0] | gate[1]) == 0u; }
// NaN or +-inf: the exponent bits all ones (optimizer.cpp's allFinite test, element by element).
DTRAIN_HOST_DEVICE inline bool topkNonFinite(float x) { return topkKey(x) >= 0x7f800000u; }
// One element of the finiteness check into a gate word: thread i's work of openGate / dropNonFinite's first kernel.
DTRAIN_HOST_DEVICE inline void topkFlagNonFinite(const float* x, uint32_t* word, size_t i) {
  if (topkNonFinite(x[i])) *word = 1u;
}
// One element of dropNonFinite's second kernel: the residual (and velocity) zeroed when word 1 was set.
DTRAIN_HOST_DEVICE inline void topkDropAt(float* acc, float* velocity, const uint32_t* gate, size_t i) {
  if (gate[1] == 0u) return;
  acc[i] = 0.0f;
  if (velocity != nullptr) velocity[i] = 0.0f;
}
// The local clipping's factor from the sum of squares (in double): torch.nn.utils.clip_grad_norm_'s
// max_norm / (total_norm + 1e-6) with total_norm rounded to float, as optimizer.cpp's clipGradNorm; applied
// (g = g * coef) only when below 1.
DTRAIN_HOST_DEVICE inline float topkClipCoefficient(double sumSquares, double limit) {
  const float norm = static_cast<float>(sqrt(sumSquares));
  return static_cast<float>(limit / (static_cast<double>(norm) + 1e-6));
}
DTRAIN_HOST_DEVICE inline void topkClipAt(float* g, float coef, size_t i) {
  if (coef < 1.0f) g[i] = g[i] * coef;
}

}  // namespace dtrain::gpu
