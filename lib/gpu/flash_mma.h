// The 16 x 16 tensor-core tile operations of the tensor-core fused attention (flash_attention_tc.h), one interface
// with two implementations: the CUDA WMMA API (nvcuda::wmma, <mma.h>) in the device pass, and a plain C++
// emulation of the same fragment operations for the host (tests/gpu/test_gpu_flash_tc.cpp runs every warp of the
// real launch grids on the CPU through it). No CUDA header is needed to include this from host code.
//
// The contract that makes the emulation faithful: WMMA's fragment element layout (which thread holds which
// element) is opaque, so the kernels touch fragments only through fill / loadAcc / storeAcc / mma, with every
// operand and result a 16 x 16 tile in shared memory; the row-wise softmax work runs on tiles stored to shared
// memory. Any host layout of a fragment then computes the same values (up to the order of the float additions
// inside one mma, which the hardware does not specify).
//
// Precisions (the tag M):
//   FlashBf16: operands bfloat16 (round to nearest even, __float2bfloat16_rn), wmma m16n16k16, float accumulators
//              ("precision": "bf16").
//   FlashTf32: operands TF32 (float32 storage, rounded to a 10-bit mantissa, round to nearest with ties away from
//              zero as cvt.rna.tf32.f32 / wmma::__float_to_tf32 do), wmma m16n16k8 with precision::tf32 (two k
//              steps per 16 x 16 x 16 product), float accumulators (float32 jobs with "tf32" on, the default).
// fromBf16(bits): the operand of a value stored as bfloat16 (its bits; q, k, v kept as bf16 under "precision": "bf16"),
// exactly that value (bf16 has 8 significant bits, TF32 11): the same operand toOperand gives the float32 value the
// bf16 was rounded from (nearest even, as toOperand<FlashBf16>), NaN aside (the payload may differ).
// Products of two rounded operands are exact in float32 (8 x 8 or 11 x 11 significant bits), so the only rounding
// inside an mma is that of the float32 sums: the emulation adds the 16 products of each element in k order onto the
// accumulator; the tensor cores add them in an unspecified order (and may keep extra bits), which is within the
// tolerance the tests give the sums.
//
// Shared-memory layouts: row-major (element (r, c) at p[r * ld + c]) or column-major (p[c * ld + r]) 16 x 16 tiles;
// WMMA needs ld a multiple of 8 (16-bit operands) or 4 (floats) and every tile start 32-byte aligned (kept by the
// layouts in flash_attention_tc.h: tiles start at multiples of 16 rows and 16 columns of 32-byte aligned arrays).
// Thread-safety: fragment operations are warp-collective on the device (all 32 lanes of a warp, converged, with
// the same arguments); the emulation's are plain functions on one warp's state.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "lib/gpu/host_device.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <mma.h>
#endif

