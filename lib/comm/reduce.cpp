#include "lib/comm/reduce.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__) && defined(__AVX2__)
#include <immintrin.h>
#define DTRAIN_COMM_F16C 1
#else
#define DTRAIN_COMM_F16C 0
#endif

#include "lib/common/error.h"

namespace dtrain::comm {
namespace {

uint32_t bitsOf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float floatOf(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Storage traits: how an element is loaded into the type it is combined in, and stored back.
template <typename T>
struct Plain {
  using S = T;
  using C = T;
  static C load(S v) { return v; }
  static S store(C v) { return v; }
};
struct BF16 {
  using S = uint16_t;
  using C = float;
  static float load(uint16_t v) { return floatOf(static_cast<uint32_t>(v) << 16); }
  static uint16_t store(float v) { return floatToBf16(v); }
};
struct FP16 {
  using S = uint16_t;
  using C = float;
  static float load(uint16_t v) { return fp16ToFloat(v); }
  static uint16_t store(float v) { return floatToFp16(v); }
};

// Combining functors. Integer sums go through the unsigned type so overflow wraps instead of being UB.
struct Sum {
  template <typename C>
  static C apply(C a, C b) {
    if constexpr (std::is_integral_v<C>) {
      using U = std::make_unsigned_t<C>;
      return static_cast<C>(static_cast<U>(a) + static_cast<U>(b));
    } else {
      return a + b;
    }
  }
};
struct Min {
  template <typename C>
  static C apply(C a, C b) { return b < a ? b : a; }
};
struct Max {
  template <typename C>
  static C apply(C a, C b) { return b > a ? b : a; }
};

template <typename Tr, typename Op>
void kernel2(void* outv, const void* av, const void* bv, size_t n) {
  using S = typename Tr::S;
  auto* out = static_cast<S*>(outv);
  const auto* a = static_cast<const S*>(av);
  const auto* b = static_cast<const S*>(bv);
  for (size_t i = 0; i < n; ++i) out[i] = Tr::store(Op::apply(Tr::load(a[i]), Tr::load(b[i])));
}

#if DTRAIN_COMM_F16C
// AVX2 + F16C paths (the scalar tails round identically, nearest even).
// fp16 with hardware conversions, 8 lanes at a time.
template <typename Op>
__m256 apply8(__m256 a, __m256 b) {
  if constexpr (std::is_same_v<Op, Sum>) return _mm256_add_ps(a, b);
  if constexpr (std::is_same_v<Op, Min>) return _mm256_min_ps(b, a);  // b < a ? b : a, as the scalar Min
  if constexpr (std::is_same_v<Op, Max>) return _mm256_max_ps(b, a);
}
template <typename Op>
void kernel2Fp16(void* outv, const void* av, const void* bv, size_t n) {
  auto* out = static_cast<uint16_t*>(outv);
  const auto* a = static_cast<const uint16_t*>(av);
  const auto* b = static_cast<const uint16_t*>(bv);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i)));
    __m256 y = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(apply8<Op>(x, y), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  kernel2<FP16, Op>(out + i, a + i, b + i, n - i);
}

// bf16, 8 lanes at a time: widen by shifting into the high half, combine, round to nearest even with the
// same integer trick as floatToBf16 (NaN kept quiet), narrow with an unsigned pack.
__m256 loadBf16x8(const uint16_t* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
void storeBf16x8(uint16_t* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i quietNan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256 isNan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  rounded = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quietNan), isNan));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
template <typename Op>
void kernel2Bf16(void* outv, const void* av, const void* bv, size_t n) {
  auto* out = static_cast<uint16_t*>(outv);
  const auto* a = static_cast<const uint16_t*>(av);
  const auto* b = static_cast<const uint16_t*>(bv);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) storeBf16x8(out + i, apply8<Op>(loadBf16x8(a + i), loadBf16x8(b + i)));
  kernel2<BF16, Op>(out + i, a + i, b + i, n - i);
}
void divideBf16(void* bufv, size_t n, int d) {
  auto* buf = static_cast<uint16_t*>(bufv);
  const __m256 div = _mm256_set1_ps(static_cast<float>(d));
  size_t i = 0;
  for (; i + 8 <= n; i += 8) storeBf16x8(buf + i, _mm256_div_ps(loadBf16x8(buf + i), div));
  for (; i < n; ++i) buf[i] = floatToBf16(bf16ToFloat(buf[i]) / static_cast<float>(d));
}
#endif

template <typename Op>
void dispatchType(void* out, const void* a, const void* b, size_t n, DType t) {
  switch (t) {
    case DType::kFloat32: return kernel2<Plain<float>, Op>(out, a, b, n);
    case DType::kFloat64: return kernel2<Plain<double>, Op>(out, a, b, n);
    case DType::kInt32: return kernel2<Plain<int32_t>, Op>(out, a, b, n);
    case DType::kInt64: return kernel2<Plain<int64_t>, Op>(out, a, b, n);
    case DType::kBFloat16:
#if DTRAIN_COMM_F16C
      return kernel2Bf16<Op>(out, a, b, n);
#else
      return kernel2<BF16, Op>(out, a, b, n);
#endif
    case DType::kFloat16:
#if DTRAIN_COMM_F16C
      return kernel2Fp16<Op>(out, a, b, n);
#else
      return kernel2<FP16, Op>(out, a, b, n);
#endif
    default: break;
  }
  DTRAIN_THROW(Error, "reduce: dtype {} is not supported by the collectives", dtypeName(t));
}

