// The fused causal attention of the CUDA causal_self_attention (lib/nn/cuda/layers_gpt.cpp, "attention": "fused"):
// the per-thread work and the per-block tile loops of its four kernels (kernels_attention.cu), in plain C++ for the
// host and the device (no CUDA header), so tests/gpu/test_gpu_flash.cpp runs every thread of the real launch grid
// on the CPU, shared-memory tiles as plain arrays, against the CPU layer (lib/nn/layers_attention.cpp).
//
// These are the kernels of float32 jobs with TF32 off (exact float32 products); bf16 and TF32 jobs run the
// tensor-core kernels of flash_attention_tc.h, which share this file's geometry, items, log-sum-exp and dropout
// policies.
// Algorithm: FlashAttention (Dao et al. 2022) in the form of FlashAttention-2 (Dao 2023), fp32 throughout.
//   Forward, one thread per query row i (kFlashThreads rows per block), looping over key tiles j0 = 0, R, 2R, ...
//   up to the block's last row (tiles above the diagonal are never visited): the block stages K and V rows
//   [j0, j0 + R) of its (sample, head) in shared memory, each thread walks them in chunks of kFlashChunk keys with
//   the online softmax (running max m, sum l, output accumulator acc rescaled by exp2(m_old - m_new) once per
//   chunk), skipping keys j > i. Then O_i = acc / l into the concatenated heads and L_i = m + log2(l) (the
//   log-sum-exp in base-2 units of the scaled scores) into lse [batch, H, T]. The [T, T] square never exists.
//   Scores are s_ij = (q_i . k_j) * scale * log2(e), exponentiated with exp2 (as FlashAttention's kernels do); the
//   CPU's exp((q.k - max) * scale) is the same value up to float rounding.
//   Backward (deterministic: every output element is summed by one thread in a fixed order, no atomics):
//     dQ kernel, one thread per query row i: D_i = dO_i . O_i (written to dsum [batch, H, T] for the next two
//       kernels), then over the key tiles up to the diagonal: P_ij = exp2(s_ij - L_i), dP_ij = dO_i . v_j,
//       dS_ij = P_ij (dP_ij - D_i), dq_i += dS_ij k_j; finally dq_i *= scale.
//     dK kernel, one thread per key row j, over query tiles i0 = the block's first row, ... up to T (Q, dO, L and D
//       rows staged in shared memory), queries i >= j only: dk_j += dS_ij q_i; finally dk_j *= scale.
//     dV kernel, one thread per key row j, the same tiles: dv_j += P_ij dO_i.
//   dK and dV are separate kernels to keep each thread's registers at three head-size arrays (k, v, dk) and two
//   (k, dv); the price is computing s_ij twice. D_i = sum_j P_ij dP_ij = dO_i . O_i (FlashAttention's identity),
//   so nothing of size T x T is needed in backward either.
// Attention dropout (FlashDropout): forward O_i = sum_j drop(P_ij) v_j / l_i with the normaliser l_i over the
// undropped P; backward dP_ij = drop(dO_i . v_j) (the gradient through the select), dV_j = sum_i drop(P_ij) dO_i,
// and D_i = dO_i . O_i still equals sum_j P_ij dP_ij. drop(x) at element e = ((b H + h) T + i) T + j is x / (1 - p)
// where the draw keeps e, 0 where it drops it: the CPU layer's mask, recomputed from the counter by each kernel.
// Head sizes: the kernels are compiled for 16, 32, 64 and 128 (flashHeadTemplate); a head size in between runs the
// next larger one with its tiles and registers zero-padded (zeros add nothing to a dot product). Above 128 the
// layer keeps the cuBLAS path (kFlashMaxHeadSize).
// Layouts (those of the CUDA layer): qkv [batch * T, 3C] row-major, q of head h at columns [h hs, (h + 1) hs), k at
// C + h hs, v at 2C + h hs; the heads att and their gradient datt [batch * T, C] (head h at column h hs); dqkv as
// qkv; lse and dsum [batch, H, T] floats.
// Blocks: the grid is 1-D, capped at kMaxBlocks (grid.h); block x handles items x, x + gridDim.x, ... where an item
// is (sample, head, tile of kFlashThreads rows) (flashItem): query tiles last first in forward and dQ (the last
// rows see the most keys), key tiles first first in dK and dV.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "lib/gpu/host_device.h"
#include "lib/gpu/philox.h"

