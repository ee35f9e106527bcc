// Philox4x32-10, the counter-based generator every dropout mask comes from (the CPU layers, the CUDA layers and the
// fused attention kernel alike), and the dropout rule on top of it. Plain C++ for the host and the device
// (DTRAIN_HOST_DEVICE, no CUDA header): a CPU layer, a CUDA kernel's thread and tests/gpu's CPU emulations call these
// very functions, so CPU and GPU masks are equal bit for bit by construction.
//
// The generator: Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011 (the Random123
// library's philox4x32_R with R = 10; also cuRAND's Philox_4x32_10 and PyTorch's CUDA dropout). A block is a pure
// function of a 128-bit counter and a 64-bit key: four 32-bit outputs per counter value, any block computable
// without the ones before it. tests/nn/test_philox.cpp checks the published known-answer vectors (Random123's
// kat_vectors).
//
// Dropout's use of it (lib/nn/dropout_mask.h DropoutStream holds the state):
// - key: the layer's stream seed, mixSeed(seed, layer index) as before, reseeded by the trainer every micro-batch
//   from (seed, rank, step, micro-batch), so a resumed run draws the same masks.
// - counter: element e of a training forward's draw has counter offset + e, where offset is the sum of the spans
//   (element counts rounded up to 4, dropoutSpan) of the layer's earlier training forwards since the last reseed:
//   two forwards between reseeds draw different masks, as a stream would. Counter c is lane c % 4 of the Philox
//   block with counter {c / 4 low word, c / 4 high word, 0, 0}.
// - the draw: the lane's top 24 bits u; element e is kept when u * 2^-24 >= p (the old std::mt19937_64 rule,
//   `(engine() >> 40) * 2^-24 >= p`, 24 random bits), computed exactly in integers as u >= dropoutThreshold(p).
// - elements: the dropout layer numbers its batch's values in memory order (sample-major); attention dropout
//   numbers the full [batch, heads, T, T] square, e = ((sample * H + head) * T + i) * T + j with the model's heads
//   (a tensor-parallel rank uses its global head numbers), the elements above the diagonal simply unused.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lib/gpu/host_device.h"

namespace dtrain::gpu {

// Four 32-bit words: a Philox counter or an output block.
struct Philox4x32 {
  uint32_t v[4];
};

// Two 32-bit words: a Philox key.
struct PhiloxKey {
  uint32_t v[2];
};

// The published constants: the round multipliers and the Weyl key increments (golden ratio, sqrt(3) - 1).
inline constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
inline constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
inline constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
inline constexpr int kPhiloxRounds = 10;

// One Philox4x32 round (Random123's _philox4x32round).
DTRAIN_HOST_DEVICE inline Philox4x32 philoxRound(const Philox4x32& c, const PhiloxKey& k) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c.v[0];
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c.v[2];
  return {{static_cast<uint32_t>(p1 >> 32) ^ c.v[1] ^ k.v[0], static_cast<uint32_t>(p1),
           static_cast<uint32_t>(p0 >> 32) ^ c.v[3] ^ k.v[1], static_cast<uint32_t>(p0)}};
}

// Philox4x32-10: ten rounds, the key bumped by (W0, W1) before every round but the first.
DTRAIN_HOST_DEVICE inline Philox4x32 philox4x32_10(Philox4x32 counter, PhiloxKey key) {
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r > 0) {
      key.v[0] += kPhiloxW0;
      key.v[1] += kPhiloxW1;
    }
    counter = philoxRound(counter, key);
  }
  return counter;
}

// --- Dropout ---

// The counters a draw of n elements takes: n rounded up to a whole block, so every draw starts on a block and a
// kernel thread can take one block (4 elements) at a time.
DTRAIN_HOST_DEVICE inline uint64_t dropoutSpan(uint64_t n) { return (n + 3) / 4 * 4; }

// Philox block number `block` under a 64-bit key: lanes 0..3 are counters 4 block .. 4 block + 3.
DTRAIN_HOST_DEVICE inline Philox4x32 dropoutBlock(uint64_t key, uint64_t block) {
  return philox4x32_10({{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u}},
                       {{static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)}});
}

// The draw's 24 random bits from a lane: the uniform in [0, 1) is this times 2^-24.
DTRAIN_HOST_DEVICE inline uint32_t dropoutBits24(uint32_t lane) { return lane >> 8; }

