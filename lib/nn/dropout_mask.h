// Internal to lib/nn: a dropout layer's generator state (DropoutStream) and the CPU layers' bulk form of the
// dropout rule. The rule itself, its generator (Philox4x32-10) and the element numbering are lib/gpu/philox.h's,
// shared with the CUDA layers' kernels, so CPU and GPU masks are equal bit for bit; the CUDA layers
// (lib/nn/cuda/layers_spatial.cpp, layers_gpt.cpp) hold a DropoutStream too and hand its draws to their kernels.
// tests/nn/test_philox.cpp checks the bulk form against gpu::dropoutKept; tests/gpu/test_gpu_window.cpp and
// test_gpu_attention.cpp the CUDA kernels' per-thread work against the CPU layers.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>

#include "lib/gpu/philox.h"

namespace dtrain::nn::detail {

// splitmix64 of a seed and a small integer (layers_dense.cpp): a layer's stream is seeded mixSeed(seed, index).
uint64_t mixSeed(uint64_t seed, uint64_t salt);

// One dropout layer's generator: the Philox key and the counter offset of its next draw (lib/gpu/philox.h). Not
// thread-safe (one layer, one thread).
class DropoutStream {
 public:
  // `pinned`: the layer spec's "seed", which wins over the reseeds' seeds (the same masks on every rank, whatever
  // the job's seed).
  DropoutStream(std::optional<uint64_t> pinned, int64_t index) : pinned_(pinned), index_(static_cast<uint64_t>(index)) {}

  // Keys the stream and restarts its counters at 0. Without a pinned seed the key is mixSeed(seed, index) (the
  // trainer's seed already mixes the job seed, rank, step and micro-batch); with one it is
  // mixSeed(mixSeed(pinned, position), index): a pinned layer's masks follow `position` (the trainer's step and
  // micro-batch, the same on every rank; 0 at the layer's construction), so a resumed run, which reseeds at the
  // step it resumes from, draws the masks of the run it continues.
  void reseed(uint64_t seed, uint64_t position) {
    key_ = pinned_ ? mixSeed(mixSeed(*pinned_, position), index_) : mixSeed(seed, index_);
    offset_ = 0;
  }

  // The draw of one training forward over n elements with drop probability p and kept-value scale `scale`; the
  // next draw starts dropoutSpan(n) counters later. Backward reuses the returned draw (same key and offset).
  gpu::DropoutDraw next(uint64_t n, double p, float scale) {
    const gpu::DropoutDraw draw{.key = key_, .offset = offset_, .threshold = gpu::dropoutThreshold(p), .scale = scale};
    offset_ += gpu::dropoutSpan(n);
    return draw;
  }

 private:
  std::optional<uint64_t> pinned_;
  uint64_t index_;
  uint64_t key_ = 0;
  uint64_t offset_ = 0;
};

// Most Philox blocks philoxLanes computes at once (4 KiB of lanes on the stack).
inline constexpr size_t kPhiloxBatch = 256;

// out[4 k + l] = lane l of gpu::dropoutBlock(key, block + k) for k < count (at most kPhiloxBatch): the same bits,
// computed as gpu::philox4x32_10 does but round by round for all blocks side by side, so the compiler vectorises
// the rounds (one block after the other would be a serial chain of multiplies).
inline void philoxLanes(uint64_t key, uint64_t block, size_t count, uint32_t* out) {
  uint32_t c0[kPhiloxBatch], c1[kPhiloxBatch], c2[kPhiloxBatch], c3[kPhiloxBatch];
  for (size_t k = 0; k < count; ++k) {
    c0[k] = static_cast<uint32_t>(block + k);
    c1[k] = static_cast<uint32_t>((block + k) >> 32);
    c2[k] = c3[k] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int r = 0; r < gpu::kPhiloxRounds; ++r) {
    if (r > 0) {
      k0 += gpu::kPhiloxW0;
      k1 += gpu::kPhiloxW1;
    }
    for (size_t k = 0; k < count; ++k) {  // gpu::philoxRound
      const uint64_t p0 = static_cast<uint64_t>(gpu::kPhiloxM0) * c0[k];
      const uint64_t p1 = static_cast<uint64_t>(gpu::kPhiloxM1) * c2[k];
      c0[k] = static_cast<uint32_t>(p1 >> 32) ^ c1[k] ^ k0;
      c1[k] = static_cast<uint32_t>(p1);
      c2[k] = static_cast<uint32_t>(p0 >> 32) ^ c3[k] ^ k1;
      c3[k] = static_cast<uint32_t>(p0);
    }
  }
  for (size_t k = 0; k < count; ++k) {
    out[4 * k] = c0[k];
    out[4 * k + 1] = c1[k];
    out[4 * k + 2] = c2[k];
    out[4 * k + 3] = c3[k];
  }
}

// For the n elements [first, first + n) of `draw`, in order: f(i, mask) for i = 0..n-1, mask being all ones where
// the element is kept (gpu::dropoutKept(draw.key, draw.offset + first + i, draw.threshold)) and 0 where it is
// dropped. The blocks are computed up to kPhiloxBatch at a time and f called in a loop over up to 4 kPhiloxBatch
// elements, which the compiler vectorises when f is branch-free (a select `kept ? v : 0` is not: GCC keeps the
// branch, as v's product may trap; masking v's bits is, and gives the select's value).
template <class F>
inline void forEachKept(const gpu::DropoutDraw& draw, uint64_t first, size_t n, F&& f) {
  uint32_t lanes[4 * kPhiloxBatch];
  const uint64_t counter = draw.offset + first;
  uint64_t block = counter / 4;
  size_t skip = static_cast<size_t>(counter % 4);
  for (size_t done = 0; done < n; skip = 0) {
    const size_t take = std::min(4 * kPhiloxBatch - skip, n - done), blocks = (skip + take + 3) / 4;
    philoxLanes(draw.key, block, blocks, lanes);
    const uint32_t* u = lanes + skip;
    for (size_t i = 0; i < take; ++i) f(done + i, 0u - static_cast<uint32_t>(gpu::dropoutBits24(u[i]) >= draw.threshold));
    done += take;
    block += blocks;
  }
}

// v where mask is all ones, +0 where it is 0 (forEachKept's mask).
inline float keptOrZero(float v, uint32_t mask) { return std::bit_cast<float>(std::bit_cast<uint32_t>(v) & mask); }

// The dropout layer's mask of n elements: mask[i] = draw.scale where kept, 0 where dropped (y = x * mask, the
// kMultiply form).
inline void drawDropoutMask(const gpu::DropoutDraw& draw, size_t n, float* mask) {
  const float scale = draw.scale;
  forEachKept(draw, 0, n, [&](size_t i, uint32_t kept) { mask[i] = keptOrZero(scale, kept); });
}

// Attention dropout of elements [first, first + n): out[i] = in[i] * draw.scale where kept, 0 where dropped (the
// kSelect form, `kept ? v * scale : 0`, for any v).
inline void dropoutSelect(const gpu::DropoutDraw& draw, uint64_t first, const float* in, float* out, size_t n) {
  const float scale = draw.scale;
  forEachKept(draw, first, n, [&](size_t i, uint32_t kept) { out[i] = keptOrZero(in[i] * scale, kept); });
}

}  // namespace dtrain::nn::detail