// Full unrolling of the head-size loops in the device pass (the per-thread arrays must stay in registers: every
// index a compile-time constant); nothing for the host compiler (nvcc's host pass included).
#if defined(__CUDA_ARCH__)
#define DTRAIN_FLASH_UNROLL _Pragma("unroll")
#else
#define DTRAIN_FLASH_UNROLL
#endif

namespace dtrain::gpu {

inline constexpr int kFlashThreads = 64;         // threads per block: the rows one block owns
inline constexpr int kFlashChunk = 16;           // forward: keys per online-softmax rescale
inline constexpr int64_t kFlashMaxHeadSize = 128;

// The compiled head size that runs `hs` (0 when none: hs < 1 or hs > 128).
DTRAIN_HOST_DEVICE constexpr int flashHeadTemplate(int64_t hs) {
  return hs < 1 ? 0 : hs <= 16 ? 16 : hs <= 32 ? 32 : hs <= 64 ? 64 : hs <= kFlashMaxHeadSize ? 128 : 0;
}

// Rows of a shared-memory tile (keys in forward and dQ, queries in dK and dV) for compiled head size HS: two tiles
// of R x HS floats are at most 32 KiB (static shared memory stays under the 48 KiB default).
template <int HS>
inline constexpr int kFlashTileRows = HS <= 64 ? 64 : 32;

struct FlashGeometry {
  int64_t batch = 0, t = 0, heads = 0, hs = 0;
  float scale = 1;      // 1 / sqrt(hs), rounded as the layer rounds it
  float scaleLog2 = 1;  // scale * log2(e): scores in base-2 units
  DTRAIN_HOST_DEVICE int64_t c() const { return heads * hs; }
  DTRAIN_HOST_DEVICE int64_t tiles() const { return (t + kFlashThreads - 1) / kFlashThreads; }
  DTRAIN_HOST_DEVICE int64_t items() const { return batch * heads * tiles(); }
};

inline FlashGeometry flashGeometry(int64_t batch, int64_t t, int64_t heads, int64_t hs) {
  FlashGeometry g{batch, t, heads, hs};
  g.scale = 1.0f / std::sqrt(static_cast<float>(hs));
  g.scaleLog2 = g.scale * 1.44269504088896340736f;
  return g;
}

// One block's work: sample b, head h, rows [row0, row0 + kFlashThreads) (queries or keys, by kernel).
struct FlashItem {
  int64_t b = 0, h = 0, row0 = 0;
};
DTRAIN_HOST_DEVICE inline FlashItem flashItem(const FlashGeometry& g, int64_t item, bool lastTileFirst) {
  const int64_t tiles = g.tiles(), bh = item / tiles;
  const int64_t tile = lastTileFirst ? tiles - 1 - item % tiles : item % tiles;
  return {bh / g.heads, bh % g.heads, tile * kFlashThreads};
}

DTRAIN_HOST_DEVICE inline int64_t flashMin(int64_t a, int64_t b) { return a < b ? a : b; }

// Copies rows [0, n) of a column block (src: its first row, rows ld floats apart, hs columns) into tile [ROWS, HS]
// (row-major), columns hs .. HS-1 zero; rows n .. ROWS-1 are left as they are (never read). Thread tid of
// `threads` copies elements tid, tid + threads, ... (neighbouring threads read neighbouring columns).
template <int HS, int ROWS>
DTRAIN_HOST_DEVICE inline void flashLoadTile(float* tile, const float* src, int64_t ld, int64_t hs, int64_t n, int tid,
                                             int threads) {
  for (int e = tid; e < ROWS * HS; e += threads) {
    const int r = e / HS, d = e % HS;
    if (r < n) tile[e] = d < hs ? src[r * ld + d] : 0.0f;
  }
}

// The same for one float per row (L or D of rows [0, n)): tile[r] = src[r].
template <int ROWS>
DTRAIN_HOST_DEVICE inline void flashLoadRows(float* tile, const float* src, int64_t n, int tid, int threads) {
  for (int r = tid; r < ROWS; r += threads)
    if (r < n) tile[r] = src[r];
}

// sum_d a[d] b[d] over the padded head size, in order d = 0, 1, ... (the device reads b, a shared-memory row, four
// floats at a time; the same products and additions in the same order).
template <int HS>
DTRAIN_HOST_DEVICE inline float flashDot(const float* a, const float* b) {
  float s = 0.0f;
#if defined(__CUDA_ARCH__)
DTRAIN_FLASH_UNROLL
  for (int d = 0; d < HS; d += 4) {
    const float4 v = *reinterpret_cast<const float4*>(b + d);
    s += a[d] * v.x;
    s += a[d + 1] * v.y;
    s += a[d + 2] * v.z;
    s += a[d + 3] * v.w;
  }
#else
  for (int d = 0; d < HS; ++d) s += a[d] * b[d];
#endif
  return s;
}

// acc[d] += w * b[d] over the padded head size (b a shared-memory row).
template <int HS>
DTRAIN_HOST_DEVICE inline void flashAxpy(float* acc, float w, const float* b) {
#if defined(__CUDA_ARCH__)
DTRAIN_FLASH_UNROLL
  for (int d = 0; d < HS; d += 4) {
    const float4 v = *reinterpret_cast<const float4*>(b + d);
    acc[d] += w * v.x;
    acc[d + 1] += w * v.y;
    acc[d + 2] += w * v.z;
    acc[d + 3] += w * v.w;
  }
#else
  for (int d = 0; d < HS; ++d) acc[d] += w * b[d];
#endif
}

// A head-size row from global memory into registers, zero-padded.
template <int HS>
DTRAIN_HOST_DEVICE inline void flashLoadRow(float* to, const float* from, int64_t hs) {
DTRAIN_FLASH_UNROLL
  for (int d = 0; d < HS; ++d) to[d] = d < hs ? from[d] : 0.0f;
}

template <int HS>
DTRAIN_HOST_DEVICE inline void flashStoreRow(float* to, const float* from, int64_t hs, float scale) {
DTRAIN_FLASH_UNROLL
  for (int d = 0; d < HS; ++d)
    if (d < hs) to[d] = from[d] * scale;
}

// No attention dropout: every probability kept as it is. (The dropout policy's interface: kOn, and apply(e, v),
// what dropout makes of value v at element e = ((b H + h) T + i) T + j of the probabilities: the CPU layer's
// select, v / (1 - p) where kept, 0 where dropped; applied to P in forward and dV and to dP in dQ and dK.)
struct FlashNoDropout {
  static constexpr bool kOn = false;
  DTRAIN_HOST_DEVICE float apply(uint64_t, float v) const { return v; }
  // The same in two steps (the tensor-core kernels drop two values of one element with one draw):
  DTRAIN_HOST_DEVICE bool keeps(uint64_t) const { return true; }
  DTRAIN_HOST_DEVICE float applyKept(bool, float v) const { return v; }
};

// Attention dropout ("dropout" > 0, training): element e's fate is the draw's (philox.h: Philox4x32-10 at counter
// offset + e, the CPU layer's own rule and numbering), applied as the CPU layer's select (kSelect: v * scale where
// kept, 0 where dropped). Computed where it is needed (one Philox block per element visited), never stored.
struct FlashDropout {
  static constexpr bool kOn = true;
  DropoutDraw draw;
  DTRAIN_HOST_DEVICE float apply(uint64_t e, float v) const {
    return dropoutValue(DropoutForm::kSelect, draw.kept(e), v, draw.scale);
  }
  DTRAIN_HOST_DEVICE bool keeps(uint64_t e) const { return draw.kept(e); }
  DTRAIN_HOST_DEVICE float applyKept(bool kept, float v) const {
    return dropoutValue(DropoutForm::kSelect, kept, v, draw.scale);
  }
};

// --- Per-thread state and work ---

// Forward, query row i (i < 0: a thread past T, which only helps load tiles).
template <int HS>
struct FlashForwardRow {
  float q[HS], acc[HS];
  float m, l;      // running maximum of the scores (base 2) and sum of exp2(s - m) over the keys seen
  int64_t i;
  uint64_t e0;     // element index of (i, j = 0) for the dropout policy

