// Reduction kernels: every dtype and op against a scalar reference, 16-bit rounding, integer wrap-around.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "lib/comm/reduce.h"
#include "lib/comm/types.h"
#include "lib/common/error.h"

using namespace dtrain;
using namespace dtrain::comm;

namespace {

// Reference combine on doubles (exact for the small integers used below).
double combine(double a, double b, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return a + b;
    case ReduceOp::kMin: return std::min(a, b);
    case ReduceOp::kMax: return std::max(a, b);
  }
  return 0;
}

void store(DType t, void* buf, size_t i, double v) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(buf)[i] = static_cast<float>(v); break;
    case DType::kFloat64: static_cast<double*>(buf)[i] = v; break;
    case DType::kInt32: static_cast<int32_t*>(buf)[i] = static_cast<int32_t>(v); break;
    case DType::kInt64: static_cast<int64_t*>(buf)[i] = static_cast<int64_t>(v); break;
    case DType::kBFloat16: static_cast<uint16_t*>(buf)[i] = floatToBf16(static_cast<float>(v)); break;
    case DType::kFloat16: static_cast<uint16_t*>(buf)[i] = floatToFp16(static_cast<float>(v)); break;
    default: FAIL("unsupported dtype");
  }
}

double load(DType t, const void* buf, size_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(buf)[i];
    case DType::kFloat64: return static_cast<const double*>(buf)[i];
    case DType::kInt32: return static_cast<const int32_t*>(buf)[i];
    case DType::kInt64: return static_cast<double>(static_cast<const int64_t*>(buf)[i]);
    case DType::kBFloat16: return bf16ToFloat(static_cast<const uint16_t*>(buf)[i]);
    case DType::kFloat16: return fp16ToFloat(static_cast<const uint16_t*>(buf)[i]);
    default: break;
  }
  return 0;
}

}  // namespace

TEST_CASE("reduce2 and reduceMany match a scalar reference for every dtype and op") {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> val(-20, 20);
  for (DType t : kSupportedDTypes) {
    for (ReduceOp op : kAllReduceOps) {
      CAPTURE(dtypeName(t));
      CAPTURE(reduceOpName(op));
      // 3000 elements: crosses reduceMany's 4 KiB blocks and the 8-lane fp16 path with a tail.
      const size_t n = 3001;
      const int nsrc = 5;
      std::vector<std::vector<char>> src(nsrc, std::vector<char>(n * dtypeSize(t)));
      for (auto& s : src)
        for (size_t i = 0; i < n; ++i) store(t, s.data(), i, val(rng));
      std::vector<char> out(n * dtypeSize(t)), out2(n * dtypeSize(t));
      reduce2(out.data(), src[0].data(), src[1].data(), n, t, op);
      for (size_t i = 0; i < n; ++i)
        REQUIRE(load(t, out.data(), i) == combine(load(t, src[0].data(), i), load(t, src[1].data(), i), op));
      std::vector<const void*> ptrs;
      for (auto& s : src) ptrs.push_back(s.data());
      const int divisor = op == ReduceOp::kAvg ? nsrc : 1;
      reduceMany(out.data(), out2.data(), ptrs.data(), nsrc, n, t, op, divisor);
      for (size_t i = 0; i < n; ++i) {
        double want = load(t, src[0].data(), i);
        for (int k = 1; k < nsrc; ++k) want = combine(want, load(t, src[static_cast<size_t>(k)].data(), i), op);
        if (op == ReduceOp::kAvg) {
          if (t == DType::kInt32 || t == DType::kInt64) {
            want = static_cast<double>(static_cast<int64_t>(want) / nsrc);
          } else {
            want /= nsrc;
          }
        }
        const double got = load(t, out.data(), i);
        const double tol = (t == DType::kBFloat16) ? std::abs(want) / 128 : (t == DType::kFloat16) ? std::abs(want) / 1024 : 1e-6;
        REQUIRE(std::abs(got - want) <= tol);
        REQUIRE(load(t, out2.data(), i) == got);
      }
    }
  }
}

TEST_CASE("reduceMany may write over its first source") {
  std::vector<float> a(5000, 1.0f), b(5000, 2.0f), c(5000, 3.0f);
  const void* srcs[] = {a.data(), b.data(), c.data()};
  reduceMany(a.data(), nullptr, srcs, 3, a.size(), DType::kFloat32, ReduceOp::kSum);
  for (float v : a) REQUIRE(v == 6.0f);
}