namespace dtrain::gpu {

struct FlashBf16 {};
struct FlashTf32 {};

// Rounding as the device rounds, on the host (bit patterns; NaN and infinities pass through).
inline float flashRoundTf32Host(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // ties away from zero
  std::memcpy(&x, &u, 4);
  return x;
}
inline uint16_t flashBf16BitsHost(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}
inline float flashBf16ValueHost(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

template <class M>
struct FlashMma;

#if defined(__CUDA_ARCH__)

namespace flash_wmma = nvcuda::wmma;

// The device: WMMA fragments. kRowA / kRowB: whether the A / B tile is row-major (else column-major) in memory.
template <class M>
struct FlashMmaDevice;

template <>
struct FlashMmaDevice<FlashBf16> {
  using Operand = __nv_bfloat16;
  using Element = __nv_bfloat16;
  static constexpr int kK = 16;
  static __device__ Operand toOperand(float x) { return __float2bfloat16_rn(x); }
  static __device__ Operand fromBf16(uint16_t b) { return __ushort_as_bfloat16(b); }  // the stored value as it is
};

template <>
struct FlashMmaDevice<FlashTf32> {
  using Operand = float;
  using Element = flash_wmma::precision::tf32;
  static constexpr int kK = 8;
  static __device__ Operand toOperand(float x) { return flash_wmma::__float_to_tf32(x); }
  static __device__ Operand fromBf16(uint16_t b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }  // exact
};

template <class M>
struct FlashMma : FlashMmaDevice<M> {
  using Base = FlashMmaDevice<M>;
  using typename Base::Element;
  using typename Base::Operand;
  static constexpr int kK = Base::kK;
  using Acc = flash_wmma::fragment<flash_wmma::accumulator, 16, 16, kK, float>;
  template <bool kRow>
  using Layout = typename std::conditional<kRow, flash_wmma::row_major, flash_wmma::col_major>::type;

  static __device__ void fill(Acc& c, float v) { flash_wmma::fill_fragment(c, v); }
  static __device__ void loadAcc(Acc& c, const float* p, int ld) {
    flash_wmma::load_matrix_sync(c, p, ld, flash_wmma::mem_row_major);
  }
  static __device__ void storeAcc(float* p, const Acc& c, int ld) {
    flash_wmma::store_matrix_sync(p, c, ld, flash_wmma::mem_row_major);
  }
  // c += A B, A and B 16 x 16 (operands already rounded by toOperand, so the fragments need no conversion).
  template <bool kRowA, bool kRowB>
  static __device__ void mma(Acc& c, const Operand* a, int lda, const Operand* b, int ldb) {
    flash_wmma::fragment<flash_wmma::matrix_a, 16, 16, kK, Element, Layout<kRowA>> fa;
    flash_wmma::fragment<flash_wmma::matrix_b, 16, 16, kK, Element, Layout<kRowB>> fb;
#pragma unroll
    for (int k = 0; k < 16; k += kK) {
      flash_wmma::load_matrix_sync(fa, a + (kRowA ? k : k * lda), lda);
      flash_wmma::load_matrix_sync(fb, b + (kRowB ? k * ldb : k), ldb);
      flash_wmma::mma_sync(c, fa, fb, c);
    }
  }
};

#else

// The host: a fragment is its 16 x 16 values, row-major.
template <class M>
struct FlashMmaHostOperand;
template <>
struct FlashMmaHostOperand<FlashBf16> {
  using Operand = uint16_t;  // bfloat16 bits
  static Operand toOperand(float x) { return flashBf16BitsHost(x); }
  static Operand fromBf16(uint16_t b) { return b; }
  static float value(Operand o) { return flashBf16ValueHost(o); }
};
template <>
struct FlashMmaHostOperand<FlashTf32> {
  using Operand = float;
  static Operand toOperand(float x) { return flashRoundTf32Host(x); }
  static Operand fromBf16(uint16_t b) { return flashBf16ValueHost(b); }
  static float value(Operand o) { return o; }
};

template <class M>
struct FlashMma : FlashMmaHostOperand<M> {
  using Base = FlashMmaHostOperand<M>;
  using typename Base::Operand;
  struct Acc {
    float x[256];
  };
  static void fill(Acc& c, float v) {
    for (float& e : c.x) e = v;
  }
  static void loadAcc(Acc& c, const float* p, int ld) {
    for (int r = 0; r < 16; ++r)
      for (int k = 0; k < 16; ++k) c.x[r * 16 + k] = p[r * ld + k];
  }
  static void storeAcc(float* p, const Acc& c, int ld) {
    for (int r = 0; r < 16; ++r)
      for (int k = 0; k < 16; ++k) p[r * ld + k] = c.x[r * 16 + k];
  }
  template <bool kRowA, bool kRowB>
  static void mma(Acc& c, const Operand* a, int lda, const Operand* b, int ldb) {
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        float s = c.x[i * 16 + j];
        for (int k = 0; k < 16; ++k)
          s += Base::value(kRowA ? a[i * lda + k] : a[k * lda + i]) * Base::value(kRowB ? b[k * ldb + j] : b[j * ldb + k]);
        c.x[i * 16 + j] = s;
      }
  }
};

#endif

}  // namespace dtrain::gpu