  DTRAIN_HOST_DEVICE void begin(const float* qRow, int64_t hs, int64_t row, uint64_t firstElement) {
    i = row, e0 = firstElement;
    m = -INFINITY, l = 0.0f;
DTRAIN_FLASH_UNROLL
    for (int d = 0; d < HS; ++d) acc[d] = 0.0f;
    if (i >= 0) flashLoadRow<HS>(q, qRow, hs);
  }

  // Keys [j0, j0 + n) staged in kTile, vTile ([R, HS] each); keys j > i are skipped.
  template <class Drop>
  DTRAIN_HOST_DEVICE void step(const float* kTile, const float* vTile, int64_t j0, int64_t n, float scaleLog2,
                               const Drop& drop) {
    if (i < 0) return;
    const int64_t valid = flashMin(n, i - j0 + 1);
    for (int64_t c0 = 0; c0 < valid; c0 += kFlashChunk) {
      float s[kFlashChunk];
      float chunkMax = -INFINITY;
DTRAIN_FLASH_UNROLL
      for (int u = 0; u < kFlashChunk; ++u) {
        s[u] = c0 + u < valid ? flashDot<HS>(q, kTile + (c0 + u) * HS) * scaleLog2 : -INFINITY;
        chunkMax = fmaxf(chunkMax, s[u]);
      }
      const float mNew = fmaxf(m, chunkMax);  // finite: key c0 is valid
      const float alpha = exp2f(m - mNew);    // 0 for the first chunk (m = -inf)
      l *= alpha;
DTRAIN_FLASH_UNROLL
      for (int d = 0; d < HS; ++d) acc[d] *= alpha;
DTRAIN_FLASH_UNROLL
      for (int u = 0; u < kFlashChunk; ++u) {
        if (c0 + u >= valid) break;
        const float p = exp2f(s[u] - mNew);
        l += p;  // the softmax's normaliser counts every key, dropped or not
        const float w = Drop::kOn ? drop.apply(e0 + static_cast<uint64_t>(j0 + c0 + u), p) : p;
        flashAxpy<HS>(acc, w, vTile + (c0 + u) * HS);
      }
      m = mNew;
    }
  }

