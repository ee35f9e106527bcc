// The attention kernels (kernels_attention.h). The dropout: one Philox block (4 elements) per thread, grid-stride,
// bounded grid (grid.h); the per-thread work is philox.h's dropoutQuad, the function the CPU tests emulate. The
// fused (flash) attention: four kernels of kFlashThreads threads, one (sample, head, row tile) item per block at a
// time over a bounded 1-D grid, running flash_attention.h's tile loops (the very functions test_gpu_flash.cpp
// emulates) with the tiles in static shared memory and each thread's row state in registers. The tensor-core fused
// attention (bf16, TF32; q, k, v read as float32, or for bf16 also as stored bf16 bits, the In of the kernels):
// three kernels of kFlashTcThreads threads (4 warps), the same items and grid, running
// flash_attention_tc.h's per-warp item functions (which test_gpu_flash_tc.cpp emulates warp by warp) with the
// tiles in dynamic shared memory (the kernels' limit raised above 48 KiB where they need it) and each warp's
// accumulator fragments in registers.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "lib/gpu/flash_attention.h"
#include "lib/gpu/flash_attention_tc_backward.h"
#include "lib/gpu/grid.h"
#include "lib/gpu/kernels_attention.h"
#include "lib/gpu/launch.h"
#include "lib/gpu/philox.h"

namespace dtrain::gpu::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void dropoutSelectKernel(const float* in, DropoutDraw draw, uint64_t first, float* out, size_t n,
                                    size_t quads) {
  for (size_t q = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; q < quads;
       q += static_cast<size_t>(blockDim.x) * gridDim.x)
    dropoutQuad(draw, DropoutForm::kSelect, first, q, in, out, n);
}

[[noreturn]] void unsupportedHeadSize() {
  detail::cudaFailed("flash attention: head size outside 1 .. 128", static_cast<int>(cudaErrorInvalidValue), __FILE__,
                     __LINE__);
}