TEST_CASE("fp16 and bf16 conversions round to nearest even and keep specials") {
  CHECK(floatToFp16(1.0f) == 0x3c00);
  CHECK(fp16ToFloat(0x3c00) == 1.0f);
  CHECK(floatToFp16(65504.0f) == 0x7bff);
  CHECK(floatToFp16(65520.0f) == 0x7c00);  // rounds up to inf
  CHECK(floatToFp16(-std::numeric_limits<float>::infinity()) == 0xfc00);
  CHECK(std::isnan(fp16ToFloat(floatToFp16(std::nanf("")))));
  CHECK(fp16ToFloat(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(floatToFp16(std::ldexp(1.0f, -25)) == 0x0000);  // tie to even: down to zero
  CHECK(floatToFp16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);  // tie to even: stays 1.0
  CHECK(floatToFp16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);  // tie to even: up
  CHECK(floatToBf16(1.0f) == 0x3f80);
  CHECK(bf16ToFloat(0x3f80) == 1.0f);
  CHECK(floatToBf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);      // tie to even: down
  CHECK(floatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);  // tie to even: up
  CHECK(std::isnan(bf16ToFloat(floatToBf16(std::nanf("")))));
  // Every fp16 value survives a round trip through float.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0) continue;  // NaN payloads may change
    REQUIRE(floatToFp16(fp16ToFloat(static_cast<uint16_t>(h))) == h);
  }
}

TEST_CASE("vectorised fp16 sums agree with the scalar conversions bit for bit") {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> val(-1000.0f, 1000.0f);
  const size_t n = 1027;
  std::vector<uint16_t> a(n), b(n), out(n);
  for (size_t i = 0; i < n; ++i) {
    a[i] = floatToFp16(val(rng));
    b[i] = floatToFp16(val(rng) * 1e-3f);
  }
  reduce2(out.data(), a.data(), b.data(), n, DType::kFloat16, ReduceOp::kSum);
  for (size_t i = 0; i < n; ++i) REQUIRE(out[i] == floatToFp16(fp16ToFloat(a[i]) + fp16ToFloat(b[i])));
}

TEST_CASE("vectorised bf16 sums and divisions agree with the scalar conversions bit for bit") {
  std::mt19937 rng(13);
  std::uniform_real_distribution<float> val(-1000.0f, 1000.0f);
  const size_t n = 1029;
  std::vector<uint16_t> a(n), b(n), out(n);
  for (size_t i = 0; i < n; ++i) {
    a[i] = floatToBf16(val(rng));
    b[i] = floatToBf16(val(rng) * 1e-2f);
  }
  // Specials in the vector part: NaN, infinities, the largest finite value (its sum overflows to inf).
  a[3] = floatToBf16(std::nanf(""));
  a[4] = floatToBf16(std::numeric_limits<float>::infinity());
  a[5] = 0x7f7f;
  b[5] = 0x7f7f;
  reduce2(out.data(), a.data(), b.data(), n, DType::kBFloat16, ReduceOp::kSum);
  for (size_t i = 0; i < n; ++i) {
    const uint16_t want = floatToBf16(bf16ToFloat(a[i]) + bf16ToFloat(b[i]));
    if (std::isnan(bf16ToFloat(want))) {
      REQUIRE(std::isnan(bf16ToFloat(out[i])));
    } else {
      REQUIRE(out[i] == want);
    }
  }
  CHECK(out[5] == 0x7f80);  // overflow rounds to +inf
  std::vector<uint16_t> d = b;
  divide(d.data(), n, DType::kBFloat16, 3);
  for (size_t i = 0; i < n; ++i) REQUIRE(d[i] == floatToBf16(bf16ToFloat(b[i]) / 3.0f));
  std::vector<uint16_t> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = floatToFp16(val(rng));
  std::vector<uint16_t> hd = h;
  divide(hd.data(), n, DType::kFloat16, 7);
  for (size_t i = 0; i < n; ++i) REQUIRE(hd[i] == floatToFp16(fp16ToFloat(h[i]) / 7.0f));
}

TEST_CASE("integer sums wrap around instead of overflowing") {
  int32_t a[2] = {std::numeric_limits<int32_t>::max(), -5};
  int32_t b[2] = {1, 3};
  reduce2(a, a, b, 2, DType::kInt32, ReduceOp::kSum);
  CHECK(a[0] == std::numeric_limits<int32_t>::min());
  CHECK(a[1] == -2);
  int64_t c = 7;
  divide(&c, 1, DType::kInt64, 2);
  CHECK(c == 3);
}

TEST_CASE("dtype and op names parse back") {
  for (DType t : kSupportedDTypes) CHECK(parseDType(dtypeName(t)) == t);
  for (ReduceOp op : kAllReduceOps) CHECK(parseReduceOp(reduceOpName(op)) == op);
  CHECK(parseDType("bf16") == DType::kBFloat16);
  CHECK(parseDType("half") == DType::kFloat16);
  CHECK_FALSE(parseDType("complex64").has_value());
  // The collectives take exactly six of the common dtypes.
  for (DType t : kSupportedDTypes) CHECK(isSupported(t));
  CHECK_FALSE(isSupported(DType::kBool));
  CHECK_FALSE(isSupported(DType::kUInt8));
  CHECK_THROWS_WITH_AS(checkSupported(DType::kUInt64, "allreduce"), doctest::Contains("dtype uint64 is not supported"),
                       UsageError);
  CHECK_FALSE(parseReduceOp("prod").has_value());
}