  // O_i = acc / l, L_i = m + log2(l).
  DTRAIN_HOST_DEVICE void finish(float* outRow, float* lse, int64_t hs) const {
    if (i < 0) return;
    flashStoreRow<HS>(outRow, acc, hs, 1.0f / l);
    *lse = m + log2f(l);
  }
};

// dQ, query row i: also D_i = dO_i . O_i.
template <int HS>
struct FlashGradQRow {
  float q[HS], dout[HS], dq[HS];
  float lse, dsum;
  int64_t i;
  uint64_t e0;

  DTRAIN_HOST_DEVICE void begin(const float* qRow, const float* outRow, const float* doutRow, float rowLse, int64_t hs,
                                int64_t row, uint64_t firstElement, float* dsumOut) {
    i = row, e0 = firstElement;
DTRAIN_FLASH_UNROLL
    for (int d = 0; d < HS; ++d) dq[d] = 0.0f;
    if (i < 0) return;
    flashLoadRow<HS>(q, qRow, hs);
    flashLoadRow<HS>(dout, doutRow, hs);
    lse = rowLse;
    float s = 0.0f;
DTRAIN_FLASH_UNROLL
    for (int d = 0; d < HS; ++d)
      if (d < hs) s += dout[d] * outRow[d];
    dsum = s;
    *dsumOut = s;
  }