// The integer form of `u >= p` for u = bits * 2^-24: bits >= ceil(p * 2^24) (exact: p * 2^24 is p's own value
// scaled by a power of two). 0 for p <= 0 (everything kept), 2^24 for p >= 1 (nothing kept: bits < 2^24).
DTRAIN_HOST_DEVICE inline uint32_t dropoutThreshold(double p) {
  if (!(p > 0.0)) return 0u;
  if (p >= 1.0) return 1u << 24;
  const double scaled = p * 16777216.0;
  const auto floor = static_cast<uint32_t>(scaled);
  return static_cast<double>(floor) < scaled ? floor + 1 : floor;
}

// THE dropout rule: whether the element with counter `counter` of the layer keyed `key` is kept, for
// threshold = dropoutThreshold(p). Random access: any element's bit costs one Philox block, whatever came before.
// Stable signature (the fused attention kernel calls it with counter = offset + e).
DTRAIN_HOST_DEVICE inline bool dropoutKept(uint64_t key, uint64_t counter, uint32_t threshold) {
  return dropoutBits24(dropoutBlock(key, counter / 4).v[counter % 4]) >= threshold;
}

// One training forward's draw of one dropout layer: everything a kernel needs to drop element e (passed to kernels
// by value). lib/nn/dropout_mask.h's DropoutStream hands them out.
struct DropoutDraw {
  uint64_t key = 0;        // the layer's stream seed
  uint64_t offset = 0;     // counter of element 0 (a multiple of 4)
  uint32_t threshold = 0;  // dropoutThreshold(p)
  float scale = 1.0f;      // what a kept element is multiplied by: float(1 / (1 - p)) as the CPU rounds it

  DTRAIN_HOST_DEVICE bool kept(uint64_t e) const { return dropoutKept(key, offset + e, threshold); }
};

// What a dropout does to element e of a draw whose lane decided `kept`, in the CPU layers' two forms:
// - kMultiply (the dropout layer, layers_dense.cpp: y = x * mask): v * (kept ? scale : 0), so a dropped -x or inf
//   gives -0 or NaN exactly as the CPU's product;
// - kSelect (attention dropout, layers_attention.cpp: `kept ? p * keep : 0`): applied to P in forward (and to the
//   recomputed P in backward, giving the forward's dropped P bit for bit) and to dP in backward.
enum class DropoutForm { kMultiply, kSelect };

DTRAIN_HOST_DEVICE inline float dropoutValue(DropoutForm form, bool kept, float v, float scale) {
  if (form == DropoutForm::kMultiply) return v * (kept ? scale : 0.0f);
  return kept ? v * scale : 0.0f;
}

// --- The dropout kernels' per-thread work (kernels_spatial.cu, kernels_attention.cu; emulated by tests/gpu) ---
//
// A kernel over elements [first, first + n) of a draw gives each thread one Philox block: thread q takes block
// (offset + first) / 4 + q, whose lanes are the draw's elements 4 ((offset + first) / 4 + q) + l - offset; those
// inside [first, first + n) are written (first need not be a multiple of 4: an attention sample's square starts
// where the one before it ended).

// Threads (blocks) covering elements [first, first + n).
DTRAIN_HOST_DEVICE inline uint64_t dropoutQuads(uint64_t first, uint64_t n) {
  return n == 0 ? 0 : (first % 4 + n + 3) / 4;
}

// Thread q's work: out[i] = dropoutValue(form, kept(first + i), in[i], scale) for its elements i of [0, n) (in and
// out point at element `first`; in == out allowed).
DTRAIN_HOST_DEVICE inline void dropoutQuad(const DropoutDraw& d, DropoutForm form, uint64_t first, uint64_t q,
                                           const float* in, float* out, uint64_t n) {
  const uint64_t lead = first % 4;  // lanes of the thread-0 block before `first`
  const Philox4x32 block = dropoutBlock(d.key, (d.offset + first) / 4 + q);
  for (int l = 0; l < 4; ++l) {
    const uint64_t at = 4 * q + static_cast<uint64_t>(l);
    if (at < lead || at - lead >= n) continue;
    const uint64_t i = at - lead;
    out[i] = dropoutValue(form, dropoutBits24(block.v[l]) >= d.threshold, in[i], d.scale);
  }
}

}  // namespace dtrain::gpu