// The block's threads for flash_attention.h's item functions: each() is the calling thread's own work on its
// registers, sync() the block barrier.
template <class Row>
struct DeviceThreads {
  Row& row;
  template <class F>
  __host__ __device__ void each(F&& f) {
#if defined(__CUDA_ARCH__)
    f(static_cast<int>(threadIdx.x), row);
#endif
  }
  __host__ __device__ void sync(FlashSync) {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

template <int HS, class Drop>
__global__ void __launch_bounds__(kFlashThreads) flashForwardKernel(FlashGeometry g, const float* qkv, float* att,
                                                                     float* lse, Drop drop) {
  constexpr int R = kFlashTileRows<HS>;
  __shared__ __align__(16) float kTile[R * HS];
  __shared__ __align__(16) float vTile[R * HS];
  FlashForwardRow<HS> row;
  DeviceThreads<FlashForwardRow<HS>> th{row};
  for (int64_t item = blockIdx.x; item < g.items(); item += gridDim.x)
    flashForwardItem<HS>(th, g, item, qkv, att, lse, kTile, vTile, drop);
}

template <int HS, class Drop>
__global__ void __launch_bounds__(kFlashThreads) flashGradQKernel(FlashGeometry g, const float* qkv, const float* att,
                                                                   const float* lse, const float* datt, float* dsum,
                                                                   float* dqkv, Drop drop) {
  constexpr int R = kFlashTileRows<HS>;
  __shared__ __align__(16) float kTile[R * HS];
  __shared__ __align__(16) float vTile[R * HS];
  FlashGradQRow<HS> row;
  DeviceThreads<FlashGradQRow<HS>> th{row};
  for (int64_t item = blockIdx.x; item < g.items(); item += gridDim.x)
    flashGradQItem<HS>(th, g, item, qkv, att, lse, datt, dsum, dqkv, kTile, vTile, drop);
}

template <int HS, bool kGradK, class Drop>
__global__ void __launch_bounds__(kFlashThreads) flashGradKVKernel(FlashGeometry g, const float* qkv, const float* lse,
                                                                    const float* datt, const float* dsum, float* dqkv,
                                                                    Drop drop) {
  constexpr int R = kFlashTileRows<HS>;
  using Row = typename std::conditional<kGradK, FlashGradKRow<HS>, FlashGradVRow<HS>>::type;
  __shared__ __align__(16) float qTile[R * HS];
  __shared__ __align__(16) float doTile[R * HS];
  __shared__ float lseTile[R];
  __shared__ float dsumTile[R];
  Row row;
  DeviceThreads<Row> th{row};
  for (int64_t item = blockIdx.x; item < g.items(); item += gridDim.x)
    flashGradKVItem<HS, kGradK>(th, g, item, qkv, lse, datt, dsum, dqkv, qTile, doTile, lseTile, dsumTile, drop);
}

// The block's warps for flash_attention_tc.h's item functions: threads() and lanes() are the calling thread's own
// work, warps() the calling warp's collective fragment work on its (per-thread slice of the) state, sync() and
// syncWarp() the block and warp barriers.
template <class Warp>
struct DeviceWarps {
  Warp& state;
  template <class F>
  __host__ __device__ void threads(F&& f) {
#if defined(__CUDA_ARCH__)
    f(static_cast<int>(threadIdx.x));
#endif
  }
  template <class F>
  __host__ __device__ void warps(F&& f) {
#if defined(__CUDA_ARCH__)
    f(static_cast<int>(threadIdx.x >> 5), state);
#endif
  }
  template <class F>
  __host__ __device__ void lanes(F&& f) {
#if defined(__CUDA_ARCH__)
    f(static_cast<int>(threadIdx.x >> 5), static_cast<int>(threadIdx.x & 31));
#endif
  }
  __host__ __device__ void sync(FlashSync) {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
  __host__ __device__ void syncWarp() {
#if defined(__CUDA_ARCH__)
    __syncwarp();
#endif
  }
};

extern __shared__ __align__(128) unsigned char flashTcSmem[];

template <class M, int HS, class Drop, class In>
__global__ void __launch_bounds__(kFlashTcThreads) flashTcForwardKernel(FlashGeometry g, const In* qkv, float* att,
                                                                         float* lse, Drop drop) {
  const FlashTcForwardSmem<M, HS> sm(reinterpret_cast<uintptr_t>(flashTcSmem));
  FlashTcForwardWarp<M, HS> state;
  DeviceWarps<FlashTcForwardWarp<M, HS>> th{state};
  for (int64_t item = blockIdx.x; item < g.items(); item += gridDim.x)
    flashTcForwardItem<M, HS>(th, g, item, qkv, att, lse, sm, drop);
}

template <class M, int HS, class Drop, class In>
__global__ void __launch_bounds__(kFlashTcThreads) flashTcGradQKernel(FlashGeometry g, const In* qkv,
                                                                       const float* att, const float* lse,
                                                                       const float* datt, float* dsum, float* dqkv,
                                                                       Drop drop) {
  const FlashTcGradQSmem<M, HS> sm(reinterpret_cast<uintptr_t>(flashTcSmem));
  FlashTcGradQWarp<M, HS> state;
  DeviceWarps<FlashTcGradQWarp<M, HS>> th{state};
  for (int64_t item = blockIdx.x; item < g.items(); item += gridDim.x)
    flashTcGradQItem<M, HS>(th, g, item, qkv, att, lse, datt, dsum, dqkv, sm, drop);
}

template <class M, int HS, class Drop, class In>
__global__ void __launch_bounds__(kFlashTcThreads) flashTcGradKVKernel(FlashGeometry g, const In* qkv,
                                                                        const float* lse, const float* datt,
                                                                        const float* dsum, float* dqkv, Drop drop) {
  const FlashTcGradKVSmem<M, HS> sm(reinterpret_cast<uintptr_t>(flashTcSmem));
  FlashTcGradKVWarp<M, HS> state;
  DeviceWarps<FlashTcGradKVWarp<M, HS>> th{state};
  for (int64_t item = blockIdx.x; item < g.items(); item += gridDim.x)
    flashTcGradKVItem<M, HS>(th, g, item, qkv, lse, datt, dsum, dqkv, sm, drop);
}

// A kernel's dynamic shared memory: above the default 48 KiB the kernel's limit is raised first (per launch: a
// host-side attribute, cheap, and right for whichever GPU is current).
template <class Kernel>
void flashTcSmemLimit(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    DTRAIN_CU_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <class M, int HS, class Drop, class In>
void flashTcForwardLaunch(const FlashGeometry& g, const In* qkv, float* att, float* lse, const Drop& drop) {
  const size_t bytes = FlashTcForwardSmem<M, HS>(0).bytes;
  flashTcSmemLimit(flashTcForwardKernel<M, HS, Drop, In>, bytes);
  flashTcForwardKernel<M, HS, Drop, In><<<rowGrid(g.items()), kFlashTcThreads, bytes>>>(g, qkv, att, lse, drop);
  DTRAIN_CU_CHECK_LAUNCH("flashTcForwardKernel");
}

template <class M, int HS, class Drop, class In>
void flashTcBackwardLaunch(const FlashGeometry& g, const In* qkv, const float* att, const float* lse,
                           const float* datt, float* dsum, float* dqkv, const Drop& drop) {
  const unsigned grid = rowGrid(g.items());
  const size_t qBytes = FlashTcGradQSmem<M, HS>(0).bytes, kvBytes = FlashTcGradKVSmem<M, HS>(0).bytes;
  flashTcSmemLimit(flashTcGradQKernel<M, HS, Drop, In>, qBytes);
  flashTcGradQKernel<M, HS, Drop, In><<<grid, kFlashTcThreads, qBytes>>>(g, qkv, att, lse, datt, dsum, dqkv, drop);
  DTRAIN_CU_CHECK_LAUNCH("flashTcGradQKernel");
  flashTcSmemLimit(flashTcGradKVKernel<M, HS, Drop, In>, kvBytes);
  flashTcGradKVKernel<M, HS, Drop, In><<<grid, kFlashTcThreads, kvBytes>>>(g, qkv, lse, datt, dsum, dqkv, drop);
  DTRAIN_CU_CHECK_LAUNCH("flashTcGradKVKernel");
}

template <int HS, class Drop>
void flashForwardLaunch(const FlashGeometry& g, const float* qkv, float* att, float* lse, const Drop& drop) {
  flashForwardKernel<HS, Drop><<<rowGrid(g.items()), kFlashThreads>>>(g, qkv, att, lse, drop);
  DTRAIN_CU_CHECK_LAUNCH("flashForwardKernel");
}

template <int HS, class Drop>
void flashBackwardLaunch(const FlashGeometry& g, const float* qkv, const float* att, const float* lse,
                         const float* datt, float* dsum, float* dqkv, const Drop& drop) {
  const unsigned grid = rowGrid(g.items());
  flashGradQKernel<HS, Drop><<<grid, kFlashThreads>>>(g, qkv, att, lse, datt, dsum, dqkv, drop);
  DTRAIN_CU_CHECK_LAUNCH("flashGradQKernel");
  flashGradKVKernel<HS, true, Drop><<<grid, kFlashThreads>>>(g, qkv, lse, datt, dsum, dqkv, drop);
  DTRAIN_CU_CHECK_LAUNCH("flashGradKVKernel<dK>");
  flashGradKVKernel<HS, false, Drop><<<grid, kFlashThreads>>>(g, qkv, lse, datt, dsum, dqkv, drop);
  DTRAIN_CU_CHECK_LAUNCH("flashGradKVKernel<dV>");
}

// The compiled head size for `hs`, then the dropout policy: run(std::integral_constant<int, HS>, policy).
template <class Run>
void flashDispatch(int64_t hs, const DropoutDraw* dropout, Run&& run) {
  auto withDrop = [&](auto size) {
    if (dropout != nullptr) return run(size, FlashDropout{*dropout});
    run(size, FlashNoDropout{});
  };
  switch (flashHeadTemplate(hs)) {
    case 16: return withDrop(std::integral_constant<int, 16>{});
    case 32: return withDrop(std::integral_constant<int, 32>{});
    case 64: return withDrop(std::integral_constant<int, 64>{});
    case 128: return withDrop(std::integral_constant<int, 128>{});
    default: unsupportedHeadSize();
  }
}

}  // namespace

void flashAttentionForward(const float* qkv, float* att, float* lse, int64_t batch, int64_t t, int64_t heads,
                           int64_t hs, const DropoutDraw* dropout, FlashMath math) {
  const FlashGeometry g = flashGeometry(batch, t, heads, hs);
  if (g.items() == 0) return;
  flashDispatch(hs, dropout, [&](auto size, const auto& drop) {
    constexpr int HS = decltype(size)::value;
    switch (math) {
      case FlashMath::kBf16: return flashTcForwardLaunch<FlashBf16, HS>(g, qkv, att, lse, drop);
      case FlashMath::kTf32: return flashTcForwardLaunch<FlashTf32, HS>(g, qkv, att, lse, drop);
      case FlashMath::kFloat32: return flashForwardLaunch<HS>(g, qkv, att, lse, drop);
    }
  });
}

void flashAttentionBackward(const float* qkv, const float* att, const float* lse, const float* datt, float* dsum,
                            float* dqkv, int64_t batch, int64_t t, int64_t heads, int64_t hs,
                            const DropoutDraw* dropout, FlashMath math) {
  const FlashGeometry g = flashGeometry(batch, t, heads, hs);
  if (g.items() == 0) return;
  flashDispatch(hs, dropout, [&](auto size, const auto& drop) {
    constexpr int HS = decltype(size)::value;
    switch (math) {
      case FlashMath::kBf16: return flashTcBackwardLaunch<FlashBf16, HS>(g, qkv, att, lse, datt, dsum, dqkv, drop);
      case FlashMath::kTf32: return flashTcBackwardLaunch<FlashTf32, HS>(g, qkv, att, lse, datt, dsum, dqkv, drop);
      case FlashMath::kFloat32: return flashBackwardLaunch<HS>(g, qkv, att, lse, datt, dsum, dqkv, drop);
    }
  });
}

void flashAttentionForwardBf16(const uint16_t* qkv, float* att, float* lse, int64_t batch, int64_t t, int64_t heads,
                               int64_t hs, const DropoutDraw* dropout) {
  const FlashGeometry g = flashGeometry(batch, t, heads, hs);
  if (g.items() == 0) return;
  flashDispatch(hs, dropout, [&](auto size, const auto& drop) {
    flashTcForwardLaunch<FlashBf16, decltype(size)::value>(g, qkv, att, lse, drop);
  });
}

void flashAttentionBackwardBf16(const uint16_t* qkv, const float* att, const float* lse, const float* datt,
                                float* dsum, float* dqkv, int64_t batch, int64_t t, int64_t heads, int64_t hs,
                                const DropoutDraw* dropout) {
  const FlashGeometry g = flashGeometry(batch, t, heads, hs);
  if (g.items() == 0) return;
  flashDispatch(hs, dropout, [&](auto size, const auto& drop) {
    flashTcBackwardLaunch<FlashBf16, decltype(size)::value>(g, qkv, att, lse, datt, dsum, dqkv, drop);
  });
}

void dropoutSelect(const float* in, const DropoutDraw& draw, uint64_t first, float* out, size_t n) {
  if (n == 0) return;
  const size_t quads = dropoutQuads(first, n);
  dropoutSelectKernel<<<gridFor(quads, kThreads), kThreads>>>(in, draw, first, out, n, quads);
  DTRAIN_CU_CHECK_LAUNCH("dropoutSelectKernel");
}

}  // namespace dtrain::gpu::kernels