  template <class Drop>
  DTRAIN_HOST_DEVICE void step(const float* kTile, const float* vTile, int64_t j0, int64_t n, float scaleLog2,
                               const Drop& drop) {
    if (i < 0) return;
    const int64_t valid = flashMin(n, i - j0 + 1);
    for (int64_t jj = 0; jj < valid; ++jj) {
      const float* k = kTile + jj * HS;
      const float p = exp2f(flashDot<HS>(q, k) * scaleLog2 - lse);
      float dp = flashDot<HS>(dout, vTile + jj * HS);
      if (Drop::kOn) dp = drop.apply(e0 + static_cast<uint64_t>(j0 + jj), dp);
      flashAxpy<HS>(dq, p * (dp - dsum), k);
    }
  }

  DTRAIN_HOST_DEVICE void finish(float* dqRow, int64_t hs, float scale) const {
    if (i >= 0) flashStoreRow<HS>(dqRow, dq, hs, scale);
  }
};

// dK, key row j.
template <int HS>
struct FlashGradKRow {
  float k[HS], v[HS], dk[HS];
  int64_t j;

  DTRAIN_HOST_DEVICE void begin(const float* kRow, const float* vRow, int64_t hs, int64_t row) {
    j = row;
DTRAIN_FLASH_UNROLL
    for (int d = 0; d < HS; ++d) dk[d] = 0.0f;
    if (j < 0) return;
    flashLoadRow<HS>(k, kRow, hs);
    flashLoadRow<HS>(v, vRow, hs);
  }

  // Queries [i0, i0 + n) staged: q and dO rows in qTile, doTile, their L and D in lseTile, dsumTile. e00: the
  // element index of (i = 0, j = 0) of this (sample, head). Queries i < j are skipped.
  template <class Drop>
  DTRAIN_HOST_DEVICE void step(const float* qTile, const float* doTile, const float* lseTile, const float* dsumTile,
                               int64_t i0, int64_t n, float scaleLog2, int64_t t, uint64_t e00, const Drop& drop) {
    if (j < 0) return;
    for (int64_t ii = j > i0 ? j - i0 : 0; ii < n; ++ii) {
      const float* q = qTile + ii * HS;
      const float p = exp2f(flashDot<HS>(k, q) * scaleLog2 - lseTile[ii]);
      float dp = flashDot<HS>(v, doTile + ii * HS);
      if (Drop::kOn) dp = drop.apply(e00 + static_cast<uint64_t>((i0 + ii) * t + j), dp);
      flashAxpy<HS>(dk, p * (dp - dsumTile[ii]), q);
    }
  }

  DTRAIN_HOST_DEVICE void finish(float* dkRow, int64_t hs, float scale) const {
    if (j >= 0) flashStoreRow<HS>(dkRow, dk, hs, scale);
  }
};

// dV, key row j.
template <int HS>
struct FlashGradVRow {
  float k[HS], dv[HS];
  int64_t j;

  DTRAIN_HOST_DEVICE void begin(const float* kRow, int64_t hs, int64_t row) {
    j = row;
DTRAIN_FLASH_UNROLL
    for (int d = 0; d < HS; ++d) dv[d] = 0.0f;
    if (j >= 0) flashLoadRow<HS>(k, kRow, hs);
  }

  template <class Drop>
  DTRAIN_HOST_DEVICE void step(const float* qTile, const float* doTile, const float* lseTile, int64_t i0, int64_t n,
                               float scaleLog2, int64_t t, uint64_t e00, const Drop& drop) {
    if (j < 0) return;
    for (int64_t ii = j > i0 ? j - i0 : 0; ii < n; ++ii) {
      float p = exp2f(flashDot<HS>(k, qTile + ii * HS) * scaleLog2 - lseTile[ii]);
      if (Drop::kOn) p = drop.apply(e00 + static_cast<uint64_t>((i0 + ii) * t + j), p);
      flashAxpy<HS>(dv, p, doTile + ii * HS);
    }
  }

