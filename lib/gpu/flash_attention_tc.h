// The tensor-core fused causal attention of the CUDA causal_self_attention ("attention": "fused" under
// "precision": "bf16", or float32 with "tf32" on, the default): the per-warp algorithm of its three kernels
// (kernels_attention.cu), written against flash_mma.h's 16 x 16 fragment operations, so the same code compiles for
// the device (WMMA) and for the host (a plain C++ emulation of the fragments): tests/gpu/test_gpu_flash_tc.cpp
// runs every warp and lane of the real launch grids on the CPU, shared memory as a plain buffer, against the CPU
// layer. Float32 with TF32 off keeps flash_attention.h's exact CUDA-core kernels.
//
// Algorithm: FlashAttention-2 (Dao 2023), the tiles on tensor cores (16 x 16 x 16 MMAs, bf16 or TF32 operands,
// float32 accumulators), with flash_attention.h's conventions: scores in base 2 (s = q.k * scale * log2 e, exp2),
// the log-sum-exp L_i = m_i + log2(l_i) per query row kept for backward, attention dropout from philox.h's counter
// (element e = ((b H + h) T + i) T + j) recomputed where needed, nothing of size T x T in memory.
//   A block is kFlashTcWarps = 4 warps and owns 64 rows (kFlashThreads) of one (sample, head): queries (forward,
//   dQ) or keys (dK/dV); warp w owns rows [16 w, 16 w + 16). Items and their order are flash_attention.h's
//   (flashItem: forward and dQ last query tile first, dK/dV first key tile first), over a bounded grid.
//   Forward: the block's Q rows as operands in shared memory; for each key tile [j0, j0 + C) up to the block's last
//   row (C = kFlashTcCols: 64 keys for head sizes up to 64, 32 for 128), K and V staged as operands; each warp with
//   keys at or below its rows: S = Q K^T by MMAs (only the key columns up to its last row) stored to its float
//   scratch; the row-wise online softmax on that tile, two lanes per row (lane l: row l % 16, half l / 16 of the
//   columns; partial maxima and sums combined through shared memory in a fixed order): the causal mask (j > i:
//   -inf), the new running maximum m, P = exp2(s - m) written rounded to the operand type (after dropout), l
//   rescaled by alpha = exp2(m_old - m) plus the tile's sum (over the undropped P); then O (HS / 16 accumulator
//   fragments in registers) stored to the scratch, each row multiplied by its alpha, loaded back, and O += P V by
//   MMAs. At the end O / l goes to the concatenated heads and L = m + log2(l) to lse [batch, H, T].
//   Backward (deterministic: every output element is accumulated by one warp's fragments in a fixed order, no
//   atomics), two kernels:
//     dQ, a block per query tile: D_i = dO_i . O_i in float32 (one lane per row, written to dsum for the next
//       kernel), then over the key tiles up to the diagonal: S = Q K^T and dP = dO V^T by MMAs; per element
//       P = exp2(s - L_i) (0 above the diagonal), dP dropped as forward dropped P, dS = P (dP - D_i) rounded to an
//       operand; dQ += dS K by MMAs; finally dQ x scale.
//     dK/dV, a block per key tile, over the query tiles from its first key on: S^T = K Q^T and dP^T = V dO^T by
//       MMAs; per element (key j, query i >= j) P^T, the dropped P^T and dS^T rounded to operands; dV += drop(P)^T
//       dO and dK += dS^T Q by MMAs; finally dK x scale and dV.
//   Everything the lanes do runs on tiles stored to shared memory; fragments are touched only through flash_mma.h
//   (fill, loadAcc, storeAcc, mma), so the host emulation is faithful whatever WMMA's register layout is.
// Precision: q, k, v, dO, P and dS are rounded to the operand type once each where they enter an MMA (q, k, v
// stored as bf16, "precision": "bf16" with bf16 storage, are taken as they are: flashTcOperand); S, dP, O, dQ, dK,
// dV accumulate in float32; the softmax statistics (m, l, L), D and the element-wise work are float32. Nothing but
// the operand staging reads q, k or v, so bf16-stored q, k, v give the bits of their float32 values' rounding.
// Head sizes: compiled for 16, 32, 64 and 128 (flashHeadTemplate), a head size in between zero-padded.
// Layouts of the inputs and outputs: flash_attention.h's (qkv [batch * T, 3C] of float, or of uint16_t bf16 bits
// (the item functions' In), att/datt [batch * T, C], lse/dsum [batch, H, T], dqkv [batch * T, 3C]; all but qkv
// float32).
// Shared memory: FlashTcForwardSmem, and FlashTcGradQSmem / FlashTcGradKVSmem in flash_attention_tc_backward.h
// (bytes(): up to about 160 KiB at head size 128 with TF32 operands; the launcher raises the kernels' dynamic
// shared-memory limit above 48 KiB).
#pragma once

