// The CPU executor of the tensor-core fused attention's kernels (lib/gpu/flash_attention_tc.h and
// flash_attention_tc_backward.h): every warp and lane of the real launch grids of the three kernels (forward, dQ,
// dK/dV) runs the very item functions the device runs, with flash_mma.h's host fragments, the block's shared memory a
// plain buffer (NaN at each item's start, the staged tiles NaN again whenever the block frees them, so a read of
// anything no thread wrote shows). q, k, v in float32 (emulateCore; bf16 or TF32 operands) or stored as bf16
// (emulateCoreBf16). Used by test_gpu_flash_tc.cpp (against references and the CPU layer) and
// test_gpu_flash_tc_bf16.cpp (the bf16-stored input against the float32 one, bit for bit). Host only; not
// thread-safe (plain functions on the caller's buffers).
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lib/gpu/flash_attention.h"
#include "lib/gpu/flash_attention_tc_backward.h"
#include "lib/gpu/flash_mma.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/philox.h"

namespace dtrain::gputest {

using namespace dtrain::gpu;

inline constexpr float kNan = std::numeric_limits<float>::quiet_NaN();

// One block's warps on the CPU (flash_attention_tc.h's executor): each call runs every thread / warp / lane in
// turn, so a phase ends for all before the next begins (the barriers' meaning). sync(kTileFree) fills the staged
// tiles with 0xff bytes: NaN as float, bf16 and TF32 alike.
template <class Warp>
struct HostWarps {
  std::vector<Warp> states = std::vector<Warp>(kFlashTcWarps);
  std::vector<std::pair<void*, size_t>> staged;  // what the block reloads after each kTileFree
  template <class F>
  void threads(F&& f) {
    for (int tid = 0; tid < kFlashTcThreads; ++tid) f(tid);
  }
  template <class F>
  void warps(F&& f) {
    for (int w = 0; w < kFlashTcWarps; ++w) f(w, states[static_cast<size_t>(w)]);
  }
  template <class F>
  void lanes(F&& f) {
    for (int w = 0; w < kFlashTcWarps; ++w)
      for (int lane = 0; lane < 32; ++lane) f(w, lane);
  }
  void sync(FlashSync s) {
    if (s == FlashSync::kTileFree)
      for (auto [p, n] : staged) std::memset(p, 0xff, n);
  }
  void syncWarp() {}
};

struct Launch {
  int64_t grid = 0;  // 0: the launcher's (rowGrid(items))
  bool reversed = false;
};

template <class Body>
inline void eachBlock(const FlashGeometry& g, const Launch& launch, Body&& body) {
  const int64_t grid = launch.grid > 0 ? launch.grid : static_cast<int64_t>(rowGrid(g.items()));
  for (int64_t k = 0; k < grid; ++k) {
    const int64_t bx = launch.reversed ? grid - 1 - k : k;
    for (int64_t item = bx; item < g.items(); item += grid) body(item);
  }
}

// A block's shared memory: `bytes` of NaN (0xff), 128-byte aligned.
struct SharedBuffer {
  std::vector<unsigned char> raw;
  uintptr_t base = 0;
  size_t bytes = 0;
  explicit SharedBuffer(size_t n) : raw(n + 128), bytes(n) {
    base = (reinterpret_cast<uintptr_t>(raw.data()) + 127) / 128 * 128;
  }
  void poison() { std::memset(reinterpret_cast<void*>(base), 0xff, bytes); }
};

template <class Op>
inline std::pair<void*, size_t> region(Op* p, size_t n) {
  return {static_cast<void*>(p), n * sizeof(Op)};
}

struct Shape4 {
  int64_t batch, t, c, heads;
};
// Shapes: T not a multiple of the 64-row tiles, T = 1, exactly one tile, hs 16, 32, 64 and 128 exactly and padded
// (4 -> 16, 48 -> 64, 20 -> 32, 6 -> 16), several heads, batch > 1.
inline constexpr Shape4 kShapes[] = {{2, 70, 16, 2}, {1, 1, 8, 2},   {3, 130, 128, 2}, {1, 64, 64, 1},
                                     {2, 45, 256, 2}, {2, 65, 96, 2}, {2, 33, 80, 4},  {2, 40, 32, 2},
                                     {1, 97, 64, 2},  {3, 37, 18, 3}};

struct Core {
  std::vector<float> att, lse, dsum, dqkv;
};

enum class Math { kBf16, kTf32 };
inline const std::string& name(Math math) {
  static const std::string names[] = {"bf16", "tf32"};
  return names[math == Math::kBf16 ? 0 : 1];
}

template <class M, int HS, FlashTcFault kFault, class In, class Drop>
inline void emulateTc(const FlashGeometry& g, const Launch& launch, const std::vector<In>& qkv,
               const std::vector<float>* datt, Core& out, const Drop& drop) {
  using Ld = FlashTcLd<HS>;
  {
    const FlashTcForwardSmem<M, HS> layout(0);
    SharedBuffer buf(layout.bytes);
    const FlashTcForwardSmem<M, HS> sm(buf.base);
    HostWarps<FlashTcForwardWarp<M, HS>> th;
    th.staged = {region(sm.k, Ld::kCols * Ld::kOp), region(sm.v, Ld::kCols * Ld::kOp)};
    eachBlock(g, launch, [&](int64_t item) {
      buf.poison();
      flashTcForwardItem<M, HS, kFault>(th, g, item, qkv.data(), out.att.data(), out.lse.data(), sm, drop);
    });
  }
  if (datt == nullptr) return;
  {
    SharedBuffer buf(FlashTcGradQSmem<M, HS>(0).bytes);
    const FlashTcGradQSmem<M, HS> sm(buf.base);
    HostWarps<FlashTcGradQWarp<M, HS>> th;
    th.staged = {region(sm.k, Ld::kCols * Ld::kOp), region(sm.v, Ld::kCols * Ld::kOp)};
    eachBlock(g, launch, [&](int64_t item) {
      buf.poison();
      flashTcGradQItem<M, HS, kFault>(th, g, item, qkv.data(), out.att.data(), out.lse.data(), datt->data(),
                                      out.dsum.data(), out.dqkv.data(), sm, drop);
    });
  }
  {
    SharedBuffer buf(FlashTcGradKVSmem<M, HS>(0).bytes);
    const FlashTcGradKVSmem<M, HS> sm(buf.base);
    HostWarps<FlashTcGradKVWarp<M, HS>> th;
    th.staged = {region(sm.q, Ld::kCols * Ld::kOp), region(sm.dout, Ld::kCols * Ld::kOp),
                 region(sm.rowL, 2 * Ld::kCols)};
    eachBlock(g, launch, [&](int64_t item) {
      buf.poison();
      flashTcGradKVItem<M, HS, kFault>(th, g, item, qkv.data(), out.lse.data(), datt->data(), out.dsum.data(),
                                       out.dqkv.data(), sm, drop);
    });
  }
}

// The core's outputs sized and filled with NaN: every element the kernels own must be written.
inline void poisonCore(const FlashGeometry& g, bool backward, Core& out) {
  const size_t rows = static_cast<size_t>(g.batch * g.t), lse = static_cast<size_t>(g.batch * g.heads * g.t);
  out.att.assign(rows * static_cast<size_t>(g.c()), kNan);
  out.lse.assign(lse, kNan);
  out.dsum.assign(backward ? lse : 0, kNan);
  out.dqkv.assign(backward ? rows * static_cast<size_t>(3 * g.c()) : 0, kNan);
}

// The attention core as the kernels compute it (the launcher's dispatch: compiled head size, dropout policy, the
// math) from q, k, v in float32; everything poisoned first: every element the kernels own must be written.
inline void emulateCore(const FlashGeometry& g, const Launch& launch, const std::vector<float>& qkv,
                        const std::vector<float>* datt, Core& out, const DropoutDraw* draw, Math math,
                        FlashTcFault fault = FlashTcFault::kNone) {
  poisonCore(g, datt != nullptr, out);
  auto withFault = [&](auto m, auto hs, const auto& drop) {
    using M = decltype(m);
    constexpr int HS = decltype(hs)::value;
    if (fault == FlashTcFault::kNone) return emulateTc<M, HS, FlashTcFault::kNone>(g, launch, qkv, datt, out, drop);
    // The broken kernels: compiled for the head sizes the fault test runs only (build time).
    if constexpr (HS >= 64 && !std::decay_t<decltype(drop)>::kOn) {
      if (fault == FlashTcFault::kMaskDiagonal)
        return emulateTc<M, HS, FlashTcFault::kMaskDiagonal>(g, launch, qkv, datt, out, drop);
      return emulateTc<M, HS, FlashTcFault::kNoRescale>(g, launch, qkv, datt, out, drop);
    }
    FAIL("no broken kernel compiled for hs " << HS);
  };
  auto withDrop = [&](auto m, auto hs) {
    if (draw != nullptr) return withFault(m, hs, FlashDropout{*draw});
    withFault(m, hs, FlashNoDropout{});
  };
  auto withMath = [&](auto hs) {
    if (math == Math::kBf16) return withDrop(FlashBf16{}, hs);
    withDrop(FlashTf32{}, hs);
  };
  switch (flashHeadTemplate(g.hs)) {
    case 16: return withMath(std::integral_constant<int, 16>{});
    case 32: return withMath(std::integral_constant<int, 32>{});
    case 64: return withMath(std::integral_constant<int, 64>{});
    case 128: return withMath(std::integral_constant<int, 128>{});
    default: FAIL("no compiled head size for hs " << g.hs);
  }
}

// The bf16 kernels reading q, k, v stored as bf16 (qkv: bf16 bits in the float32 qkv's layout; the launcher's
// flashAttentionForwardBf16 / flashAttentionBackwardBf16 dispatch), the loader correct (kNone) or broken
// (kBf16WrongHalf).
inline void emulateCoreBf16(const FlashGeometry& g, const Launch& launch, const std::vector<uint16_t>& qkv,
                            const std::vector<float>* datt, Core& out, const DropoutDraw* draw,
                            FlashTcFault fault = FlashTcFault::kNone) {
  poisonCore(g, datt != nullptr, out);
  auto withFault = [&](auto hs, const auto& drop) {
    constexpr int HS = decltype(hs)::value;
    if (fault == FlashTcFault::kBf16WrongHalf)
      return emulateTc<FlashBf16, HS, FlashTcFault::kBf16WrongHalf>(g, launch, qkv, datt, out, drop);
    REQUIRE(fault == FlashTcFault::kNone);
    emulateTc<FlashBf16, HS, FlashTcFault::kNone>(g, launch, qkv, datt, out, drop);
  };
  auto withDrop = [&](auto hs) {
    if (draw != nullptr) return withFault(hs, FlashDropout{*draw});
    withFault(hs, FlashNoDropout{});
  };
  switch (flashHeadTemplate(g.hs)) {
    case 16: return withDrop(std::integral_constant<int, 16>{});
    case 32: return withDrop(std::integral_constant<int, 32>{});
    case 64: return withDrop(std::integral_constant<int, 64>{});
    case 128: return withDrop(std::integral_constant<int, 128>{});
    default: FAIL("no compiled head size for hs " << g.hs);
  }
}

}  // namespace dtrain::gputest