  DTRAIN_HOST_DEVICE void finish(float* dvRow, int64_t hs) const {
    if (j >= 0) flashStoreRow<HS>(dvRow, dv, hs, 1.0f);
  }
};

// --- One block's item: the tile loops, for any thread executor ---
// `Threads` runs the block's threads: th.each(f) calls f(tid, state) for every thread of the block (the device: the
// calling thread with its registers; the CPU emulation: every tid in turn with its own state, so a phase of all
// threads finishes before the next begins), th.sync(FlashSync) is the block barrier (__syncthreads on the device;
// the emulation poisons the tiles with NaN at kTileFree, so a thread reading a row no thread loaded shows).

enum class FlashSync { kTileFree, kTileReady };

// The key-tile loop of the query-row kernels (forward, dQ): K and V of the (sample, head) at `base` (its q row 0;
// k at + c, v at + 2c), tile by tile up to the block's last query row, staged by the block's threads, then every
// row's step(kTile, vTile, first key, keys, scaleLog2, drop) over the tile (keys above a row are its step's to skip).
template <int HS, class Threads, class Drop>
DTRAIN_HOST_DEVICE inline void flashKeyTiles(Threads& th, const FlashGeometry& g, const FlashItem& it,
                                             const float* base, float* kTile, float* vTile, const Drop& drop) {
  constexpr int R = kFlashTileRows<HS>;
  const int64_t c3 = 3 * g.c(), t = g.t;
  const int64_t end = flashMin(t, it.row0 + kFlashThreads);  // keys up to the block's last row
  for (int64_t j0 = 0; j0 < end; j0 += R) {
    const int64_t n = flashMin(R, t - j0);
    th.sync(FlashSync::kTileFree);
    th.each([&](int tid, auto&) {
      flashLoadTile<HS, R>(kTile, base + g.c() + j0 * c3, c3, g.hs, n, tid, kFlashThreads);
      flashLoadTile<HS, R>(vTile, base + 2 * g.c() + j0 * c3, c3, g.hs, n, tid, kFlashThreads);
    });
    th.sync(FlashSync::kTileReady);
    th.each([&](int, auto& row) { row.step(kTile, vTile, j0, n, g.scaleLog2, drop); });
  }
}

template <int HS, class Threads, class Drop>
DTRAIN_HOST_DEVICE inline void flashForwardItem(Threads& th, const FlashGeometry& g, int64_t item, const float* qkv,
                                                float* att, float* lse, float* kTile, float* vTile, const Drop& drop) {
  const FlashItem it = flashItem(g, item, true);
  const int64_t c = g.c(), c3 = 3 * c, t = g.t;
  const float* base = qkv + it.b * t * c3 + it.h * g.hs;  // q of (sample, head) row 0; k at + c, v at + 2c
  const int64_t bh = it.b * g.heads + it.h;
  th.each([&](int tid, FlashForwardRow<HS>& row) {
    const int64_t i = it.row0 + tid;
    if (i >= t) return row.begin(nullptr, g.hs, -1, 0);
    row.begin(base + i * c3, g.hs, i, static_cast<uint64_t>((bh * t + i) * t));
  });
  flashKeyTiles<HS>(th, g, it, base, kTile, vTile, drop);
  th.each([&](int, FlashForwardRow<HS>& row) {
    if (row.i >= 0) row.finish(att + (it.b * t + row.i) * c + it.h * g.hs, lse + bh * t + row.i, g.hs);
  });
}

template <int HS, class Threads, class Drop>
DTRAIN_HOST_DEVICE inline void flashGradQItem(Threads& th, const FlashGeometry& g, int64_t item, const float* qkv,
                                              const float* att, const float* lse, const float* datt, float* dsum,
                                              float* dqkv, float* kTile, float* vTile, const Drop& drop) {
  const FlashItem it = flashItem(g, item, true);
  const int64_t c = g.c(), c3 = 3 * c, t = g.t;
  const float* base = qkv + it.b * t * c3 + it.h * g.hs;
  const int64_t bh = it.b * g.heads + it.h;
  th.each([&](int tid, FlashGradQRow<HS>& row) {
    const int64_t i = it.row0 + tid;
    if (i >= t) return row.begin(nullptr, nullptr, nullptr, 0.0f, g.hs, -1, 0, nullptr);
    const int64_t r = (it.b * t + i) * c + it.h * g.hs;
    row.begin(base + i * c3, att + r, datt + r, lse[bh * t + i], g.hs, i, static_cast<uint64_t>((bh * t + i) * t),
              dsum + bh * t + i);
  });
  flashKeyTiles<HS>(th, g, it, base, kTile, vTile, drop);
  th.each([&](int, FlashGradQRow<HS>& row) {
    if (row.i >= 0) row.finish(dqkv + (it.b * t + row.i) * c3 + it.h * g.hs, g.hs, g.scale);
  });
}

// dK and dV share the query-tile loop: Grad is FlashGradKRow (kGradK) or FlashGradVRow.
template <int HS, bool kGradK, class Threads, class Drop>
DTRAIN_HOST_DEVICE inline void flashGradKVItem(Threads& th, const FlashGeometry& g, int64_t item, const float* qkv,
                                               const float* lse, const float* datt, const float* dsum, float* dqkv,
                                               float* qTile, float* doTile, float* lseTile, float* dsumTile,
                                               const Drop& drop) {
  using Row = typename std::conditional<kGradK, FlashGradKRow<HS>, FlashGradVRow<HS>>::type;
  constexpr int R = kFlashTileRows<HS>;
  const FlashItem it = flashItem(g, item, false);
  const int64_t c = g.c(), c3 = 3 * c, t = g.t;
  const float* base = qkv + it.b * t * c3 + it.h * g.hs;
  const float* doBase = datt + it.b * t * c + it.h * g.hs;
  const int64_t bh = it.b * g.heads + it.h;
  const uint64_t e00 = static_cast<uint64_t>(bh * t * t);
  th.each([&](int tid, Row& row) {
    const int64_t j = it.row0 + tid;
    const bool in = j < t;
    const float* kRow = in ? base + c + j * c3 : nullptr;
    if constexpr (kGradK) row.begin(kRow, in ? kRow + c : nullptr, g.hs, in ? j : -1);
    else row.begin(kRow, g.hs, in ? j : -1);
  });
  for (int64_t i0 = it.row0; i0 < t; i0 += R) {  // queries before the block's first key see none of its keys
    const int64_t n = flashMin(R, t - i0);
    th.sync(FlashSync::kTileFree);
    th.each([&](int tid, Row&) {
      flashLoadTile<HS, R>(qTile, base + i0 * c3, c3, g.hs, n, tid, kFlashThreads);
      flashLoadTile<HS, R>(doTile, doBase + i0 * c, c, g.hs, n, tid, kFlashThreads);
      flashLoadRows<R>(lseTile, lse + bh * t + i0, n, tid, kFlashThreads);
      if constexpr (kGradK) flashLoadRows<R>(dsumTile, dsum + bh * t + i0, n, tid, kFlashThreads);
    });
    th.sync(FlashSync::kTileReady);
    th.each([&](int, Row& row) {
      if constexpr (kGradK) row.step(qTile, doTile, lseTile, dsumTile, i0, n, g.scaleLog2, t, e00, drop);
      else row.step(qTile, doTile, lseTile, i0, n, g.scaleLog2, t, e00, drop);
    });
  }
  th.each([&](int, Row& row) {
    if (row.j < 0) return;
    float* to = dqkv + (it.b * t + row.j) * c3 + it.h * g.hs;
    if constexpr (kGradK) row.finish(to + c, g.hs, g.scale);
    else row.finish(to + 2 * c, g.hs);
  });
}

}  // namespace dtrain::gpu