#include <cstddef>
#include <cstdint>

#include "lib/gpu/flash_attention.h"
#include "lib/gpu/flash_mma.h"
#include "lib/gpu/host_device.h"

namespace dtrain::gpu {

inline constexpr int kFlashTcWarps = 4;
inline constexpr int kFlashTcThreads = 32 * kFlashTcWarps;
static_assert(16 * kFlashTcWarps == kFlashThreads, "a block owns flash_attention.h's 64-row tile");

// Key tile width (forward, dQ) or query tile height (dK/dV) for compiled head size HS.
template <int HS>
inline constexpr int kFlashTcCols = HS <= 64 ? 64 : 32;

// Deliberate faults for the tests only (a broken kernel must fail them); the device always runs kNone.
enum class FlashTcFault {
  kNone,
  kMaskDiagonal,  // the causal mask is off by one at the diagonal (lets key j = i + 1 in) in every kernel
  kNoRescale,     // forward: O is not rescaled by exp2(m_old - m_new) when a row's maximum grows
  kBf16WrongHalf,  // q, k, v stored as bf16: every kernel's loader reads the neighbour column's half (d ^ 1)
};

// Leading dimensions (elements) of the shared-memory tiles; the padding keeps rows off one bank and keeps WMMA's
// rules (operand ld a multiple of 8, float ld a multiple of 4; tile starts 32-byte aligned).
template <int HS>
struct FlashTcLd {
  static constexpr int kCols = kFlashTcCols<HS>;
  static constexpr int kOp = HS + 8;                             // operand tiles [rows, HS]
  static constexpr int kP = kCols + 8;                           // a warp's operand tile [16, kCols] (P, dS)
  static constexpr int kF = (kCols > HS ? kCols : HS) + 4;       // a warp's float scratch [16, max(kCols, HS)]
  static constexpr int kG = kCols + 4;                           // a warp's second float scratch [16, kCols] (dP)
};

// Carves a shared-memory buffer into 128-byte aligned arrays (base 0: only counts the bytes). The per-warp arrays
// are carved once, for warp 0, and repeat every `warpBytes` (warp w's: at(p, w)), so a warp finds its own by
// arithmetic, not through an array indexed at run time (which the device would keep in local memory).
struct FlashTcCarve {
  uintptr_t base;
  size_t at = 0;
  DTRAIN_HOST_DEVICE void align() { at = (at + 127) / 128 * 128; }
  template <class T>
  DTRAIN_HOST_DEVICE T* take(size_t n) {
    align();
    T* p = reinterpret_cast<T*>(base + at);
    at += n * sizeof(T);
    return p;
  }
};

template <class M, int HS>
struct FlashTcSmemBase {
  using Op = typename FlashMma<M>::Operand;
  using Ld = FlashTcLd<HS>;
  size_t warpBytes = 0, bytes = 0;
  template <class T>
  DTRAIN_HOST_DEVICE T* at(T* p, int w) const {
    return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) + static_cast<size_t>(w) * warpBytes);
  }
  // After the block's arrays: the per-warp arrays (carved by `perWarp`) for kFlashTcWarps warps.
  template <class F>
  DTRAIN_HOST_DEVICE void carveWarps(FlashTcCarve& c, F&& perWarp) {
    c.align();
    const size_t first = c.at;
    perWarp(c);
    c.align();
    warpBytes = c.at - first;
    bytes = first + kFlashTcWarps * warpBytes;
  }
};

