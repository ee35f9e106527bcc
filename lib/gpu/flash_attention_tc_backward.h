// The backward kernels of the tensor-core fused causal attention (flash_attention_tc.h has the algorithm, the
// conventions, the forward and the pieces these share): their shared-memory layouts, their warps' accumulator
// fragments and their per-warp item functions, dQ (with D = rowwise dO . O) and then dK/dV. Split from
// flash_attention_tc.h along the forward/backward seam; the code is unchanged. Emulated warp by warp by
// tests/gpu/test_gpu_flash_tc.cpp; launched by kernels_attention.cu.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lib/gpu/flash_attention_tc.h"

namespace dtrain::gpu {

// dQ: the block's Q and dO rows, the key tile's K and V; per warp S (then dQ for its output), dP, dS and its rows'
// L and D.
template <class M, int HS>
struct FlashTcGradQSmem : FlashTcSmemBase<M, HS> {
  using typename FlashTcSmemBase<M, HS>::Op;
  using Ld = FlashTcLd<HS>;
  Op* q;
  Op* dout;
  Op* k;
  Op* v;
  float* f0;    // [16, kF]
  float* g0;    // [16, kG]
  Op* ds0;      // [16, kP]
  float* row0;  // L[16], D[16]
  DTRAIN_HOST_DEVICE explicit FlashTcGradQSmem(uintptr_t base) {
    FlashTcCarve c{base};
    q = c.take<Op>(kFlashThreads * Ld::kOp);
    dout = c.take<Op>(kFlashThreads * Ld::kOp);
    k = c.take<Op>(Ld::kCols * Ld::kOp);
    v = c.take<Op>(Ld::kCols * Ld::kOp);
    this->carveWarps(c, [&](FlashTcCarve& w) {
      f0 = w.take<float>(16 * Ld::kF);
      g0 = w.take<float>(16 * Ld::kG);
      ds0 = w.take<Op>(16 * Ld::kP);
      row0 = w.take<float>(32);
    });
  }
  DTRAIN_HOST_DEVICE float* f(int w) const { return this->at(f0, w); }
  DTRAIN_HOST_DEVICE float* g(int w) const { return this->at(g0, w); }
  DTRAIN_HOST_DEVICE Op* ds(int w) const { return this->at(ds0, w); }
  DTRAIN_HOST_DEVICE float* rowL(int w) const { return this->at(row0, w); }
  DTRAIN_HOST_DEVICE float* rowD(int w) const { return this->at(row0, w) + 16; }
};

// dK/dV: the block's K and V rows, the query tile's Q, dO, L and D; per warp S^T (then dK and dV for their output),
// dP^T, the dropped P^T and dS^T.
template <class M, int HS>
struct FlashTcGradKVSmem : FlashTcSmemBase<M, HS> {
  using typename FlashTcSmemBase<M, HS>::Op;
  using Ld = FlashTcLd<HS>;
  Op* k;
  Op* v;
  Op* q;
  Op* dout;
  float* rowL;  // [kCols]
  float* rowD;  // [kCols]
  float* f0;    // [16, kF]
  float* g0;    // [16, kG]
  Op* p0;       // [16, kP]
  Op* ds0;      // [16, kP]
  DTRAIN_HOST_DEVICE explicit FlashTcGradKVSmem(uintptr_t base) {
    FlashTcCarve c{base};
    k = c.take<Op>(kFlashThreads * Ld::kOp);
    v = c.take<Op>(kFlashThreads * Ld::kOp);
    q = c.take<Op>(Ld::kCols * Ld::kOp);
    dout = c.take<Op>(Ld::kCols * Ld::kOp);
    rowL = c.take<float>(2 * Ld::kCols);
    rowD = rowL + Ld::kCols;
    this->carveWarps(c, [&](FlashTcCarve& w) {
      f0 = w.take<float>(16 * Ld::kF);
      g0 = w.take<float>(16 * Ld::kG);
      p0 = w.take<Op>(16 * Ld::kP);
      ds0 = w.take<Op>(16 * Ld::kP);
    });
  }
  DTRAIN_HOST_DEVICE float* f(int w) const { return this->at(f0, w); }
  DTRAIN_HOST_DEVICE float* g(int w) const { return this->at(g0, w); }
  DTRAIN_HOST_DEVICE Op* p(int w) const { return this->at(p0, w); }
  DTRAIN_HOST_DEVICE Op* ds(int w) const { return this->at(ds0, w); }
};

template <class M, int HS>
struct FlashTcGradQWarp {
  typename FlashMma<M>::Acc dq[HS / 16];
};
template <class M, int HS>
struct FlashTcGradKVWarp {
  typename FlashMma<M>::Acc dk[HS / 16], dv[HS / 16];
};

// --- Backward, dQ: one item (sample, head, 64 query rows); also D = rowwise dO . O into dsum ---
template <class M, int HS, FlashTcFault kFault = FlashTcFault::kNone, class Threads, class In, class Drop>
DTRAIN_HOST_DEVICE inline void flashTcGradQItem(Threads& th, const FlashGeometry& g, int64_t item, const In* qkv,
                                                const float* att, const float* lse, const float* datt, float* dsum,
                                                float* dqkv, const FlashTcGradQSmem<M, HS>& sm, const Drop& drop) {
  using Mma = FlashMma<M>;
  using Ld = FlashTcLd<HS>;
  using Warp = FlashTcGradQWarp<M, HS>;
  constexpr int C = Ld::kCols;
  const FlashItem it = flashItem(g, item, true);
  const int64_t c = g.c(), c3 = 3 * c, t = g.t;
  const In* base = qkv + it.b * t * c3 + it.h * g.hs;
  const int64_t bh = it.b * g.heads + it.h;
  const float scaleLog2 = g.scaleLog2;
  const int64_t rows = flashMin(kFlashThreads, t - it.row0);
  th.sync(FlashSync::kTileFree);
  th.threads([&](int tid) {
    flashTcLoadTile<M, HS, kFlashThreads, kFault>(sm.q, base + it.row0 * c3, c3, g.hs, rows, tid);
    flashTcLoadTile<M, HS, kFlashThreads>(sm.dout, datt + (it.b * t + it.row0) * c + it.h * g.hs, c, g.hs, rows,
                                          tid);
  });
  // D_i = dO_i . O_i in float32 (d = 0, 1, ...: flash_attention.h's order), L_i; rows past T: 0 (their dO is 0).
  th.lanes([&](int w, int lane) {
    if (lane >= 16) return;
    const int64_t i = it.row0 + 16 * w + lane;
    float dI = 0.0f, lI = 0.0f;
    if (i < t) {
      const int64_t r = (it.b * t + i) * c + it.h * g.hs;
      for (int64_t d = 0; d < g.hs; ++d) dI += datt[r + d] * att[r + d];
      lI = lse[bh * t + i];
      dsum[bh * t + i] = dI;
    }
    sm.rowD(w)[lane] = dI, sm.rowL(w)[lane] = lI;
  });
  th.warps([&](int, Warp& st) {
DTRAIN_FLASH_UNROLL
    for (int d = 0; d < HS / 16; ++d) Mma::fill(st.dq[d], 0.0f);
  });
  const int64_t end = flashMin(t, it.row0 + kFlashThreads);
  for (int64_t j0 = 0; j0 < end; j0 += C) {
    const int64_t n = flashMin(C, t - j0);
    auto cols = [&](int w) -> int { return flashTcWarpKeyCols(it.row0 + 16 * w, t, j0, n); };
    th.sync(FlashSync::kTileFree);
    th.threads([&](int tid) {
      flashTcLoadTile<M, HS, C, kFault>(sm.k, base + c + j0 * c3, c3, g.hs, n, tid);
      flashTcLoadTile<M, HS, C, kFault>(sm.v, base + 2 * c + j0 * c3, c3, g.hs, n, tid);
    });
    th.sync(FlashSync::kTileReady);
    // S = Q K^T and dP = dO V^T.
    th.warps([&](int w, Warp&) {
      const int kc = cols(w);
      for (int cb = 0; cb < kc / 16; ++cb) {
        typename Mma::Acc s, dp;
        Mma::fill(s, 0.0f);
        Mma::fill(dp, 0.0f);
DTRAIN_FLASH_UNROLL
        for (int d = 0; d < HS / 16; ++d) {
          Mma::template mma<true, false>(s, sm.q + 16 * w * Ld::kOp + 16 * d, Ld::kOp,
                                         sm.k + 16 * cb * Ld::kOp + 16 * d, Ld::kOp);
          Mma::template mma<true, false>(dp, sm.dout + 16 * w * Ld::kOp + 16 * d, Ld::kOp,
                                         sm.v + 16 * cb * Ld::kOp + 16 * d, Ld::kOp);
        }
        Mma::storeAcc(sm.f(w) + 16 * cb, s, Ld::kF);
        Mma::storeAcc(sm.g(w) + 16 * cb, dp, Ld::kG);
      }
    });
    th.syncWarp();
    // dS = P (drop(dP) - D), 0 above the diagonal.
    th.lanes([&](int w, int lane) {
      const int kc = cols(w), r = lane & 15, h = lane >> 4;
      if (kc == 0) return;
      const int64_t i = it.row0 + 16 * w + r;
      const float lI = sm.rowL(w)[r], dI = sm.rowD(w)[r];
      const uint64_t e0 = static_cast<uint64_t>((bh * t + i) * t + j0);
      for (int u = h * kc / 2; u < (h + 1) * kc / 2; ++u) {
        const int64_t j = j0 + u;
        const bool above = kFault == FlashTcFault::kMaskDiagonal ? j > i + 1 : j > i;
        float ds = 0.0f;
        if (!above) {
          const float p = exp2f(sm.f(w)[r * Ld::kF + u] * scaleLog2 - lI);
          float dp = sm.g(w)[r * Ld::kG + u];
          if (Drop::kOn) dp = drop.applyKept(drop.keeps(e0 + static_cast<uint64_t>(u)), dp);
          ds = p * (dp - dI);
        }
        sm.ds(w)[r * Ld::kP + u] = Mma::toOperand(ds);
      }
    });
    th.syncWarp();
    th.warps([&](int w, Warp& st) {
      const int kc = cols(w);
DTRAIN_FLASH_UNROLL
      for (int d = 0; d < HS / 16; ++d)
        for (int kb = 0; kb < kc / 16; ++kb)
          Mma::template mma<true, true>(st.dq[d], sm.ds(w) + 16 * kb, Ld::kP, sm.k + 16 * kb * Ld::kOp + 16 * d,
                                        Ld::kOp);
    });
  }
  th.warps([&](int w, Warp& st) {
    if (it.row0 + 16 * w >= t) return;
DTRAIN_FLASH_UNROLL
    for (int d = 0; d < HS / 16; ++d) Mma::storeAcc(sm.f(w) + 16 * d, st.dq[d], Ld::kF);
  });
  th.syncWarp();
  th.lanes([&](int w, int lane) {
    const int r = lane & 15, h = lane >> 4;
    const int64_t i = it.row0 + 16 * w + r;
    if (i >= t) return;
    float* out = dqkv + (it.b * t + i) * c3 + it.h * g.hs;
    for (int d = h * HS / 2; d < (h + 1) * HS / 2; ++d)
      if (d < g.hs) out[d] = sm.f(w)[r * Ld::kF + d] * g.scale;
  });
}

// --- Backward, dK and dV: one item (sample, head, 64 key rows) ---
template <class M, int HS, FlashTcFault kFault = FlashTcFault::kNone, class Threads, class In, class Drop>
DTRAIN_HOST_DEVICE inline void flashTcGradKVItem(Threads& th, const FlashGeometry& g, int64_t item, const In* qkv,
                                                 const float* lse, const float* datt, const float* dsum, float* dqkv,
                                                 const FlashTcGradKVSmem<M, HS>& sm, const Drop& drop) {
  using Mma = FlashMma<M>;
  using Ld = FlashTcLd<HS>;
  using Warp = FlashTcGradKVWarp<M, HS>;
  constexpr int C = Ld::kCols;
  const FlashItem it = flashItem(g, item, false);
  const int64_t c = g.c(), c3 = 3 * c, t = g.t;
  const In* base = qkv + it.b * t * c3 + it.h * g.hs;
  const float* doBase = datt + it.b * t * c + it.h * g.hs;
  const int64_t bh = it.b * g.heads + it.h;
  const uint64_t e00 = static_cast<uint64_t>(bh * t * t);
  const float scaleLog2 = g.scaleLog2;
  const int64_t keys = flashMin(kFlashThreads, t - it.row0);
  th.sync(FlashSync::kTileFree);
  th.threads([&](int tid) {
    flashTcLoadTile<M, HS, kFlashThreads, kFault>(sm.k, base + c + it.row0 * c3, c3, g.hs, keys, tid);
    flashTcLoadTile<M, HS, kFlashThreads, kFault>(sm.v, base + 2 * c + it.row0 * c3, c3, g.hs, keys, tid);
  });
  th.warps([&](int, Warp& st) {
DTRAIN_FLASH_UNROLL
    for (int d = 0; d < HS / 16; ++d) Mma::fill(st.dk[d], 0.0f), Mma::fill(st.dv[d], 0.0f);
  });
  for (int64_t i0 = it.row0; i0 < t; i0 += C) {  // queries before the block's first key see none of its keys
    const int64_t n = flashMin(C, t - i0);
    // The query columns [first, last) warp w needs: from its first key on (a multiple of 16), none past T.
    auto first = [&](int w) -> int {
      const int64_t k0 = it.row0 + 16 * w;
      return k0 >= t || k0 - i0 >= C ? C : static_cast<int>(k0 > i0 ? k0 - i0 : 0);
    };
    const int last = flashTcRound16(n);
    th.sync(FlashSync::kTileFree);
    th.threads([&](int tid) {
      flashTcLoadTile<M, HS, C, kFault>(sm.q, base + i0 * c3, c3, g.hs, n, tid);
      flashTcLoadTile<M, HS, C>(sm.dout, doBase + i0 * c, c, g.hs, n, tid);
      for (int u = tid; u < C; u += kFlashTcThreads) {
        sm.rowL[u] = u < n ? lse[bh * t + i0 + u] : 0.0f;
        sm.rowD[u] = u < n ? dsum[bh * t + i0 + u] : 0.0f;
      }
    });
    th.sync(FlashSync::kTileReady);
    // S^T = K Q^T and dP^T = V dO^T (rows: the warp's keys; columns: the tile's queries).
    th.warps([&](int w, Warp&) {
      for (int cb = first(w) / 16; cb < last / 16; ++cb) {
        typename Mma::Acc s, dp;
        Mma::fill(s, 0.0f);
        Mma::fill(dp, 0.0f);
DTRAIN_FLASH_UNROLL
        for (int d = 0; d < HS / 16; ++d) {
          Mma::template mma<true, false>(s, sm.k + 16 * w * Ld::kOp + 16 * d, Ld::kOp,
                                         sm.q + 16 * cb * Ld::kOp + 16 * d, Ld::kOp);
          Mma::template mma<true, false>(dp, sm.v + 16 * w * Ld::kOp + 16 * d, Ld::kOp,
                                         sm.dout + 16 * cb * Ld::kOp + 16 * d, Ld::kOp);
        }
        Mma::storeAcc(sm.f(w) + 16 * cb, s, Ld::kF);
        Mma::storeAcc(sm.g(w) + 16 * cb, dp, Ld::kG);
      }
    });
    th.syncWarp();
    // Per element (key j = row, query i = column): drop(P)^T and dS^T = P (drop(dP) - D_i), 0 where i < j or i >= T.
    th.lanes([&](int w, int lane) {
      const int lo = first(w), r = lane & 15, h = lane >> 4;
      if (lo >= last) return;
      const int64_t j = it.row0 + 16 * w + r;
      const int half = (last - lo) / 2;
      for (int u = lo + h * half; u < lo + (h + 1) * half; ++u) {
        const int64_t i = i0 + u;
        const bool above = kFault == FlashTcFault::kMaskDiagonal ? j > i + 1 : j > i;
        float pd = 0.0f, ds = 0.0f;
        if (!above && i < t) {
          const float p = exp2f(sm.f(w)[r * Ld::kF + u] * scaleLog2 - sm.rowL[u]);
          float dp = sm.g(w)[r * Ld::kG + u];
          pd = p;
          if (Drop::kOn) {
            const bool kept = drop.keeps(e00 + static_cast<uint64_t>(i * t + j));
            pd = drop.applyKept(kept, p);
            dp = drop.applyKept(kept, dp);
          }
          ds = p * (dp - sm.rowD[u]);
        }
        sm.p(w)[r * Ld::kP + u] = Mma::toOperand(pd);
        sm.ds(w)[r * Ld::kP + u] = Mma::toOperand(ds);
      }
    });
    th.syncWarp();
    // dV += drop(P)^T dO, dK += dS^T Q.
    th.warps([&](int w, Warp& st) {
      const int lo = first(w);
DTRAIN_FLASH_UNROLL
      for (int d = 0; d < HS / 16; ++d)
        for (int kb = lo / 16; kb < last / 16; ++kb) {
          Mma::template mma<true, true>(st.dv[d], sm.p(w) + 16 * kb, Ld::kP, sm.dout + 16 * kb * Ld::kOp + 16 * d,
                                        Ld::kOp);
          Mma::template mma<true, true>(st.dk[d], sm.ds(w) + 16 * kb, Ld::kP, sm.q + 16 * kb * Ld::kOp + 16 * d,
                                        Ld::kOp);
        }
    });
  }
  // dK x scale, then dV, through the warp's scratch.
  for (int which = 0; which < 2; ++which) {
    th.syncWarp();
    th.warps([&](int w, Warp& st) {
      if (it.row0 + 16 * w >= t) return;
DTRAIN_FLASH_UNROLL
      for (int d = 0; d < HS / 16; ++d) Mma::storeAcc(sm.f(w) + 16 * d, which == 0 ? st.dk[d] : st.dv[d], Ld::kF);
    });
    th.syncWarp();
    th.lanes([&](int w, int lane) {
      const int r = lane & 15, h = lane >> 4;
      const int64_t j = it.row0 + 16 * w + r;
      if (j >= t) return;
      float* out = dqkv + (it.b * t + j) * c3 + (which == 0 ? c : 2 * c) + it.h * g.hs;
      const float scale = which == 0 ? g.scale : 1.0f;
      for (int d = h * HS / 2; d < (h + 1) * HS / 2; ++d)
        if (d < g.hs) out[d] = sm.f(w)[r * Ld::kF + d] * scale;
    });
  }
}

}  // namespace dtrain::gpu