#if DTRAIN_COMM_F16C
void divideFp16(void* bufv, size_t n, int d) {
  auto* buf = static_cast<uint16_t*>(bufv);
  const __m256 div = _mm256_set1_ps(static_cast<float>(d));
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(buf + i),
                     _mm256_cvtps_ph(_mm256_div_ps(x, div), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) buf[i] = floatToFp16(fp16ToFloat(buf[i]) / static_cast<float>(d));
}
#endif

template <typename Tr>
void divideT(void* bufv, size_t n, int d) {
  auto* buf = static_cast<typename Tr::S*>(bufv);
  using C = typename Tr::C;
  const C div = static_cast<C>(d);
  for (size_t i = 0; i < n; ++i) buf[i] = Tr::store(Tr::load(buf[i]) / div);
}

}  // namespace

float bf16ToFloat(uint16_t v) { return floatOf(static_cast<uint32_t>(v) << 16); }

uint16_t floatToBf16(float v) {
  // Branch-free (a select, not a branch), so the kernels' loops vectorise.
  const uint32_t u = bitsOf(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quietNan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quietNan : rounded);
}

// Branch-light IEEE half conversions (after F. Giesen's public-domain float/half routines).
float fp16ToFloat(uint16_t h) {
  constexpr uint32_t kShiftedExp = 0x7c00u << 13;
  uint32_t o = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  uint32_t exp = kShiftedExp & o;
  o += (127u - 15u) << 23;
  if (exp == kShiftedExp) {
    o += (128u - 16u) << 23;  // inf / NaN
  } else if (exp == 0) {
    o += 1u << 23;  // zero / subnormal: renormalise through float arithmetic
    o = bitsOf(floatOf(o) - floatOf(113u << 23));
  }
  o |= (static_cast<uint32_t>(h) & 0x8000u) << 16;
  return floatOf(o);
}

uint16_t floatToFp16(float v) {
  constexpr uint32_t kInf32 = 255u << 23;
  constexpr uint32_t kMax16 = (127u + 16u) << 23;
  constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = bitsOf(v);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= kMax16) {
    o = u > kInf32 ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {
    o = bitsOf(floatOf(u) + floatOf(kDenormMagic)) - kDenormMagic;
  } else {
    const uint32_t mantOdd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    u += mantOdd;
    o = u >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

void reduce2(void* out, const void* a, const void* b, size_t count, DType dtype, ReduceOp op) {
  switch (combiningOp(op)) {
    case ReduceOp::kSum: return dispatchType<Sum>(out, a, b, count, dtype);
    case ReduceOp::kMin: return dispatchType<Min>(out, a, b, count, dtype);
    case ReduceOp::kMax: return dispatchType<Max>(out, a, b, count, dtype);
    case ReduceOp::kAvg: break;
  }
  DTRAIN_THROW(Error, "unreachable reduce op");
}

void divide(void* buf, size_t count, DType dtype, int divisor) {
  if (divisor <= 1) return;
  switch (dtype) {
    case DType::kFloat32: return divideT<Plain<float>>(buf, count, divisor);
    case DType::kFloat64: return divideT<Plain<double>>(buf, count, divisor);
    case DType::kInt32: return divideT<Plain<int32_t>>(buf, count, divisor);
    case DType::kInt64: return divideT<Plain<int64_t>>(buf, count, divisor);
    case DType::kBFloat16:
#if DTRAIN_COMM_F16C
      return divideBf16(buf, count, divisor);
#else
      return divideT<BF16>(buf, count, divisor);
#endif
    case DType::kFloat16:
#if DTRAIN_COMM_F16C
      return divideFp16(buf, count, divisor);
#else
      return divideT<FP16>(buf, count, divisor);
#endif
    default: break;
  }
  DTRAIN_THROW(Error, "divide: dtype {} is not supported by the collectives", dtypeName(dtype));
}

void reduceMany(void* out, void* out2, const void* const* srcs, int nsrc, size_t count, DType dtype, ReduceOp op,
                int divisor) {
  DTRAIN_CHECK(nsrc >= 1, "reduceMany needs at least one source");
  const size_t esz = dtypeSize(dtype);
  // 4 KiB blocks: the output block and the sources' blocks stay in L1 across the nsrc-1 passes.
  const size_t block = 4096 / esz;
  auto* o = static_cast<char*>(out);
  auto* o2 = static_cast<char*>(out2);
  for (size_t first = 0; first < count; first += block) {
    const size_t n = std::min(block, count - first);
    const size_t off = first * esz;
    char* dst = o + off;
    const auto* s0 = static_cast<const char*>(srcs[0]) + off;
    if (nsrc == 1) {
      if (dst != s0) std::memcpy(dst, s0, n * esz);
    } else {
      reduce2(dst, s0, static_cast<const char*>(srcs[1]) + off, n, dtype, op);
      for (int k = 2; k < nsrc; ++k) reduce2(dst, dst, static_cast<const char*>(srcs[k]) + off, n, dtype, op);
    }
    if (divisor > 1) divide(dst, n, dtype, divisor);
    if (o2 != nullptr) std::memcpy(o2 + off, dst, n * esz);
  }
}

}  // namespace dtrain::comm