// Forward: the block's Q rows, the key tile's K and V; per warp a float scratch (S, then O for its rescale and
// output), P, and its rows' statistics.
template <class M, int HS>
struct FlashTcForwardSmem : FlashTcSmemBase<M, HS> {
  using typename FlashTcSmemBase<M, HS>::Op;
  using Ld = FlashTcLd<HS>;
  Op* q;       // [64, kOp]
  Op* k;       // [kCols, kOp]
  Op* v;       // [kCols, kOp]
  float* f0;   // warp 0's [16, kF]
  Op* p0;      // warp 0's [16, kP]
  float* st0;  // warp 0's m[16], l[16], alpha[16], redM[2][16], redL[2][16]
  DTRAIN_HOST_DEVICE explicit FlashTcForwardSmem(uintptr_t base) {
    FlashTcCarve c{base};
    q = c.take<Op>(kFlashThreads * Ld::kOp);
    k = c.take<Op>(Ld::kCols * Ld::kOp);
    v = c.take<Op>(Ld::kCols * Ld::kOp);
    this->carveWarps(c, [&](FlashTcCarve& w) {
      f0 = w.take<float>(16 * Ld::kF);
      p0 = w.take<Op>(16 * Ld::kP);
      st0 = w.take<float>(112);
    });
  }
  DTRAIN_HOST_DEVICE float* f(int w) const { return this->at(f0, w); }
  DTRAIN_HOST_DEVICE Op* p(int w) const { return this->at(p0, w); }
  DTRAIN_HOST_DEVICE float* m(int w) const { return this->at(st0, w); }
  DTRAIN_HOST_DEVICE float* l(int w) const { return this->at(st0, w) + 16; }
  DTRAIN_HOST_DEVICE float* alpha(int w) const { return this->at(st0, w) + 32; }
  DTRAIN_HOST_DEVICE float* redM(int w) const { return this->at(st0, w) + 48; }
  DTRAIN_HOST_DEVICE float* redL(int w) const { return this->at(st0, w) + 80; }
};

// The block's executor (the device: kernels_attention.cu's; the CPU: the test's), for the item functions below and
// in flash_attention_tc_backward.h:
//   th.threads(f): f(tid) for every thread tid < kFlashTcThreads of the block (tile loads);
//   th.warps(f):   f(w, state) for every warp w, warp-collective (fragment operations; `state` holds the warp's
//                  accumulator fragments; the condition of any branch inside must be the same for the whole warp);
//   th.lanes(f):   f(w, lane) for every lane of every warp (element-wise work on shared memory; no fragments);
//   th.sync(FlashSync): the block barrier (the emulation poisons the block's staged tiles at kTileFree);
//   th.syncWarp(): the warp barrier between a warp's phases (fragment stores and lane reads, and back).
// Each call is a phase: on the CPU every thread (warp, lane) finishes it before the next begins, so the device
// code needs a barrier wherever one phase reads what another wrote: th.syncWarp within a warp's own shared memory,
// th.sync for the block's tiles.

// The operand of an input element: a float32 value rounded (toOperand), or a value stored as bf16 (its bits,
// uint16_t) as it is (fromBf16): the same operand when the bf16 is the float32 value rounded to nearest even.
template <class M>
DTRAIN_HOST_DEVICE inline typename FlashMma<M>::Operand flashTcOperand(float x) {
  return FlashMma<M>::toOperand(x);
}
template <class M>
DTRAIN_HOST_DEVICE inline typename FlashMma<M>::Operand flashTcOperand(uint16_t bf16) {
  return FlashMma<M>::fromBf16(bf16);
}

// Copies rows [0, n) of a column block (src: its first row, rows ld elements apart, hs columns; In float, or
// uint16_t for bf16 bits) into the operand tile [ROWS, ld = FlashTcLd<HS>::kOp] as operands (flashTcOperand);
// rows n .. ROWS-1 and columns hs .. HS-1 are zeros (an MMA reads whole 16-row tiles: a stale or NaN row would leak
// into the products).
template <class M, int HS, int ROWS, FlashTcFault kFault = FlashTcFault::kNone, class In>
DTRAIN_HOST_DEVICE inline void flashTcLoadTile(typename FlashMma<M>::Operand* tile, const In* src, int64_t ld,
                                               int64_t hs, int64_t n, int tid) {
  for (int e = tid; e < ROWS * HS; e += kFlashTcThreads) {
    const int r = e / HS, d = e % HS;
    // The broken loader reads the other bf16 of the element's 4-byte pair (its neighbour column).
    const int64_t col = kFault == FlashTcFault::kBf16WrongHalf && sizeof(In) == 2 ? (d ^ 1) : d;
    tile[r * FlashTcLd<HS>::kOp + d] =
        r < n && d < hs ? flashTcOperand<M>(src[r * ld + col]) : FlashMma<M>::toOperand(0.0f);
  }
}

DTRAIN_HOST_DEVICE constexpr int flashTcRound16(int64_t n) { return static_cast<int>((n + 15) / 16 * 16); }

// The key columns of the tile [j0, j0 + n) that the warp whose 16 query rows start at r0 needs (causal: up to its
// last row), rounded up to a multiple of 16; 0 when the warp has no rows (r0 >= t) or the tile is above its rows.
DTRAIN_HOST_DEVICE inline int flashTcWarpKeyCols(int64_t r0, int64_t t, int64_t j0, int64_t n) {
  if (r0 >= t || j0 > r0 + 15) return 0;
  return flashTcRound16(flashMin(n, r0 + 16 - j0));
}

template <class M, int HS>
struct FlashTcForwardWarp {
  typename FlashMma<M>::Acc o[HS / 16];
};

// --- Forward: one item (sample, head, 64 query rows) ---
template <class M, int HS, FlashTcFault kFault = FlashTcFault::kNone, class Threads, class In, class Drop>
DTRAIN_HOST_DEVICE inline void flashTcForwardItem(Threads& th, const FlashGeometry& g, int64_t item, const In* qkv,
                                                  float* att, float* lse, const FlashTcForwardSmem<M, HS>& sm,
                                                  const Drop& drop) {
  using Mma = FlashMma<M>;
  using Ld = FlashTcLd<HS>;
  using Warp = FlashTcForwardWarp<M, HS>;
  constexpr int C = Ld::kCols;
  const FlashItem it = flashItem(g, item, true);
  const int64_t c = g.c(), c3 = 3 * c, t = g.t;
  const In* base = qkv + it.b * t * c3 + it.h * g.hs;  // q of (sample, head) row 0; k at + c, v at + 2c
  const int64_t bh = it.b * g.heads + it.h;
  const float scaleLog2 = g.scaleLog2;
  th.sync(FlashSync::kTileFree);  // the previous item's readers of the block's tiles are done
  th.threads([&](int tid) {
    flashTcLoadTile<M, HS, kFlashThreads, kFault>(sm.q, base + it.row0 * c3, c3, g.hs,
                                                  flashMin(kFlashThreads, t - it.row0), tid);
  });
  th.lanes([&](int w, int lane) {
    if (lane < 16) sm.m(w)[lane] = -INFINITY, sm.l(w)[lane] = 0.0f;
  });
  th.warps([&](int, Warp& st) {
DTRAIN_FLASH_UNROLL
    for (int d = 0; d < HS / 16; ++d) Mma::fill(st.o[d], 0.0f);
  });
  const int64_t end = flashMin(t, it.row0 + kFlashThreads);  // keys up to the block's last row
  for (int64_t j0 = 0; j0 < end; j0 += C) {
    const int64_t n = flashMin(C, t - j0);
    auto cols = [&](int w) -> int { return flashTcWarpKeyCols(it.row0 + 16 * w, t, j0, n); };
    th.sync(FlashSync::kTileFree);
    th.threads([&](int tid) {
      flashTcLoadTile<M, HS, C, kFault>(sm.k, base + c + j0 * c3, c3, g.hs, n, tid);
      flashTcLoadTile<M, HS, C, kFault>(sm.v, base + 2 * c + j0 * c3, c3, g.hs, n, tid);
    });
    th.sync(FlashSync::kTileReady);
    // S = Q K^T, 16 key columns at a time, into the warp's float scratch.
    th.warps([&](int w, Warp&) {
      const int kc = cols(w);
      for (int cb = 0; cb < kc / 16; ++cb) {
        typename Mma::Acc s;
        Mma::fill(s, 0.0f);
DTRAIN_FLASH_UNROLL
        for (int d = 0; d < HS / 16; ++d)
          Mma::template mma<true, false>(s, sm.q + 16 * w * Ld::kOp + 16 * d, Ld::kOp,
                                         sm.k + 16 * cb * Ld::kOp + 16 * d, Ld::kOp);
        Mma::storeAcc(sm.f(w) + 16 * cb, s, Ld::kF);
      }
    });
    th.syncWarp();
    // Lane (row r, half h) takes columns [h kc / 2, (h + 1) kc / 2) of row r: the masked, scaled score of key j.
    auto score = [&](int w, int r, int u) -> float {
      const int64_t i = it.row0 + 16 * w + r, j = j0 + u;
      const bool above = kFault == FlashTcFault::kMaskDiagonal ? j > i + 1 : j > i;
      return above ? -INFINITY : sm.f(w)[r * Ld::kF + u] * scaleLog2;
    };
    th.lanes([&](int w, int lane) {
      const int kc = cols(w), r = lane & 15, h = lane >> 4;
      if (kc == 0) return;
      float mx = -INFINITY;
      for (int u = h * kc / 2; u < (h + 1) * kc / 2; ++u) mx = fmaxf(mx, score(w, r, u));
      sm.redM(w)[h * 16 + r] = mx;
    });
    th.syncWarp();
    th.lanes([&](int w, int lane) {
      const int kc = cols(w), r = lane & 15, h = lane >> 4;
      if (kc == 0) return;
      const float* redM = sm.redM(w);
      // Finite: the row has a key at or below it in this tile (j0 <= its warp's first row, or kc would be 0).
      const float mNew = fmaxf(sm.m(w)[r], fmaxf(redM[r], redM[16 + r]));
      const int64_t i = it.row0 + 16 * w + r;
      const uint64_t e0 = static_cast<uint64_t>((bh * t + i) * t + j0);
      float sum = 0.0f;
      for (int u = h * kc / 2; u < (h + 1) * kc / 2; ++u) {
        const float s = score(w, r, u);
        float p = 0.0f, kept = 0.0f;
        if (s != -INFINITY) {
          p = exp2f(s - mNew);
          kept = Drop::kOn ? drop.applyKept(drop.keeps(e0 + static_cast<uint64_t>(u)), p) : p;
        }
        sum += p;  // the normaliser counts every key, dropped or not
        sm.p(w)[r * Ld::kP + u] = Mma::toOperand(kept);
      }
      sm.redL(w)[h * 16 + r] = sum;
    });
    th.syncWarp();
    th.lanes([&](int w, int lane) {
      if (lane >= 16 || cols(w) == 0) return;
      float *m = sm.m(w), *l = sm.l(w);
      const float *redM = sm.redM(w), *redL = sm.redL(w);
      const float mOld = m[lane];
      const float mNew = fmaxf(mOld, fmaxf(redM[lane], redM[16 + lane]));
      const float alpha = exp2f(mOld - mNew);  // 0 for the first tile (m = -inf)
      l[lane] = l[lane] * alpha + (redL[lane] + redL[16 + lane]);
      m[lane] = mNew;
      sm.alpha(w)[lane] = kFault == FlashTcFault::kNoRescale && mOld != -INFINITY ? 1.0f : alpha;
    });
    // O rescaled per row through shared memory, then O += P V.
    th.warps([&](int w, Warp& st) {
      if (cols(w) == 0) return;
DTRAIN_FLASH_UNROLL
      for (int d = 0; d < HS / 16; ++d) Mma::storeAcc(sm.f(w) + 16 * d, st.o[d], Ld::kF);
    });
    th.syncWarp();
    th.lanes([&](int w, int lane) {
      if (cols(w) == 0) return;
      const int r = lane & 15, h = lane >> 4;
      const float alpha = sm.alpha(w)[r];
      for (int d = h * HS / 2; d < (h + 1) * HS / 2; ++d) sm.f(w)[r * Ld::kF + d] *= alpha;
    });
    th.syncWarp();
    th.warps([&](int w, Warp& st) {
      const int kc = cols(w);
      if (kc == 0) return;
DTRAIN_FLASH_UNROLL
      for (int d = 0; d < HS / 16; ++d) {
        Mma::loadAcc(st.o[d], sm.f(w) + 16 * d, Ld::kF);
        for (int kb = 0; kb < kc / 16; ++kb)
          Mma::template mma<true, true>(st.o[d], sm.p(w) + 16 * kb, Ld::kP, sm.v + 16 * kb * Ld::kOp + 16 * d,
                                        Ld::kOp);
      }
    });
  }
  // O_i = O / l, L_i = m + log2(l).
  th.warps([&](int w, Warp& st) {
    if (it.row0 + 16 * w >= t) return;
DTRAIN_FLASH_UNROLL
    for (int d = 0; d < HS / 16; ++d) Mma::storeAcc(sm.f(w) + 16 * d, st.o[d], Ld::kF);
  });
  th.syncWarp();
  th.lanes([&](int w, int lane) {
    const int r = lane & 15, h = lane >> 4;
    const int64_t i = it.row0 + 16 * w + r;
    if (i >= t) return;
    const float lR = sm.l(w)[r];
    const float inv = 1.0f / lR;
    float* out = att + (it.b * t + i) * c + it.h * g.hs;
    for (int d = h * HS / 2; d < (h + 1) * HS / 2; ++d)
      if (d < g.hs) out[d] = sm.f(w)[r * Ld::kF + d] * inv;
    if (h == 0) lse[bh * t + i] = sm.m(w)[r] + log2f(lR);
  });
}

}  // namespace dtrain::gpu
